"""Quantized weights end to end on the tiny checkpoint (float32, CPU): the loader, the reference
path and the fast decoder's use of the kernels.

The engine runs on the model `load_quantized` built (int4 groups of 32: the tiny model's 64- and
32-column matrices fit no larger group); generate() runs on a separate, ordinary model holding
the same weights dequantized. Equal tokens and codes mean the loader put every weight where
transformers' own loading puts it (experts fused as the library fuses them), the dequantizing
properties compute what plain weights compute, and the fast decoder's quantized matmuls (the
kernels' CPU path) agree with them up to the order of summation.
"""

from __future__ import annotations

import pytest
import torch

from duplex_chat.config import DuplexError
from duplex_chat.model.loading import ModelBundle, load_model
from duplex_chat.model.quant.formats import QuantWeight, Scheme
from duplex_chat.model.footprint import rounded_in_layer
from duplex_chat.model.quant.modules import quant_weight, quantized_schemes

from .conftest import tiny_settings
from .test_engine_fidelity import assert_turns_match_reference, make_conversation

INT4_G32 = Scheme("int", 4, group_size=32, symmetric=True)


def load_tiny_quantized(checkpoint, scheme: Scheme) -> ModelBundle:
    """The tiny checkpoint loaded as `load_model` does, its decoder layers quantized by `scheme`."""
    from unittest import mock

    from duplex_chat.model.quant import formats

    with mock.patch.dict(formats.MODES, {"int4": scheme}):
        return load_model(tiny_settings(checkpoint, quantize="int4").qwen)


def dequantized_copy(bundle: ModelBundle, checkpoint=None) -> ModelBundle:
    """An ordinary model holding `bundle`'s quantized weights dequantized to float32: what
    generate() on those weights means. It is the checkpoint loaded by transformers alone (no
    layer-by-layer loading, no config changes) with those weights written in by name, so a
    loader that put a weight in the wrong place, or left the config changed, differs from it.
    It lives on `bundle`'s device, as in tests/test_gpu.py: the engine on the GPU against
    generate() on the CPU differed in the waveform (tokens and codes equal; H100, 2026-12-06),
    float32 convolutions on the two devices not being the same computation."""
    device = next(bundle.model.parameters()).device
    base = load_model(tiny_settings(checkpoint or bundle.source,
                                    **({"device_map": "cuda"} if device.type == "cuda" else {})).qwen)
    quantized = quantized_schemes(bundle.model)
    assert quantized and not quantized_schemes(base.model)
    with torch.no_grad():
        for name in quantized:
            module_name, _, leaf = name.rpartition(".")
            value = quant_weight(bundle.model.get_submodule(module_name), leaf)
            base.model.get_parameter(name).copy_(value.dequantize(torch.float32))
    return base


@pytest.fixture(scope="module")
def int4_tiny(tiny_checkpoint):
    bundle = load_tiny_quantized(tiny_checkpoint, INT4_G32)
    return bundle, dequantized_copy(bundle)


def test_loader_quantizes_exactly_the_decoder_layers(int4_tiny, tiny_bundle):
    """Attention, experts and the talker's shared expert are int4; routers, norms, embeddings,
    heads, the audio encoder, the code predictor and code2wav keep the checkpoint's weights; and
    every quantized weight is the round-to-nearest of the checkpoint's own."""
    bundle, plain = int4_tiny
    names = set(quantized_schemes(bundle.model))
    assert names and all(".layers." in n and "code_predictor" not in n for n in names)
    assert all(rounded_in_layer(n.split(".layers.", 1)[1].split(".", 1)[1]) for n in names)
    assert any("shared_expert." in n for n in names)
    assert not any(n.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) for n in names)
    reference = dict(tiny_bundle.model.named_parameters())
    loaded = dict(plain.model.named_parameters())
    assert reference.keys() == loaded.keys()
    for name, value in reference.items():
        if name in names:
            error = (loaded[name] - value).abs().max() / value.abs().max()
            assert 0 < error < 0.1, name  # rounded to 16 levels per group, not lost
        else:
            assert torch.equal(loaded[name], value), name


def test_fused_experts_are_each_experts_rounding(int4_tiny, tiny_bundle):
    """Expert e's rows of gate_up_proj are its gate_proj then its up_proj, each rounded alone."""
    from duplex_chat.model.listener import thinker_text_model
    from duplex_chat.model.quant.formats import quantize

    layer = thinker_text_model(bundle_model := int4_tiny[0].model.thinker).layers[1]
    original = thinker_text_model(tiny_bundle.model.thinker).layers[1]
    got = quant_weight(layer.mlp.experts, "gate_up_proj")
    assert isinstance(got, QuantWeight) and bundle_model is not None
    for e in (0, original.mlp.experts.num_experts - 1):
        want = quantize(original.mlp.experts.gate_up_proj[e], INT4_G32)
        assert torch.equal(got.data[e], want.data) and torch.equal(got.scale[e], want.scale)


@pytest.mark.parametrize("decoder", ["eager", "fast"])
def test_int4_engine_equals_generate_on_the_dequantized_weights(int4_tiny, tiny_checkpoint,
                                                                decoder):
    bundle, plain = int4_tiny
    conv, settings = make_conversation(bundle, tiny_checkpoint, 2.0, decoder=decoder)
    assert_turns_match_reference(conv, settings, [(2.4, 2), (1.7, 3)], reference_bundle=plain)


def test_int8_through_the_settings(tiny_checkpoint):
    """`qwen.quantize = int8` (per channel fits any width) loads through `load_model`."""
    bundle = load_model(tiny_settings(tiny_checkpoint, quantize="int8").qwen)
    schemes = set(quantized_schemes(bundle.model).values())
    assert schemes == {Scheme("int", 8)}


def test_int4_groups_that_do_not_fit_are_refused_in_one_sentence(tiny_checkpoint):
    with pytest.raises(DuplexError) as caught:
        load_model(tiny_settings(tiny_checkpoint, quantize="int4").qwen)
    message = str(caught.value)
    assert "groups of 128" in message and "thinker layer 0" in message
    assert "\n" not in message


def test_fp8_needs_a_new_enough_gpu(tiny_checkpoint):
    with pytest.raises(DuplexError) as caught:
        load_model(tiny_settings(tiny_checkpoint, quantize="fp8").qwen)
    assert "compute capability 8.9" in str(caught.value)


def test_fp8_refused_on_an_ampere_gpu(monkeypatch, tiny_checkpoint):
    from .test_loading import load_error, pretend_gpus

    pretend_gpus(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX A6000")
    message = load_error(tiny_checkpoint, quantize="fp8", device_map="cuda")
    assert "RTX A6000 is 8.6" in message and "--quantize int8 or int4." in message


def test_quantize_and_load_in_8bit_are_one_choice():
    from duplex_chat.config import load_settings

    with pytest.raises(DuplexError, match="choose one"):
        load_settings(overrides={"qwen.quantize": "int4", "qwen.load_in_8bit": True}, environ={})


@pytest.mark.gpu
def test_int4_fast_decoder_on_gpu_equals_generate(tiny_checkpoint):
    """The Triton kernels inside the compiled steps and CUDA graphs, against generate() on the
    dequantized weights (float32 on the GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from unittest import mock

    from duplex_chat.model.quant import formats

    with mock.patch.dict(formats.MODES, {"int4": INT4_G32}):
        bundle = load_model(tiny_settings(tiny_checkpoint, quantize="int4",
                                          device_map="cuda").qwen)
    conv, settings = make_conversation(bundle, tiny_checkpoint, 2.0, decoder="fast",
                                       device_map="cuda")
    assert conv.talker._graphed
    assert_turns_match_reference(conv, settings, [(2.4, 2), (1.7, 3)],
                                 reference_bundle=dequantized_copy(bundle))
