"""The engine's sampler against transformers' own logits processors (what generate() applies)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from duplex_chat.model.sampling import Sampler, SamplingSettings


def reference_probs(logits, history, temperature, top_k, top_p, penalty, suppress):
    ids = history[None]
    scores = logits[None].clone()
    for processor in (RepetitionPenaltyLogitsProcessor(penalty),
                      SuppressTokensLogitsProcessor(suppress.tolist(), device="cpu"),
                      TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k),
                      TopPLogitsWarper(top_p)):
        scores = processor(ids, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("ranked", [False, True], ids=["sorted", "ranked"])
@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (0.9, 50, 1.0, 1.05),  # the talker's defaults
    (1.0, 50, 0.8, 1.0),  # the code predictor's
    (0.7, 20, 0.8, 1.0),  # the thinker's
])
def test_distribution_equals_transformers(temperature, top_k, top_p, penalty, ranked):
    generator = torch.Generator().manual_seed(0)
    suppress = torch.arange(2000, 2048)
    sampler = Sampler(SamplingSettings(False, temperature, top_k, top_p, penalty), suppress,
                      ranked=ranked)
    for _ in range(20):
        logits = 3 * torch.randn(2048, generator=generator)
        history = torch.randint(0, 2048, (30,), generator=generator)
        seen = torch.zeros(2048, dtype=torch.bool).index_fill(0, history, True)
        expected = reference_probs(logits, history, temperature, top_k, top_p, penalty, suppress)
        assert torch.allclose(sampler.probabilities(logits, seen), expected, atol=1e-6)


def test_history_and_mask_penalize_alike():
    sampler = Sampler(SamplingSettings(True, repetition_penalty=1.3))
    logits = torch.tensor([2.0, -1.0, 1.9, 0.5])
    history = torch.tensor([0, 0])
    seen = torch.tensor([True, False, False, False])
    assert int(sampler(logits, history=history)) == int(sampler(logits, seen=seen)) == 2
    assert int(sampler(logits)) == 0


def test_ranking_breaks_ties_like_a_stable_sort():
    sampler = Sampler(SamplingSettings(False, 1.0, 2, 1.0), ranked=True)
    probs = sampler.probabilities(torch.tensor([1.0, 3.0, 3.0, 3.0, -2.0]))
    assert probs.tolist() == [0.0, 0.5, 0.5, 0.0, 0.0]  # of three equal best, the first two


@pytest.mark.parametrize("ranked", [False, True], ids=["sorted", "ranked"])
def test_draws_follow_the_distribution(ranked):
    sampler = Sampler(SamplingSettings(False, 1.0, 3, 1.0), generator=torch.Generator().manual_seed(1),
                      ranked=ranked)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = torch.stack([sampler(logits) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq[3] == 0  # outside the top 3
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
