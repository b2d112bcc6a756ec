"""A lean decoder for the GPU: static KV cache allocated once, decode steps captured as CUDA graphs.

`FastStack` runs any of Qwen3-Omni's three decoder stacks (thinker, talker, code predictor) with
the weights of the loaded transformers modules (no copies). Prefill takes any number of tokens;
a decode step takes one and, on CUDA, replays a graph captured for the smallest cache-length
bucket that holds the position, so attention reads only that much cache. For voice prompts the
3-D rotary positions are equal in all three axes, which makes M-RoPE plain 1-D RoPE: a cos/sin
table indexed by position replaces the per-call rotary computation.

Numerically this is the same computation as transformers' eager path, in a different order of
summation for the mixture of experts; `bench --verify` and tests/test_fast.py compare the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BUCKETS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)  # cache lengths with a graph each


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers' Qwen3 layers compute it (float32 inside)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def moe_decode(x, router, w_gate_up, w_down, top_k: int, norm_topk: bool):
    """One token through a mixture of experts, reading only the chosen experts' weights.

    x: (1, H); router: (E, H); w_gate_up: (E, 2I, H); w_down: (E, H, I) -> (1, H).
    Written as gather-multiply-sum so that, compiled, the gather fuses into the reduction and no
    copy of the chosen experts is made (eager, it is a plain but wasteful reference).
    """
    probs = torch.softmax(F.linear(x, router).float(), dim=-1)  # (1, E)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    index, weights = index[0], weights.to(x.dtype)[0]  # (k,)
    gate_up = (w_gate_up[index] * x).sum(-1)  # (k, 2I)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = F.silu(gate) * up  # (k, I)
    out = (w_down[index] * hidden[:, None, :]).sum(-1)  # (k, H)
    return (out * weights[:, None]).sum(0, keepdim=True)


def _dense_mlp(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def decode_layer(x, pos, cos, sin, keys, values, w: dict, attend: int):
    """One decoder layer for one token at position `pos` (0-d long tensor), attending to cache
    positions [0, attend). x: (1, H); keys/values: (Hkv, max_len, hd), written at `pos`.
    Pure tensor code, so one compiled version serves every layer of the same shapes."""
    hd = keys.shape[-1]
    h = _rms(x, w["ln1"], w["eps"])
    q = _rms(F.linear(h, w["wq"]).view(-1, hd), w["qn"], w["eps"])[:, None]  # (Hq, 1, hd)
    k = _rms(F.linear(h, w["wk"]).view(-1, hd), w["kn"], w["eps"])[:, None]  # (Hkv, 1, hd)
    v = F.linear(h, w["wv"]).view(-1, hd)[:, None]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    keys.index_copy_(1, pos.view(1), k)
    values.index_copy_(1, pos.view(1), v)
    mask = (torch.arange(attend, device=x.device) <= pos)[None]  # (1, attend)
    att = F.scaled_dot_product_attention(
        q[None], keys[None, :, :attend], values[None, :, :attend], attn_mask=mask,
        scale=w["scaling"], enable_gqa=True)  # (1, Hq, 1, hd)
    x = x + F.linear(att.reshape(1, -1), w["wo"])
    h = _rms(x, w["ln2"], w["eps"])
    if "router" in w:
        out = moe_decode(h, w["router"], w["w_gate_up"], w["w_down"], w["top_k"], w["norm_topk"])
        if "shared_gate" in w:
            out = out + torch.sigmoid(F.linear(h, w["shared_gate"])) * _dense_mlp(
                h, w["s_gate"], w["s_up"], w["s_down"])
    else:
        out = _dense_mlp(h, w["m_gate"], w["m_up"], w["m_down"])
    return x + out


def _layer_tensors(layer: torch.nn.Module) -> dict:
    """The weights `decode_layer` needs, by name (references, not copies)."""
    attn, mlp = layer.self_attn, layer.mlp
    if any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
        raise NotImplementedError("attention biases are not used by Qwen3-Omni")
    w = {
        "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
        "eps": layer.input_layernorm.variance_epsilon,
        "wq": attn.q_proj.weight, "wk": attn.k_proj.weight, "wv": attn.v_proj.weight,
        "wo": attn.o_proj.weight, "qn": attn.q_norm.weight, "kn": attn.k_norm.weight,
        "scaling": attn.scaling,
    }
    if hasattr(mlp, "experts"):
        w.update(router=mlp.gate.weight, w_gate_up=mlp.experts.gate_up_proj,
                 w_down=mlp.experts.down_proj, top_k=mlp.gate.top_k,
                 norm_topk=mlp.gate.norm_topk_prob)
        if getattr(mlp, "shared_expert", None) is not None:
            se = mlp.shared_expert
            w.update(shared_gate=mlp.shared_expert_gate.weight, s_gate=se.gate_proj.weight,
                     s_up=se.up_proj.weight, s_down=se.down_proj.weight)
    else:
        w.update(m_gate=mlp.gate_proj.weight, m_up=mlp.up_proj.weight, m_down=mlp.down_proj.weight)
    return w


class _Layer:
    """One decoder layer: its modules (for prefill) and its weights by name (for decode)."""

    def __init__(self, layer: torch.nn.Module):
        attn = layer.self_attn
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.scaling = attn.scaling
        self.mlp = layer.mlp
        self.weights = _layer_tensors(layer)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prefill MLP, x: (n, H) -> (n, H). On CUDA the experts run as one grouped GEMM
        (no host sync, no loop over experts); elsewhere transformers' own forward."""
        experts = getattr(self.mlp, "experts", None)
        if experts is None or x.device.type != "cuda":
            return self.mlp(x[None])[0]
        from transformers.integrations.moe import grouped_mm_experts_forward

        _, weights, index = self.mlp.gate(x)
        out = grouped_mm_experts_forward(experts, x, index, weights)
        shared = getattr(self.mlp, "shared_expert", None)
        if shared is not None:
            out = out + torch.sigmoid(self.mlp.shared_expert_gate(x)) * shared(x)
        return out


class FastStack:
    """A decoder stack with its own static KV cache.

    lm: a transformers decoder model with `.layers`, `.norm`, `.rotary_emb` (thinker text model,
    talker model or code-predictor model). Capacity `max_len` positions.
    """

    def __init__(self, lm: torch.nn.Module, max_len: int, compile_decode: bool = True):
        self.lm = lm
        self.layers = [_Layer(layer) for layer in lm.layers]
        self.norm = lm.norm
        first = lm.layers[0].self_attn
        weight = first.q_proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.kv_heads = first.k_proj.out_features // first.head_dim
        self.head_dim = first.head_dim
        self.max_len = max_len
        shape = (len(self.layers), self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros(shape, device=self.device, dtype=self.dtype)
        inv_freq = lm.rotary_emb.inv_freq.to(self.device, torch.float32)
        freqs = torch.arange(max_len, device=self.device, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        self.length = 0
        self._graphs: dict[int, "_DecodeGraph"] = {}
        self._pool = None
        self._decode_layer = decode_layer
        if self.device.type == "cuda" and compile_decode:
            import torch._dynamo as dynamo

            # one compiled graph per (layer shapes, bucket): thinker, talker, predictor x buckets
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            self._decode_layer = torch.compile(decode_layer, dynamic=False)

    def reset(self) -> None:
        self.length = 0

    def crop(self, length: int) -> None:
        """Forget positions from `length` on (their cache entries are simply overwritten later)."""
        self.length = min(self.length, length)

    # ----- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, hidden_layer: int | None = None):
        """Prefill or decode at the current length. x: (n, H) input embeddings.
        Returns (final normed states (n, H), states after `hidden_layer` layers (n, H) or None)."""
        n = x.shape[0]
        if self.length + n > self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")
        if n == 1 and hidden_layer is None:
            if self.device.type == "cuda":
                out = self._graph_for(self.length + 1).run(x, self.length)
            else:
                pos = torch.tensor(self.length, device=self.device)
                out = self.decode(x, pos, self.length + 1)
            self.length += 1
            return out, None
        out, kept = self._run(x, self.length, self.length + n, hidden_layer)
        self.length += n
        return out, kept

    def decode(self, x: torch.Tensor, pos: torch.Tensor, attend: int) -> torch.Tensor:
        """One token (1, H) at device position `pos`, attending to [0, attend) -> (1, H)."""
        where = pos.view(1)  # index_select, not cos[pos]: a tensor index would sync with the host
        cos, sin = self.cos.index_select(0, where), self.sin.index_select(0, where)  # (1, hd)
        for i, layer in enumerate(self.layers):
            x = self._decode_layer(x, pos, cos, sin, self.keys[i], self.values[i], layer.weights,
                                   attend)
        return self.norm(x)

    def _run(self, x, start: int, attend: int, hidden_layer=None):
        """Prefill: layers over x (n, H) at positions start.., attending to cache [0, attend)."""
        n = x.shape[0]
        positions = torch.arange(start, start + n, device=self.device)
        cos, sin = self.cos[positions], self.sin[positions]  # (n, hd)
        keys_pos = torch.arange(attend, device=self.device)
        mask = keys_pos[None, :] <= positions[:, None]  # (n, attend)
        kept = x if hidden_layer == 0 else None
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer, i, layer.norm1(x), positions, cos, sin, mask, attend)
            x = x + layer.feed_forward(layer.norm2(x))
            if hidden_layer is not None and i + 1 == hidden_layer:
                kept = x
        return self.norm(x), kept

    def _attention(self, layer: _Layer, i: int, x, positions, cos, sin, mask, attend: int):
        n = x.shape[0]
        q = layer.q_norm(layer.q(x).view(n, -1, self.head_dim)).transpose(0, 1)  # (Hq, n, hd)
        k = layer.k_norm(layer.k(x).view(n, -1, self.head_dim)).transpose(0, 1)  # (Hkv, n, hd)
        v = layer.v(x).view(n, -1, self.head_dim).transpose(0, 1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.keys[i].index_copy_(1, positions, k)
        self.values[i].index_copy_(1, positions, v)
        out = F.scaled_dot_product_attention(
            q[None], self.keys[i, :, :attend][None], self.values[i, :, :attend][None],
            attn_mask=mask, scale=layer.scaling, enable_gqa=True,
        )  # (1, Hq, n, hd)
        return layer.o(out[0].transpose(0, 1).reshape(n, -1))

    # ----- CUDA graphs ---------------------------------------------------------------------------

    def _graph_for(self, needed: int) -> "_DecodeGraph":
        bucket = next((b for b in BUCKETS if b >= needed and b <= self.max_len), self.max_len)
        graph = self._graphs.get(bucket)
        if graph is None:
            if self._pool is None:  # graphs replay one at a time, so they can share memory
                self._pool = torch.cuda.graph_pool_handle()
            graph = self._graphs[bucket] = _DecodeGraph(self, bucket, self._pool)
        return graph

    def warm_up(self, up_to: int) -> None:
        """Capture the decode graphs for every bucket up to `up_to` positions ahead of time."""
        for bucket in BUCKETS:
            if bucket <= self.max_len:
                self._graph_for(bucket)
            if bucket >= up_to:
                break


class _DecodeGraph:
    """One decode step (a single token) for a fixed attention length, captured once, replayed."""

    def __init__(self, stack: FastStack, bucket: int, pool):
        self.stack = stack
        self.x = torch.zeros(1, stack.layers[0].q.in_features, device=stack.device,
                             dtype=stack.dtype)
        # Warm-up (and compilation) writes cache entries at the last position of the bucket,
        # which is never attended to before a real token overwrites it.
        self.pos = torch.full((), bucket - 1, dtype=torch.long, device=stack.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up runs outside the graph, as capture requires
            for _ in range(2):
                stack.decode(self.x, self.pos, bucket)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = stack.decode(self.x, self.pos, bucket)

    def run(self, x: torch.Tensor, position: int) -> torch.Tensor:
        self.x.copy_(x)
        self.pos.fill_(position)
        self.graph.replay()
        return self.out
