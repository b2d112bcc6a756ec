"""Choosing the next token from logits, the way transformers' generate() does for each stage.

Order as in generate(): repetition penalty and suppressed tokens first, then (when sampling)
temperature, top-k and top-p. Greedy is plain argmax after the first two, so a greedy engine and a
greedy `generate()` pick the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# On the GPU, vocabularies up to this size (codec: 2048, 3072) rank their candidates by pairwise
# comparison: (V, V) elementwise work that a compiler fuses into one reduction, where a sort or
# topk is a separate kernel of 10-25 us (measured on an H200: a 2048-way sort took 22 us).
RANK_LIMIT = 4096


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
                 generator: torch.Generator | None = None, ranked: bool | None = None):
        self.settings = settings
        self.suppress = suppress  # (k,) long ids that are never chosen
        self.generator = generator
        # How top-k/top-p find their candidates: ranked (fusible, see `_ranked`) or sorted.
        # None: ranked for small vocabularies on the GPU.
        self.ranked = ranked

    def graph_safe(self) -> "Sampler":
        """The same sampler drawing from the default generator, which CUDA graphs can capture."""
        return Sampler(self.settings, self.suppress, generator=None, ranked=self.ranked)

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
        # Exponential race: argmax of p / Exp(1) noise is a draw from p, like multinomial, but in
        # elementwise ops and one reduction that a compiler fuses (multinomial is several kernels).
        probs = values.softmax(-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        # Noise can be exactly 0: keep dropped candidates (p = 0) out of the race even then.
        choice = torch.where(probs > 0, probs / noise, -1.0).argmax()
        if ids is None:
            return choice
        return ids.index_select(0, choice.view(1))[0]  # not ids[tensor]: no host sync

    def probabilities(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution `__call__` draws from when sampling, over the whole vocabulary."""
        values, ids = self._candidates(self._penalized(logits, seen))
        if ids is None:
            return values.softmax(-1)
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
        """Temperature, top-k and top-p: (scores, -inf where dropped; their ids). Sorted or topk'd
        candidates come in descending order with their ids (n,); ranked ones stay in vocabulary
        order and the ids are None."""
        s = self.settings
        scores = scores / s.temperature
        ranked = self.ranked
        if ranked is None:
            ranked = scores.is_cuda and scores.numel() <= RANK_LIMIT
        if ranked:
            return _ranked(scores, s.top_k, s.top_p), None
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


def _ranked(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k and top-p without sorting: scores (V,) -> the same with -inf where dropped.

    rank[i] = how many ids come before i in descending order (ties broken by id, as a stable
    sort would); the mass before i is the sum of the probabilities of lower ranks. Both are
    (V, V) comparisons reduced over one axis."""
    ids = torch.arange(scores.numel(), device=scores.device)
    ahead = (scores[None, :] > scores[:, None]) | (
        (scores[None, :] == scores[:, None]) & (ids[None, :] < ids[:, None]))  # (V, V): j before i
    rank = ahead.sum(-1)  # (V,)
    if top_k and top_k < scores.numel():
        scores = scores.masked_fill(rank >= top_k, float("-inf"))
    if top_p < 1.0:
        probs = scores.softmax(-1)
        before = torch.where(rank[None, :] < rank[:, None], probs[None, :], 0.0).sum(-1)
        scores = scores.masked_fill(before >= top_p, float("-inf"))
    return scores
