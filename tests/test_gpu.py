"""The fast decoder where its CUDA-only parts run (compiled steps, CUDA graphs, one graph per
frame): the tiny checkpoint on the GPU against transformers' generate(), as the CPU fidelity
tests do it. Skipped without a CUDA GPU; run on one with `python -m pytest -q -m gpu`."""

from __future__ import annotations

import pytest
import torch

from .conftest import tiny_settings
from .fidelity import run_turn, user_audio
from .test_engine_fidelity import (
    assert_stage_timings_sane,
    assert_turns_match_reference,
    make_conversation,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_bundle(tiny_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from duplex_chat.model.loading import load_model

    return load_model(tiny_settings(tiny_checkpoint, device_map="cuda").qwen)


def test_fast_decoder_on_gpu_equals_generate(cuda_bundle, tiny_checkpoint):
    conv, settings = make_conversation(cuda_bundle, tiny_checkpoint, 2.0, decoder="fast",
                                       device_map="cuda")
    assert conv.talker._graphed  # the graph paths, not the CPU fallbacks
    assert_turns_match_reference(conv, settings, [(2.4, 2), (1.7, 3)])
    _, _, events = run_turn(conv, user_audio(1.5, seed=4), chunk=4000)  # timed by CUDA events
    assert_stage_timings_sane(events)


def test_decode_with_equals_forward(cuda_bundle):
    assert_decode_with_equals_forward(cuda_bundle.model.talker.model, torch.device("cuda"))


def assert_decode_with_equals_forward(lm, device: torch.device) -> None:
    """A stack's `decode_with` step gives what its one-token forward gives, across the 512-row
    bucket (on CUDA: the captured graph of a fn around the step against the stack's own)."""
    from duplex_chat.model.fast import FastStack

    a, b = FastStack(lm, 1200), FastStack(lm, 1200)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(520, lm.config.hidden_size, device=device, generator=generator)
    a.forward(x[:500])
    b.forward(x[:500])
    for i in range(500, 520):
        want, _ = a.forward(x[i:i + 1])
        got = b.decode_with("test", lambda step, e: step(e[None]).clone(), (x[i],))
        torch.testing.assert_close(got, want)
    assert a.length == b.length == 520
