"""Shared fixtures: one tiny random Qwen3-Omni checkpoint per test session, loaded through the
same path as a real one."""

from __future__ import annotations

import pytest
import torch

from duplex_chat.config import load_settings
from duplex_chat.model.tiny import build_tiny_checkpoint

# Two cores in CI: more threads than that only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny checkpoint directory (built once, ~6 s)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-omni"))


def tiny_settings(checkpoint, **qwen):
    """Settings for the tiny checkpoint on the CPU in float32, greedy unless told otherwise."""
    overrides = {"qwen.model_id": str(checkpoint), "qwen.device_map": "cpu",
                 "qwen.torch_dtype": "float32", "qwen.greedy": True}
    overrides.update({f"qwen.{k}": v for k, v in qwen.items()})
    return load_settings(overrides=overrides, environ={})


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint):
    """The tiny checkpoint loaded through `load_model` (session-wide: treat as read-only)."""
    from duplex_chat.model.loading import load_model

    return load_model(tiny_settings(tiny_checkpoint).qwen)
