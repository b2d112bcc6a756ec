"""Choosing the next token from logits, the way transformers' generate() does for each stage.

Order as in generate(): repetition penalty and suppressed tokens first, then (when sampling)
temperature, top-k and top-p. Greedy is plain argmax after the first two, so a greedy engine and a
greedy `generate()` pick the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    greedy: bool
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0


class Sampler:
    """Stateless apart from the generator; one per stage so each can have its own settings."""

    def __init__(self, settings: SamplingSettings, suppress: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        self.settings = settings
        self.suppress = suppress  # (k,) long ids that are never chosen
        self.generator = generator

    def graph_safe(self) -> "Sampler":
        """The same sampler drawing from the default generator, which CUDA graphs can capture."""
        return Sampler(self.settings, self.suppress, generator=None)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None,
                 seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits: (vocab,) float. The repetition penalty looks at ids already produced in this
        reply, given as `history` (n,) long or as a `seen` (vocab,) bool mask (same result;
        the mask has a fixed shape, for CUDA graphs). Returns a 0-d long tensor (no host sync)."""
        s = self.settings
        scores = self._penalized(logits, seen, history)
        if s.greedy or s.temperature == 0.0:
            return scores.argmax()
        values, ids = self._candidates(scores)
        choice = torch.multinomial(values.softmax(-1), 1, generator=self.generator)  # (1,)
        return ids.index_select(0, choice)[0]  # not ids[tensor]: that would sync with the host

    def probabilities(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution `__call__` draws from when sampling, over the whole vocabulary."""
        values, ids = self._candidates(self._penalized(logits, seen))
        return torch.zeros_like(logits, dtype=torch.float).scatter(0, ids, values.softmax(-1))

    def _penalized(self, logits, seen=None, history=None) -> torch.Tensor:
        """Repetition penalty and suppressed ids, as float32 scores (vocab,)."""
        p = self.settings.repetition_penalty
        scores = logits.float()
        if p != 1.0:
            penalized = torch.where(scores < 0, scores * p, scores / p)
            if seen is not None:
                scores = torch.where(seen, penalized, scores)
            elif history is not None and history.numel():
                scores = scores.scatter(0, history, penalized.gather(0, history))
        if self.suppress is not None:
            scores = scores.index_fill(0, self.suppress, float("-inf"))
        return scores

    def _candidates(self, scores: torch.Tensor):
        """Temperature, top-k and top-p: (scores (n,) in descending order, -inf where dropped;
        their ids (n,)). With top-k only the k survivors are kept, already sorted by topk."""
        s = self.settings
        scores = scores / s.temperature
        if s.top_k and s.top_k < scores.numel():
            values, ids = torch.topk(scores, s.top_k)
        else:
            values, ids = torch.sort(scores, descending=True)
        if s.top_p < 1.0:
            probs = values.softmax(-1)
            before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
            # Keep the smallest prefix holding top_p of the mass, as transformers' TopP does.
            values = values.masked_fill(before >= s.top_p, float("-inf"))
        return values, ids
