"""Reading checkpoints in compressed-tensors format, as llm-compressor writes them.

Such a checkpoint's config.json has a `quantization_config` with quant_method
"compressed-tensors": `config_groups` (each a scheme: `weights` {num_bits, type, symmetric,
strategy, group_size, block_structure, ...}, `targets` and optionally its own `format`), a
global `format` and an `ignore` list. Targets and ignore entries are module names, "re:" regular
expressions (matched from the start of the name, `re.match`) or the class name "Linear";
compressed-tensors picks, for a module, exact names first, then regexes (each kind in sorted
order), then classes (`quantization/lifecycle/apply.py`, `utils/match.py: match_targets`).

What a quantized Linear `P` holds (compressed-tensors 0.20, `compressors/`):
  pack-quantized   P.weight_packed int32 (N, ceil(K * bits / 32)), P.weight_scale,
                   P.weight_shape int64 [N, K], and when asymmetric P.weight_zero_point int32
                   packed along N, (ceil(N * bits / 32), groups) (older writers: int8 unpacked).
  int-quantized, naive-quantized, float-quantized
                   P.weight int8 or float8_e4m3fn (N, K), P.weight_scale, and when asymmetric
                   P.weight_zero_point int8 (unpacked).
  weight_scale is (N, K // G) for groups, (N, 1) per channel, (1,) per tensor, (ceil(N / bn),
  ceil(K / bk)) per block, in the dtype of the weight it was made from. Activation scales
  (P.input_scale, ...) may sit beside them; they are not read: duplex-chat runs weight-only,
  with activations in 16 bits, which only removes the activation rounding the checkpoint was
  calibrated with (vLLM does the same on GPUs without FP8).

Mixture-of-experts layers: llm-compressor quantizes one Linear per expert, so a Qwen3-Omni
checkpoint holds `thinker.model.layers.L.mlp.experts.E.{gate,up,down}_proj.*` (and the same under
`talker.model.layers.L.mlp.experts.E`), while this transformers version fuses them into 3-D
`mlp.experts.gate_up_proj` (E, 2I, H), gate rows first, then up, and `mlp.experts.down_proj`
(E, H, I) (`Qwen3OmniMoeThinkerTextExperts`, `Qwen3OmniMoeTalkerTextExperts`; transformers'
conversion_mapping "qwen2_moe": MergeModulelist + Concatenate(dim=1)). `load_experts` does that
mapping on the quantized tensors.

Tensors come through a callable `get_tensor(name)`, so the caller streams them from the
safetensors shards as it likes; it returns the tensor, or raises KeyError (or returns None)
when the checkpoint has no such tensor. This module never imports compressed-tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from duplex_chat.config import DuplexError

from .formats import FP8_DTYPE, SCALE_DTYPES, QuantWeight, Scheme, pack_int4, unpack_int32

QUANT_METHOD = "compressed-tensors"
READ_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
DENSE = "dense"  # stored unquantized: the plain `weight` is loaded
SUPPORTED = ("compressed-tensors int4 or int8 weights (groups or channels, symmetric or not) "
             "and FP8 e4m3 weights (per channel, per tensor or in blocks)")

# Tensor-name suffixes of quantization parameters: never model parameters of their own.
QUANT_PARAM_SUFFIXES = (
    "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
    "weight_global_scale", "input_scale", "input_zero_point", "input_global_scale",
    "output_scale", "output_zero_point", "k_scale", "v_scale", "q_scale",
)

GetTensor = Callable[[str], "Tensor | None"]


@dataclass(frozen=True)
class QuantGroup:
    """One config group: the weight `scheme`, the on-disk `format`, its `targets`, and the
    checkpoint's own strategy name (an FP8 "tensor" scale is read as one scale per channel)."""

    name: str
    scheme: Scheme
    format: str
    targets: tuple[str, ...]
    strategy: str

    def describe(self) -> str:
        how = self.scheme.describe()
        if self.strategy == "tensor":
            how = how.replace("per channel", "per tensor")
        return f"{how} ({self.format})"


@dataclass(frozen=True)
class CompressedConfig:
    """A checkpoint's compressed-tensors quantization, as far as weights go."""

    groups: tuple[QuantGroup, ...]
    ignore: tuple[str, ...]
    format: str

    def group_for(self, module_name: str) -> QuantGroup | None:
        """The config group that quantizes the Linear `module_name`, or None (left in 16 bits:
        ignored, untargeted or stored dense)."""
        if any(_matches(module_name, entry) for entry in self.ignore):
            return None
        target_to_group: dict[str, QuantGroup] = {}
        for group in self.groups:  # a target listed twice: the later group wins, as in apply.py
            for target in group.targets:
                target_to_group[target] = group
        ordered = sorted(target_to_group, key=lambda t: (t.startswith("re:"), t))
        matched = [t for t in ordered if t != "Linear" and _matches(module_name, t)]
        if "Linear" in target_to_group:
            matched.append("Linear")
        if not matched:
            return None
        group = target_to_group[matched[0]]
        return None if group.format == DENSE else group

    def scheme_for(self, module_name: str) -> Scheme | None:
        group = self.group_for(module_name)
        return None if group is None else group.scheme

    def is_quantized(self, module_name: str) -> bool:
        return self.group_for(module_name) is not None

    def describe(self) -> str:
        """E.g. "int4 symmetric, groups of 32 (pack-quantized)" for messages and `check`."""
        kinds = sorted({g.describe() for g in self.groups if g.format != DENSE})
        return "; ".join(kinds) if kinds else "no quantized weights"


def _matches(name: str, entry: str) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return entry == name


def _looks_like_class(entry: str) -> bool:
    return not entry.startswith("re:") and "." not in entry and entry[:1].isupper()


def _refuse(what: str) -> DuplexError:
    return DuplexError(f"This checkpoint's quantization uses {what}, which duplex-chat cannot "
                       "load.",
                       hint=f"duplex-chat reads {SUPPORTED}; or use the bf16 release with "
                            "--quantize.")


# Preset names llm-compressor recipes may use as a group key with a list of targets
# (compressed-tensors' `preset_name_to_scheme`), reduced to their weights.
_PRESETS: dict[str, dict[str, Any]] = {
    "W4A16": dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128),
    "W4A16_ASYM": dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128),
    "W8A16": dict(num_bits=8, type="int", symmetric=True, strategy="group", group_size=128),
    "W8A8": dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
    "INT8": dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
    "FP8": dict(num_bits=8, type="float", symmetric=True, strategy="tensor"),
    "FP8_DYNAMIC": dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
    "FP8_BLOCK": dict(num_bits=8, type="float", symmetric=True, strategy="block",
                      block_structure=[128, 128]),
}
_PRESET_ACTIVATIONS = {"W8A8", "INT8", "FP8", "FP8_DYNAMIC", "FP8_BLOCK"}


def read_scheme(config: Mapping[str, Any]) -> CompressedConfig | None:
    """A checkpoint's compressed-tensors weight quantization from its config.json (the whole
    dict, or its `quantization_config`), or None when it is not quantized.

    Raises DuplexError naming what cannot be loaded: another quant_method, a sparse, transformed
    (rotated) or expert-pruned checkpoint, a format other than the four read here, fp4 (nvfp4,
    mxfp4), int weights of other than 4 or 8 bits or with one scale per tensor or per block,
    group-wise FP8, asymmetric FP8, activation-ordered groups (g_idx) or class-name targets other
    than Linear. Activation and KV-cache quantization are ignored (weight-only, see the module
    docstring).
    """
    qc = config.get("quantization_config", config if "quant_method" in config else None)
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise _refuse(f"quant_method {method!r} (not compressed-tensors)")
    fmt = qc.get("format") or DENSE
    if fmt not in READ_FORMATS + (DENSE, "mixed-precision"):
        raise _refuse(f"the {fmt!r} format")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and (sparsity.get("format") or DENSE) != DENSE:
        raise _refuse(f"sparse weights ({sparsity.get('format')!r}, "
                      f"{sparsity.get('sparsity_structure')!r})")
    if qc.get("transform_config"):
        raise _refuse("weight transforms (transform_config: rotated weights)")
    if qc.get("moe_sparsity_config"):
        raise _refuse("pruned experts (moe_sparsity_config)")

    groups = []
    for name, entry in (qc.get("config_groups") or {}).items():
        if isinstance(entry, (list, tuple)):  # a preset name with its targets
            if name not in _PRESETS:
                raise _refuse(f"the preset scheme {name!r}")
            entry = {"targets": list(entry), "weights": _PRESETS[name],
                     "input_activations": {} if name in _PRESET_ACTIVATIONS else None}
        group = _read_group(name, entry, fmt)
        if group is not None:
            groups.append(group)
    ignore = tuple(qc.get("ignore") or ())
    for entry in ignore:
        if _looks_like_class(entry):
            raise _refuse(f"the class name {entry!r} in its ignore list (module names and 're:' "
                          "patterns are read)")
    return CompressedConfig(groups=tuple(groups), ignore=ignore, format=fmt)


def _read_group(name: str, entry: Mapping[str, Any], global_format: str) -> QuantGroup | None:
    weights = entry.get("weights")
    if not weights:
        return None  # activations only: the weights stay as they are
    targets = tuple(entry.get("targets") or ())
    for target in targets:
        if target != "Linear" and _looks_like_class(target):
            raise _refuse(f"the class-name target {target!r} in group {name!r} (only 'Linear', "
                          "module names and 're:' patterns are read)")
    kind = str(weights.get("type", "int")).lower()
    bits = int(weights.get("num_bits", 8))
    symmetric = bool(weights.get("symmetric", True))
    group_size = weights.get("group_size")
    strategy = weights.get("strategy")
    if strategy is None:  # as QuantizationArgs infers it
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    strategy = str(strategy).lower()
    label = f"{kind}{bits} weights with strategy {strategy!r} in group {name!r}"

    if weights.get("dynamic") not in (None, False, "false"):
        raise _refuse(f"dynamically quantized weights in group {name!r}")
    if str(weights.get("actorder")).lower() in ("group", "dynamic", "true"):
        raise _refuse(f"activation-ordered groups (actorder {weights.get('actorder')!r}, g_idx) "
                      f"in group {name!r}")
    scale_dtype = weights.get("scale_dtype")
    if scale_dtype is not None and str(scale_dtype).replace("torch.", "") not in (
            "bfloat16", "float16", "float32"):
        raise _refuse(f"{scale_dtype} scales in group {name!r}")

    block = None
    if kind == "int":
        if bits not in (4, 8):
            raise _refuse(f"int{bits} weights (group {name!r}; int4 and int8 are read)")
        if strategy == "group":
            if not group_size or group_size <= 0:
                raise _refuse(f"{label} without a group size")
        elif strategy == "channel":
            group_size = None
        else:
            raise _refuse(f"{label} (int weights are read with group or channel scales)")
        zp_dtype = weights.get("zp_dtype")
        if not symmetric and zp_dtype is not None and "int8" not in str(zp_dtype):
            raise _refuse(f"{zp_dtype} zero points in group {name!r}")
    elif kind == "float":
        if bits != 8:
            raise _refuse(f"fp{bits} weights (group {name!r}: nvfp4/mxfp4 are not read)")
        if not symmetric:
            raise _refuse(f"asymmetric FP8 weights in group {name!r}")
        if strategy == "block":
            structure = weights.get("block_structure")
            if isinstance(structure, str):
                structure = [int(v) for v in structure.split("x")]
            if not structure or len(structure) != 2:
                raise _refuse(f"{label} without a block structure")
            block = (int(structure[0]), int(structure[1]))
        elif strategy not in ("channel", "tensor"):
            raise _refuse(f"{label} (FP8 weights are read per channel, per tensor or in blocks)")
        group_size = None
    else:
        raise _refuse(f"{kind!r} weights in group {name!r}")

    scheme = Scheme(kind, bits, group_size=group_size, symmetric=symmetric, block=block)
    fmt = entry.get("format") or global_format
    if fmt == "mixed-precision":
        fmt = _inferred_format(kind, entry.get("input_activations"))
    if fmt not in READ_FORMATS + (DENSE,):
        raise _refuse(f"the {fmt!r} format (group {name!r})")
    if fmt == "pack-quantized" and kind != "int":
        raise _refuse(f"pack-quantized {kind} weights (group {name!r})")
    return QuantGroup(name=name, scheme=scheme, format=fmt, targets=targets, strategy=strategy)


def _inferred_format(kind: str, input_activations: Any) -> str:
    """compressed-tensors' `infer_module_format` for a Linear (compressors/format.py)."""
    if kind == "int":
        return "int-quantized" if input_activations is not None else "pack-quantized"
    return "float-quantized" if input_activations is not None else "naive-quantized"


def is_quant_param(name: str) -> bool:
    """Whether a checkpoint tensor is a quantization parameter (read by `load_linear` or
    deliberately ignored), not a model parameter."""
    return name.rpartition(".")[2] in QUANT_PARAM_SUFFIXES


def tensor_names(prefix: str, cfg: CompressedConfig | None) -> tuple[str, ...]:
    """The tensors `load_linear(…, prefix, cfg)` reads."""
    group = None if cfg is None else cfg.group_for(prefix)
    if group is None:
        return (f"{prefix}.weight",)
    names = (["weight_packed", "weight_scale", "weight_shape"] if group.format == "pack-quantized"
             else ["weight", "weight_scale"])
    if not group.scheme.symmetric:
        names.append("weight_zero_point")
    return tuple(f"{prefix}.{n}" for n in names)


class _Missing(KeyError):
    pass


def _get(get_tensor: GetTensor, name: str) -> Tensor:
    try:
        tensor = get_tensor(name)
    except KeyError:
        tensor = None
    if tensor is None:
        raise _Missing(name)
    return tensor


def load_linear(get_tensor: GetTensor, prefix: str,
                cfg: CompressedConfig | None) -> QuantWeight | Tensor:
    """The weight of the Linear `prefix` (e.g. "thinker.model.layers.0.self_attn.q_proj"): a
    QuantWeight when the checkpoint quantizes it, else its plain `weight` tensor."""
    try:
        return _load_linear(get_tensor, prefix, cfg)
    except _Missing as missing:
        group = None if cfg is None else cfg.group_for(prefix)
        how = "unquantized" if group is None else group.describe()
        raise DuplexError(f"The checkpoint has no tensor {missing.args[0]}, which {prefix} needs "
                          f"({how}).",
                          hint="The download may be incomplete, or its config.json may not "
                               "describe its tensors.") from None


def _load_linear(get_tensor: GetTensor, prefix: str, cfg: CompressedConfig | None):
    group = None if cfg is None else cfg.group_for(prefix)
    if group is None:
        return _get(get_tensor, f"{prefix}.weight")
    s = group.scheme

    def bad(problem: str) -> DuplexError:
        return DuplexError(f"{prefix} ({group.describe()}) does not fit its scheme: {problem}.")

    zero = None
    if group.format == "pack-quantized":
        packed = _get(get_tensor, f"{prefix}.weight_packed")
        shape = [int(v) for v in _get(get_tensor, f"{prefix}.weight_shape").reshape(-1).tolist()]
        if len(shape) != 2 or packed.dtype != torch.int32 or packed.ndim != 2:
            raise bad(f"weight_packed is {packed.dtype} {tuple(packed.shape)} for weight_shape "
                      f"{shape}")
        n, k = shape
        if tuple(packed.shape) != (n, math.ceil(k * s.bits / 32)):
            raise bad(f"weight_packed has shape {tuple(packed.shape)}, weight_shape {shape} needs "
                      f"{(n, math.ceil(k * s.bits / 32))}")
        if s.bits == 4:
            if k % 8:
                raise bad(f"{k} input columns are not a multiple of 8")
            data = packed.contiguous()
        else:
            data = unpack_int32(packed, 8, k)
    else:
        weight = _get(get_tensor, f"{prefix}.weight")
        want = torch.int8 if s.kind == "int" else FP8_DTYPE
        if weight.dtype != want or weight.ndim != 2:
            raise bad(f"weight is {weight.dtype} {tuple(weight.shape)}, expected 2-D {want}")
        n, k = weight.shape
        if s.kind == "int" and s.bits == 4:
            if k % 8:
                raise bad(f"{k} input columns are not a multiple of 8")
            if weight.numel() and (int(weight.min()) < -8 or int(weight.max()) > 7):
                raise bad("its int4 values lie outside [-8, 7]")
            data = pack_int4(weight)
        else:
            data = weight

    if s.group_size is not None and k % s.group_size:
        raise bad(f"{k} input columns do not split into groups of {s.group_size}")
    scale = _get(get_tensor, f"{prefix}.weight_scale")
    if scale.dtype not in SCALE_DTYPES:
        raise bad(f"weight_scale is {scale.dtype}")
    if group.strategy == "tensor":  # FP8: one scale, read as one per channel (same weights)
        if scale.numel() != 1:
            raise bad(f"a per-tensor weight_scale has shape {tuple(scale.shape)}")
        scale = scale.reshape(1, 1).expand(n, 1).contiguous()
    elif s.granularity == "channel" and tuple(scale.shape) == (n,):
        scale = scale.reshape(n, 1)
    if not s.symmetric:
        zero = _get(get_tensor, f"{prefix}.weight_zero_point")
        if zero.dtype == torch.int32:  # packed along N (pack_to_int32(..., packed_dim=0))
            if zero.ndim != 2 or zero.shape[1] != scale.shape[-1]:
                raise bad(f"weight_zero_point has shape {tuple(zero.shape)}")
            zero = unpack_int32(zero.t(), s.bits, n).t().contiguous()
        elif zero.dtype != torch.int8:
            raise bad(f"weight_zero_point is {zero.dtype}")
    try:
        return QuantWeight(data=data, scale=scale, zero=zero, scheme=s)
    except ValueError as problem:
        raise bad(str(problem).split(": ", 1)[-1]) from None


def load_experts(get_tensor: GetTensor, prefix: str, num_experts: int,
                 cfg: CompressedConfig | None) -> dict[str, QuantWeight | Tensor]:
    """The fused expert weights of the MoE block `prefix` (e.g.
    "thinker.model.layers.0.mlp.experts") from one Linear per expert (`prefix.E.gate_proj`, ...):
    {"gate_up_proj": (E, 2I, H), "down_proj": (E, H, I)}, each a QuantWeight when quantized.
    Each output is allocated once and filled expert by expert."""
    out: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    for e in range(num_experts):
        def load(proj: str):
            name = f"{prefix}.{e}.{proj}"
            try:
                return _load_linear(get_tensor, name, cfg)
            except _Missing as missing:
                raise DuplexError(f"The checkpoint has no tensor {missing.args[0]}: expert {e} "
                                  f"of the {num_experts} in {prefix} is missing.",
                                  hint="The download may be incomplete, or the checkpoint has "
                                       "fewer experts than its config says.") from None

        gate, up, down = load("gate_proj"), load("up_proj"), load("down_proj")
        what_gate, what_up = _what(gate), _what(up)
        if what_gate != what_up or gate.shape != up.shape:
            raise DuplexError(f"{prefix}.{e}: gate_proj ({what_gate}, {tuple(gate.shape)}) and "
                              f"up_proj ({what_up}, {tuple(up.shape)}) differ, so they cannot "
                              "be fused into gate_up_proj.")
        parts = {"gate_up_proj": (gate, up), "down_proj": (down,)}
        for key, pieces in parts.items():
            what = _what(pieces[0])
            if e == 0:
                kinds[key] = what
                out[key] = _allocate(pieces, num_experts, prefix, key)
            elif what != kinds[key]:
                raise DuplexError(f"{prefix}: expert {e}'s {key} is {what} but expert 0's is "
                                  f"{kinds[key]}; experts must share one scheme to be fused.")
            _fill(out[key], e, pieces, prefix, key)
    return out


def _what(weight: QuantWeight | Tensor) -> str:
    if isinstance(weight, QuantWeight):
        return f"{weight.scheme.describe()} with {weight.scale.dtype} scales"
    return f"unquantized {weight.dtype}"


def _fused_parts(pieces, attr: str) -> list[Tensor]:
    return [getattr(p, attr) for p in pieces]


def _allocate(pieces, num_experts: int, prefix: str, key: str):
    first = pieces[0]
    rows = len(pieces)
    if isinstance(first, Tensor):
        return first.new_empty((num_experts, first.shape[0] * rows, *first.shape[1:]))
    s = first.scheme
    if s.block is not None and rows > 1 and first.shape[0] % s.block[0]:
        raise DuplexError(f"{prefix}: gate_proj and up_proj have {first.shape[0]} rows, not a "
                          f"multiple of the {s.block[0]}-row FP8 blocks, so their scales cannot "
                          "be fused into gate_up_proj.")

    def empty(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.new_empty((num_experts, t.shape[0] * rows, *t.shape[1:]))

    return QuantWeight(data=empty(first.data), scale=empty(first.scale), zero=empty(first.zero),
                       scheme=s)


def _fill(out, e: int, pieces, prefix: str, key: str) -> None:
    def put(dst: Tensor, parts: list[Tensor]) -> None:
        if sum(p.shape[0] for p in parts) != dst.shape[1] or parts[0].shape[1:] != dst.shape[2:]:
            raise DuplexError(f"{prefix}.{e}: its {key} pieces have shapes "
                              f"{[tuple(p.shape) for p in parts]}, unlike expert 0's.")
        row = 0
        for p in parts:
            dst[e, row:row + p.shape[0]].copy_(p)
            row += p.shape[0]

    if isinstance(out, Tensor):
        put(out, list(pieces))
        return
    put(out.data, _fused_parts(pieces, "data"))
    put(out.scale, _fused_parts(pieces, "scale"))
    if out.zero is not None:
        put(out.zero, _fused_parts(pieces, "zero"))
