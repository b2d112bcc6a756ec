"""Pieces of the GPU decoder (model/fast.py) against the library operations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duplex_chat.model.fast import attend_few, inductor_options, moe_dense, moe_gather


@pytest.mark.parametrize("heads,kv_heads,length,n", [(32, 4, 37, 1), (16, 8, 16, 1), (16, 2, 5, 1),
                                                     (16, 8, 16, 2), (32, 4, 37, 2)])
def test_few_token_attention_equals_sdpa(heads, kv_heads, length, n):
    generator = torch.Generator().manual_seed(heads + length + n)
    hd = 16
    q = torch.randn(heads, n, hd, generator=generator)
    keys = torch.randn(kv_heads, length, hd, generator=generator)
    values = torch.randn(kv_heads, length, hd, generator=generator)
    # causal for the n new tokens at the end of what is written; the last two rows not yet written
    positions = torch.arange(length - 2 - n, length - 2)
    mask = torch.arange(length)[None, :] <= positions[:, None]  # (n, L)
    expected = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                              scale=0.3, enable_gqa=True)[0]  # (Hq, n, hd)
    got = attend_few(q, keys, values, mask, 0.3)
    assert got.shape == (n, heads * hd)
    torch.testing.assert_close(got, expected.transpose(0, 1).reshape(n, -1), rtol=1e-5, atol=1e-6)


def test_expert_paths_agree():
    generator = torch.Generator().manual_seed(3)
    experts, hidden, inter = 8, 32, 24
    x = torch.randn(5, hidden, generator=generator)
    router = torch.randn(experts, hidden, generator=generator)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=generator) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=generator) / inter**0.5
    for norm in (False, True):
        torch.testing.assert_close(moe_gather(x, router, gate_up, down, 2, norm),
                                   moe_dense(x, router, gate_up, down, 2, norm))


def test_decode_with_equals_forward_on_cpu(tiny_bundle):
    from .test_gpu import assert_decode_with_equals_forward

    assert_decode_with_equals_forward(tiny_bundle.model.talker.model, torch.device("cpu"))


def test_compile_options_unknown_to_this_torch_are_left_out():
    wanted = {"coordinate_descent_tuning": True, "triton.cudagraphs": False,
              "no_such_option": 1, "triton.no_such_option": 2, "no_such_group.option": 3}
    assert inductor_options(wanted) == {"coordinate_descent_tuning": True,
                                        "triton.cudagraphs": False}
    with pytest.raises(RuntimeError):  # what a torch without an option we ask for would do
        torch.compile(lambda x: x + 1, options=wanted)
    torch.compile(lambda x: x + 1, options=inductor_options(wanted))  # options checked here
