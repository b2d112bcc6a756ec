"""Thinker and talker as growing-cache decoders: prefill pieces as they arrive, step one token.

Both own their KV cache and a position counter. For voice prompts Qwen3-Omni's 3-D rotary
positions are plain 0, 1, 2, … in all three axes, so the counter is all the position state there is.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _cache_kwarg(module: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept either version."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


PREDICTOR_POSITIONS = 16  # talker state + codebook 0, then codebooks 1..14 one at a time


def _positions(start: int, n: int, device) -> torch.Tensor:
    """(4, 1, n): the text row (for the causal mask) and the three rotary rows, all equal."""
    return torch.arange(start, start + n, device=device).view(1, 1, n).expand(4, 1, n)


class EagerStack:
    """A decoder stack (`lm`, a transformers text model) run through transformers' own forward,
    with a growing `DynamicCache`. The reference path, and the one used on the CPU."""

    def __init__(self, lm: torch.nn.Module):
        self.lm = lm
        self._cache_name = _cache_kwarg(lm)
        self._mrope = hasattr(lm.rotary_emb, "mrope_section")
        self.cache = DynamicCache(config=lm.config)
        self.length = 0

    def forward(self, embeds: torch.Tensor, hidden_layer: int | None = None):
        """embeds: (n, d). Returns (last hidden states (n, d), layer `hidden_layer` states (n, d) or
        None). The layer index counts like `output_hidden_states`: 0 is the input embeddings."""
        n = embeds.shape[0]
        positions = _positions(self.length, n, embeds.device)
        out = self.lm(
            inputs_embeds=embeds[None],
            position_ids=positions if self._mrope else positions[0],
            use_cache=True,
            output_hidden_states=hidden_layer is not None,
            **{self._cache_name: self.cache},
        )
        self.length += n
        layer = out.hidden_states[hidden_layer][0] if hidden_layer is not None else None
        return out.last_hidden_state[0], layer

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions."""
        if length < self.length:
            self.cache.crop(length - self.length)  # negative: tokens to remove (all versions)
            self.length = length

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.lm.config)
        self.length = 0


def make_stack(lm: torch.nn.Module, fast: bool, max_len: int, export_layer: int | None = None):
    """The eager stack, or the static-cache one (CUDA graphs on the GPU) when `fast`;
    `export_layer` is the layer whose states prefills must also return."""
    if fast:
        from .fast import FastStack

        return FastStack(lm, max_len, export_layer)
    return EagerStack(lm)


class _StackUser:
    """Delegates position bookkeeping to the stack it drives."""

    stack: "EagerStack"

    @property
    def length(self) -> int:
        return self.stack.length

    def forward(self, embeds: torch.Tensor, hidden_layer: int | None = None):
        return self.stack.forward(embeds, hidden_layer)

    def crop(self, length: int) -> None:
        self.stack.crop(length)

    def reset(self) -> None:
        self.stack.reset()


class ThinkerStream(_StackUser):
    """The thinker's language model plus its embedding and output head."""

    def __init__(self, thinker: torch.nn.Module, fast: bool = False, max_len: int = 16384,
                 export_layer: int | None = None):
        from .listener import thinker_text_model

        lm = thinker_text_model(thinker)
        self.stack = make_stack(lm, fast, max_len, export_layer)
        self.head = thinker.lm_head
        self.embed_tokens = lm.embed_tokens

    def embed(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """(n,) ids -> (n, d) input embeddings."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.embed_tokens.weight.device)
        return self.embed_tokens(ids)

    def prefill(self, embeds: torch.Tensor, hidden_layer: int | None = None):
        """Returns (logits of the last position (vocab,), layer states (n, d) or None)."""
        last, layer = self.forward(embeds, hidden_layer)
        return self.head(last[-1]), layer

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: 0-d long. Returns next-token logits (vocab,)."""
        last, _ = self.forward(self.embed(token.view(1)))
        return self.head(last[-1])


class TalkerStream(_StackUser):
    """The talker (codebook 0 of each frame) and its code predictor (codebooks 1-15).

    The cache holds the user part of the conversation (`user_length` positions, grows across turns)
    followed by the current reply's assistant part, which `end_reply` cuts away again.
    """

    def __init__(self, talker: torch.nn.Module, fast: bool = False, max_len: int = 16384):
        self.stack = make_stack(talker.model, fast, max_len)
        self.fast = fast
        self.predictor_stack = make_stack(talker.code_predictor.model, fast, PREDICTOR_POSITIONS)
        self.talker = talker
        self.codec_head = talker.codec_head
        self.codec_embed = talker.model.get_input_embeddings()
        self.predictor = talker.code_predictor
        self.groups = talker.config.num_code_groups
        self.user_length = 0
        self._graphed = fast and self.predictor_stack.device.type == "cuda"
        self._frame_fn = None
        self._step_frame = None
        self._frame_graph = None
        self._compiled_predictor_step = None
        device = self.codec_embed.weight.device
        self._predictor_positions = torch.arange(PREDICTOR_POSITIONS, device=device)
        self._seen = torch.zeros(self.codec_head.out_features, dtype=torch.bool, device=device)

    def project_text(self, thinker_embeds: torch.Tensor) -> torch.Tensor:
        """(n, d_thinker) token embeddings -> (n, d_talker)."""
        return self.talker.text_projection(thinker_embeds)

    def project_hidden(self, thinker_hidden: torch.Tensor) -> torch.Tensor:
        """(n, d_thinker) thinker states of audio tokens -> (n, d_talker)."""
        return self.talker.hidden_projection(thinker_hidden)

    def extend_user(self, embeds: torch.Tensor) -> None:
        """Append user-part positions (n, d_talker); only valid between replies."""
        assert self.length == self.user_length, "user part extended during a reply"
        self.forward(embeds)
        self.user_length = self.length

    def start_reply(self, user_tail: torch.Tensor, assistant: torch.Tensor):
        """Prefill the rest of the user part (m, d_talker) and the assistant part (n, d_talker)
        in one pass. Returns (logits (vocab,), last state (d,))."""
        assert self.length == self.user_length, "a reply is already under way"
        self._seen.zero_()
        last, _ = self.forward(torch.cat([user_tail, assistant]))
        self.user_length += user_tail.shape[0]
        return self.codec_head(last[-1]), last[-1]

    def step(self, embed: torch.Tensor):
        """One frame: embed (d_talker,) = previous frame's codec embeddings + text. Returns
        (logits (vocab,), last state (d,))."""
        last, _ = self.forward(embed[None])
        return self.codec_head(last[-1]), last[-1]

    def end_reply(self) -> None:
        self.crop(self.user_length)

    def reset(self) -> None:
        self.stack.reset()
        self.user_length = 0

    def frame(self, logits: torch.Tensor, state: torch.Tensor, talker_sample, predictor_sample):
        """One codec frame: codebook 0 from the talker's logits (vocab,), then codebooks 1..15
        from the code predictor. Returns (codes (16,) long, summed codec embeddings (d,)).
        On CUDA (fast) the whole frame is one graph replay; the repetition penalty's memory of
        this reply's codes is a mask (`_seen`), cleared by `start_reply`."""
        if not self._graphed:
            code0 = talker_sample(logits, seen=self._seen)
            self._seen[code0] = True
            return self.residual_codes(state, code0, predictor_sample)
        if self._frame_graph is None:
            from .graphs import CapturedCall

            self._frame_graph = CapturedCall(self._frame_body(talker_sample, predictor_sample),
                                             (logits, state), preserve=(self._seen,))
        codes, total = self._frame_graph(logits, state)
        return codes.clone(), total.clone()

    def step_frame(self, embed: torch.Tensor, talker_sample, predictor_sample):
        """`step(embed)` and then `frame` of what it gives: the next frame from the previous one's
        summed codec embeddings plus the text, embed (d,). Returns as `frame`. On CUDA (fast)
        the talker step, its head and the frame are one graph replay: no host work between."""
        if not self._graphed:
            logits, state = self.step(embed)
            return self.frame(logits, state, talker_sample, predictor_sample)
        codes, total = self.stack.decode_with(
            "frame", self._step_frame_fn(talker_sample, predictor_sample), (embed,),
            preserve=(self._seen,))
        return codes.clone(), total.clone()

    def warm_up_frames(self, up_to: int, talker_sample, predictor_sample) -> None:
        """Capture `frame` and `step_frame` for talker caches up to `up_to` positions now."""
        weight = self.codec_head.weight  # (vocab, d)
        state = weight.new_zeros(weight.shape[1])
        logits = weight.new_zeros(weight.shape[0])
        self.frame(logits, state, talker_sample, predictor_sample)
        if self._graphed:
            self.stack.warm_up_decode_with(
                "frame", self._step_frame_fn(talker_sample, predictor_sample), (state,), up_to,
                preserve=(self._seen,))

    def _frame_body(self, talker_sample, predictor_sample):
        """The graph-capturable frame: (logits, state) -> (codes, summed embeddings). The
        samplers of the first call are the ones kept."""
        if self._frame_fn is None:
            pick0, pick = talker_sample.graph_safe(), predictor_sample.graph_safe()
            if self.predictor_stack.device.type == "cuda":
                from .fast import compile_step

                # Eager, code 0's ranked top-k/top-p over 3072 ids is (V, V) tensors in memory
                # (~0.1 ms per frame); compiled, two fused reductions.
                pick0 = compile_step(pick0)

            def frame(logits, state):
                code0 = pick0(logits, seen=self._seen)
                self._seen.index_fill_(0, code0.view(1), True)
                return self._residual_codes_fast(state, code0, pick)

            self._frame_fn = frame
        return self._frame_fn

    def _step_frame_fn(self, talker_sample, predictor_sample):
        """`decode_with`'s fn for `step_frame`: made once, as its graphs keep the first one."""
        if self._step_frame is None:
            body = self._frame_body(talker_sample, predictor_sample)

            def step_frame(step, embed):
                state = step(embed[None])[-1]  # (d,)
                return body(self.codec_head(state), state)

            self._step_frame = step_frame
        return self._step_frame

    def residual_codes(self, talker_state: torch.Tensor, code0: torch.Tensor, sample) -> tuple:
        """Codebooks 1..15 of a frame from the talker state (d,) and codebook 0 (0-d long).

        A direct loop over the code predictor (what `generate()` does with a nested generate()).
        `sample(logits)` picks each code. Returns (codes (16,) long, summed codec embeddings (d,))
        — the sum is the next talker step's input before the text is added.
        """
        if not self.fast:
            return self._residual_codes_eager(talker_state, code0, sample)
        return self._residual_codes_fast(talker_state, code0, sample)

    def _residual_codes_eager(self, talker_state, code0, sample):
        """As generate() runs it: prefill (state, code 0), then one code per step."""
        first = self.codec_embed(code0.view(1))  # (1, d)
        embeds = torch.cat([talker_state.view(1, -1), first])  # (2, d)
        stack = self.predictor_stack
        stack.reset()
        codes, codec_embeds = [code0.view(1)], [first]
        for group in range(self.groups - 1):
            last, _ = stack.forward(embeds)
            code = sample(self.predictor.lm_head[group](last[-1]))
            codes.append(code.view(1))
            embeds = self.predictor.model.get_input_embeddings()[group](code.view(1))  # (1, d)
            codec_embeds.append(embeds)
        # Summed in one reduction, as generate() does, so float rounding matches too.
        return torch.cat(codes), torch.cat(codec_embeds).sum(0)

    def _residual_codes_fast(self, talker_state, code0, sample):
        """The same with fixed shapes and device-side positions, so the whole frame (15 steps,
        15 heads, sampling) can be one CUDA graph: the first step takes positions 0 and 1 (talker
        state, codebook 0) together, as the eager prefill does, then one code per step. On CUDA
        each step (5 layers, norm, head, sampling, next embedding) is one compiled region, reused
        by all codebooks: their heads and embedding tables are inputs, not constants."""
        stack = self.predictor_stack
        positions = self._predictor_positions
        first = self.codec_embed(code0.view(1))  # (1, d)
        step = self._predictor_step
        if stack.device.type == "cuda":
            if self._compiled_predictor_step is None:
                from .fast import compile_step

                self._compiled_predictor_step = compile_step(self._predictor_step)
            step = self._compiled_predictor_step
        heads = self.predictor.lm_head
        tables = self.predictor.model.get_input_embeddings()
        x = torch.cat([talker_state.view(1, -1), first])  # (2, d) at positions 0, 1
        codes, codec_embeds = [code0.view(1)], [first]
        for group in range(self.groups - 1):
            start = positions[0] if group == 0 else positions[group + 1]
            code, x = step(x, start, heads[group].weight, tables[group].weight, sample)
            codes.append(code)
            codec_embeds.append(x)
        return torch.cat(codes), torch.cat(codec_embeds).sum(0)

    def _predictor_step(self, x, start, head, table, sample):
        """x (n, d) at positions start.. (0-d) -> (code (1,) long of the last position, its
        embedding in `table` (1, d))."""
        last, _ = self.predictor_stack.step(x, start, PREDICTOR_POSITIONS)
        code = sample(F.linear(last[-1], head)).view(1)
        return code, F.embedding(code, table)
