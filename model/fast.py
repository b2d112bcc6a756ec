"""A lean decoder for the GPU: static KV cache allocated once, decode steps captured as CUDA graphs.

`FastStack` runs any of Qwen3-Omni's three decoder stacks (thinker, talker, code predictor) with
the weights of the loaded transformers modules (no copies). Prefill takes any number of tokens;
a decode step takes one and, on CUDA, replays a graph captured for the smallest cache-length
bucket that holds the position, so attention reads only that much cache. For voice prompts the
3-D rotary positions are equal in all three axes, which makes M-RoPE plain 1-D RoPE: a cos/sin
table indexed by position replaces the per-call rotary computation.

Numerically this is the same computation as transformers' eager path, in a different order of
summation for the mixture of experts and one-token attention; `bench --verify` compares the two
on the GPU, tests/test_fast.py checks the pieces against the library operations they replace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .graphs import CapturedCall
from .quant import kernels
from .quant.formats import QuantWeight
from .quant.modules import quant_weight, quantize_module

BUCKETS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)  # attention lengths with graphs
TOKEN_BUCKETS = (1, 4, 8, 16, 32, 64)  # input sizes with graphs (shorter inputs are padded)
PAD_ROOM = TOKEN_BUCKETS[-1]  # cache rows past capacity that padded prefills may write
# Decode steps are bound by kernel count, not bytes, so every option here is about kernels.
# Coordinate-descent tuning makes inductor write one-token matmuls as Triton reductions, which
# fuse with the norms, activations and residual adds around them (fewer, fuller kernels). Combo
# kernels merge independent small kernels (q and k norms, say) into one launch; programmatic
# dependent launch (Hopper on) lets each kernel start while the one before it drains. The two
# last took a talker step + frame from 3.96 to 3.66 ms (H200, benchmarks/talker_micro.py).
WANTED_OPTIONS = {"coordinate_descent_tuning": True, "combo_kernels": True,
                  "triton.enable_pdl": True}


def inductor_options(wanted: dict) -> dict:
    """Those of `wanted` that this torch's inductor knows: torch.compile rejects unknown options,
    and programmatic dependent launch is newer than the oldest torch we support."""
    import torch._inductor.config as inductor

    known = {}
    for name, value in wanted.items():
        owner = inductor
        *parents, leaf = name.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        if owner is not None and hasattr(owner, leaf):
            known[name] = value
    return known


COMPILE_OPTIONS = inductor_options(WANTED_OPTIONS)


def compile_step(fn):
    """`fn` compiled for fixed-shape decode work with COMPILE_OPTIONS (read at call time, so a
    benchmark can set them first)."""
    return torch.compile(fn, dynamic=False, options=COMPILE_OPTIONS)


# Attention of a step this short, over a window this long, is written out (`attend_few`); longer
# ones use SDPA. Written out won at the code predictor's 16 rows and a 512-row thinker window
# (4.43 -> 4.24 ms/token, H200); longer windows keep SDPA's flash kernel, not yet timed against it.
FEW_QUERIES = 2
WRITTEN_OUT_MAX_ROWS = 512


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers' Qwen3 layers compute it (float32 inside)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x (n, K) times w (N, K) transposed -> (n, N). w is a plain weight, or a `QuantWeight`
    run by the dequantising kernels (the weights never exist in 16 bit)."""
    if isinstance(w, QuantWeight):
        return kernels.quant_linear(x, w.data, w.scale, w.zero, _kernel_group(w))
    return F.linear(x, w)


def _kernel_group(w: QuantWeight) -> int:
    """The kernels' `group` argument: the group size, the FP8 block's width, or 0 per channel."""
    s = w.scheme
    return s.block[1] if s.block is not None else (s.group_size or 0)


def _route(x, router, top_k: int, norm_topk: bool):
    """x: (n, H) -> routing weights (n, k) in x's dtype and expert ids (n, k)."""
    probs = torch.softmax(linear(x, router).float(), dim=-1)  # (n, E)
    # A one-block sort of 128 values and a slice: one kernel where topk takes two.
    weights, index = torch.sort(probs, dim=-1, descending=True)
    weights, index = weights[:, :top_k], index[:, :top_k]
    if norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), index


def attend_few(q, keys, values, mask, scale: float) -> torch.Tensor:
    """Attention of a few query tokens, written out so a compiler fuses it into a few reductions.

    q: (Hq, n, hd); keys/values: (Hkv, L, hd) with Hq a multiple of Hkv (query head h reads kv
    head h // (Hq/Hkv), as SDPA's enable_gqa does); mask: (n, L) bool -> (n, Hq * hd).
    In float32 inside. For a token or two a library attention kernel costs 3-9 us plus layout
    copies around it (measured on an H200), for a few microseconds of memory traffic.
    """
    hq, n, hd = q.shape
    hkv = keys.shape[0]
    g = hq // hkv
    q = q.reshape(hkv, g * n, 1, hd).float()  # (Hkv, g * n, 1, hd): a kv head's g heads x n tokens
    scores = (q * keys[:, None].float()).sum(-1) * scale  # (Hkv, g * n, L)
    scores = scores.masked_fill(~mask.repeat(g, 1), float("-inf"))
    probs = scores.softmax(-1)
    out = (probs[..., None] * values[:, None].float()).sum(-2)  # (Hkv, g * n, hd)
    return out.to(keys.dtype).reshape(hq, n, hd).transpose(0, 1).reshape(n, hq * hd)


def moe_gather(x, router, w_gate_up, w_down, top_k: int, norm_topk: bool):
    """Few tokens through the experts, reading only the chosen experts' weights.

    x: (n, H); router: (E, H); w_gate_up: (E, 2I, H); w_down: (E, H, I) -> (n, H).
    Written as gather-multiply-sum so that, compiled, the gather fuses into the reduction and no
    copy of the chosen experts is made (eager, it is a plain but wasteful reference).
    """
    weights, index = _route(x, router, top_k, norm_topk)
    gate_up = (w_gate_up[index] * x[:, None, None, :]).sum(-1)  # (n, k, 2I)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = F.silu(gate) * up  # (n, k, I)
    out = (w_down[index] * hidden[:, :, None, :]).sum(-1)  # (n, k, H)
    return (out * weights[..., None]).sum(1)


def moe_quant(x, router, w_gate_up: QuantWeight, w_down: QuantWeight, top_k: int,
              norm_topk: bool):
    """Routed experts with quantized weights, any number of tokens: the kernels read only the
    chosen experts (one GEMV per token and slot for a few tokens, a grouped GEMM sorted by expert
    for many). Shapes as `moe_gather`."""
    weights, index = _route(x, router, top_k, norm_topk)
    gate_up = kernels.quant_moe(x, index, w_gate_up.data, w_gate_up.scale, w_gate_up.zero,
                                _kernel_group(w_gate_up))  # (n, k, 2I)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = F.silu(gate) * up  # (n, k, I)
    out = kernels.quant_moe(hidden, index, w_down.data, w_down.scale, w_down.zero,
                            _kernel_group(w_down))  # (n, k, H)
    return (out * weights[..., None]).sum(1)


def moe_dense(x, router, w_gate_up, w_down, top_k: int, norm_topk: bool):
    """Many tokens through the experts: every expert on every token (one batched GEMM each way),
    weighted by the sparse routing. Reads each expert once, whatever the routing, and has fixed
    shapes, so it can be captured. x: (n, H) -> (n, H)."""
    weights, index = _route(x, router, top_k, norm_topk)
    dense = torch.zeros(x.shape[0], w_gate_up.shape[0], device=x.device, dtype=x.dtype)
    dense = dense.scatter(1, index, weights)  # (n, E)
    gate, up = torch.matmul(x, w_gate_up.transpose(1, 2)).chunk(2, dim=-1)  # (E, n, I) each
    out = torch.matmul(F.silu(gate) * up, w_down.transpose(1, 2))  # (E, n, H)
    return torch.einsum("ne,enh->nh", dense, out)


def _dense_mlp(x, gate_up, down):
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)


def run_layer(x, positions, cos, sin, mask, kv, w: dict, attend: int, dense_moe: bool,
              written_out: bool = False):
    """One decoder layer for tokens x (n, H) at `positions` (n,) (device tensor), attending to
    cache rows [0, attend) under `mask` (n, attend). kv: (2, Hkv, rows, hd), keys then values,
    written at `positions` (both in one write: one kernel, not two). `written_out`: attention by
    `attend_few` instead of SDPA. Pure tensor code: one compiled or captured version serves every
    layer of the same shapes."""
    n, hd = x.shape[0], kv.shape[-1]
    h = _rms(x, w["ln1"], w["eps"])
    q, k, v = linear(h, w["wqkv"]).split(w["qkv_split"], dim=-1)
    q = _rms(q.reshape(n, -1, hd), w["qn"], w["eps"]).transpose(0, 1)  # (Hq, n, hd)
    k = _rms(k.reshape(n, -1, hd), w["kn"], w["eps"]).transpose(0, 1)  # (Hkv, n, hd)
    v = v.reshape(n, -1, hd).transpose(0, 1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    kv.index_copy_(2, positions, torch.stack([k, v]))
    keys, values = kv[0], kv[1]
    if written_out:
        att = attend_few(q, keys[:, :attend], values[:, :attend], mask, w["scaling"])
    else:
        att = F.scaled_dot_product_attention(
            q[None], keys[None, :, :attend], values[None, :, :attend], attn_mask=mask,
            scale=w["scaling"], enable_gqa=True)  # (1, Hq, n, hd)
        att = att[0].transpose(0, 1).reshape(n, -1)  # (n, Hq * hd)
    x = x + linear(att, w["wo"])
    h = _rms(x, w["ln2"], w["eps"])
    if "router" in w:
        if isinstance(w["w_gate_up"], QuantWeight):
            moe = moe_quant
        else:
            moe = moe_dense if dense_moe else moe_gather
        out = moe(h, w["router"], w["w_gate_up"], w["w_down"], w["top_k"], w["norm_topk"])
        if "shared_gate" in w:
            out = out + torch.sigmoid(linear(h, w["shared_gate"])) * _dense_mlp(
                h, w["s_gate_up"], w["s_down"])
    else:
        out = _dense_mlp(h, w["m_gate_up"], w["m_down"])
    return x + out


def _fuse(*linears: torch.nn.Linear):
    """One weight for several linears that read the same input: (sum of outputs, in), a tensor
    or, for quantized linears, a `QuantWeight` (rows are independent in every layout but FP8
    blocks, so the packed data, scales and zero points are simply stacked; FP8 blocks must not
    straddle two linears).

    The modules' own weights become views into it, so the model (and transformers' eager
    path) keeps working and no memory is spent twice."""
    quantized = [quant_weight(m) for m in linears]
    if any(q is not None for q in quantized):
        return _fuse_quantized(linears, quantized)
    cached = getattr(linears[0], "_duplex_fused", None)
    if cached is not None and all(m.weight.data_ptr() == cached[0].data_ptr() + i
                                  for m, i in zip(linears, cached[1])):
        return cached[0]  # fused by an earlier stack over the same model
    fused = torch.cat([m.weight.detach() for m in linears])
    offsets = []
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused[row:row + rows], requires_grad=False)
        offsets.append(row * fused.shape[1] * fused.element_size())
        row += rows
    linears[0]._duplex_fused = (fused, offsets)
    return fused


def _fuse_quantized(linears, quantized: list) -> QuantWeight:
    from duplex_chat.config import DuplexError

    schemes = {None if q is None else (q.scheme, q.scale.dtype) for q in quantized}
    if len(schemes) != 1:
        raise DuplexError(
            "Linears that read one input are quantized differently ("
            + ", ".join(f"{m.out_features} rows {'16-bit' if q is None else q.scheme.describe()}"
                        for m, q in zip(linears, quantized))
            + "); the fast decoder needs them alike.",
            hint='Set qwen.decoder = "eager" (SCA_QWEN_DECODER=eager) for this checkpoint.')
    block = quantized[0].scheme.block
    if block is not None and any(q.shape[0] % block[0] for q in quantized[:-1]):
        raise DuplexError(
            f"Linears that read one input have {[q.shape[0] for q in quantized]} rows, not whole "
            f"{block[0]}-row FP8 blocks, so their scales cannot be fused.",
            hint='Set qwen.decoder = "eager" (SCA_QWEN_DECODER=eager) for this checkpoint.')
    cached = getattr(linears[0], "_duplex_fused", None)
    if isinstance(cached, QuantWeight) and all(q.data._base is cached.data for q in quantized):
        return cached  # fused by an earlier stack over the same model
    parts = ("data", "scale", "zero")
    fused = QuantWeight(scheme=quantized[0].scheme, **{
        p: None if getattr(quantized[0], p) is None else torch.cat([getattr(q, p) for q in quantized])
        for p in parts})
    row = 0
    for m, q in zip(linears, quantized):
        rows = q.data.shape[0]
        view = QuantWeight(scheme=q.scheme, **{
            p: None if getattr(fused, p) is None else getattr(fused, p)[row:row + rows]
            for p in parts})
        quantize_module(m, {"weight": view}, m._quant_dtype)
        row += rows
    linears[0]._duplex_fused = fused
    return fused


def _weight(module: torch.nn.Module, name: str = "weight"):
    """module.<name> as the fast path reads it: the `QuantWeight` when quantized (never the
    dequantizing property), else the tensor."""
    quantized = quant_weight(module, name)
    return quantized if quantized is not None else getattr(module, name)


def _layer_tensors(layer: torch.nn.Module) -> dict:
    """The weights `run_layer` needs, by name. Linears that share an input are fused into one
    GEMV (q/k/v; gate/up), because at one token each kernel costs its launch, not its bytes."""
    attn, mlp = layer.self_attn, layer.mlp
    if any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
        raise NotImplementedError("attention biases are not used by Qwen3-Omni")
    w = {
        "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
        "eps": layer.input_layernorm.variance_epsilon,
        "wqkv": _fuse(attn.q_proj, attn.k_proj, attn.v_proj),
        "qkv_split": (attn.q_proj.out_features, attn.k_proj.out_features,
                      attn.v_proj.out_features),
        "wo": _weight(attn.o_proj), "qn": attn.q_norm.weight, "kn": attn.k_norm.weight,
        "scaling": attn.scaling,
    }
    if hasattr(mlp, "experts"):
        w.update(router=_weight(mlp.gate), w_gate_up=_weight(mlp.experts, "gate_up_proj"),
                 w_down=_weight(mlp.experts, "down_proj"), top_k=mlp.gate.top_k,
                 norm_topk=mlp.gate.norm_topk_prob)
        if getattr(mlp, "shared_expert", None) is not None:
            se = mlp.shared_expert
            w.update(shared_gate=_weight(mlp.shared_expert_gate),
                     s_gate_up=_fuse(se.gate_proj, se.up_proj), s_down=_weight(se.down_proj))
    else:
        w.update(m_gate_up=_fuse(mlp.gate_proj, mlp.up_proj), m_down=_weight(mlp.down_proj))
    return w


class FastStack:
    """A decoder stack with its own static KV cache.

    lm: a transformers decoder model with `.layers`, `.norm`, `.rotary_emb` (thinker text model,
    talker model or code-predictor model). Capacity `max_len` positions. `export_layer`: the
    layer whose output prefills return too (counted like `output_hidden_states`), if any.
    """

    def __init__(self, lm: torch.nn.Module, max_len: int, export_layer: int | None = None,
                 compile_decode: bool = True):
        self.lm = lm
        self.weights = [_layer_tensors(layer) for layer in lm.layers]
        self.norm = lm.norm
        first = lm.layers[0].self_attn
        # the norm's weight: a quantized projection's `.weight` would dequantize the whole matrix
        weight = lm.norm.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.hidden = first.q_proj.in_features
        kv_heads = first.k_proj.out_features // first.head_dim
        self.max_len = max_len
        rows = max_len + PAD_ROOM
        # (layers, keys/values, Hkv, rows, hd)
        self.kv = torch.zeros((len(self.weights), 2, kv_heads, rows, first.head_dim),
                              device=self.device, dtype=self.dtype)
        inv_freq = lm.rotary_emb.inv_freq.to(self.device, torch.float32)
        freqs = torch.arange(rows, device=self.device, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # (rows, head_dim)
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        self.export_layer = export_layer
        self.written_out_rows = WRITTEN_OUT_MAX_ROWS  # longest window attended by `attend_few`
        self.length = 0
        self._graphs: dict[tuple[int, int], CapturedCall] = {}
        self._pool = None
        self._decode_layer = run_layer
        if self.device.type == "cuda" and compile_decode:
            import torch._dynamo as dynamo

            # one compiled graph per (layer shapes, bucket): thinker, talker, predictor x buckets
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            self._decode_layer = compile_step(run_layer)

    def reset(self) -> None:
        self.length = 0

    def crop(self, length: int) -> None:
        """Forget positions from `length` on (their cache rows are simply overwritten later)."""
        self.length = min(self.length, length)

    def forward(self, x: torch.Tensor, hidden_layer: int | None = None):
        """Run x (n, H) at the current length. Returns (final normed states (n, H), states after
        `hidden_layer` layers (n, H) or None). On CUDA, inputs of up to 64 tokens replay a
        captured graph (padded to a token bucket); longer ones run directly."""
        n = x.shape[0]
        if self.length + n > self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")
        if n == 0:
            return x, (x if hidden_layer is not None else None)
        if hidden_layer is not None and hidden_layer != self.export_layer:
            raise ValueError(f"this stack exports layer {self.export_layer}, not {hidden_layer}")
        if self.device.type != "cuda":
            start = torch.tensor(self.length, device=self.device)
            out, kept = self.step(x, start, self.length + n)
            self.length += n
            return out, (kept if hidden_layer is not None else None)
        outs, kepts = [], []
        for piece in x.split(PAD_ROOM):  # long inputs go through the largest graph in pieces
            out, kept = self._replay(piece)
            outs.append(out)
            kepts.append(kept)
        kept = torch.cat(kepts) if hidden_layer is not None else None
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), kept

    def _replay(self, x: torch.Tensor):
        """x (n <= 64, H) through the captured graph of its size bucket (zero-padded)."""
        n = x.shape[0]
        tokens = next(b for b in TOKEN_BUCKETS if b >= n)
        padded = x if tokens == n else torch.cat([x, x.new_zeros(tokens - n, x.shape[1])])
        out, kept = self._graph(tokens, self.length + tokens)(padded, self.length)
        self.length += n
        return out[:n].clone(), kept[:n].clone()

    def step(self, x: torch.Tensor, start: torch.Tensor, attend: int):
        """x (n, H) at positions start.. (start: 0-d device tensor), attending to rows
        [0, attend). Returns (final normed states, export-layer states) — both (n, H)."""
        n = x.shape[0]
        positions = start + torch.arange(n, device=self.device)
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        mask = torch.arange(attend, device=self.device)[None, :] <= positions[:, None]
        layer_fn = self._decode_layer if n == 1 else run_layer
        written_out = n <= FEW_QUERIES and attend <= self.written_out_rows
        kept = x
        for i, w in enumerate(self.weights):
            x = layer_fn(x, positions, cos, sin, mask, self.kv[i], w, attend, n > 1, written_out)
            if self.export_layer == i + 1:
                kept = x
        return self.norm(x), kept

    def decode_with(self, name: str, fn, inputs: tuple[torch.Tensor, ...], preserve=()):
        """One new token through the stack inside `fn(step, *inputs)`, where `step(x (1, H))`
        returns the final normed state (1, H) at the current position: fn builds x from its
        inputs and may go on with the state (a head, sampling), so on CUDA all of it is one graph
        per cache bucket (`name` keeps the graphs of different fns apart; the first fn given
        under a name is the one captured). Returns fn's outputs; on CUDA these are static
        tensors that the next replay overwrites. `preserve`: tensors fn updates in place (state
        such as a mask of codes seen) that the capture's warm-up runs must leave as they were."""
        if self.length + 1 > self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")
        if self.device.type == "cuda":
            graph = self._step_graph(name, self._bucket(self.length + 1), fn, inputs, preserve)
            out = graph(self.length, *inputs)
        else:
            start, attend = torch.tensor(self.length, device=self.device), self.length + 1
            out = fn(lambda x: self.step(x, start, attend)[0], *inputs)
        self.length += 1
        return out

    def warm_up_decode_with(self, name: str, fn, inputs, up_to: int, preserve=()) -> None:
        """Capture `decode_with`'s graphs for cache lengths up to `up_to` now."""
        for bucket in BUCKETS:
            if bucket <= self.max_len:
                self._step_graph(name, bucket, fn, inputs, preserve)
            if bucket >= up_to:
                break

    def _step_graph(self, name, attend, fn, inputs, preserve) -> "CapturedCall":
        graph = self._graphs.get((name, attend))
        if graph is None:
            def run(start, *args):
                return fn(lambda x: self.step(x, start, attend)[0], *args)

            # As in _graph: warm-up writes a cache row nothing attends to before it is rewritten.
            start = torch.tensor(attend - 1, device=self.device)
            graph = CapturedCall(run, (start, *inputs), self._graph_pool(), preserve=preserve)
            self._graphs[(name, attend)] = graph
        return graph

    def _bucket(self, needed: int) -> int:
        """The attention length of the graphs for a cache that will hold `needed` positions."""
        attend = next((b for b in BUCKETS if b >= needed and b <= self.max_len), None)
        return attend or self.max_len + PAD_ROOM

    def _graph_pool(self):
        if self._pool is None:  # graphs replay one at a time, so they can share memory
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _graph(self, tokens: int, needed: int) -> CapturedCall:
        attend = self._bucket(needed)
        graph = self._graphs.get((tokens, attend))
        if graph is None:
            x = torch.zeros(tokens, self.hidden, device=self.device, dtype=self.dtype)
            # Warm-up writes cache rows at the end of the window, which nothing attends to
            # before real tokens overwrite them.
            start = torch.tensor(attend - tokens, device=self.device)
            graph = CapturedCall(lambda x, s: self.step(x, s, attend), (x, start),
                                 self._graph_pool())
            self._graphs[(tokens, attend)] = graph
        return graph

    def warm_up(self, up_to: int, token_buckets=TOKEN_BUCKETS) -> None:
        """Capture the graphs for inputs of `token_buckets` sizes at cache lengths up to `up_to`."""
        for bucket in BUCKETS:
            for tokens in token_buckets:
                if tokens < bucket <= self.max_len:
                    self._graph(tokens, bucket)
            if bucket >= up_to:
                break
