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
        scores = logits.float()
        if s.repetition_penalty != 1.0:
            penalized = torch.where(scores < 0, scores * s.repetition_penalty,
                                    scores / s.repetition_penalty)
            if seen is not None:
                scores = torch.where(seen, penalized, scores)
            elif history is not None and history.numel():
                scores = scores.scatter(0, history, penalized.gather(0, history))
        if self.suppress is not None:
            scores = scores.index_fill(0, self.suppress, float("-inf"))
        if s.greedy or s.temperature == 0.0:
            return scores.argmax()
        scores = scores / s.temperature
        if s.top_k and s.top_k < scores.numel():
            kth = torch.topk(scores, s.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = cumulative <= (1 - s.top_p)
            # Always keep the most likely token (built, not assigned: CUDA graphs forbid the copy).
            drop_sorted = torch.cat([drop_sorted[:-1], drop_sorted.new_zeros(1)])
            drop = drop_sorted.scatter(0, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        probs = scores.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]
