"""Weight quantization formats: which quantization (`Scheme`), one quantized weight in memory
(`QuantWeight`), round-to-nearest quantization (`quantize`) and int4 packing.

The in-memory layout is fixed, because the kernels are written against it. A weight is 2-D
(N, K) = (out_features, in_features), or 3-D (E, N, K) for a fused expert tensor such as
transformers' `mlp.experts.gate_up_proj` (E, 2I, H) and `mlp.experts.down_proj` (E, H, I):

  int4   `data` int32 (..., N, K // 8). Element k of a row is nibble k % 8 of word k // 8 (bits
         4*(k % 8) to 4*(k % 8) + 3), stored unsigned as u = q + 8 with q in [-8, 7]. This is
         compressed-tensors' "pack-quantized" layout for 4 bits
         (`compressors/pack_quantized/helpers.py: pack_to_int32`, packed_dim=1), so a checkpoint's
         `weight_packed` is used as it is.
  int8   `data` int8 (..., N, K), q in [-128, 127].
  fp8    `data` torch.float8_e4m3fn (..., N, K).

  `scale`  (..., N, K // G) for groups of G along K, (..., N, 1) per output channel, or
           (..., ceil(N / bn), ceil(K / bk)) for FP8 blocks of bn x bk; in the dtype the
           checkpoint (or the quantized weight) has: bfloat16, float16 or float32.
  `zero`   None when symmetric, else int8 with the scale's shape, holding the signed zero point
           (compressed-tensors packs it in checkpoints; the reader unpacks it).

The weight is w = (q - zero) * scale, for FP8 w = data * scale with each scale broadcast over its
block; `QuantWeight.dequantize` computes this in float32 and casts once, which gives the same
bits as compressed-tensors' own `dequantize` (that one multiplies in the scale's dtype, but every
(q - zero) is an integer of at most 9 bits, so the float32 product is exact and both round once).

`quantize` is round to nearest with min-max scales, computed as compressed-tensors computes them
(`quantization/utils/helpers.py: calculate_qparams`, in the weight's dtype: symmetric
scale = absmax / ((q_max - q_min) / 2), i.e. absmax / 7.5 for int4, / 127.5 for int8, / 448 for
FP8) and the values rounded as its quantize kernel does on a GPU (x / scale in float32, clamp,
round half to even). See `quantize` for the one place its CPU fallback differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT4_PER_WORD = 8


@dataclass(frozen=True)
class Scheme:
    """A weight quantization: integer (`kind` "int") or float8 e4m3 ("float"), with one scale per
    group of `group_size` input columns, per output channel (`group_size` None, `block` None) or
    per `block` = (rows, columns) tile (FP8 only)."""

    kind: str
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    block: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float"):
            raise ValueError(f"Scheme kind must be 'int' or 'float', not {self.kind!r}")
        if self.kind == "int" and self.bits not in (4, 8):
            raise ValueError(f"int weights must have 4 or 8 bits, not {self.bits}")
        if self.kind == "float":
            if self.bits != 8:
                raise ValueError(f"float weights must have 8 bits (e4m3), not {self.bits}")
            if not self.symmetric:
                raise ValueError("FP8 weights are symmetric (no zero point)")
            if self.group_size is not None:
                raise ValueError("FP8 weights take a scale per channel or per block, not per group")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive, not {self.group_size}")
        if self.block is not None:
            if self.kind != "float":
                raise ValueError("block-wise scales are for FP8 weights only")
            if len(self.block) != 2 or min(self.block) <= 0:
                raise ValueError(f"block must be two positive sizes, not {self.block}")
            object.__setattr__(self, "block", (int(self.block[0]), int(self.block[1])))

    @property
    def name(self) -> str:
        """"int4", "int8" or "fp8"."""
        return f"int{self.bits}" if self.kind == "int" else "fp8"

    @property
    def granularity(self) -> str:
        """"group", "channel" or "block"."""
        if self.block is not None:
            return "block"
        return "group" if self.group_size is not None else "channel"

    @property
    def qmin(self) -> float:
        return -FP8_MAX if self.kind == "float" else float(-(1 << (self.bits - 1)))

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.kind == "float" else float((1 << (self.bits - 1)) - 1)

    def describe(self) -> str:
        """E.g. "int4 symmetric, groups of 128", "fp8 e4m3, blocks of 128x128"."""
        head = "fp8 e4m3" if self.kind == "float" else (
            f"int{self.bits} {'symmetric' if self.symmetric else 'asymmetric'}")
        if self.block is not None:
            return f"{head}, blocks of {self.block[0]}x{self.block[1]}"
        if self.group_size is not None:
            return f"{head}, groups of {self.group_size}"
        return f"{head}, per channel"


# Quantize-at-load modes (`qwen.quantize`), besides "none".
MODES: dict[str, Scheme] = {
    "int4": Scheme("int", 4, group_size=128, symmetric=True),
    "int8": Scheme("int", 8, group_size=None, symmetric=True),
    "fp8": Scheme("float", 8),
}


@dataclass
class QuantWeight:
    """One quantized weight, 2-D (N, K) or fused experts (E, N, K), in the module docstring's
    layout. Tensors only: it is not an nn.Module and owns no device logic."""

    data: Tensor
    scale: Tensor
    scheme: Scheme
    zero: Tensor | None = None

    def __post_init__(self) -> None:
        problem = self._layout_problem()
        if problem:
            raise ValueError(f"QuantWeight ({self.scheme.describe()}): {problem}")

    def _layout_problem(self) -> str | None:
        s, data, scale, zero = self.scheme, self.data, self.scale, self.zero
        want = {("int", 4): torch.int32, ("int", 8): torch.int8, ("float", 8): FP8_DTYPE}
        if data.dtype != want[(s.kind, s.bits)]:
            return f"data is {data.dtype}, the layout needs {want[(s.kind, s.bits)]}"
        if data.ndim not in (2, 3):
            return f"data has {data.ndim} dimensions, not 2 or 3"
        if scale.dtype not in SCALE_DTYPES:
            return f"scale is {scale.dtype}, not one of {SCALE_DTYPES}"
        *lead, n, k = self.shape
        expected = tuple(lead) + scale_shape(s, n, k)
        if tuple(scale.shape) != expected:
            return f"scale has shape {tuple(scale.shape)}, expected {expected}"
        if s.symmetric and zero is not None:
            return "a symmetric weight has no zero point"
        if not s.symmetric:
            if zero is None:
                return "an asymmetric weight needs a zero point"
            if zero.dtype != torch.int8 or zero.shape != scale.shape:
                return (f"zero is {zero.dtype} {tuple(zero.shape)}, expected int8 "
                        f"{tuple(scale.shape)}")
        return None

    @property
    def shape(self) -> torch.Size:
        """The logical (dequantized) shape: (N, K) or (E, N, K)."""
        if self.scheme.kind == "int" and self.scheme.bits == 4:
            return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * INT4_PER_WORD))
        return self.data.shape

    @property
    def nbytes(self) -> int:
        """Bytes of all its tensors."""
        return sum(t.numel() * t.element_size()
                   for t in (self.data, self.scale, self.zero) if t is not None)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device: torch.device | str) -> QuantWeight:
        """The same weight on `device` (no dtype changes)."""
        return replace(self, data=self.data.to(device), scale=self.scale.to(device),
                       zero=None if self.zero is None else self.zero.to(device))

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """w = (q - zero) * scale (FP8: data * scale per block), in float32, cast to `dtype`."""
        s = self.scheme
        *lead, n, k = self.shape
        if s.kind == "float":
            w = self.data.float()
            if s.block is not None:
                w.mul_(expand_blocks(self.scale.float(), s.block, n, k))
            else:
                w.mul_(self.scale.float())
            return w.to(dtype)
        q = unpack_int4(self.data) if s.bits == 4 else self.data
        g = s.group_size or k
        w = q.float().reshape(*lead, n, k // g, g)
        if self.zero is not None:
            w.sub_(self.zero.float().unsqueeze(-1))
        w.mul_(self.scale.float().unsqueeze(-1))
        return w.reshape(*lead, n, k).to(dtype)


def scale_shape(scheme: Scheme, n: int, k: int) -> tuple[int, int]:
    """The shape of one 2-D weight's scale (and zero point) under `scheme`."""
    if scheme.block is not None:
        return (math.ceil(n / scheme.block[0]), math.ceil(k / scheme.block[1]))
    if scheme.group_size is not None:
        return (n, k // scheme.group_size)
    return (n, 1)


def expand_blocks(scale: Tensor, block: tuple[int, int], n: int, k: int) -> Tensor:
    """A block scale (..., ceil(N/bn), ceil(K/bk)) broadcast to one value per element
    (..., N, K)."""
    bn, bk = block
    return scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


def pack_int4(q: Tensor) -> Tensor:
    """int8 values in [-8, 7], (..., K) with K % 8 == 0 -> int32 words (..., K // 8): element k is
    nibble k % 8 of word k // 8, stored as q + 8 (compressed-tensors' pack-quantized layout)."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 takes int8 values, not {q.dtype}")
    k = q.shape[-1]
    if k % INT4_PER_WORD:
        raise ValueError(f"pack_int4 needs a multiple of 8 values per row, not {k}")
    u = (q.to(torch.int32) + 8).reshape(*q.shape[:-1], k // INT4_PER_WORD, INT4_PER_WORD)
    words = u[..., 0].clone()
    for j in range(1, INT4_PER_WORD):
        # int32 shifts wrap (j = 7 sets the sign bit), which is the bit pattern wanted
        words.bitwise_or_(u[..., j] << (4 * j))
    return words


def unpack_int4(words: Tensor) -> Tensor:
    """The inverse of `pack_int4`: int32 (..., K // 8) -> int8 (..., K) in [-8, 7]."""
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_int4 takes int32 words, not {words.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles.reshape(*words.shape[:-1], -1) - 8).to(torch.int8)


def unpack_int32(words: Tensor, bits: int, count: int) -> Tensor:
    """compressed-tensors' `unpack_from_int32` along the last dim for 4 or 8 bits (32 / bits
    values per word, value i of a row at bits [bits * i, bits * (i + 1)) of the dense bit
    stream, offset by 2**(bits - 1)): int32 (..., ceil(count * bits / 32)) -> int8 (..., count)."""
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit values are unpacked here, not {bits}")
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*words.shape[:-1], words.shape[-1] * per_word)[..., :count]
    return (values - (1 << (bits - 1))).to(torch.int8)


def quantize(weight: Tensor, scheme: Scheme) -> QuantWeight:
    """Round `weight` (N, K) or (E, N, K) to nearest under `scheme`, on the weight's device.

    Scales (and zero points) are min-max over each group, channel or block, computed in the
    weight's dtype with compressed-tensors' `calculate_qparams` formulas, so they have the
    weight's dtype (float16 for other dtypes, as there). Values are x / scale in float32
    (+ zero), clamped and rounded half to even: exactly what compressed-tensors' quantize
    kernel computes on a GPU (Triton, `_quantize_kernel`). Its CPU fallback divides in the
    weight's dtype instead, so for a bfloat16 weight x / scale is first rounded to 8
    significant bits there; for a float32 weight the two are the same. FP8 blocks at the
    edge are padded with zeros for the maximum, as compressed-tensors pads them.

    A 3-D weight is quantized one expert at a time, so at most one float32 copy of one
    expert exists at once.
    """
    if not weight.is_floating_point():
        raise TypeError(f"quantize takes a floating-point weight, not {weight.dtype}")
    if weight.ndim == 3:
        first = _quantize_2d(weight[0], scheme)
        out = QuantWeight(
            data=first.data.new_empty((weight.shape[0], *first.data.shape)),
            scale=first.scale.new_empty((weight.shape[0], *first.scale.shape)),
            zero=None if first.zero is None else first.zero.new_empty(
                (weight.shape[0], *first.zero.shape)),
            scheme=scheme)
        for e in range(weight.shape[0]):
            part = first if e == 0 else _quantize_2d(weight[e], scheme)
            out.data[e].copy_(part.data)
            out.scale[e].copy_(part.scale)
            if out.zero is not None:
                out.zero[e].copy_(part.zero)
        return out
    if weight.ndim != 2:
        raise ValueError(f"quantize takes a 2-D or 3-D weight, not shape {tuple(weight.shape)}")
    return _quantize_2d(weight, scheme)


def _quantize_2d(weight: Tensor, scheme: Scheme) -> QuantWeight:
    n, k = weight.shape
    if scheme.group_size is not None and k % scheme.group_size:
        raise ValueError(f"{k} input columns do not split into groups of {scheme.group_size}")
    if scheme.kind == "int" and scheme.bits == 4 and k % INT4_PER_WORD:
        raise ValueError(f"int4 weights need a multiple of 8 input columns, not {k}")
    if weight.dtype not in SCALE_DTYPES:  # compressed-tensors' initialize_qparams does the same
        weight = weight.to(torch.float16)

    if scheme.block is not None:
        bn, bk = scheme.block
        pad_n, pad_k = -n % bn, -k % bk
        padded = torch.nn.functional.pad(weight, (0, pad_k, 0, pad_n)) if pad_n or pad_k else weight
        tiles = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
        lo, hi = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
        del padded, tiles
    else:
        g = scheme.group_size or k
        grouped = weight.reshape(n, k // g, g)
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)

    scale, zero = _qparams(lo, hi, scheme)

    x = weight.to(torch.float32, copy=True)  # the one float32 copy (never the caller's tensor)
    if scheme.block is not None:
        x.div_(expand_blocks(scale.float(), scheme.block, n, k))
    else:
        g = scheme.group_size or k
        x = x.view(n, k // g, g)
        x.div_(scale.float().unsqueeze(-1))
        if zero is not None:
            x.add_(zero.float().unsqueeze(-1))
        x = x.view(n, k)
    x.clamp_(scheme.qmin, scheme.qmax)
    if scheme.kind == "float":
        return QuantWeight(data=x.to(FP8_DTYPE), scale=scale, scheme=scheme)
    q = x.round_().to(torch.int8)
    del x
    data = pack_int4(q) if scheme.bits == 4 else q
    return QuantWeight(data=data, scale=scale, zero=zero, scheme=scheme)


def _qparams(lo: Tensor, hi: Tensor, scheme: Scheme) -> tuple[Tensor, Tensor | None]:
    """compressed-tensors' `calculate_qparams` (weights, no global scale or scale_dtype), step
    by step in the same dtype, so the scales and zero points are bit for bit the same."""
    device = lo.device
    q_min = torch.tensor(scheme.qmin, device=device)  # float32 0-dim, as `calculate_range` makes
    q_max = torch.tensor(scheme.qmax, device=device)
    lo = torch.min(lo, torch.zeros_like(lo))
    hi = torch.max(hi, torch.zeros_like(hi))
    bit_range = q_max - q_min
    zero = None
    if scheme.symmetric:
        absmax = torch.max(torch.abs(lo), torch.abs(hi))
        scale = absmax / (bit_range.to(absmax.dtype) / 2)
    else:
        scale = (hi - lo) / bit_range.to(hi.dtype)
        zero = torch.clamp(q_min - (lo / scale), q_min, q_max)
    eps = torch.finfo(scale.dtype).eps
    scale = torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype, device=device), scale)
    if zero is not None:
        # an all-zero group (range 0) gives 0/0 there; any zero point reproduces its zeros
        zero = torch.round(torch.clamp(torch.nan_to_num(zero, nan=0.0), -128, 127)).to(torch.int8)
    return scale, zero
