"""`duplex-chat check` and the model footprint it relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from duplex_chat.audio.devices import DeviceInfo
from duplex_chat.cli import check
from duplex_chat.cli.app import app
from duplex_chat.config import load_settings
from duplex_chat.model import footprint
from duplex_chat.model.checkpoint import SAFETENSORS_INDEX
from duplex_chat.model.reference_config import release_config_dict
from duplex_chat.model.tiny import build_tiny_model, tiny_config_dict

GIB = 1024**3
RELEASE_TOTAL = 35.26e9  # DESIGN.md


def _real_counts(model) -> dict[str, int]:
    def n(module):
        return sum(p.numel() for p in module.parameters())

    thinker = model.thinker
    return {
        "thinker": n(thinker.model.language_model) + n(thinker.lm_head),
        "audio_encoder": n(thinker.model.audio_tower),
        "vision": n(thinker.model.visual),
        "talker": n(model.talker) - n(model.talker.code_predictor),
        "code_predictor": n(model.talker.code_predictor),
        "code2wav": n(model.code2wav),
    }


# ------------------------------------------------------------------------------- footprint


def test_footprint_equals_the_tiny_models_real_counts():
    model = build_tiny_model()
    assert footprint.part_params(tiny_config_dict()) == _real_counts(model)
    assert sum(footprint.part_params(tiny_config_dict()).values()) == sum(
        p.numel() for p in model.parameters())


def test_footprint_follows_dense_layers_tied_heads_and_biases():
    """Branches the tiny config does not take: a dense thinker layer, tied heads, biased attention."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    cfg = tiny_config_dict()
    cfg["thinker_config"]["text_config"]["mlp_only_layers"] = [0]
    cfg["thinker_config"]["tie_word_embeddings"] = True
    cfg["talker_config"]["tie_word_embeddings"] = True
    cfg["code2wav_config"]["attention_bias"] = True
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**cfg))
    real = _real_counts(model)
    real["thinker"] = sum(p.numel() for p in model.thinker.model.language_model.parameters())
    assert footprint.part_params(cfg) == real


def test_release_total_matches_design():
    params = footprint.part_params(release_config_dict())
    assert sum(params.values()) == pytest.approx(RELEASE_TOTAL, rel=0.01)
    assert params["thinker"] == pytest.approx(30.2e9, rel=0.02)
    assert params["audio_encoder"] == pytest.approx(0.65e9, rel=0.02)


def test_release_gpu_bytes():
    cfg = release_config_dict()
    weights = footprint.weight_bytes(cfg, "bfloat16", False)
    assert weights / GIB == pytest.approx(64.7, abs=0.1)  # DESIGN.md: without vision, bf16
    assert footprint.weight_bytes(cfg, "float32", False) == 2 * weights
    assert footprint.weight_bytes(cfg, "auto", False) == weights  # the release config is bf16
    int8 = footprint.weight_bytes(cfg, "bfloat16", True)
    experts = sum(c.experts for c in footprint.part_counts(cfg).values())
    assert experts * 2 < int8 < weights  # the fused experts stay 16-bit under bitsandbytes
    from duplex_chat.model.fast import PAD_ROOM

    assert footprint.FAST_PAD_ROWS == PAD_ROOM  # footprint's copy, kept free of torch
    default = footprint.cache_for(load_settings(environ={}).qwen)
    assert default == (16384 + 512 + 64, 16384 + 512 + 64 + 1500 + 16)  # 120 s replies
    margin = footprint.gpu_bytes(cfg, "bfloat16", False, default) - weights
    rows = (default[0] + footprint.FAST_PAD_ROWS, default[1] + footprint.FAST_PAD_ROWS)
    kv = (96 * rows[0] + 20 * rows[1]) * 1024  # thinker 96 KiB, talker 20 KiB per position
    assert margin == kv + footprint.ACTIVATION_WORKSPACE_BYTES
    # the largest context the settings allow: 6.1 GiB of thinker cache, 74 GiB in all
    longest = footprint.cache_positions(65536, 512, 120.0)
    assert footprint.gpu_bytes(cfg, "bfloat16", False, longest) / GIB == pytest.approx(74.0, abs=0.1)


def _fake_hub_repo(cache, model_id, shards, present):
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "blobs").mkdir()
    (repo / "blobs" / "blob1").write_bytes(b"x" * 1000)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe"}))
    index = {"weight_map": {f"w{i}": s for i, s in enumerate(shards)}}
    (snapshot / SAFETENSORS_INDEX).write_text(json.dumps(index))
    for shard in present:
        (snapshot / shard).write_bytes(b"")


def test_hub_cache_status_reads_only_the_disk(tmp_path):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    _fake_hub_repo(tmp_path, "org/complete", shards, shards)
    _fake_hub_repo(tmp_path, "org/partial", shards, shards[:1])
    full = footprint.hub_cache_status("org/complete", cache_dir=tmp_path)
    assert (full.kind, full.present, full.size_bytes) == ("hub", True, 1000)
    assert full.config() == {"model_type": "qwen3_omni_moe"}
    partial = footprint.hub_cache_status("org/partial", cache_dir=tmp_path)
    assert not partial.present and partial.missing == (shards[1],)
    absent = footprint.hub_cache_status("org/absent", cache_dir=tmp_path)
    assert not absent.present and "not in the Hugging Face cache" in absent.detail
    missing_dir = footprint.hub_cache_status(str(tmp_path / "nowhere"))
    assert missing_dir.kind == "local" and not missing_dir.present


# ------------------------------------------------------------------------------ fit decisions


def _fit(gpu_free_gib: float, gpu_total_gib: float, **overrides):
    settings = load_settings(overrides={f"qwen.{k}": v for k, v in overrides.items()}, environ={})
    gpu = check.GpuState(True, ("Fake GPU",), ((int(gpu_free_gib * GIB), int(gpu_total_gib * GIB)),))
    need = footprint.gpu_bytes(release_config_dict(), settings.qwen.torch_dtype,
                               settings.qwen.load_in_8bit, footprint.cache_for(settings.qwen))
    return check._fit_row(settings, gpu, need, release_config_dict())


def test_fit_on_an_80gb_card():
    assert _fit(79, 79.2).status == check.OK
    too_big = _fit(79, 79.2, torch_dtype="float32")
    assert too_big.status == check.FAIL and "--dtype bfloat16" in too_big.fix


def test_fit_fails_on_a_small_card_with_what_to_try():
    row = _fit(22, 24)
    assert row.status == check.FAIL and "GiB" in row.fix and "80 GB" in row.fix


def test_fit_fails_when_others_hold_the_memory():
    row = _fit(30, 79.2)
    assert row.status == check.FAIL and "nvidia-smi" in row.fix


def test_devices_table_renders():
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(check.devices_table([DeviceInfo(3, "USB [Mic]", "ALSA", 1, 0, 48000.0, True, False)]))
    text = console.export_text()
    assert "USB [Mic]" in text and "48000 Hz" in text and "input" in text


# ---------------------------------------------------------------------------------- the command


@pytest.fixture
def tiny_dir(tiny_checkpoint):
    """The session's tiny checkpoint (conftest.py), passed to check as --model DIR."""
    return tiny_checkpoint


def _check_json(args, env=None):
    result = CliRunner().invoke(app, ["check", "--json", *args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def _row(report, name):
    return next(r for r in report["checks"] if r["name"] == name)


def test_check_json_sections_and_sources(tiny_dir):
    code, report = _check_json(["--model", str(tiny_dir), "--device-map", "cuda"],
                               env={"SCA_QWEN_TORCH_DTYPE": "float16"})
    assert set(report) >= {"ok", "checks", "config"}
    assert {r["section"] for r in report["checks"]} >= {"system", "model", "audio"}
    assert all(r["status"] in ("ok", "warn", "fail") for r in report["checks"])
    config = report["config"]
    assert config["qwen.torch_dtype"] == {"value": "float16",
                                          "source": "environment SCA_QWEN_TORCH_DTYPE"}
    assert config["qwen.device_map"]["source"] == "flag --device-map"
    assert config["vad.threshold"]["source"] == "default"
    checkpoint = _row(report, "checkpoint")
    assert checkpoint["status"] == "ok" and "local directory" in checkpoint["detail"]
    assert "float16" in _row(report, "size")["detail"]
    if not torch.cuda.is_available():
        assert code == 1 and not report["ok"]
        assert _row(report, "CUDA")["status"] == "fail"


def test_dtype_flag_beats_the_environment(tiny_dir):
    _, report = _check_json(["--model", str(tiny_dir), "--dtype", "float32"],
                            env={"SCA_QWEN_TORCH_DTYPE": "float16"})
    entry = report["config"]["qwen.torch_dtype"]
    assert entry["value"] == "float32" and entry["source"].startswith("flag --")


def test_missing_model_dir_is_a_failure(tmp_path):
    code, report = _check_json(["--model", str(tmp_path / "no-such-model")])
    assert code == 1
    row = _row(report, "checkpoint")
    assert row["status"] == "fail" and row["fix"]


def test_human_output_has_tables(tiny_dir):
    result = CliRunner().invoke(app, ["check", "--model", str(tiny_dir)])
    assert "duplex-chat check" in result.stdout and "Effective configuration" in result.stdout
    assert result.exit_code in (0, 1)


def test_bad_config_value_is_one_clean_line():
    env = dict(os.environ, SCA_QWEN_TORCH_DTYPE="float8")
    result = subprocess.run([sys.executable, "-m", "duplex_chat.cli.app", "check", "--json"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "qwen.torch_dtype" in lines[0] and "float8" in lines[0]


@pytest.mark.parametrize("breakage", ["no config", "not json", "other model", "no weights",
                                      "a shard missing"])
def test_check_and_loading_judge_a_directory_by_one_rule(tmp_path, breakage):
    """`check` never calls ready what loading refuses: both say the same sentence."""
    from duplex_chat.config import DuplexError
    from duplex_chat.model.loading import resolve_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe"}))
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (tmp_path / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": dict(zip("ab", shards))}))
    for shard in shards:
        (tmp_path / shard).write_bytes(b"")
    if breakage == "no config":
        (tmp_path / "config.json").unlink()
    elif breakage == "not json":
        (tmp_path / "config.json").write_text("{")
    elif breakage == "other model":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif breakage == "no weights":
        for shard in shards:
            (tmp_path / shard).unlink()
        (tmp_path / SAFETENSORS_INDEX).unlink()
    else:
        (tmp_path / shards[1]).unlink()
    status = footprint.hub_cache_status(str(tmp_path))
    with pytest.raises(DuplexError) as refused:
        resolve_checkpoint(str(tmp_path))
    assert not status.present and status.detail == str(refused.value)
