"""Loading a checkpoint through `load_model`; each user-caused failure is one clear DuplexError."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from duplex_chat.config import DuplexError
from duplex_chat.model.loading import load_model, resolve_dtype
from duplex_chat.model.tiny import SPECIAL_TOKENS

from .conftest import tiny_settings

GIB = 1024**3
HUB_ID = "Qwen/Qwen3-Omni-30B-A3B-Instruct"


def load_error(checkpoint, **qwen) -> str:
    """The one-line message of the DuplexError that loading with these settings raises."""
    with pytest.raises(DuplexError) as info:
        load_model(tiny_settings(checkpoint, **qwen).qwen)
    message = str(info.value)
    assert "\n" not in message
    return message


def pretend_gpus(monkeypatch, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ------------------------------------------------------------------------------ real load


def test_tiny_checkpoint_loads_for_voice(tiny_bundle, tiny_checkpoint):
    model = tiny_bundle.model
    assert type(model).__name__ == "Qwen3OmniMoeForConditionalGeneration"
    assert model.thinker.model.visual is None
    assert not any(type(m).__name__.endswith("VisionEncoder") for m in model.modules())
    assert not any(m.training for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert tiny_bundle.device == torch.device("cpu") and tiny_bundle.dtype == torch.float32
    assert tiny_bundle.source == str(tiny_checkpoint)
    assert tiny_bundle.config.model_type == "qwen3_omni_moe"
    assert tiny_bundle.load_seconds > 0
    # Voice parts are all there.
    assert model.talker is not None and model.code2wav is not None


def test_tokenizer_knows_the_chat_tokens(tiny_bundle):
    tokenizer = tiny_bundle.tokenizer
    for token, token_id in SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    ids = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == SPECIAL_TOKENS["<|im_start|>"]
    assert tokenizer.decode(ids) == "<|im_start|>user\n"


def test_progress_messages(tiny_checkpoint):
    messages = []
    load_model(tiny_settings(tiny_checkpoint).qwen, progress=messages.append)
    assert any("loading" in m and "float32" in m for m in messages)
    assert messages[-1].startswith("model ready in")


def test_auto_dtype_follows_the_checkpoint():
    assert resolve_dtype("auto", {"dtype": "bfloat16"}) == torch.bfloat16
    assert resolve_dtype("auto", {"torch_dtype": "float16"}) == torch.float16
    assert resolve_dtype("float32", {"dtype": "bfloat16"}) == torch.float32


# ----------------------------------------------------------------------- bad checkpoints


def test_path_does_not_exist(tmp_path):
    message = load_error(tmp_path / "no-such-model")
    assert "no-such-model" in message and "does not exist" in message


def test_path_is_a_file(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    assert "directory" in load_error(tmp_path / "weights.safetensors")


def test_directory_without_config(tmp_path):
    message = load_error(tmp_path)
    assert "not a Qwen3-Omni checkpoint" in message and "config.json" in message


def test_config_of_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    message = load_error(tmp_path)
    assert "'llama'" in message and "qwen3_omni_moe" in message


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "not valid JSON" in load_error(tmp_path)


def test_config_without_weights(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    message = load_error(tmp_path)
    assert "no weight files" in message


# ------------------------------------------------------------------------------ the hub


def test_hub_id_not_cached_and_hub_unreachable(monkeypatch, tiny_checkpoint):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake_snapshot_download(repo_id, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    progress = []
    with pytest.raises(DuplexError) as info:
        load_model(tiny_settings(tiny_checkpoint, model_id=HUB_ID).qwen, progress=progress.append)
    message = str(info.value)
    assert calls == [True, False]  # the cache first, then the network
    assert HUB_ID in message and "not in the local cache" in message
    assert "--model" in message and "SCA_QWEN_MODEL_ID" in message and "directory" in message
    assert any("downloading" in m for m in progress)


def test_hub_id_found_in_cache_is_used_without_network(monkeypatch, tiny_checkpoint):
    import huggingface_hub

    def fake_snapshot_download(repo_id, local_files_only=False, **kwargs):
        assert local_files_only, "the network must not be tried when the cache has the model"
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    bundle = load_model(tiny_settings(tiny_checkpoint, model_id=HUB_ID).qwen)
    assert bundle.source == str(tiny_checkpoint)


# ---------------------------------------------------------------------------- devices


def test_cuda_requested_without_cuda(monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = load_error(tiny_checkpoint, device_map="cuda")
    assert "CUDA" in message and "no CUDA GPU" in message and "--device-map cpu" in message


def test_gpu_index_that_does_not_exist(monkeypatch, tiny_checkpoint):
    pretend_gpus(monkeypatch, count=1)
    message = load_error(tiny_checkpoint, device_map="cuda:3")
    assert "cuda:3" in message and "1 GPU" in message


def test_device_that_is_not_a_device(tiny_checkpoint):
    message = load_error(tiny_checkpoint, device_map="gpu")
    assert "'gpu'" in message and "cuda, cuda:N, cpu or auto" in message


def test_8bit_without_bitsandbytes(monkeypatch, tiny_checkpoint):
    pretend_gpus(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails even where installed
    message = load_error(tiny_checkpoint, device_map="cuda", load_in_8bit=True)
    assert "bitsandbytes" in message and "duplex-chat[int8]" in message


def test_out_of_memory_says_needed_free_and_what_to_try(monkeypatch, tiny_checkpoint):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    pretend_gpus(monkeypatch)
    seen = {}

    def fake_from_pretrained(source, **kwargs):
        seen.update(kwargs)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Qwen3OmniMoeForConditionalGeneration, "from_pretrained",
                        fake_from_pretrained)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GIB, 80 * GIB))
    message = load_error(tiny_checkpoint, device_map="cuda")
    assert "Out of GPU memory" in message
    assert "needs about 2 GiB" in message  # tiny weights + the fixed working margin
    assert "3.0 GiB free of 80.0 GiB" in message
    assert "--quantize int8" in message and "int4" in message and "larger GPU" in message
    assert "smallest common card it fits: RTX 3090" in message  # 2 GiB
    # Everything was placed on the GPU but the vision tower, which waits on the CPU to be dropped.
    placement = seen["device_map"]
    assert placement["thinker.model.visual"] == "cpu"
    assert set(placement.values()) == {"cpu", "cuda:0"}
    assert placement["talker"] == "cuda:0" and placement["code2wav"] == "cuda:0"


def test_8bit_when_auto_finds_no_gpu(monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = load_error(tiny_checkpoint, device_map="auto", load_in_8bit=True)
    assert "load_in_8bit" in message and "CUDA GPU" in message and "cpu" in message


def test_tiny_model_is_the_same_every_time():
    """Every weight comes from the seed, none from uninitialised memory or left at zero
    (transformers leaves the talker's router at zeros and its experts empty; `init_talker_moe`
    draws them)."""
    from duplex_chat.model.tiny import build_tiny_model

    first, second = build_tiny_model().state_dict(), build_tiny_model().state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    for part in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
        drawn = first[f"talker.model.layers.0.mlp.{part}"]
        assert 0.015 < drawn.std() < 0.025, part  # initializer_range 0.02, like the thinker's
