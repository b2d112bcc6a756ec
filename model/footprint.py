"""How big a Qwen3-Omni is, from its config alone, and whether its weights are on this disk.

`part_params(config)` counts the parameters of each part of `Qwen3OmniMoeForConditionalGeneration`
analytically (no model is built, transformers is not imported), following the module layout of
transformers' `modeling_qwen3_omni_moe.py`; tests check the counts equal the instantiated tiny
model's, part by part, and the release config's total is the 35.26 B that DESIGN.md gives.

`gpu_bytes(config, dtype, load_in_8bit, cache)` turns that into the GPU memory `talk` needs: the
weights of every part but the vision tower (voice chat never loads images) plus a working margin
(KV caches of the size the settings give them, `cache_for(qwen_settings)`, and a workspace).

`hub_cache_status(model_id)` says whether a model is a local directory or sits complete in the
Hugging Face hub cache, reading only the local disk (never the network).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from duplex_chat.audio.constants import FRAME_HZ

from .checkpoint import CONFIG_FILE, inspect_checkpoint, missing_weights

PARTS = ("thinker", "audio_encoder", "vision", "talker", "code_predictor", "code2wav")
VOICE_PARTS = tuple(p for p in PARTS if p != "vision")  # what `talk` puts on the GPU

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



@dataclass(frozen=True)
class PartCount:
    """Parameters of one part, split by how 8-bit loading treats them.

    linear: weights of `nn.Linear` layers (quantised to int8 by `load_in_8bit`);
    experts: the fused MoE expert tensors (`nn.Parameter`s, which bitsandbytes leaves in 16 bit);
    other: embeddings, `lm_head`s (skipped by loading.py's int8 config), biases, norms, convs.
    """

    linear: int = 0
    experts: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.linear + self.experts + self.other

    def __add__(self, o: "PartCount") -> "PartCount":
        return PartCount(self.linear + o.linear, self.experts + o.experts, self.other + o.other)


def _lin(n_in: int, n_out: int, bias: bool = True) -> PartCount:
    """An nn.Linear: int8-able weight, bias kept in 16 bit."""
    return PartCount(linear=n_in * n_out, other=n_out if bias else 0)


def _other(n: int) -> PartCount:
    return PartCount(other=n)


def _sum(counts) -> PartCount:
    total = PartCount()
    for c in counts:
        total = total + c
    return total


def _head_dim(cfg: Mapping[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _attention(cfg: Mapping[str, Any], qk_norm: bool) -> PartCount:
    """Grouped-query attention: q, k, v, o projections (+ per-head RMSNorm on q and k)."""
    h, hd, bias = cfg["hidden_size"], _head_dim(cfg), bool(cfg.get("attention_bias", False))
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    count = _lin(h, q, bias) + _lin(h, kv, bias) + _lin(h, kv, bias) + _lin(q, h, bias)
    return count + _other(2 * hd) if qk_norm else count


def _gated_mlp(hidden: int, inter: int) -> PartCount:
    """SwiGLU MLP: gate, up and down projections without biases."""
    return _lin(hidden, inter, False) + _lin(hidden, inter, False) + _lin(inter, hidden, False)


def _moe(cfg: Mapping[str, Any], shared: bool) -> PartCount:
    """Router + fused experts (gate_up and down) (+ the talker's shared expert and its gate)."""
    h, mi = cfg["hidden_size"], cfg["moe_intermediate_size"]
    n = cfg.get("num_experts") or cfg["num_local_experts"]
    count = _lin(h, n, False) + PartCount(experts=n * 3 * h * mi)
    if shared:
        count = count + _gated_mlp(h, cfg["shared_expert_intermediate_size"]) + _lin(h, 1, False)
    return count


def _is_sparse(cfg: Mapping[str, Any], layer: int) -> bool:
    n = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    return (layer not in cfg.get("mlp_only_layers", []) and n > 0
            and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0)


def _thinker_text(thinker: Mapping[str, Any]) -> PartCount:
    cfg = thinker["text_config"]
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        mlp = _moe(cfg, shared=False) if _is_sparse(cfg, i) else _gated_mlp(h, cfg["intermediate_size"])
        layers.append(_attention(cfg, qk_norm=True) + mlp + _other(2 * h))
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
    layer = _attention(cfg, qk_norm=True) + _moe(cfg, shared=True) + _other(2 * h)
    resize_mlp = _lin(talker["thinker_hidden_size"], inter) + _lin(inter, h)
    # codec_head is an nn.Linear that the int8 skip list ("lm_head", "code2wav") does not name.
    head = PartCount() if talker.get("tie_word_embeddings", False) else _lin(h, vocab, False)
    return (_sum(layer for _ in range(cfg["num_hidden_layers"])) + _other(h) + _other(vocab * h)
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


def weight_bytes(config: Mapping[str, Any], torch_dtype: str, load_in_8bit: bool) -> int:
    """Bytes of the weights `talk` loads (every part but the vision tower).

    With `load_in_8bit` only `nn.Linear` weights become int8: transformers' bitsandbytes
    integration leaves the fused MoE expert tensors (most of the model) and the output heads in
    16 bit, so 8-bit saves little on Qwen3-Omni.
    """
    dtype = resolve_dtype(config, torch_dtype)
    counts = part_counts(config)
    if not load_in_8bit:
        return sum(counts[p].total for p in VOICE_PARTS) * BYTES_PER_PARAM[dtype]
    unquantised = BYTES_PER_PARAM["float16"] if dtype == "float32" else BYTES_PER_PARAM[dtype]
    quantised = _sum(counts[p] for p in VOICE_PARTS if p not in INT8_SKIPPED_PARTS)
    kept = sum(counts[p].total for p in INT8_SKIPPED_PARTS)
    return (quantised.linear * INT8_BYTES
            + (quantised.experts + quantised.other + kept) * unquantised)


def gpu_bytes(config: Mapping[str, Any], torch_dtype: str, load_in_8bit: bool,
              cache: tuple[int, int]) -> int:
    """Estimated GPU memory for `talk`: weights without the vision tower + working margin, with
    KV caches of `cache` = (thinker, talker) positions (`cache_for(settings.qwen)`)."""
    dtype = resolve_dtype(config, torch_dtype)
    if load_in_8bit and dtype == "float32":
        dtype = "float16"
    return weight_bytes(config, torch_dtype, load_in_8bit) + working_margin(config, dtype, cache)


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
