"""The fused dequantising kernels (model/quant/kernels.py) against a float32 matmul on weights
dequantized here, from the layouts alone (not with the module's own code).

Without a GPU the Triton kernels run in Triton's interpreter on small shapes. The interpreter has
to be on before triton is first imported, so this module sets TRITON_INTERPRET=1 before it imports
anything that could import triton; when another test module imported triton first (model/fast.py
imports torch._inductor, which does), the kernel tests skip and say so: set TRITON_INTERPRET=1 in
the environment, or run this file alone. With a GPU the same tests run the compiled kernels, and
the `gpu`-marked ones check the release config's shapes, torch.compile and CUDA graphs.
"""

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from duplex_chat.model.quant import kernels  # noqa: E402  (after the interpreter is set up)

DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_TRITON:
    KERNEL_SKIP = "triton is not installed (pip install triton)"
elif not HAS_CUDA and not kernels.INTERPRETED:
    KERNEL_SKIP = ("no GPU, and Triton's interpreter is off: triton was imported before "
                   "TRITON_INTERPRET=1 was set (importing torch._inductor does it); set "
                   "TRITON_INTERPRET=1 in the environment or run this file alone")
else:
    KERNEL_SKIP = None
if KERNEL_SKIP is not None and os.environ.get("CI"):
    # CI installs triton (test extras) and conftest turns the interpreter on: a skip there would
    # hide that the kernels were never tested
    raise RuntimeError(f"kernel tests would be skipped in CI: {KERNEL_SKIP}")
needs_kernels = pytest.mark.skipif(KERNEL_SKIP is not None, reason=KERNEL_SKIP or "")
needs_gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")

TOLERANCE = 1e-3  # relative error (Frobenius norms) of a kernel against float32 on its weights

# name -> (bits, group along K (0: per output row; fp8 128: 128 x 128 blocks), asymmetric,
#          scale dtype, small-test (N, K))
SCHEMES = {
    "int4-g32": (4, 32, False, torch.bfloat16, (96, 256)),
    "int4-g32-asym": (4, 32, True, torch.float16, (96, 256)),
    "int4-g128": (4, 128, False, torch.float32, (96, 384)),
    "int4-g128-asym": (4, 128, True, torch.bfloat16, (96, 384)),
    "int8-channel": (8, 0, False, torch.bfloat16, (80, 320)),
    "int8-g64-asym": (8, 64, True, torch.float16, (80, 320)),
    "fp8-channel": ("fp8", 0, False, torch.float32, (200, 320)),
    "fp8-block": ("fp8", 128, False, torch.float32, (200, 320)),
}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (..., N, K) in [-8, 7] -> int32 (..., N, K // 8): nibble j of word i is q[8 i + j] + 8."""
    u = (q + 8).to(torch.int64)
    words = torch.zeros(*q.shape[:-1], q.shape[-1] // 8, dtype=torch.int64, device=q.device)
    for j in range(8):
        words |= u[..., j::8] << (4 * j)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """The layout read back, one nibble at a time: (..., N, K // 8) int32 -> (..., N, K) q."""
    words = data.to(torch.int64) & 0xFFFFFFFF
    nibbles = [(words >> (4 * j)) & 0xF for j in range(8)]
    return torch.stack(nibbles, -1).reshape(*data.shape[:-1], -1) - 8


def expand(t: torch.Tensor, rows: int, cols: int, N: int, K: int) -> torch.Tensor:
    """A per-(block of rows, group of columns) tensor repeated over its weights: (..., N, K)."""
    return t.float().repeat_interleave(rows, -2).repeat_interleave(cols, -1)[..., :N, :K]


def make_weights(name: str, lead=(), shape=None, seed=0, device="cpu"):
    """Random quantized weights of scheme `name` in the loader's layout, and their float32
    dequantization written out from that layout: (data, scale, zero, group, w), on `device`."""
    bits, group, asym, scale_dtype, (N, K) = SCHEMES[name]
    N, K = shape or (N, K)
    gen = torch.Generator(device).manual_seed(seed)
    kw = {"generator": gen, "device": device}
    if bits == "fp8":
        values = torch.randn(*lead, N, K, **kw) * 3
        tiny = torch.rand(*lead, N, K, **kw) < 0.1
        values = torch.where(tiny, values * 2e-3, values)  # some subnormal e4m3 values
        data = values.to(torch.float8_e4m3fn)
        if group:
            scale = torch.rand(*lead, -(-N // 128), -(-K // 128), **kw) * 0.02 + 0.01
            w = data.float() * expand(scale, 128, 128, N, K)
        else:
            scale = torch.rand(*lead, N, 1, **kw) * 0.02 + 0.01
            w = data.float() * scale
        return data, scale, None, group, w
    low, high = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(low, high, (*lead, N, K), **kw)
    groups = K // group if group else 1
    scale = (torch.rand(*lead, N, groups, **kw) * 0.02 + 0.005).to(scale_dtype)
    zero = (torch.randint(-8 if bits == 4 else -100, 8 if bits == 4 else 100,
                          (*lead, N, groups), **kw).to(torch.int8) if asym else None)
    if bits == 4:
        data = pack_int4(q)
        assert torch.equal(unpack_int4(data), q)
        q = unpack_int4(data).float()
    else:
        data = q.to(torch.int8)
        q = data.float()
    size = group or K
    if zero is not None:
        q = q - expand(zero, 1, size, N, K)
    return data, scale, zero, group, q * expand(scale, 1, size, N, K)


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def moe_reference(x: torch.Tensor, index: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out[t, s] = w[index[t, s]] @ x[t] (or x[t, s]), in float64 made float32, an expert at a
    time (gathering every pair's weights would take n * k weight matrices)."""
    n, k = index.shape
    rows = x.double().reshape(n, -1, x.shape[-1]).expand(n, k, x.shape[-1])
    out = torch.zeros(n, k, w.shape[-2], device=x.device, dtype=torch.float64)
    for e in index.unique().tolist():
        chosen = index == e
        out[chosen] = rows[chosen] @ w[e].double().T
    return out.float()


def linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().T).float()


# --- the kernels, small shapes (the interpreter on CPU) --------------------------------------

@needs_kernels
@pytest.mark.parametrize("n", [1, 3, 40])  # GEMV one token, GEMV a few rows, GEMM
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_linear(scheme, n):
    data, scale, zero, group, w = make_weights(scheme)
    x = torch.randn(n, w.shape[1], generator=torch.Generator().manual_seed(n))
    out = kernels.quant_linear(*to(DEVICE, x, data, scale, zero), group)
    assert out.shape == (n, w.shape[0]) and out.dtype == x.dtype
    assert relative_error(out.cpu(), linear_reference(x, w)) <= TOLERANCE


# (tokens n, slots k, experts E, routing, x per slot): decode runs a GEMV per (token, slot),
# prefill (more than 32 pairs) the grouped GEMM; 25 * 3 = 75 pairs fill no whole block.
MOE_CASES = {
    "decode": (1, 4, 6, "random", False),
    "decode-per-slot": (2, 3, 6, "random", True),
    "prefill": (25, 3, 6, "random", False),  # repeats, also within a token
    "prefill-one-expert-per-slot": (25, 3, 6, "one", True),
}


def routing(kind: str, n: int, k: int, experts: int, seed: int = 0) -> torch.Tensor:
    if kind == "one":
        return torch.full((n, k), experts // 2, dtype=torch.int64)
    return torch.randint(0, experts, (n, k), generator=torch.Generator().manual_seed(seed))


@needs_kernels
@pytest.mark.parametrize("case", sorted(MOE_CASES))
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_moe(scheme, case):
    n, k, experts, kind, per_slot = MOE_CASES[case]
    data, scale, zero, group, w = make_weights(scheme, lead=(experts,))
    index = routing(kind, n, k, experts)
    K = w.shape[-1]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, k, K, generator=gen) if per_slot else torch.randn(n, K, generator=gen)
    out = kernels.quant_moe(*to(DEVICE, x, index, data, scale, zero), group)
    assert out.shape == (n, k, w.shape[1]) and out.dtype == x.dtype
    assert relative_error(out.cpu(), moe_reference(x, index, w)) <= TOLERANCE


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["int4-g128-asym", "int8-g64-asym"])
def test_half_inputs(scheme, dtype):
    """bf16/fp16 activations (the tensor-core path): equal to float32 on the same inputs up to
    the output's own rounding."""
    data, scale, zero, group, w = make_weights(scheme, lead=(4,))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, w.shape[-1], generator=gen).to(dtype)
    index = torch.randint(0, 4, (40, 2), generator=gen)
    out = kernels.quant_linear(*to(DEVICE, x, data[1], scale[1], zero[1]), group)
    ref = linear_reference(x, w[1])
    assert out.dtype == dtype
    assert relative_error(out.cpu(), ref.to(dtype).float()) <= TOLERANCE
    for xs in (x[:1], x):  # GEMV, grouped GEMM
        out = kernels.quant_moe(*to(DEVICE, xs, index[:len(xs)], data, scale, zero), group)
        ref = moe_reference(xs, index[:len(xs)], w)
        assert relative_error(out.cpu(), ref.to(dtype).float()) <= TOLERANCE


@needs_kernels
def test_compiled_fullgraph_and_fake():
    """torch.compile(fullgraph) traces the public functions with the ops inside, and the ops'
    fake implementation gives the output's shape and dtype without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    data, scale, zero, group, w = make_weights("int4-g32-asym", lead=(3,))
    x = torch.randn(5, w.shape[-1])
    index = torch.tensor([[0, 2], [1, 1], [2, 0], [0, 0], [2, 1]])
    args = to(DEVICE, x, index, data, scale, zero)

    def layer(x, index, data, scale, zero):
        return kernels.quant_moe(x, index, data, scale, zero, group).sum(1)

    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert relative_error(compiled(*args).cpu(), moe_reference(x, index, w).sum(1)) <= TOLERANCE
    with FakeTensorMode() as mode:
        fakes = [None if t is None else mode.from_tensor(t) for t in args]
        out = torch.ops.duplex_quant.moe(fakes[0], fakes[1], fakes[2], fakes[3], fakes[4], group)
        assert out.shape == (5, 2, w.shape[1]) and out.dtype == x.dtype
        out = torch.ops.duplex_quant.linear(fakes[0], fakes[2][0], fakes[3][0], fakes[4][0],
                                            group)
        assert out.shape == (5, w.shape[1])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
@pytest.mark.parametrize("kind", ["random", "one"])
def test_align_by_expert(kind):
    """The sorted blocks of (token, slot) pairs: each pair once, in a block of its expert,
    padding only at the ends of experts' runs, fixed shapes whatever the routing."""
    n, k, experts, block = 13, 3, 5, 4
    index = routing(kind, n, k, experts, seed=3)
    ids, block_expert, total = kernels.align_by_expert(index, experts, block)
    assert ids.shape == (block * block_expert.shape[0],)
    assert block_expert.shape == (-(-(n * k + min(experts, n * k) * (block - 1)) // block),)
    used = ids[:total.item()]
    real = used[used < n * k].long()
    assert sorted(real.tolist()) == list(range(n * k))
    assert (ids[total.item():] == n * k).all()
    flat = index.reshape(-1)
    for b in range(total.item() // block):
        rows = ids[b * block:(b + 1) * block].long()
        rows = rows[rows < n * k]
        assert len(rows) > 0 and (flat[rows] == block_expert[b]).all()
    counts = torch.bincount(flat, minlength=experts)
    assert total.item() == int(sum(-(-c // block) * block for c in counts.tolist()))


# --- the fallback (PyTorch, float32) ----------------------------------------------------------

@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_fallback(scheme, monkeypatch):
    data, scale, zero, group, w = make_weights(scheme, lead=(3,))
    assert torch.equal(kernels.dequantize(data, scale, zero, group), w)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, w.shape[-1], generator=gen)
    index = torch.tensor([[0, 2], [2, 2], [1, 0]])
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # CPU tensors go to the fallback
    linear = kernels.quant_linear(x, data[1], scale[1], None if zero is None else zero[1], group)
    assert relative_error(linear, linear_reference(x, w[1])) <= 1e-6
    moe = kernels.quant_moe(x, index, data, scale, zero, group)
    assert relative_error(moe, moe_reference(x, index, w)) <= 1e-6
    per_slot = torch.randn(3, 2, w.shape[-1], generator=gen)
    moe = kernels.quant_moe(per_slot, index, data, scale, zero, group)
    assert relative_error(moe, moe_reference(per_slot, index, w)) <= 1e-6


def test_layout_errors():
    data, scale, zero, group, _ = make_weights("int4-g32-asym")
    x = torch.randn(1, 256)
    with pytest.raises(ValueError, match="group size 64"):
        kernels.quant_linear(x, data, scale, zero, 64)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.quant_linear(x, data, scale[:, :4], zero, 32)
    with pytest.raises(TypeError, match="float16"):
        kernels.quant_linear(x, data.to(torch.float16), scale, zero, 32)
    fp8, fp8_scale, _, _, _ = make_weights("fp8-block")
    with pytest.raises(ValueError, match="fp8 scale"):
        kernels.quant_linear(torch.randn(1, 320), fp8, fp8_scale, None, None)


@pytest.mark.parametrize("group", [96, 256])
def test_group_sizes_the_tiles_cannot_hold_are_refused(group):
    """Groups of 96 would be read with the wrong scales (a tile straddles groups) and groups of
    256 overflow the GEMV's tile: refused, not run wrong."""
    data = torch.randint(-128, 128, (8, 768), dtype=torch.int8)
    scale = torch.rand(8, 768 // group) + 0.5
    with pytest.raises(ValueError, match=f"group size {group}"):
        kernels.quant_linear(torch.randn(1, 768), data, scale, None, group)


# --- the release config's shapes, on the GPU --------------------------------------------------

H, I, E, TOP_K = 2048, 768, 128, 8  # thinker: hidden, expert width, experts, experts a token
GPU_SCHEMES = ["int4-g32-asym", "int4-g128", "int8-channel", "fp8-channel", "fp8-block"]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("scheme", GPU_SCHEMES)
def test_release_linear(scheme):
    data, scale, zero, group, w = make_weights(scheme, shape=(3 * H, H), device="cuda")
    args = data, scale, zero  # a 2048 x 6144 GEMV
    gen = torch.Generator().manual_seed(5)
    for n in (1, 4, 300):
        x = torch.randn(n, H, generator=gen).cuda()
        out = kernels.quant_linear(x, *args, group)
        assert relative_error(out, linear_reference(x, w)) <= TOLERANCE, n
        xb = x.bfloat16()  # against float32 on the same inputs, rounded as the output is
        out = kernels.quant_linear(xb, *args, group)
        assert relative_error(out, linear_reference(xb, w).bfloat16().float()) <= TOLERANCE, n


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("scheme", GPU_SCHEMES)
def test_release_moe(scheme):
    up = make_weights(scheme, lead=(E,), shape=(2 * I, H), device="cuda")
    down = make_weights(scheme, lead=(E,), shape=(H, I), seed=1, device="cuda")
    up_args, down_args, w_up, w_down = up[:3], down[:3], up[4], down[4]
    gen = torch.Generator().manual_seed(6)
    for n in (1, 2, 64, 512):
        index = torch.rand(n, E, generator=gen).argsort(-1)[:, :TOP_K].cuda()  # distinct
        x = torch.randn(n, H, generator=gen).cuda()
        out = kernels.quant_moe(x, index, *up_args, up[3])
        assert relative_error(out, moe_reference(x, index, w_up)) <= TOLERANCE, n
        hidden = torch.randn(n, TOP_K, I, generator=gen).cuda().bfloat16()
        out = kernels.quant_moe(hidden, index, *down_args, down[3])
        ref = moe_reference(hidden, index, w_down).bfloat16().float()
        assert relative_error(out, ref) <= TOLERANCE, n


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n", [1, 64])
def test_compiled_in_cuda_graph(n):
    """An expert layer built on the ops, compiled by inductor (fullgraph) and captured in a CUDA
    graph, replays with new inputs and equals the eager result."""
    gen = torch.Generator().manual_seed(7)
    up = make_weights("int4-g32-asym", lead=(E,), shape=(2 * I, H), device="cuda")[:3]
    down = make_weights("int4-g32-asym", lead=(E,), shape=(H, I), seed=1, device="cuda")[:3]

    def experts(x, index):
        gate, lin = kernels.quant_moe(x, index, *up, 32).chunk(2, dim=-1)
        return kernels.quant_moe(torch.nn.functional.silu(gate) * lin, index, *down, 32).sum(1)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(n, H, generator=g).cuda().bfloat16(),
                torch.rand(n, E, generator=g).argsort(-1)[:, :TOP_K].cuda())

    compiled = torch.compile(experts, fullgraph=True, dynamic=False)
    static = inputs(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            compiled(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(*static)
    new = inputs(1)
    for buffer, value in zip(static, new):
        buffer.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(out, experts(*new).float()) <= 1e-2  # bf16 between the two GEMMs
