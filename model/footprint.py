"""How big a Qwen3-Omni is, from its config alone, and whether its weights are on this disk.

`part_params(config)` counts the parameters of each part of `Qwen3OmniMoeForConditionalGeneration`
analytically (no model is built, transformers is not imported), following the module layout of
transformers' `modeling_qwen3_omni_moe.py`; tests check the counts equal the instantiated tiny
model's, part by part, and the release config's total is the 35.26 B that DESIGN.md gives.

`gpu_bytes(config, dtype, load_in_8bit, cache, quantize)` turns that into the GPU memory `talk`
needs: the weights of every part but the vision tower (voice chat never loads images), stored as
`qwen.quantize` (or a pre-quantized checkpoint's own `quantization_config`) stores them, plus a
working margin (KV caches of the size the settings give them, `cache_for(qwen_settings)`, and a
workspace). `rounded_at_load(name)` is the one rule for which weights
quantize-at-load rounds; model/quant/load.py applies it. `CARDS` / `fits_cards(bytes)` say which common
GPUs an estimate fits, `context_that_fits` the longest `max_context_tokens` a budget allows.

`hub_cache_status(model_id)` says whether a model is a local directory or sits complete in the
Hugging Face hub cache, reading only the local disk (never the network).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from duplex_chat.audio.constants import FRAME_HZ

from .checkpoint import CONFIG_FILE, inspect_checkpoint, missing_weights

PARTS = ("thinker", "audio_encoder", "vision", "talker", "code_predictor", "code2wav")
VOICE_PARTS = tuple(p for p in PARTS if p != "vision")  # what `talk` puts on the GPU

GIB = 1024**3
BYTES_PER_PARAM = {"float16": 2, "bfloat16": 2, "float32": 4}
INT8_BYTES = 1  # bitsandbytes LLM.int8 stores nn.Linear weights as int8 (+ a per-row scale)
INT8_SKIPPED_PARTS = ("code2wav",)  # loading.py's llm_int8_skip_modules keeps these in 16 bit

# KV-cache positions beyond the settings' context and reply lengths (see `cache_positions`).
THINKER_SLACK_TOKENS = 64  # a user turn's closing tokens and the assistant header
TALKER_SLACK_FRAMES = 16
FAST_PAD_ROWS = 64  # rows past capacity that model/fast.py's padded prefills may write (PAD_ROOM)
# Working margin on top of the weights and caches (document changes in `working_margin`).
ACTIVATION_WORKSPACE_BYTES = 2 * 1024**3  # prefill activations, MoE buffers, cuBLAS workspace,
#                                           allocator fragmentation, code2wav and encoder activations



# ------------------------------------------------------------------ what quantize-at-load rounds
#
# THE RULE (model/loading.py rounds exactly these; keep the two in step): `qwen.quantize` rounds
# the weights of the thinker's and the talker's decoder layers:
#   - attention q/k/v/o projections,
#   - the routed experts (transformers' fused 3-D `gate_up_proj` [E, 2I, H] and
#     `down_proj` [E, H, I]),
#   - the talker's shared expert (gate/up/down), and dense MLPs of decoder layers
#     (`mlp_only_layers`; the release config has none),
# and nothing else: not the routers (`mlp.gate`, `shared_expert_gate`), embeddings, `lm_head`s,
# the talker's `codec_head`, norms, the audio encoder, the code predictor (its own decoder layers
# included), the talker's `text_projection` / `hidden_projection`, code2wav, the vision tower.
# Scales run along the input dimension (the last one): one per output row (int8, fp8) or one per
# group of `group_size` inputs of a row (int4).
# The decoder-layer weights quantize-at-load rounds, by their name inside a layer: attention
# projections, routed experts (fused 3-D), shared experts and dense MLPs. Not the routers
# (`mlp.gate`, `mlp.shared_expert_gate`) or norms: tiny, and the routing decides which experts
# run at all. model/quant/load.py rounds by this rule; the sizes here count by it.
ROUNDED_IN_LAYER = re.compile(
    r"^(self_attn\.[qkvo]_proj\.weight"
    r"|mlp\.experts\.(gate_up_proj|down_proj)"
    r"|mlp\.shared_expert\.(gate|up|down)_proj\.weight"
    r"|mlp\.(gate|up|down)_proj\.weight)$"
)
# The thinker's and the talker's decoder layers (the thinker's text model sits at
# `thinker.model` in transformers 5.17, at `thinker.model.language_model` later); the code
# predictor's layers are not among them.
DECODER_LAYER = re.compile(r"^(thinker\.model(\.language_model)?|talker\.model)\.layers\.\d+\.")


def rounded_in_layer(name: str) -> bool:
    """Whether quantize-at-load rounds a decoder layer's parameter `name` (relative to the
    layer, e.g. "self_attn.q_proj.weight")."""
    return ROUNDED_IN_LAYER.match(name) is not None


def rounded_at_load(name: str) -> bool:
    """Whether quantize-at-load rounds the parameter `name` (a `named_parameters()` name of
    `Qwen3OmniMoeForConditionalGeneration`)."""
    layer = DECODER_LAYER.match(name)
    return layer is not None and rounded_in_layer(name[layer.end():])


@dataclass(frozen=True)
class WeightFormat:
    """How a rounded weight is stored, as far as its size goes.

    bits: per weight; group_size: inputs per scale along a row (None: one scale per output row);
    block: (rows, cols) per scale for block-wise FP8 (overrides group_size); scale_bits and
    zero_bits (0 when symmetric; 8 otherwise, as model/quant/formats.py holds zero points in
    memory: int8, one per scale): per scale; talker: whether the talker's decoder layers are
    rounded too (community checkpoints leave the talker in bf16).
    """

    name: str
    bits: int
    group_size: int | None = None
    scale_bits: int = 16
    zero_bits: int = 0
    block: tuple[int, int] | None = None
    talker: bool = True

    def matrix_bytes(self, n_in: int, n_out: int) -> int:
        """Bytes of one rounded [n_out, n_in] weight: packed values + scales (+ zero points)."""
        if self.block is not None:
            scales = math.ceil(n_out / self.block[0]) * math.ceil(n_in / self.block[1])
        elif self.group_size:
            scales = n_out * math.ceil(n_in / self.group_size)
        else:
            scales = n_out
        return math.ceil(n_in * n_out * self.bits / 8) + math.ceil(
            scales * (self.scale_bits + self.zero_bits) / 8)


# Quantize at load (`qwen.quantize`): round to nearest, symmetric, no zero point.
QUANTIZE_FORMATS = {
    "int8": WeightFormat("int8", 8, None, scale_bits=16),  # int8, a 16-bit scale per output row
    "int4": WeightFormat("int4", 4, 128, scale_bits=16),  # 4-bit, a 16-bit scale per 128 weights
    "fp8": WeightFormat("fp8", 8, None, scale_bits=32),  # float8_e4m3fn, a float32 scale per row
}
QUANTIZE_MODES = ("none", *QUANTIZE_FORMATS)  # = config.settings.QUANTIZE_MODES (a test checks)
# FP8 weights are offered on Ada, Hopper and newer only (issue 19's rule: the GPUs with FP8
# hardware; the kernels decode FP8 with integer operations and would run on older ones too).
FP8_MIN_CAPABILITY = (8, 9)


def fp8_refusal(capability: tuple[int, int], gpu: str) -> str | None:
    """Why FP8 weights cannot run on `gpu` (how the sentence names it) of compute capability
    `capability`, or None when they can. `check` and the loader both say it this way."""
    if tuple(capability) >= FP8_MIN_CAPABILITY:
        return None
    need = ".".join(map(str, FP8_MIN_CAPABILITY))
    return (f"FP8 weights run on compute capability {need} or newer only (Ada, Hopper, "
            f"Blackwell); {gpu} is {capability[0]}.{capability[1]}")


def checkpoint_format(config: Mapping[str, Any]) -> WeightFormat | None:
    """A pre-quantized checkpoint's `WeightFormat` from its config.json `quantization_config`
    (compressed-tensors, as llm-compressor writes it), or None for a checkpoint in 16 bit.

    Read minimally, for sizing only and without torch (model/quant/compressed.py's `read_scheme`
    reads it for loading; a test holds the two together): the first config group's `weights`
    (num_bits, type, symmetric, strategy, group_size, block_structure, scale_dtype) and the
    `ignore` list, where a pattern naming "talker" leaves the talker in 16 bit. Scales count 16
    bits (the checkpoint's dtype), FP8's 32 (as quantize-at-load's fp8, the larger case).
    Only the thinker's and the talker's decoder layers are counted as quantized: a checkpoint that
    also quantizes the audio encoder or code2wav is overestimated by at most ~1 GiB.
    """
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"quantization_config.quant_method {method!r} is not compressed-tensors")
    groups = [g for g in (q.get("config_groups") or {}).values() if g.get("weights")]
    if not groups:
        raise ValueError("quantization_config has no config group with weights")
    w = groups[0]["weights"]
    bits, kind = int(w["num_bits"]), w.get("type", "int")
    strategy = w.get("strategy") or ("group" if w.get("group_size") else "channel")
    group = int(w["group_size"]) if strategy == "group" else None
    block = (tuple(w["block_structure"]) if strategy == "block" and w.get("block_structure")
             else None)
    scale_bits = 32 if (w.get("scale_dtype") or "").endswith("float32") or (
        kind == "float" and not w.get("scale_dtype")) else 16
    zero_bits = 0 if w.get("symmetric", True) or kind == "float" else 8  # unpacked to int8
    talker = not _ignored(TALKER_SAMPLE_LINEAR, q.get("ignore") or ())
    sym = "" if zero_bits == 0 else " asymmetric"
    detail = f"g{group}" if group else (f"block {block[0]}x{block[1]}" if block else "per channel")
    name = f"{kind}{bits} {detail}{sym} checkpoint" + ("" if talker else ", talker 16-bit")
    return WeightFormat(name, bits, group, scale_bits, zero_bits, block, talker)


# A linear of the talker's decoder layers: whether the checkpoint's `ignore` list names it says
# whether the talker was left in 16 bit (llm-compressor writes `ignore` as plain module names,
# and a quantized talker may still have a router or head named there).
TALKER_SAMPLE_LINEAR = "talker.model.layers.0.self_attn.q_proj"


def _ignored(module: str, ignore) -> bool:
    """compressed-tensors' matching of one `ignore` entry: "re:" regexes from the start of the
    name (re.match), anything else the exact module name."""
    return any(re.match(str(e)[3:], module) if str(e).startswith("re:") else str(e) == module
               for e in ignore)


def weight_format(config: Mapping[str, Any], quantize: str = "none",
                  scheme: WeightFormat | None = None) -> WeightFormat | None:
    """What the rounded weights are stored as: `scheme` if given, else a pre-quantized
    checkpoint's own format (it wins over `quantize`: its weights are already rounded), else
    `quantize`'s; None for 16/32-bit weights."""
    if scheme is not None:
        return scheme
    own = checkpoint_format(config)
    if own is not None:
        return own
    if quantize == "none":
        return None
    if quantize not in QUANTIZE_FORMATS:
        raise ValueError(f"unknown quantize mode {quantize!r} (one of {', '.join(QUANTIZE_MODES)})")
    return QUANTIZE_FORMATS[quantize]


# ------------------------------------------------------------------------------ counting


def _merge_shapes(*shapes: tuple[tuple[int, int, int], ...]) -> tuple[tuple[int, int, int], ...]:
    merged: dict[tuple[int, int], int] = {}
    for group in shapes:
        for n_in, n_out, count in group:
            merged[(n_in, n_out)] = merged.get((n_in, n_out), 0) + count
    return tuple(sorted((i, o, c) for (i, o), c in merged.items() if c))


@dataclass(frozen=True)
class PartCount:
    """Parameters of one part, split by how quantization treats them.

    Rounded by `qwen.quantize` (see ROUNDED_AT_LOAD), in the thinker's and talker's decoder layers:
      attention: q/k/v/o projection weights; experts: the fused routed-expert tensors;
      shared_expert: the talker's shared expert; dense_mlp: dense MLPs of decoder layers.
    Never rounded:
      router: the MoE routers (`mlp.gate`, `shared_expert_gate`);
      linear: every other `nn.Linear` weight (audio encoder, projections, code predictor,
      codec_head, code2wav, vision); other: embeddings, `lm_head`s, biases, norms, convs.
    rounded_shapes: (n_in, n_out, count) of the rounded weight matrices (an expert tensor counts
    as one matrix per expert), for the scales per row or per group.
    `load_in_8bit` (bitsandbytes) makes `int8_linear` 8-bit and leaves experts and other 16-bit.
    """

    attention: int = 0
    experts: int = 0
    shared_expert: int = 0
    dense_mlp: int = 0
    router: int = 0
    linear: int = 0
    other: int = 0
    rounded_shapes: tuple[tuple[int, int, int], ...] = ()

    @property
    def total(self) -> int:
        return self.rounded + self.router + self.linear + self.other

    @property
    def rounded(self) -> int:
        """Parameters quantize-at-load rounds."""
        return self.attention + self.experts + self.shared_expert + self.dense_mlp

    @property
    def int8_linear(self) -> int:
        """`nn.Linear` weights, which bitsandbytes' `load_in_8bit` stores as int8."""
        return self.attention + self.shared_expert + self.dense_mlp + self.router + self.linear

    def __add__(self, o: "PartCount") -> "PartCount":
        return PartCount(
            self.attention + o.attention, self.experts + o.experts,
            self.shared_expert + o.shared_expert, self.dense_mlp + o.dense_mlp,
            self.router + o.router, self.linear + o.linear, self.other + o.other,
            _merge_shapes(self.rounded_shapes, o.rounded_shapes))

    def times(self, n: int) -> "PartCount":
        """n copies (n identical layers)."""
        return PartCount(
            n * self.attention, n * self.experts, n * self.shared_expert, n * self.dense_mlp,
            n * self.router, n * self.linear, n * self.other,
            tuple((i, o, c * n) for i, o, c in self.rounded_shapes))


def _lin(n_in: int, n_out: int, bias: bool = True, kind: str = "linear") -> PartCount:
    """An nn.Linear: its weight counted as `kind` (a PartCount field), its bias as other.
    Weights of the rounded kinds also record their shape."""
    fields = {kind: n_in * n_out, "other": n_out if bias else 0}
    if kind in ("attention", "shared_expert", "dense_mlp"):
        fields["rounded_shapes"] = ((n_in, n_out, 1),)
    return PartCount(**fields)


def _other(n: int) -> PartCount:
    return PartCount(other=n)


def _sum(counts) -> PartCount:
    total = PartCount()
    for c in counts:
        total = total + c
    return total


def _head_dim(cfg: Mapping[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _attention(cfg: Mapping[str, Any], qk_norm: bool, rounded: bool = False) -> PartCount:
    """Grouped-query attention: q, k, v, o projections (+ per-head RMSNorm on q and k).
    `rounded`: a thinker or talker decoder layer's (quantize-at-load rounds it)."""
    h, hd, bias = cfg["hidden_size"], _head_dim(cfg), bool(cfg.get("attention_bias", False))
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    kind = "attention" if rounded else "linear"
    count = (_lin(h, q, bias, kind) + _lin(h, kv, bias, kind) + _lin(h, kv, bias, kind)
             + _lin(q, h, bias, kind))
    return count + _other(2 * hd) if qk_norm else count


def _gated_mlp(hidden: int, inter: int, kind: str = "linear") -> PartCount:
    """SwiGLU MLP: gate, up and down projections without biases."""
    return (_lin(hidden, inter, False, kind) + _lin(hidden, inter, False, kind)
            + _lin(inter, hidden, False, kind))


def _moe(cfg: Mapping[str, Any], shared: bool) -> PartCount:
    """Router + fused experts (gate_up and down) (+ the talker's shared expert and its gate)."""
    h, mi = cfg["hidden_size"], cfg["moe_intermediate_size"]
    n = cfg.get("num_experts") or cfg["num_local_experts"]
    # gate_up_proj [n, 2*mi, h] (n_out 2*mi, n_in h) and down_proj [n, h, mi] (n_out h, n_in mi)
    experts = PartCount(experts=n * 3 * h * mi, rounded_shapes=_merge_shapes(
        ((h, 2 * mi, n),), ((mi, h, n),)))
    count = _lin(h, n, False, "router") + experts
    if shared:
        count = (count + _gated_mlp(h, cfg["shared_expert_intermediate_size"], "shared_expert")
                 + _lin(h, 1, False, "router"))
    return count


def _is_sparse(cfg: Mapping[str, Any], layer: int) -> bool:
    n = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    return (layer not in cfg.get("mlp_only_layers", []) and n > 0
            and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0)


def _thinker_text(thinker: Mapping[str, Any]) -> PartCount:
    cfg = thinker["text_config"]
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    sparse = sum(_is_sparse(cfg, i) for i in range(cfg["num_hidden_layers"]))
    dense = cfg["num_hidden_layers"] - sparse
    common = _attention(cfg, qk_norm=True, rounded=True) + _other(2 * h)
    layers = [(common + _moe(cfg, shared=False)).times(sparse),
              (common + _gated_mlp(h, cfg["intermediate_size"], "dense_mlp")).times(dense)]
    embeddings = _other(vocab * h)
    head = PartCount() if thinker.get("tie_word_embeddings", False) else _other(h * vocab)
    return embeddings + _sum(layers) + _other(h) + head


def _audio_encoder(cfg: Mapping[str, Any]) -> PartCount:
    d, ffn, ds = cfg["d_model"], cfg["encoder_ffn_dim"], cfg["downsample_hidden_size"]
    layer = _sum(_lin(d, d) for _ in range(4)) + _lin(d, ffn) + _lin(ffn, d) + _other(4 * d)
    convs = _other(ds * 9 + ds) + _other(2 * (ds * ds * 9 + ds))  # three 3x3 Conv2d, stride 2
    mel_after_convs = (((cfg["num_mel_bins"] + 1) // 2 + 1) // 2 + 1) // 2
    return (_sum(layer for _ in range(cfg["encoder_layers"])) + _other(2 * d) + convs
            + _lin(ds * mel_after_convs, d, False) + _lin(d, d) + _lin(d, cfg["output_dim"]))


def _vision(cfg: Mapping[str, Any]) -> PartCount:
    h, inter, out = cfg["hidden_size"], cfg["intermediate_size"], cfg["out_hidden_size"]
    patch = cfg["in_channels"] * cfg["temporal_patch_size"] * cfg["patch_size"] ** 2
    block = _lin(h, 3 * h) + _lin(h, h) + _lin(h, inter) + _lin(inter, h) + _other(4 * h)
    merged = h * cfg["spatial_merge_size"] ** 2

    def merger(norm_width: int) -> PartCount:
        return _other(2 * norm_width) + _lin(merged, merged) + _lin(merged, out)

    return (_other(patch * h + h) + _other(cfg["num_position_embeddings"] * h)
            + _sum(block for _ in range(cfg["depth"])) + merger(h)
            + _sum(merger(merged) for _ in cfg["deepstack_visual_indexes"]))


def _talker(talker: Mapping[str, Any]) -> PartCount:
    """The talker without its code predictor (counted on its own)."""
    cfg = talker["text_config"]
    h, vocab, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    # Every talker layer is sparse: its decoder layer replaces any dense MLP by the MoE block.
    layer = _attention(cfg, qk_norm=True, rounded=True) + _moe(cfg, shared=True) + _other(2 * h)
    resize_mlp = _lin(talker["thinker_hidden_size"], inter) + _lin(inter, h)
    # codec_head is an nn.Linear that the int8 skip list ("lm_head", "code2wav") does not name.
    head = PartCount() if talker.get("tie_word_embeddings", False) else _lin(h, vocab, False)
    return (layer.times(cfg["num_hidden_layers"]) + _other(h) + _other(vocab * h)
            + resize_mlp + resize_mlp + head)


def _code_predictor(cfg: Mapping[str, Any]) -> PartCount:
    h, vocab, groups = cfg["hidden_size"], cfg["vocab_size"], cfg["num_code_groups"] - 1
    layer = _attention(cfg, qk_norm=True) + _gated_mlp(h, cfg["intermediate_size"]) + _other(2 * h)
    # One embedding and one output head per codebook after the first.
    return (_sum(layer for _ in range(cfg["num_hidden_layers"])) + _other(h)
            + _other(groups * vocab * h) + _other(groups * h * vocab))


def _code2wav(cfg: Mapping[str, Any]) -> PartCount:
    h, dec = cfg["hidden_size"], cfg["decoder_dim"]
    # Pre-transformer layer: attention (no q/k norm), MLP, two RMSNorms, two layer scales.
    layer = _attention(cfg, qk_norm=False) + _gated_mlp(h, cfg["intermediate_size"]) + _other(4 * h)
    count = _sum(layer for _ in range(cfg["num_hidden_layers"])) + _other(h)
    count = count + _other(cfg["codebook_size"] * cfg["num_quantizers"] * h)
    convnext = _other(h * 7 + h + 2 * h + h) + _lin(h, 4 * h) + _lin(4 * h, h)  # dw, norm, gamma
    for factor in cfg["upsampling_ratios"]:
        count = count + _other(h * h * factor + h) + convnext
    count = count + _other(h * dec * 7 + dec)
    for i, rate in enumerate(cfg["upsample_rates"]):
        c_in, c_out = dec // 2**i, dec // 2 ** (i + 1)
        residual = _other(4 * c_out + c_out * c_out * 7 + c_out + c_out * c_out + c_out)
        count = count + _other(2 * c_in + c_in * c_out * 2 * rate + c_out) + _other(3 * residual.total)
    out = dec // 2 ** len(cfg["upsample_rates"])
    return count + _other(2 * out + out * 7 + 1)


def part_counts(config: Mapping[str, Any]) -> dict[str, PartCount]:
    """Parameters per part (keys: PARTS) of a Qwen3-Omni config dict (as in config.json)."""
    thinker, talker = config["thinker_config"], config["talker_config"]
    return {
        "thinker": _thinker_text(thinker),
        "audio_encoder": _audio_encoder(thinker["audio_config"]),
        "vision": _vision(thinker["vision_config"]),
        "talker": _talker(talker),
        "code_predictor": _code_predictor(talker["code_predictor_config"]),
        "code2wav": _code2wav(config["code2wav_config"]),
    }


def part_params(config: Mapping[str, Any]) -> dict[str, int]:
    """Parameter count per part (keys: PARTS)."""
    return {name: c.total for name, c in part_counts(config).items()}


def resolve_dtype(config: Mapping[str, Any], torch_dtype: str) -> str:
    """The dtype weights load in: `torch_dtype`, or for "auto" the checkpoint's own dtype."""
    if torch_dtype != "auto":
        return torch_dtype
    saved = config.get("dtype") or config.get("torch_dtype") or "float32"
    return saved if saved in BYTES_PER_PARAM else "float32"


def max_reply_frames(max_reply_seconds: float) -> int:
    """Codec frames a reply may have."""
    return max(1, int(max_reply_seconds * FRAME_HZ))


def cache_positions(max_context_tokens: int, max_reply_tokens: int,
                    max_reply_seconds: float) -> tuple[int, int]:
    """Positions of the thinker's and the talker's KV caches, as the engine allocates them: the
    thinker holds the context, a reply and a turn's closing tokens; the talker holds as many
    positions plus a reply's codec frames."""
    thinker = max_context_tokens + max_reply_tokens + THINKER_SLACK_TOKENS
    return thinker, thinker + max_reply_frames(max_reply_seconds) + TALKER_SLACK_FRAMES


def cache_for(qwen: Any) -> tuple[int, int]:
    """`cache_positions` for a QwenSettings."""
    return cache_positions(qwen.max_context_tokens, qwen.max_reply_tokens, qwen.max_reply_seconds)


def working_margin(config: Mapping[str, Any], dtype: str, cache: tuple[int, int]) -> int:
    """Bytes beyond the weights: the KV caches for `cache` = (thinker, talker) positions (plus
    the fast decoder's pad rows) and ACTIVATION_WORKSPACE_BYTES.

    Per position: layers x 2 (k, v) x kv_heads x head_dim x bytes (release, bf16: thinker
    96 KiB, talker 20 KiB; at the default 16 384-token context 1.6 + 0.4 GiB). The fixed
    2 GiB covers prefill activations, MoE routing buffers, CUDA-graph pools, cuBLAS workspace,
    encoder and code2wav activations, the CUDA context and allocator fragmentation (the
    H200 benchmark of 2026-12-04 measured 1.1 GiB allocated beyond weights and caches).
    Release config in bf16, default settings: ~3.9 GiB in all.
    """
    total = ACTIVATION_WORKSPACE_BYTES
    stacks = (config["thinker_config"]["text_config"], config["talker_config"]["text_config"])
    for cfg, positions in zip(stacks, cache):
        per_position = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * _head_dim(cfg)
        total += per_position * BYTES_PER_PARAM[dtype] * (positions + FAST_PAD_ROWS)
    return total


def weight_bytes(config: Mapping[str, Any], torch_dtype: str, load_in_8bit: bool,
                 quantize: str = "none", scheme: WeightFormat | None = None) -> int:
    """Bytes of the weights `talk` loads (every part but the vision tower).

    `quantize` (`qwen.quantize`) stores the weights ROUNDED_AT_LOAD names in its format
    (QUANTIZE_FORMATS); a pre-quantized checkpoint (config.json `quantization_config`) or an
    explicit `scheme` stores them in that format instead (see `weight_format`); everything else
    stays in `torch_dtype`. With `load_in_8bit` only `nn.Linear` weights become int8:
    transformers' bitsandbytes integration leaves the fused MoE expert tensors (most of the model)
    and the output heads in 16 bit, so 8-bit saves little on Qwen3-Omni.
    """
    dtype = resolve_dtype(config, torch_dtype)
    counts = part_counts(config)
    fmt = weight_format(config, quantize, scheme)
    if fmt is not None:
        size = BYTES_PER_PARAM[dtype]
        total = 0
        for part in VOICE_PARTS:
            c = counts[part]
            if part == "thinker" or (part == "talker" and fmt.talker):
                total += (c.total - c.rounded) * size
                total += sum(n * fmt.matrix_bytes(i, o) for i, o, n in c.rounded_shapes)
            else:
                total += c.total * size
        return total
    if not load_in_8bit:
        return sum(counts[p].total for p in VOICE_PARTS) * BYTES_PER_PARAM[dtype]
    unquantised = BYTES_PER_PARAM["float16"] if dtype == "float32" else BYTES_PER_PARAM[dtype]
    quantised = _sum(counts[p] for p in VOICE_PARTS if p not in INT8_SKIPPED_PARTS)
    kept = sum(counts[p].total for p in INT8_SKIPPED_PARTS)
    return (quantised.int8_linear * INT8_BYTES
            + (quantised.experts + quantised.other + kept) * unquantised)


def gpu_bytes(config: Mapping[str, Any], torch_dtype: str, load_in_8bit: bool,
              cache: tuple[int, int], quantize: str = "none",
              scheme: WeightFormat | None = None) -> int:
    """Estimated GPU memory for `talk`: weights without the vision tower (stored as `quantize`
    or the checkpoint's own scheme stores them, see `weight_bytes`) + working margin, with KV
    caches of `cache` = (thinker, talker) positions (`cache_for(settings.qwen)`).

    The margin is the same in every mode: the KV caches stay in `torch_dtype`, and the 2 GiB
    workspace also covers quantize-at-load's transient, one decoder layer in 16 bit (a release
    thinker layer: 1.2 GiB) while it is rounded, which comes before any activations exist."""
    dtype = resolve_dtype(config, torch_dtype)
    if load_in_8bit and dtype == "float32":
        dtype = "float16"
    weights = weight_bytes(config, torch_dtype, load_in_8bit, quantize, scheme)
    return weights + working_margin(config, dtype, cache)


def largest_rounded_layer_bytes(config: Mapping[str, Any], torch_dtype: str) -> int:
    """Bytes of the largest decoder layer's rounded weights in `torch_dtype`: what quantize-at-load
    holds unrounded at once on top of the weights already rounded."""
    dtype = resolve_dtype(config, torch_dtype)
    layers = []
    for key, part in (("thinker_config", "thinker"), ("talker_config", "talker")):
        n = config[key]["text_config"]["num_hidden_layers"]
        layers.append(part_counts(config)[part].rounded // n)  # every layer alike in the release
    return max(layers) * BYTES_PER_PARAM[dtype]


# ---------------------------------------------------------------------------- common cards


@dataclass(frozen=True)
class Card:
    """A common GPU: `cuda_gib` is the total memory CUDA reports for it
    (`torch.cuda.mem_get_info()[1]`, the "total capacity" in PyTorch's out-of-memory message),
    somewhat less than the GB on the box; `capability` its compute capability."""

    name: str
    box_gb: int
    cuda_gib: float
    capability: tuple[int, int]

    @property
    def cuda_bytes(self) -> int:
        return int(self.cuda_gib * GIB)


# Where the figures come from: PyTorch out-of-memory messages users posted (RTX 3090: "23.69 /
# 23.70 GiB total capacity"; RTX 4090: 23.61-23.68 GiB, nvidia-smi 24564 MiB), this project's
# H100 runs (79.1 GiB, docs/benchmarks.md), and for the others nvidia-smi's total less the
# ~0.4 GiB the driver keeps back, as on the 4090 (RTX 5090 32607 MiB, A6000 and RTX 6000 Ada
# 49140 MiB, L40S 46068 MiB with ECC on as shipped, A100 80GB 81920 MiB -> "79.15 GiB total
# capacity", H200 143771 MiB). Rounded down to 0.1 GiB. Compute capabilities: NVIDIA's CUDA GPU
# list (Ampere 8.0/8.6, Ada 8.9, Hopper 9.0, Blackwell consumer 12.0).
CARDS = (
    Card("RTX 3090", 24, 23.6, (8, 6)),
    Card("RTX 4090", 24, 23.6, (8, 9)),
    Card("RTX 5090", 32, 31.4, (12, 0)),
    Card("L40S", 48, 44.5, (8, 9)),
    Card("RTX 6000 Ada", 48, 47.5, (8, 9)),
    Card("RTX A6000", 48, 47.5, (8, 6)),
    Card("A100 80GB", 80, 79.1, (8, 0)),
    Card("H100 80GB", 80, 79.1, (9, 0)),
    Card("H200", 141, 139.8, (9, 0)),
)
# What an estimate must leave free on a card to count as fitting it: a desktop's share of the
# card (a display, a browser) and the estimate's own error (bf16: 68.6 GiB estimated, 67.6 GiB
# measured). Also the per-process fraction to test a card's fit with on a bigger GPU:
# (card.cuda_bytes - FIT_HEADROOM_BYTES) / total.
FIT_HEADROOM_BYTES = GIB * 3 // 2  # leaves a 24 GB card 22.1 GiB: issue 19's <= 22 GiB target


def card_budget(card: Card) -> int:
    """Bytes an estimate may take on `card` and still fit (its CUDA memory less the headroom)."""
    return card.cuda_bytes - FIT_HEADROOM_BYTES


def runs_on(card: Card, quantize: str) -> bool:
    """Whether `card` can run `quantize` at all (fp8 needs compute capability 8.9)."""
    return quantize != "fp8" or card.capability >= FP8_MIN_CAPABILITY


def fits_cards(need: int, quantize: str = "none", cards: tuple[Card, ...] = CARDS
               ) -> tuple[Card, ...]:
    """The cards of `cards` whose budget holds `need` bytes and that can run `quantize`."""
    return tuple(c for c in cards if need <= card_budget(c) and runs_on(c, quantize))


# The settings' range for qwen.max_context_tokens (config/settings.py; tests keep them equal).
CONTEXT_RANGE = (2048, 65536)
CONTEXT_STEP = 2048  # proposed contexts are multiples of 2048 tokens


def context_that_fits(config: Mapping[str, Any], torch_dtype: str, budget: int,
                      max_reply_tokens: int, max_reply_seconds: float, quantize: str = "none",
                      scheme: WeightFormat | None = None,
                      at_most: int = CONTEXT_RANGE[1]) -> int | None:
    """The largest `max_context_tokens` (a multiple of CONTEXT_STEP within CONTEXT_RANGE, at most
    `at_most`) whose `gpu_bytes` is within `budget`; None when not even the smallest fits."""
    lo = CONTEXT_RANGE[0]
    best = None
    for context in range(lo, min(at_most, CONTEXT_RANGE[1]) + 1, CONTEXT_STEP):
        cache = cache_positions(context, max_reply_tokens, max_reply_seconds)
        if gpu_bytes(config, torch_dtype, False, cache, quantize, scheme) > budget:
            break
        best = context
    return best


# ----------------------------------------------------------------------------- the local cache


@dataclass(frozen=True)
class CacheStatus:
    """Where a model's files are on this machine.

    kind: "local" (a directory was named) or "hub" (a hub id); present: config and every weight
    file found; path: the directory (for the hub, the cached snapshot) or None; size_bytes: bytes
    on disk (the repository's whole cache for a hub id); detail: one sentence for humans.
    """

    model_id: str
    kind: str
    present: bool
    path: Path | None
    size_bytes: int
    detail: str
    missing: tuple[str, ...] = field(default_factory=tuple)

    def config(self) -> dict | None:
        """The model's config.json as a dict, or None when it is not on disk."""
        if self.path is None or not (self.path / CONFIG_FILE).is_file():
            return None
        return json.loads((self.path / CONFIG_FILE).read_text(encoding="utf-8"))


def looks_like_path(model_id: str) -> bool:
    """True when `model_id` names a directory rather than a hub id ("owner/name")."""
    return (model_id.startswith(("/", ".", "~")) or model_id.count("/") != 1
            or Path(model_id).expanduser().exists())


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _local_status(model_id: str) -> CacheStatus:
    path = Path(model_id).expanduser()
    if not path.is_dir():
        return CacheStatus(model_id, "local", False, None, 0, f"{path} is not a directory.")
    found = inspect_checkpoint(path)
    return CacheStatus(model_id, "local", found.problem is None, path, _dir_size(path),
                       found.problem or "config and weights present", found.missing)


def hub_cache_status(model_id: str, cache_dir: str | Path | None = None) -> CacheStatus:
    """Whether `model_id` (hub id or directory) is complete on this disk. Never uses the network.

    A hub id is looked up in `cache_dir` (default: the hub cache, honouring HF_HUB_CACHE/HF_HOME)
    at the snapshot its "main" ref points to.
    """
    if looks_like_path(model_id):
        return _local_status(model_id)
    from huggingface_hub import constants  # local reads only; no request is ever made

    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    repo_dir = cache / ("models--" + model_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return CacheStatus(model_id, "hub", False, None, 0,
                           f"{model_id} is not in the Hugging Face cache ({cache}).")
    snapshot = repo_dir / "snapshots" / ref.read_text().strip()
    size = _dir_size(repo_dir / "blobs") if (repo_dir / "blobs").is_dir() else 0
    if not (snapshot / CONFIG_FILE).is_file():
        return CacheStatus(model_id, "hub", False, snapshot, size,
                           f"{model_id} is only partly cached (no {CONFIG_FILE}).", (CONFIG_FILE,))
    missing = missing_weights(snapshot)
    if missing:
        return CacheStatus(model_id, "hub", False, snapshot, size,
                           f"{model_id} is only partly cached: {len(missing)} weight file(s) "
                           "missing.", missing)
    return CacheStatus(model_id, "hub", True, snapshot, size, f"cached at {snapshot}")
