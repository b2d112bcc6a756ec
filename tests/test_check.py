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
    _assert_rounded_rule(model, cfg)
    assert footprint.part_counts(cfg)["thinker"].dense_mlp > 0


def _matrices(param) -> dict[tuple[int, int], int]:
    """(n_in, n_out) -> how many: a 2-D weight is one matrix, a fused [E, out, in] tensor E."""
    *experts, n_out, n_in = param.shape
    return {(n_in, n_out): experts[0] if experts else 1}


def _assert_rounded_rule(model, cfg):
    """footprint's analytic rounded counts and shapes = what ROUNDED_AT_LOAD picks in a model."""
    rounded = [(n, p) for n, p in model.named_parameters() if footprint.rounded_at_load(n)]
    counts = footprint.part_counts(cfg)
    rounded_params = counts["thinker"].rounded + counts["talker"].rounded
    assert sum(p.numel() for _, p in rounded) == rounded_params
    shapes: dict[tuple[int, int], int] = {}
    for _, p in rounded:
        for key, n in _matrices(p).items():
            shapes[key] = shapes.get(key, 0) + n
    expected = footprint._merge_shapes(counts["thinker"].rounded_shapes,
                                       counts["talker"].rounded_shapes)
    assert tuple(sorted((i, o, n) for (i, o), n in shapes.items())) == expected
    names = {n for n, _ in rounded}
    assert not any(".mlp.gate.weight" in n or "shared_expert_gate" in n or "code_predictor" in n
                   or "embed" in n or "lm_head" in n or "codec_head" in n or "projection" in n
                   for n in names)


def test_rounding_rule_on_the_tiny_model():
    """What quantize-at-load rounds: attention, experts, the talker's shared expert; no more."""
    model = build_tiny_model()
    _assert_rounded_rule(model, tiny_config_dict())
    names = {n for n, _ in model.named_parameters() if footprint.rounded_at_load(n)}
    layer = "thinker.model.language_model.layers.0."
    assert {layer + "self_attn.q_proj.weight", layer + "mlp.experts.gate_up_proj",
            layer + "mlp.experts.down_proj",
            "talker.model.layers.0.mlp.shared_expert.down_proj.weight"} <= names
    assert not footprint.rounded_at_load(layer + "mlp.gate.weight")
    predictor = "talker.code_predictor.model.layers.0."
    assert not footprint.rounded_at_load(predictor + "self_attn.q_proj.weight")


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


# -------------------------------------------------------------------- quantized footprints
#
# Hand computation from the release config (model/release_config.json = the reference config in
# ../shared/reference): per layer, the weights quantize-at-load rounds and their output rows.
#   thinker (48 layers; hidden 2048, 32 q / 4 kv heads of 128, 128 experts of 768):
#     attention 2048*4096*2 + 2048*512*2 = 18 874 368 weights, rows 4096+512+512+2048 = 7 168
#     experts 128 * 3 * 2048 * 768 = 603 979 776 weights, rows 128 * (2*768 + 2048) = 458 752
#   talker (20 layers; hidden 1024, 16 q / 2 kv heads of 128, 128 experts of 384, shared 768):
#     attention 1024*2048*2 + 1024*256*2 = 4 718 592, rows 2048+256+256+1024 = 3 584
#     experts 128 * 3 * 1024 * 384 = 150 994 944, rows 128 * (2*384 + 1024) = 229 376
#     shared expert 3 * 1024 * 768 = 2 359 296, rows 768 + 768 + 1024 = 2 560
# Every input width (2048, 4096, 768, 1024, 384) is a multiple of 128, so int4 has exactly one
# scale per 128 weights.
ROUNDED = 48 * (18_874_368 + 603_979_776) + 20 * (4_718_592 + 150_994_944 + 2_359_296)
ROWS = 48 * (7_168 + 458_752) + 20 * (3_584 + 229_376 + 2_560)
HAND = {  # bytes of the rounded weights per mode
    "int8": ROUNDED + 2 * ROWS,  # int8 + a 16-bit scale per row
    "int4": ROUNDED // 2 + 2 * (ROUNDED // 128),  # 4 bits + a 16-bit scale per 128 weights
    "fp8": ROUNDED + 4 * ROWS,  # float8 + a float32 scale per row
}
DEFAULT_CACHE = footprint.cache_positions(16384, 512, 120.0)


def _voice_params(cfg) -> int:
    return sum(v for k, v in footprint.part_params(cfg).items() if k != "vision")


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_release_weights_per_mode_equal_the_hand_computation(mode):
    cfg = release_config_dict()
    counts = footprint.part_counts(cfg)
    assert counts["thinker"].rounded + counts["talker"].rounded == ROUNDED
    kept = 2 * (_voice_params(cfg) - ROUNDED)  # everything else stays bf16
    assert footprint.weight_bytes(cfg, "bfloat16", False, mode) == HAND[mode] + kept


def test_release_estimates_per_mode():
    """int4 < fp8 ~ int8 < bf16; the figures README's memory table gives."""
    cfg = release_config_dict()
    weights = {m: footprint.weight_bytes(cfg, "bfloat16", False, m) / GIB
               for m in footprint.QUANTIZE_MODES}
    total = {m: footprint.gpu_bytes(cfg, "bfloat16", False, DEFAULT_CACHE, m) / GIB
             for m in footprint.QUANTIZE_MODES}
    assert weights["int4"] < weights["int8"] < weights["fp8"] < weights["none"]
    assert weights["fp8"] - weights["int8"] < 0.1  # only the scales differ (fp32 vs 16-bit)
    expected = {"none": (64.7, 68.6), "int8": (33.9, 37.8), "int4": (19.0, 22.9),
                "fp8": (34.0, 37.9)}
    for mode, (w, t) in expected.items():
        assert (weights[mode], total[mode]) == (pytest.approx(w, abs=0.05),
                                                pytest.approx(t, abs=0.05)), mode
    # the margin does not depend on the mode
    assert len({round(total[m] - weights[m], 6) for m in total}) == 1
    # quantize-at-load's transient (one thinker layer in bf16) fits in the 2 GiB workspace
    transient = footprint.largest_rounded_layer_bytes(cfg, "bfloat16")
    assert transient / GIB == pytest.approx(1.16, abs=0.01)
    assert transient < footprint.ACTIVATION_WORKSPACE_BYTES


def test_int4_on_a_24gb_card_at_the_context_check_proposes():
    cfg = release_config_dict()
    card = footprint.CARDS[1]
    assert card.name == "RTX 4090" and footprint.card_budget(card) / GIB == pytest.approx(22.1)
    default = footprint.gpu_bytes(cfg, "bfloat16", False, DEFAULT_CACHE, "int4")
    assert card not in footprint.fits_cards(default)  # 22.9 GiB at the default 16384 tokens
    assert [c.box_gb for c in footprint.fits_cards(default)][:1] == [32]
    context = footprint.context_that_fits(cfg, "bfloat16", footprint.card_budget(card), 512,
                                          120.0, "int4")
    assert context == 8192
    cache = footprint.cache_positions(context, 512, 120.0)
    need = footprint.gpu_bytes(cfg, "bfloat16", False, cache, "int4")
    assert need / GIB < 22.0 and card in footprint.fits_cards(need)  # issue 19: <= 22 GiB
    # 2048 tokens more would not fit the card
    longer = footprint.cache_positions(context + footprint.CONTEXT_STEP, 512, 120.0)
    assert footprint.gpu_bytes(cfg, "bfloat16", False, longer, "int4") > footprint.card_budget(card)
    # no mode fits in 12 GiB; bf16 fits no card under 80 GB
    assert footprint.context_that_fits(cfg, "bfloat16", 12 * GIB, 512, 120.0, "int4") is None
    bf16 = footprint.gpu_bytes(cfg, "bfloat16", False, DEFAULT_CACHE)
    assert min(c.box_gb for c in footprint.fits_cards(bf16)) == 80


def test_modes_and_context_range_match_the_settings():
    from duplex_chat.config import DuplexError
    from duplex_chat.config import settings as config_settings

    assert footprint.QUANTIZE_MODES == config_settings.QUANTIZE_MODES
    low, high = footprint.CONTEXT_RANGE
    for value in (low, high):
        load_settings(overrides={"qwen.max_context_tokens": value}, environ={})
    for value in (low - 1, high + 1):
        with pytest.raises(DuplexError):
            load_settings(overrides={"qwen.max_context_tokens": value}, environ={})


def _ct_config(weights: dict, ignore: list[str]) -> dict:
    """A release config with a compressed-tensors quantization_config as llm-compressor writes."""
    cfg = release_config_dict()
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized" if weights["type"] == "float" else "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None}},
        "ignore": ignore, "quantization_status": "compressed"}
    return cfg


COMMUNITY_IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*talker.*", "re:.*audio_tower.*",
                    "re:.*visual.*", "re:.*code2wav.*"]


def test_prequantized_checkpoints_are_sized_from_their_config():
    """The community int4 AWQ (W4A16, group 32, asymmetric, talker bf16): ~29 GiB, a 32 GB card."""
    # in memory: 4 bits a weight, per 32 weights a bf16 scale and an int8 zero point
    awq = _ct_config({"num_bits": 4, "type": "int", "symmetric": False, "group_size": 32,
                      "strategy": "group"}, COMMUNITY_IGNORE)
    fmt = footprint.checkpoint_format(awq)
    assert (fmt.bits, fmt.group_size, fmt.zero_bits, fmt.talker) == (4, 32, 8, False)
    thinker = footprint.part_counts(awq)["thinker"].rounded
    hand = thinker // 2 + (thinker // 32) * 3 + 2 * (_voice_params(awq) - thinker)
    assert footprint.weight_bytes(awq, "auto", False) == hand
    need = footprint.gpu_bytes(awq, "auto", False, DEFAULT_CACHE)
    assert need / GIB == pytest.approx(29.4, abs=0.1) and need / GIB <= 30  # issue 19's target
    assert min(c.box_gb for c in footprint.fits_cards(need)) == 32
    # the checkpoint's own format wins over qwen.quantize
    assert footprint.gpu_bytes(awq, "auto", False, DEFAULT_CACHE, "int8") == need
    # a W4A16 with the talker quantized too, symmetric g128 = quantize-at-load's int4
    sym = _ct_config({"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128,
                      "strategy": "group"}, ["lm_head"])
    assert footprint.weight_bytes(sym, "auto", False) == footprint.weight_bytes(
        release_config_dict(), "bfloat16", False, "int4")
    fp8 = _ct_config({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
                     ["lm_head"])
    assert footprint.weight_bytes(fp8, "auto", False) == footprint.weight_bytes(
        release_config_dict(), "bfloat16", False, "fp8")
    block = _ct_config({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                        "block_structure": [128, 128]}, ["lm_head"])
    assert footprint.checkpoint_format(block).block == (128, 128)
    assert footprint.weight_bytes(block, "auto", False) < footprint.weight_bytes(fp8, "auto", False)
    other = release_config_dict()
    other["quantization_config"] = {"quant_method": "awq", "bits": 4}
    with pytest.raises(ValueError, match="awq"):
        footprint.weight_bytes(other, "auto", False)
    gpu = check.GpuState(cuda=False)
    settings = load_settings(environ={})
    assert check.mode_estimates(settings, gpu, other) == []
    [own] = check.mode_estimates(settings, gpu, awq)
    assert own.current and own.need == need and own.flags.startswith("(the checkpoint's own: int4")


def test_sizing_agrees_with_the_loaders_reading():
    """footprint sizes the modes and reads checkpoint schemes without torch; the loader
    (model/quant) states both again in its own types. They must agree. (The rounding rule is
    one function, `footprint.rounded_in_layer`, which the loader imports.)"""
    from duplex_chat.model.quant import compressed, formats

    for name, fmt in footprint.QUANTIZE_FORMATS.items():
        scheme = formats.MODES[name]
        assert (scheme.bits, scheme.group_size, scheme.symmetric) == (
            fmt.bits, fmt.group_size, fmt.zero_bits == 0)
    for weights, ignore in (
            ({"num_bits": 4, "type": "int", "symmetric": False, "group_size": 32,
              "strategy": "group"}, COMMUNITY_IGNORE),
            ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, ["lm_head"]),
            # a quantized talker whose router and head are named in `ignore`, as llm-compressor
            # writes it: still a quantized talker
            ({"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128,
              "strategy": "group"}, ["lm_head", "talker.model.layers.0.mlp.gate",
                                     "talker.codec_head"]),
            # the talker's layers named one by one: left in 16 bit
            ({"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128,
              "strategy": "group"}, ["lm_head", "talker.model.layers.0.self_attn.q_proj"]),
            ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
              "block_structure": [128, 128]}, ["lm_head", "re:.*talker.*"])):
        cfg = _ct_config(weights, ignore)
        ours, theirs = footprint.checkpoint_format(cfg), compressed.read_scheme(cfg)
        layer = "{}.model.layers.0.self_attn.q_proj"
        assert theirs.is_quantized(layer.format("thinker"))
        assert theirs.is_quantized(layer.format("talker")) == ours.talker
        scheme = theirs.scheme_for(layer.format("thinker"))
        assert (scheme.bits, scheme.group_size, scheme.symmetric, scheme.block) == (
            ours.bits, ours.group_size, ours.zero_bits == 0, ours.block)


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
    q = settings.qwen
    need = footprint.gpu_bytes(release_config_dict(), q.torch_dtype, q.load_in_8bit,
                               footprint.cache_for(q), q.quantize)
    return check._fit_row(settings, gpu, need, release_config_dict())


def test_fit_on_an_80gb_card():
    assert _fit(79, 79.2).status == check.OK
    too_big = _fit(79, 79.2, torch_dtype="float32")
    assert too_big.status == check.FAIL and "--dtype bfloat16" in too_big.fix


def test_fit_fails_on_a_small_card_with_what_to_try():
    row = _fit(22, 24)  # int4 needs 22.9 GiB at 16384 tokens, 22.0 at 8192
    assert row.status == check.FAIL
    assert row.fix == "Try --quantize int4 with qwen.max_context_tokens = 8192 (about 22.0 GiB)."
    row = _fit(31, 31.4)  # a 32 GB card: int4 at the default context; int8 and fp8 are too big
    assert row.fix == "Try --quantize int4 (about 22.9 GiB)."
    row = _fit(15, 16)
    assert row.fix.startswith("No setting fits this card: use a GPU with at least 22.9 GiB free "
                              "for --quantize int4, e.g. RTX 5090")


def test_fit_with_int4_proposes_a_shorter_context():
    assert _fit(23.2, 23.6, quantize="int4").status == check.OK
    row = _fit(22.5, 23.6, quantize="int4")  # a desktop holds 1.1 GiB of a 24 GB card
    assert row.status == check.FAIL and "nvidia-smi" in row.fix
    assert "qwen.max_context_tokens = 12288" in row.fix and "SCA_QWEN_MAX_CONTEXT_TOKENS" in row.fix
    fp8 = _fit(31, 31.4, quantize="fp8")
    assert fp8.status == check.FAIL and fp8.fix.startswith("Try --quantize int4 (about")


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


NOT_CACHED = "org/not-cached-model"  # sized from the release config


@pytest.mark.parametrize("mode", ["none", "int8", "int4", "fp8"])
def test_check_shows_the_footprint_of_each_mode(mode):
    _, report = _check_json(["--model", NOT_CACHED, "--quantize", mode, "--device-map", "cpu"])
    cfg = release_config_dict()
    need = footprint.gpu_bytes(cfg, "bfloat16", False, DEFAULT_CACHE, mode)
    size = _row(report, "size")["detail"]
    assert f"margin = {need / GIB:.1f} GiB" in size and "max_context_tokens 16384" in size
    assert ("bfloat16 + " + mode in size) == (mode != "none")
    cards = _row(report, "cards")["detail"]
    assert cards.startswith("fits " + ", ".join(c.name for c in footprint.fits_cards(need, mode)))
    memory = {e["mode"]: e for e in report["memory"]}
    assert list(memory) == list(footprint.QUANTIZE_MODES)
    assert [m for m, e in memory.items() if e["current"]] == [mode]
    assert memory["int4"]["flags"] == "--quantize int4"
    int4 = footprint.gpu_bytes(cfg, "bfloat16", False, DEFAULT_CACHE, "int4")
    assert memory["int4"]["need"] == int4
    assert memory["int4"]["shorter"] == ["RTX 3090 at max_context_tokens 8192",
                                         "RTX 4090 at max_context_tokens 8192"]
    fp8 = {c.name for c in footprint.fits_cards(memory["fp8"]["need"], "fp8")}
    assert fp8 == {"L40S", "RTX 6000 Ada", "H100 80GB", "H200"}  # not Ampere's A6000 and A100
    assert set(memory["fp8"]["cards"]) == fp8
    assert all(e["available"] for e in memory.values())  # no GPU: nothing to refuse


def test_check_human_output_has_the_memory_table():
    result = CliRunner().invoke(app, ["check", "--model", NOT_CACHED, "--quantize", "int4"],
                                env={"COLUMNS": "200"})
    assert "GPU memory per mode" in result.stdout and "--quantize int4" in result.stdout
    assert "int4 (configured)" in result.stdout and "max_context_tokens 8192" in result.stdout


def _fake_gpu(capability, name="NVIDIA GeForce RTX 3090", free=23.2, total=23.7):
    return check.GpuState(True, (name,), ((int(free * GIB), int(total * GIB)),), (capability,))


def test_probe_gpu_reads_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (23 * GIB, 24 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 6))
    gpu = check.probe_gpu()
    assert gpu.capability == ((8, 6),)
    assert check.fp8_unsupported(gpu, 0) == (  # the loader's sentence (footprint.fp8_refusal)
        "FP8 weights run on compute capability 8.9 or newer only (Ada, Hopper, Blackwell); "
        "GPU 0 (NVIDIA GeForce RTX 3090) is 8.6")
    assert check.fp8_unsupported(_fake_gpu((8, 9)), 0) is None
    assert check.fp8_unsupported(_fake_gpu((9, 0)), 0) is None


def test_fp8_is_refused_on_a_compute_capability_8_6_gpu(monkeypatch):
    monkeypatch.setattr(check, "probe_gpu", lambda: _fake_gpu((8, 6)))
    code, report = _check_json(["--model", NOT_CACHED, "--quantize", "fp8"])
    assert code == 1
    row = _row(report, "fp8")
    assert row["status"] == "fail" and "8.9" in row["detail"] and "is 8.6" in row["detail"]
    assert "--quantize int8" in row["fix"]
    assert "compute capability 8.6" in _row(report, "GPU 0")["detail"]
    memory = {e["mode"]: e for e in report["memory"]}
    assert not memory["fp8"]["available"] and "8.9" in memory["fp8"]["why"]
    assert memory["int4"]["available"]
    # with int4 on the same card: no fp8 row, and fp8 is never proposed
    _, report = _check_json(["--model", NOT_CACHED, "--quantize", "int4"])
    assert not any(r["name"] == "fp8" for r in report["checks"])
    assert _row(report, "fits")["status"] == "ok"  # 22.9 GiB of 23.2 free


def test_an_fp8_checkpoint_is_refused_on_a_compute_capability_8_6_gpu(monkeypatch, tmp_path):
    """An FP8 checkpoint needs no --quantize to be FP8: check still says the card cannot run it."""
    cfg = _ct_config({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
                     ["lm_head"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(check, "probe_gpu", lambda: _fake_gpu((8, 6), free=47, total=47.5))
    code, report = _check_json(["--model", str(tmp_path)])
    row = _row(report, "fp8")
    assert code == 1 and row["status"] == "fail" and "is 8.6" in row["detail"]
    assert "int8 or int4 checkpoint" in row["fix"]


def test_fp8_is_accepted_on_an_ada_gpu(monkeypatch):
    monkeypatch.setattr(check, "probe_gpu", lambda: _fake_gpu((8, 9), "NVIDIA L40S", 44, 44.5))
    _, report = _check_json(["--model", NOT_CACHED, "--quantize", "fp8"])
    assert _row(report, "fp8")["status"] == "ok" and _row(report, "fits")["status"] == "ok"
    assert all(e["available"] for e in report["memory"])


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


def test_the_turn_policy_row_says_what_ends_a_turn():
    (row,) = check.check_turn(load_settings(overrides={"turn.speculate_ms": 160}, environ={}))
    assert row.status == check.OK
    assert "600 ms of silence ends a turn" in row.detail and "after 160 ms of pause" in row.detail


def test_the_smart_policy_row_loads_the_model_and_times_a_call(monkeypatch):
    settings = load_settings(overrides={"turn.policy": "smart"}, environ={})
    (row,) = check.check_turn(settings)
    assert row.status in (check.OK, check.WARN)  # WARN only on a CPU slower than 250 ms a call
    assert "Smart Turn v3.2 loads" in row.detail and "ms a call on this CPU" in row.detail
    monkeypatch.setattr(check, "SMART_TURN_SLOW_MS", 0)
    (slow,) = check.check_turn(settings)
    assert slow.status == check.WARN and "turn.policy = silence" in slow.fix


def test_a_damaged_smart_turn_model_is_a_failed_row(monkeypatch, tmp_path):
    from duplex_chat.session import smart_turn

    damaged = tmp_path / smart_turn.MODEL_FILE
    damaged.write_bytes(b"not a model")
    monkeypatch.setattr(smart_turn, "model_path", lambda: damaged)
    rows = check.collect_rows(load_settings(overrides={"turn.policy": "smart"}, environ={}),
                              check.GpuState(cuda=False))
    (row,) = [r for r in rows if r.name == "turn policy"]
    assert row.status == check.FAIL and "damaged" in row.detail and "Reinstall" in row.fix
