"""Shared fixtures: tiny random Qwen3-Omni checkpoints, one per shape and test session, loaded
through the same path as a real one."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels (model/quant/kernels.py) run through Triton's interpreter, so
# their tests and the fast decoder's quantized path test the kernels themselves. The variable
# must be set before triton is first imported (torch's inductor imports it), so here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from duplex_chat.config import load_settings  # noqa: E402
from duplex_chat.model.tiny import SHAPES, build_tiny_checkpoint  # noqa: E402

# Two cores in CI: more threads than that only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def exact_float32_on_cuda(request):
    """GPU tests hold the engine to generate() in float32, so they run in float32 for real:
    cuDNN's default TF32 convolutions (10-bit mantissas) round differently for a vocoder or
    audio encoder fed in chunks than for one fed in one piece, and cuDNN may pick a
    differently rounding algorithm per shape. Off for the test, back afterwards."""
    if request.node.get_closest_marker("gpu") is None or not torch.cuda.is_available():
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark
    cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = (
        False, False, True, False)
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """shape -> (checkpoint directory, loaded bundle), each built on first use (~3 s) and kept
    for the session (treat the bundles as read-only)."""
    from duplex_chat.model.loading import load_model

    built: dict[str, tuple] = {}

    def get(shape: str):
        if shape not in built:
            directory = build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{shape}"), shape=shape)
            built[shape] = directory, load_model(tiny_settings(directory).qwen)
        return built[shape]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_models):
    """The default ("small") tiny checkpoint's directory."""
    return tiny_models("small")[0]


@pytest.fixture(scope="session")
def tiny_bundle(tiny_models):
    """The default tiny checkpoint loaded through `load_model`."""
    return tiny_models("small")[1]


@pytest.fixture(scope="session", params=sorted(SHAPES))
def any_tiny(request, tiny_models):
    """(checkpoint, bundle) of each tiny shape in turn: tests that use it run on both."""
    return tiny_models(request.param)


def tiny_settings(checkpoint, **qwen):
    """Settings for the tiny checkpoint on the CPU in float32, greedy unless told otherwise."""
    overrides = {"qwen.model_id": str(checkpoint), "qwen.device_map": "cpu",
                 "qwen.torch_dtype": "float32", "qwen.greedy": True}
    overrides.update({f"qwen.{k}": v for k, v in qwen.items()})
    return load_settings(overrides=overrides, environ={})
