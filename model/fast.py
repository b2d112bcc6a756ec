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


class _Layer:
    """One decoder layer's modules, and which kind of MLP it has."""

    def __init__(self, layer: torch.nn.Module):
        attn = layer.self_attn
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.scaling = attn.scaling
        mlp = layer.mlp
        self.mlp = mlp
        self.router = getattr(mlp, "gate", None) if hasattr(mlp, "experts") else None
        if self.router is not None:
            self.top_k = self.router.top_k
            self.norm_topk = self.router.norm_topk_prob
            self.w_gate_up = mlp.experts.gate_up_proj  # (E, 2I, H)
            self.w_down = mlp.experts.down_proj  # (E, H, I)
            self.act = mlp.experts.act_fn
            self.shared = getattr(mlp, "shared_expert", None)
            self.shared_gate = getattr(mlp, "shared_expert_gate", None)

    def moe_decode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (1, H) -> (1, H). Reads only the chosen experts (gathered, then batched GEMV)."""
        logits = F.linear(x, self.router.weight)  # (1, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # (1, k)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)[0]  # (k,)
        index = index[0]
        gate_up = torch.bmm(self.w_gate_up[index], x[0].expand(self.top_k, -1)[..., None])  # (k, 2I, 1)
        gate, up = gate_up[..., 0].chunk(2, dim=-1)
        hidden = self.act(gate) * up  # (k, I)
        out = torch.bmm(self.w_down[index], hidden[..., None])[..., 0]  # (k, H)
        out = (out * weights[:, None]).sum(0, keepdim=True)  # (1, H)
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, H) -> (n, H)."""
        if self.router is not None and x.shape[0] == 1:
            return self.moe_decode(x)
        return self.mlp(x[None])[0]


class FastStack:
    """A decoder stack with its own static KV cache.

    lm: a transformers decoder model with `.layers`, `.norm`, `.rotary_emb` (thinker text model,
    talker model or code-predictor model). Capacity `max_len` positions.
    """

    def __init__(self, lm: torch.nn.Module, max_len: int):
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
        if n == 1 and hidden_layer is None and self.device.type == "cuda":
            out = self._graph_for(self.length + 1).run(x, self.length)
        else:
            out, kept = self._run(x, self.length, self.length + n, hidden_layer)
            self.length += n
            return out, kept
        self.length += 1
        return out, None

    def _run(self, x, start: int | torch.Tensor, attend: int, hidden_layer=None):
        """Layers over x (n, H) at positions start.., attending to cache [0, attend)."""
        n = x.shape[0]
        if isinstance(start, torch.Tensor):  # decode inside a graph: position is device data
            positions = start.view(1)
        else:
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
            graph = self._graphs[bucket] = _DecodeGraph(self, bucket)
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

    def __init__(self, stack: FastStack, bucket: int):
        self.stack = stack
        self.x = torch.zeros(1, stack.layers[0].q.in_features, device=stack.device,
                             dtype=stack.dtype)
        self.pos = torch.zeros((), dtype=torch.long, device=stack.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up run outside the graph, as capture requires
            stack._run(self.x, self.pos, bucket)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out, _ = stack._run(self.x, self.pos, bucket)

    def run(self, x: torch.Tensor, position: int) -> torch.Tensor:
        self.x.copy_(x)
        self.pos.fill_(position)
        self.graph.replay()
        return self.out
