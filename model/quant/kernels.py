"""Fused dequantising matmuls for quantized weights: Triton kernels, and a PyTorch fallback.

Two entry points, each for three weight schemes (the layouts the loader produces):

- `quant_linear(x, data, scale, zero, group)`: x (n, K) times a quantized (N, K) weight -> (n, N).
- `quant_moe(x, index, data, scale, zero, group)`: routed experts, (E, N, K) weights; each of a
  token's k slots multiplies by the expert `index` names -> (n, k, N).

Weight layouts (`...` is nothing for a dense weight, E for fused experts):

- int4: `data` int32 (..., N, K//8); element k of a row is nibble k%8 (bits 4*(k%8)) of word k//8,
  stored unsigned as q + 8 with q in [-8, 7]. `scale` (..., N, K//G); `zero` None or int8
  (..., N, K//G). w = (q - zero) * scale.
- int8: `data` int8 (..., N, K); `scale` (..., N, 1) or (..., N, K//G); `zero` as for int4.
- fp8: `data` float8_e4m3fn (..., N, K); `scale` float32 (..., N, 1) per channel, or
  (..., ceil(N/128), ceil(K/128)) for blocks of 128 x 128 (`group=128`).

Kernels. Few tokens (decode) run a GEMV that reads each weight byte once and splits K over more
programs when there are too few rows to fill the GPU; many tokens (prefill) run a tiled GEMM on
tensor cores (`tl.dot`). Routed experts at decode run one program per (token, slot, N tile)
reading only the chosen expert; at prefill, the (token, slot) pairs are sorted by expert into
blocks of rows (the idea of vLLM's `moe_align_block_size`, done here with fixed-shape torch ops on
the device), and a grouped GEMM reads each expert's weights once per block. Nothing syncs with the
host and every shape depends only on (n, k, E), so all of it can sit inside a captured CUDA graph.

Exactness. Dequantisation happens in registers and the scale is applied after the products: the
GEMM multiplies x by the integer (q - zero) (exact in bf16/fp16: |q - zero| <= 255) or by the fp8
value (exact in bf16/fp16) and scales each tile's float32 partial sum, so the only rounding is the
float32 accumulation and the final cast to x's dtype. FP8 is decoded with integer operations
(not the hardware conversion, which Triton only offers from compute capability 8.9 on), so the
same kernel runs on Ampere cards. On 8.9+ a real FP8 GEMM (`torch._scaled_mm`, FP8 tensor cores)
would be faster for prefill, but it needs the activations in FP8 too (W8A8), which changes the
numbers; decode is bound by reading weights, which this kernel already does at one byte each.

torch.compile and CUDA graphs. The Triton paths are registered with `torch.library.triton_op`
and launched through `wrap_triton` (torch >= 2.6), so inductor sees the kernels themselves and
the op's own body serves as its fake (meta) implementation. Off CUDA, the functions fall back to
dequantize + matmul in float32 (`quant_linear_torch`, `quant_moe_torch`), unless Triton's
interpreter is on (TRITON_INTERPRET=1 in the environment before triton is first imported, which
importing torch._inductor does): then the same Triton kernels run on CPU tensors, which is how
tests/test_quant_kernels.py checks them without a GPU.
"""

import functools
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the fallback needs no Triton
    triton = None

INTERPRETED = False  # set below: whether the kernels run in Triton's interpreter
INT4, INT8, FP8 = 0, 1, 2  # scheme codes, from the data dtype
# Group sizes along K the kernels take. A GEMV K tile (128 or 256 columns) must hold whole
# groups and a GEMM K tile (min(G, 64) columns) must lie within one, so powers of two from 32 to
# 128: what llm-compressor and quantize-at-load write. Others would read the wrong scales.
GROUP_SIZES = (32, 64, 128)
FP8_BLOCK = 128  # fp8 block-wise scales cover 128 x 128 weights (as llm-compressor writes them)
INT4_OFFSET = 8  # stored nibble = q + 8

# Up to this many tokens a dense layer runs the GEMV (the tokens' rows are unrolled in the
# kernel, each reuses the dequantised tile); beyond, the GEMM (tl.dot needs >= 16 rows a tile,
# so below that the GEMM would mostly multiply padding).
GEMV_MAX_TOKENS = 4
# Routed experts: up to this many (token, slot) pairs run as separate GEMVs (decode: one token's
# 8 slots, or a few tokens'); beyond, the sorted grouped GEMM, which reads an expert once for
# every block of rows routed to it instead of once per pair.
MOE_GEMV_MAX_PAIRS = 32
# The GEMV splits K until it has about this many programs per streaming multiprocessor: one wave
# of one program each leaves the memory system idle between a program's loads.
PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 16
# What the interpreter pretends the device has, so that small test shapes take the split-K path.
INTERPRETER_SMS = 4


def _scheme(data: torch.Tensor) -> int:
    if data.dtype == torch.int32:
        return INT4
    if data.dtype == torch.int8:
        return INT8
    if data.dtype == torch.float8_e4m3fn:
        return FP8
    raise TypeError(f"no kernel for weights of dtype {data.dtype} (int32-packed int4, int8 and "
                    "float8_e4m3fn are supported)")


def _in_features(data: torch.Tensor) -> int:
    return data.shape[-1] * (8 if data.dtype == torch.int32 else 1)


def _group(data: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
           group: Optional[int]) -> int:
    """Checks the layout; returns the group size along K, or 0 for one scale per output row."""
    _scheme(data)
    N, K = data.shape[-2], _in_features(data)
    lead = data.shape[:-2]
    if data.stride(-1) != 1:
        raise ValueError("weights must be contiguous along K")
    if scale.shape[:-2] != lead or (zero is not None and zero.shape != scale.shape):
        raise ValueError(f"scale {tuple(scale.shape)} / zero "
                         f"{None if zero is None else tuple(zero.shape)} do not fit weights "
                         f"{tuple(data.shape)}")
    if data.dtype == torch.float8_e4m3fn:
        if zero is not None:
            raise ValueError("fp8 weights have no zero point")
        blocks = (-(-N // FP8_BLOCK), -(-K // FP8_BLOCK))
        if group == FP8_BLOCK and tuple(scale.shape[-2:]) == blocks:
            return FP8_BLOCK
        if not group and tuple(scale.shape[-2:]) == (N, 1):
            return 0
        raise ValueError(f"fp8 scale {tuple(scale.shape)} with group={group}: expected "
                         f"(..., {N}, 1) per channel (group 0/None) or (..., {blocks[0]}, "
                         f"{blocks[1]}) with group={FP8_BLOCK}")
    if scale.shape[-2] != N:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit {N} output rows")
    groups = scale.shape[-1]
    if groups == 1 and group in (None, 0, K):
        return 0
    if group is None:
        group = K // groups
    if group <= 0 or K % group or K // group != groups:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit group size {group} over "
                         f"K={K}")
    if group not in GROUP_SIZES:
        raise ValueError(f"group size {group}: the kernels take groups of "
                         f"{', '.join(map(str, GROUP_SIZES))} (or one scale per row)")
    return group


def dequantize(data: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor] = None,
               group: Optional[int] = None) -> torch.Tensor:
    """Quantized weights (..., N, K[//8]) as float32 (..., N, K) (the fallback's first step)."""
    g = _group(data, scale, zero, group)
    N, K = data.shape[-2], _in_features(data)
    if data.dtype == torch.int32:
        shifts = torch.arange(0, 32, 4, device=data.device, dtype=torch.int32)
        q = ((data[..., None] >> shifts) & 0xF).reshape(*data.shape[:-1], K) - INT4_OFFSET
    else:
        q = data
    w = q.float()
    if data.dtype == torch.float8_e4m3fn and g:
        s = scale.float().repeat_interleave(FP8_BLOCK, -2).repeat_interleave(FP8_BLOCK, -1)
        return w * s[..., :N, :K]
    size = g or K
    if zero is not None:
        w = w - zero.float().repeat_interleave(size, -1)
    return w * scale.float().repeat_interleave(size, -1)


def quant_linear_torch(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
                       zero: Optional[torch.Tensor] = None,
                       group: Optional[int] = None) -> torch.Tensor:
    """`quant_linear` in PyTorch: dequantize to float32, matmul, cast to x's dtype."""
    return (x.float() @ dequantize(data, scale, zero, group).T).to(x.dtype)


def quant_moe_torch(x: torch.Tensor, index: torch.Tensor, data: torch.Tensor,
                    scale: torch.Tensor, zero: Optional[torch.Tensor] = None,
                    group: Optional[int] = None) -> torch.Tensor:
    """`quant_moe` in PyTorch: each expert dequantized (float32) and applied to all rows, kept
    where routed. A Python loop over experts with fixed shapes, so it also traces; it holds one
    expert's float32 weights at a time."""
    n, k = index.shape
    rows = x.float().reshape(n, -1, x.shape[-1]).expand(n, k, x.shape[-1])
    out = torch.zeros(n, k, data.shape[-2], device=x.device, dtype=torch.float32)
    for e in range(data.shape[0]):
        w = dequantize(data[e], scale[e], None if zero is None else zero[e], group)
        out = torch.where((index == e)[..., None], rows @ w.T, out)
    return out.to(x.dtype)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _use_triton(x: torch.Tensor) -> bool:
    """The Triton kernels for CUDA tensors, and for CPU tensors through the interpreter."""
    if triton is None:
        return False
    return x.device.type == "cuda" or INTERPRETED


def quant_linear(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
                 zero: Optional[torch.Tensor] = None,
                 group: Optional[int] = None) -> torch.Tensor:
    """x (n, K) (bf16, fp16 or float32) times the quantized weight (N, K) transposed -> (n, N)
    in x's dtype, accumulated in float32.

    data/scale/zero: one of the layouts in the module docstring, without the leading E.
    group: the group size along K (32, 64, 128; for fp8, 128 means 128 x 128 blocks); None or 0
    for one scale per output row (inferred from scale's shape when None and it has several).
    """
    g = _group(data, scale, zero, group)
    if x.shape[-1] != _in_features(data) or data.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} does not fit weights {tuple(data.shape)}")
    if _use_triton(x):
        return torch.ops.duplex_quant.linear(x, _raw(data), scale, zero, g)
    return quant_linear_torch(x, data, scale, zero, g)


def quant_moe(x: torch.Tensor, index: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
              zero: Optional[torch.Tensor] = None, group: Optional[int] = None) -> torch.Tensor:
    """Routed experts: out[t, s] = x[t] (or x[t, s]) times expert index[t, s]'s weight transposed.

    x: (n, K), the same input for all k slots (gate_up), or (n, k, K), one per slot (down).
    index: (n, k) integer expert ids in [0, E). data/scale/zero: (E, ...) layouts of the module
    docstring; group as for `quant_linear`. Returns (n, k, N) in x's dtype. Fixed shapes, no host
    sync: fit for CUDA graphs.
    """
    g = _group(data, scale, zero, group)
    n, k = index.shape
    K = _in_features(data)
    if data.dim() != 3 or x.shape[-1] != K or x.shape[0] != n or (
            x.dim() == 3 and x.shape[1] != k) or x.dim() not in (2, 3):
        raise ValueError(f"x {tuple(x.shape)}, index {tuple(index.shape)} do not fit experts "
                         f"{tuple(data.shape)}")
    if _use_triton(x):
        return torch.ops.duplex_quant.moe(x, index, _raw(data), scale, zero, g)
    return quant_moe_torch(x, index, data, scale, zero, g)


def _raw(data: torch.Tensor) -> torch.Tensor:
    """fp8 weights as their bytes (decoded with integer operations in the kernels)."""
    return data.view(torch.uint8) if data.dtype == torch.float8_e4m3fn else data


# --------------------------------------------------------------------------------------------
# Triton

if triton is not None:
    from triton.runtime.interpreter import InterpretedFunction

    # The kernels' constants (constexpr, as Triton requires of the globals a kernel reads).
    # int4 nibble u as float32 without an int-to-float conversion (a slow instruction): the float
    # whose bits are MAGIC_BITS | u is exactly MAGIC + u, so subtracting MAGIC + 8 (+ zero) gives
    # the integer q (- zero) exactly.
    MAGIC_BITS = tl.constexpr(0x4B000000)
    MAGIC_INT4 = tl.constexpr(8388608.0 + INT4_OFFSET)  # 2**23 + the stored offset
    # FP8 e4m3 is decoded as the fp16 whose bits are the fp8 bits shifted into place: that fp16
    # is the fp8 value / 2**8 (exponent bias 15 against 7, subnormals included), so the scale,
    # once per group, takes the 2**8.
    FP8_UNBIAS = tl.constexpr(256.0)

    # @triton.jit reads TRITON_INTERPRET when it decorates, and so did triton.language's own
    # functions (tl.zeros, ...) when triton was first imported: kernels run in the interpreter
    # only if it was on both times (torch._inductor, which model/fast.py imports, imports triton).
    _jit = triton.jit
    INTERPRETED = (os.environ.get("TRITON_INTERPRET", "0") == "1"
                   and isinstance(tl.zeros, InterpretedFunction))

    @_jit
    def _tile(w_ptr, s_ptr, z_ptr, stride_wn, stride_sn, stride_sk, stride_zn, stride_zk,
              offs_n, k0, N, K,
              SCHEME: tl.constexpr, HAS_ZERO: tl.constexpr, SN: tl.constexpr, G: tl.constexpr,
              GPT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Weights [offs_n, k0:k0+BK) as float32 (BN, GPT, BK // GPT), unscaled: q - zero for
        integers, value / 2**8 for fp8; and the scales of its GPT groups of K, (BN, GPT)."""
        GS: tl.constexpr = BK // GPT
        nmask = offs_n < N
        if SCHEME == 0:  # int4: BK // 8 words a row, expanded to 8 nibbles each
            offs_w = k0 // 8 + tl.arange(0, BK // 8)
            words = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :],
                            mask=nmask[:, None] & (offs_w[None, :] < K // 8), other=0)
            shifts = tl.arange(0, 8) * 4
            u = (words[:, :, None] >> shifts[None, None, :]) & 0xF
            u = tl.reshape(u, (BN, GPT, GS))
            w = (u | MAGIC_BITS).to(tl.float32, bitcast=True)  # 2**23 + u, exactly
            bias = MAGIC_INT4
        else:
            offs_k = k0 + tl.arange(0, BK)
            raw = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                          mask=nmask[:, None] & (offs_k[None, :] < K), other=0)
            if SCHEME == 1:
                w = tl.reshape(raw.to(tl.float32), (BN, GPT, GS))
            else:  # fp8 e4m3 bytes -> the fp16 with sign, exponent and mantissa moved into place
                b = raw.to(tl.int32)
                h = ((b << 8) & 0x8000) | ((b << 7) & 0x3F80)
                w = h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)  # value / 2**8
                w = tl.reshape(w, (BN, GPT, GS))
            bias = 0.0
        starts = k0 + tl.arange(0, GPT) * GS
        offs_g = starts // G
        gmask = nmask[:, None] & (starts[None, :] < K)
        rows = offs_n // SN
        s = tl.load(s_ptr + rows[:, None] * stride_sn + offs_g[None, :] * stride_sk, mask=gmask,
                    other=0).to(tl.float32)
        if SCHEME == 2:
            s = s * FP8_UNBIAS
        if HAS_ZERO:
            z = tl.load(z_ptr + rows[:, None] * stride_zn + offs_g[None, :] * stride_zk,
                        mask=gmask, other=0).to(tl.float32)
            w = w - (bias + z)[:, :, None]
        else:
            w = w - bias
        return w, s

    @_jit
    def _rounded(acc, ROUND_BF16: tl.constexpr):
        """acc (float32) rounded to the nearest bf16 (ties to even) when ROUND_BF16, so that the
        store's conversion, which the interpreter does by dropping bits (triton 3.9.0), is exact.
        Compiled kernels round to nearest themselves and pass ROUND_BF16 false."""
        if ROUND_BF16:
            bits = acc.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            acc = bits.to(tl.float32, bitcast=True)
        return acc

    @_jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, idx_ptr, out_ptr,
                     M, N, K, K_SPLIT,
                     stride_xt, stride_xs, stride_xm,
                     stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                     stride_ze, stride_zn, stride_zk,
                     stride_os, stride_op, stride_om,
                     TOPK: tl.constexpr, SCHEME: tl.constexpr, HAS_ZERO: tl.constexpr,
                     HAS_INDEX: tl.constexpr, SN: tl.constexpr, G: tl.constexpr,
                     GPT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     ROUND_BF16: tl.constexpr):
        """out[split, pair, m, n] = sum over this split's K of x[pair's row m, k] * w[e, n, k].

        Program (pair, N tile, K split). A pair is a (token, slot) of routed experts (expert
        index[pair], one row: M = 1) or, without an index, the dense layer's M <= BM rows."""
        pair = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        if HAS_INDEX:
            e = tl.load(idx_ptr + pair).to(tl.int64)
        else:
            e = 0
        x_base = x_ptr + (pair // TOPK) * stride_xt + (pair % TOPK) * stride_xs
        offs_n = pid_n * BN + tl.arange(0, BN)
        w_base = w_ptr + e * stride_we
        s_base = s_ptr + e * stride_se
        z_base = z_ptr + e * stride_ze
        GS: tl.constexpr = BK // GPT
        rows = tl.arange(0, BM)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_start = pid_k * K_SPLIT
        k_end = tl.minimum(k_start + K_SPLIT, K)
        for k0 in range(k_start, k_end, BK):
            w, s = _tile(w_base, s_base, z_base, stride_wn, stride_sn, stride_sk, stride_zn,
                         stride_zk, offs_n, k0, N, K, SCHEME, HAS_ZERO, SN, G, GPT, BN, BK)
            offs_k = k0 + tl.arange(0, BK)
            for m in tl.static_range(BM):
                xm = tl.load(x_base + m * stride_xm + offs_k, mask=(offs_k < K) & (offs_k * 0 + m < M),
                             other=0.0).to(tl.float32)
                part = tl.sum(w * tl.reshape(xm, (1, GPT, GS)), 2)  # (BN, GPT)
                part = tl.sum(part * s, 1)  # (BN,)
                acc += tl.where(rows[:, None] == m, part[None, :], 0.0)
        out = out_ptr + pid_k * stride_os + pair * stride_op
        tl.store(out + rows[:, None] * stride_om + offs_n[None, :],
                 _rounded(acc, ROUND_BF16).to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (offs_n[None, :] < N))

    @_jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, ids_ptr, blk_e_ptr, total_ptr, out_ptr,
                     M, N, K,
                     stride_xt, stride_xs,
                     stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                     stride_ze, stride_zn, stride_zk, stride_op,
                     TOPK: tl.constexpr, SCHEME: tl.constexpr, HAS_ZERO: tl.constexpr,
                     MOE: tl.constexpr, SN: tl.constexpr, G: tl.constexpr,
                     DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, ROUND_BF16: tl.constexpr):
        """out[row, n] = sum over K of x[row, k] * w[e, n, k] for a block of BM rows.

        Dense (MOE false): rows pid*BM.. of x (M rows), e = 0. Routed experts: the block's rows
        are (token, slot) pair ids sorted by expert (ids_ptr, M = n*k pairs, padding = M),
        its expert blk_e_ptr[pid]; blocks past total_ptr[0] rows are unused and return.
        BK divides the group size, so a tile has one scale per row, applied to its dot."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if MOE:
            total = tl.load(total_ptr)
            if pid_m * BM >= total:
                return
            e = tl.load(blk_e_ptr + pid_m).to(tl.int64)
            rows = tl.load(ids_ptr + pid_m * BM + tl.arange(0, BM))
        else:
            e = 0
            rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < M
        x_rows = x_ptr + (rows // TOPK) * stride_xt + (rows % TOPK) * stride_xs
        offs_n = pid_n * BN + tl.arange(0, BN)
        w_base = w_ptr + e * stride_we
        s_base = s_ptr + e * stride_se
        z_base = z_ptr + e * stride_ze
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            xk = tl.load(x_rows[:, None] + offs_k[None, :],
                         mask=rmask[:, None] & (offs_k[None, :] < K), other=0.0)
            w, s = _tile(w_base, s_base, z_base, stride_wn, stride_sn, stride_sk, stride_zn,
                         stride_zk, offs_n, k0, N, K, SCHEME, HAS_ZERO, SN, G, 1, BN, BK)
            w = tl.reshape(w, (BN, BK))
            if DOT_F32:
                part = tl.dot(xk.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:  # w holds integers or fp8 values: exact in x's bf16/fp16
                part = tl.dot(xk, tl.trans(w.to(xk.dtype)))
            acc += part * tl.reshape(s, (1, BN))
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_op + offs_n[None, :],
                 _rounded(acc, ROUND_BF16).to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (offs_n[None, :] < N))

    def _launch(kernel):
        """wrap_triton(kernel), so torch.compile traces the launch; the interpreter's kernels are
        launched as they are (torch 2.13's wrap_triton passes them through, older ones may not)."""
        if isinstance(kernel, InterpretedFunction):
            return _Interpreted(kernel)
        return torch.library.wrap_triton(kernel)

    class _Interpreted:
        """An interpreter kernel's launch that does nothing on fake tensors (the op's fake
        implementation runs its body on them; wrap_triton's own launches skip themselves)."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                from torch._guards import detect_fake_mode

                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                if detect_fake_mode(tensors) is None:
                    self.kernel[grid](*args, **kwargs)
            return launch

    def _scale_strides(t: Optional[torch.Tensor], g: int, expert: bool):
        """(expert, row, group) strides of scale/zero; a per-row scale has group stride 0."""
        if t is None:
            return 0, 0, 0
        return (t.stride(0) if expert else 0), t.stride(-2), (t.stride(-1) if g else 0)

    def _meta(data: torch.Tensor, g: int, zero: Optional[torch.Tensor]) -> dict:
        scheme = {torch.int32: INT4, torch.int8: INT8, torch.uint8: FP8}[data.dtype]
        return {"SCHEME": scheme, "HAS_ZERO": zero is not None,
                "SN": FP8_BLOCK if scheme == FP8 and g else 1}

    def _gemv(x, data, scale, zero, g, index, pairs, rows, topk, x_strides):
        """The GEMV over `pairs` row sets of `rows` rows each -> (pairs, rows, N) in x's dtype."""
        expert = index is not None
        N, K = data.shape[-2], _in_features(data)
        meta = _meta(data, g, zero)
        BK = 256 if meta["SCHEME"] == INT4 else 128  # 128 bytes of each weight row a step
        BN = 32
        G = g if g else BK  # per-row scales: any G (their group stride is 0); one group a tile
        tiles = pairs * triton.cdiv(N, BN)
        steps = triton.cdiv(K, BK)
        split = 1
        while (split < MAX_SPLIT_K and tiles * split < PROGRAMS_PER_SM * _sm_count(x.device)
               and steps >= 2 * split):
            split *= 2
        k_split = triton.cdiv(steps, split) * BK
        split = triton.cdiv(K, k_split)
        target = torch.empty((split, pairs, rows, N), device=x.device,
                             dtype=x.dtype if split == 1 else torch.float32)
        se, sn, sk = _scale_strides(scale, g, expert)
        ze, zn, zk = _scale_strides(zero, g, expert)
        _launch(_gemv_kernel)[(pairs, triton.cdiv(N, BN), split)](
            x, data, scale, zero if zero is not None else scale,
            index if expert else data, target,
            rows, N, K, k_split, *x_strides,
            data.stride(0) if expert else 0, data.stride(-2), se, sn, sk, ze, zn, zk,
            target.stride(0), target.stride(1), target.stride(2),
            TOPK=topk, HAS_INDEX=expert, G=G, GPT=BK // G, BM=max(1, triton.next_power_of_2(rows)),
            BN=BN, BK=BK, ROUND_BF16=_round_bf16(target), num_warps=4, **meta)
        return target[0] if split == 1 else target.sum(0).to(x.dtype)


    def _gemm(x, data, scale, zero, g, rows_total, BM, topk, x_strides, out, moe_index=None):
        expert = moe_index is not None
        N, K = data.shape[-2], _in_features(data)
        meta = _meta(data, g, zero)
        # BK divides the group (one scale per row a tile); BN = 64 divides FP8_BLOCK, so an fp8
        # tile lies inside one block of scales.
        BN, BK = 64, (min(g, 64) if g else 64)
        if expert:
            ids, blk_e, total = moe_index
            blocks = blk_e.shape[0]
        else:
            ids = blk_e = total = data
            blocks = triton.cdiv(rows_total, BM)
        se, sn, sk = _scale_strides(scale, g, expert)
        ze, zn, zk = _scale_strides(zero, g, expert)
        _launch(_gemm_kernel)[(blocks, triton.cdiv(N, BN))](
            x, data, scale, zero if zero is not None else scale, ids, blk_e, total, out,
            rows_total, N, K, *x_strides,
            data.stride(0) if expert else 0, data.stride(-2), se, sn, sk, ze, zn, zk,
            out.stride(-2),
            TOPK=topk, MOE=expert, G=g if g else BK, DOT_F32=_dot_in_float32(x),
            BM=BM, BN=BN, BK=BK, ROUND_BF16=_round_bf16(out), num_warps=4, num_stages=3,
            **meta)
        return out

    def _round_bf16(out: torch.Tensor) -> bool:
        return INTERPRETED and out.dtype == torch.bfloat16

    def _dot_in_float32(x: torch.Tensor) -> bool:
        """float32 inputs multiply in float32 (not TF32); so do bf16 ones in the interpreter,
        whose tl.dot multiplies bf16 operands' raw bits as integers (triton 3.9.0). Exact
        either way: products of bf16 values fit float32."""
        return x.dtype == torch.float32 or (INTERPRETED and x.dtype == torch.bfloat16)

    def _gemm_rows(rows: int) -> int:
        """Rows of a GEMM tile for about `rows` rows to a weight tile (tl.dot takes >= 16)."""
        return 16 if rows <= 16 else 32 if rows <= 32 else 64

    def align_by_expert(index: torch.Tensor, experts: int, block: int):
        """The (token, slot) pairs of index (n, k) sorted by expert into blocks of `block` rows.

        Returns (ids, block_expert, total): ids (blocks * block,) int32 pair ids (t * k + s),
        each expert's run padded to a multiple of `block` with the id n * k; block_expert
        (blocks,) int32, the expert of each block; total (1,) int32, rows in use (later blocks
        are unused). `blocks` is the most any routing can need, so shapes depend on (n, k,
        experts, block) alone and no value is read back to the host."""
        pairs = index.numel()
        flat = index.reshape(-1).to(torch.int64)
        order = torch.argsort(flat, stable=True)
        ones = torch.ones_like(flat)
        counts = torch.zeros(experts, dtype=torch.int64, device=index.device).scatter_add_(
            0, flat, ones)
        padded = (counts + block - 1) // block * block
        ends = torch.cumsum(padded, 0)
        sorted_e = flat[order]
        rank = torch.arange(pairs, device=index.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
        position = (ends - padded)[sorted_e] + rank
        # each expert in use pads at most block - 1 rows, and at most min(E, pairs) are in use
        blocks = triton.cdiv(pairs + min(experts, pairs) * (block - 1), block)
        ids = torch.full((blocks * block,), pairs, dtype=torch.int32, device=index.device)
        ids = ids.scatter(0, position, order.to(torch.int32))
        starts = torch.arange(blocks, device=index.device, dtype=torch.int64) * block
        block_expert = torch.searchsorted(ends, starts, right=True).clamp_(max=experts - 1)
        return ids, block_expert.to(torch.int32), ends[-1:].to(torch.int32)

    def _x_strides(x: torch.Tensor):
        """(token, slot) strides of x (n, K) or (n, k, K), last dimension contiguous."""
        if x.dim() == 2:
            return x.stride(0), 0
        return x.stride(0), x.stride(1)

    @torch.library.triton_op("duplex_quant::linear", mutates_args=())
    def _linear_op(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
                   zero: Optional[torch.Tensor], group: int) -> torch.Tensor:
        x = x.contiguous()
        n = x.shape[0]
        if 0 < n <= GEMV_MAX_TOKENS:
            return _gemv(x, data, scale, zero, group, None, 1, n, 1, (0, 0, x.stride(0)))[0]
        out = torch.empty((n, data.shape[0]), device=x.device, dtype=x.dtype)
        if n == 0:
            return out
        return _gemm(x, data, scale, zero, group, n, _gemm_rows(n), 1, (x.stride(0), 0), out)

    @torch.library.triton_op("duplex_quant::moe", mutates_args=())
    def _moe_op(x: torch.Tensor, index: torch.Tensor, data: torch.Tensor, scale: torch.Tensor,
                zero: Optional[torch.Tensor], group: int) -> torch.Tensor:
        x = x.contiguous()
        n, k = index.shape
        pairs = n * k
        strides = _x_strides(x)
        if 0 < pairs <= MOE_GEMV_MAX_PAIRS:
            flat = index.reshape(-1).to(torch.int32)
            return _gemv(x, data, scale, zero, group, flat, pairs, 1, k,
                         (*strides, 0)).view(n, k, -1)
        out = torch.empty((n, k, data.shape[-2]), device=x.device, dtype=x.dtype)
        if pairs == 0:
            return out
        BM = _gemm_rows(pairs // data.shape[0])
        aligned = align_by_expert(index, data.shape[0], BM)
        _gemm(x, data, scale, zero, group, pairs, BM, k, strides, out.view(pairs, -1),
              moe_index=aligned)
        return out
