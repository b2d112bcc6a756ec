"""The loader against compressed-tensors itself: tiny checkpoints compressed by the library as
llm-compressor writes them (`tests/quant_checkpoints.py`) load through `load_model`, and every
quantized weight dequantizes to exactly what the library decompresses for that module.

Variants (the tiny "small" model: hidden 64, expert intermediate 32, so groups of 32 fit every
decoder-layer matrix):
  int4_g32                   W4A16 symmetric, groups of 32, pack-quantized; every Linear of both
                             decoder stacks (the talker's shared expert and its gate too).
  int4_asym_g32_talker_bf16  the community layout: int4 asymmetric groups of 32, the talker left
                             unquantized; made from bf16 weights (bf16 scales), loaded in bf16.
  int8_channel               W8A16 per channel (pack-quantized int8), targeted by a pattern.
  int4_g32_routers           int4_g32 with the MoE routers quantized too: they load dequantized.
  fp8_dynamic                FP8 weights per channel: refused without a GPU of capability 8.9.
  int4_g32_audio_tower       the audio encoder quantized too: refused in one sentence.
"""

from __future__ import annotations

import pytest
import torch

from duplex_chat.config import DuplexError
from duplex_chat.model.loading import load_model
from duplex_chat.model.quant.formats import Scheme
from duplex_chat.model.quant.load import STACKS, stack_modules
from duplex_chat.model.quant.modules import quant_weight, quantized_schemes

from .conftest import tiny_settings
from .quant_checkpoints import (
    RECIPES,
    decompressed_by_library,
    quantization_config,
    quantized_modules,
    write_compressed_checkpoint,
)

# variant -> (dtype it is made from and loaded in, the scheme every quantized weight must have)
LOADED = {
    "int4_g32": (torch.float32, Scheme("int", 4, group_size=32, symmetric=True)),
    "int4_asym_g32_talker_bf16": (torch.bfloat16,
                                  Scheme("int", 4, group_size=32, symmetric=False)),
    "int8_channel": (torch.float32, Scheme("int", 8, symmetric=True)),
}
REFUSED = ("fp8_dynamic", "int4_g32_audio_tower")
OTHERS = ("int4_g32_routers",)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """variant -> directory of the tiny checkpoint compressed by compressed-tensors."""
    root = tmp_path_factory.mktemp("compressed")
    dtypes = {name: dtype for name, (dtype, _) in LOADED.items()}
    return {name: write_compressed_checkpoint(tiny_checkpoint, root / name, RECIPES[name],
                                              dtypes.get(name))
            for name in (*LOADED, *REFUSED, *OTHERS)}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """variant -> the bundle `load_model` makes of it (each loaded on first use)."""
    bundles = {}

    def get(name):
        if name not in bundles:
            dtype = str(LOADED[name][0]).removeprefix("torch.")
            bundles[name] = load_model(tiny_settings(checkpoints[name], torch_dtype=dtype).qwen)
        return bundles[name]

    return get


def test_the_checkpoints_are_what_llm_compressor_writes(checkpoints):
    """config.json carries the library's own quantization_config: method, version, one format,
    config groups with the recipe's weights, and the explicit ignore list it derives."""
    qc = quantization_config(checkpoints["int4_g32"])
    assert qc["quant_method"] == "compressed-tensors" and qc["version"]
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    assert "thinker.lm_head" in qc["ignore"] and "thinker.model.layers.0.mlp.gate" in qc["ignore"]
    asym = quantization_config(checkpoints["int4_asym_g32_talker_bf16"])
    assert "talker.model.layers.0.self_attn.q_proj" in asym["ignore"]
    assert quantization_config(checkpoints["fp8_dynamic"])["format"] == "float-quantized"


def _expected(reference: dict, prefix: str, name: str, num_experts: int) -> tuple:
    """(the library's decompressed tensor for the layer weight `name`, the hub modules it is
    made of). Fused experts: expert e's gate_proj rows then its up_proj rows."""
    if name == "mlp.experts.gate_up_proj":
        parts = [[f"{prefix}.mlp.experts.{e}.{p}" for p in ("gate_proj", "up_proj")]
                 for e in range(num_experts)]
        value = torch.stack([torch.cat([reference[f"{m}.weight"] for m in pair]) for pair in parts])
        return value, {m for pair in parts for m in pair}
    if name == "mlp.experts.down_proj":
        modules = [f"{prefix}.mlp.experts.{e}.down_proj" for e in range(num_experts)]
        return torch.stack([reference[f"{m}.weight"] for m in modules]), set(modules)
    module = f"{prefix}.{name.removesuffix('.weight')}"
    return reference[f"{module}.weight"], {module}


@pytest.mark.parametrize("variant", sorted(LOADED))
def test_dequantized_weights_equal_what_compressed_tensors_decompresses(
        variant, checkpoints, loaded, tiny_bundle):
    """Every quantized weight of the loaded model dequantizes to the library's decompression of
    its module, bit for bit; exactly the modules the checkpoint quantizes are quantized; every
    other parameter is the original checkpoint's (in the loading dtype)."""
    dtype, scheme = LOADED[variant]
    bundle = loaded(variant)
    reference = decompressed_by_library(checkpoints[variant], dtype)
    covered: set[str] = set()
    for stack_name, stack in stack_modules(bundle.model).items():
        for index, layer in enumerate(stack.layers):
            prefix = f"{STACKS[stack_name][0]}.{index}"
            experts = getattr(layer.mlp, "experts", None)
            num_experts = 0 if experts is None else experts.num_experts
            for name, got_scheme in quantized_schemes(layer).items():
                module_name, _, leaf = name.rpartition(".")
                got = quant_weight(layer.get_submodule(module_name), leaf).dequantize(dtype)
                want, modules = _expected(reference, prefix, name, num_experts)
                assert got_scheme == scheme, f"{prefix}.{name}"
                assert got.dtype == want.dtype and torch.equal(got, want), f"{prefix}.{name}"
                covered |= modules
    assert covered == quantized_modules(checkpoints[variant])

    quantized = set(quantized_schemes(bundle.model))
    original = dict(tiny_bundle.model.named_parameters())
    params = dict(bundle.model.named_parameters())
    assert params.keys() | quantized == original.keys() and not params.keys() & quantized
    for name, value in params.items():
        assert value.dtype == dtype and torch.equal(value, original[name].to(dtype)), name


def test_int4_quantizes_both_stacks_and_the_community_layout_keeps_the_talker(checkpoints):
    full = quantized_modules(checkpoints["int4_g32"])
    assert "talker.model.layers.1.mlp.shared_expert_gate" in full
    assert {m.split(".")[0] for m in full} == {"thinker", "talker"}
    assert all(".model.layers." in m and not m.endswith("mlp.gate") for m in full)
    community = quantized_modules(checkpoints["int4_asym_g32_talker_bf16"])
    assert community and all(m.startswith("thinker.model.layers.") for m in community)


def test_quantized_routers_load_as_16_bit_weights(checkpoints, tiny_bundle):
    """A checkpoint that quantizes the routers (transformers' routers are not Linears here):
    they load dequantized, as the library decompresses them; the rest as in int4_g32."""
    directory = checkpoints["int4_g32_routers"]
    routers = {m for m in quantized_modules(directory) if m.endswith("mlp.gate")}
    assert len(routers) == 4
    bundle = load_model(tiny_settings(directory).qwen)
    reference = decompressed_by_library(directory, torch.float32)
    for stack_name, stack in stack_modules(bundle.model).items():
        for index, layer in enumerate(stack.layers):
            module = f"{STACKS[stack_name][0]}.{index}.mlp.gate"
            assert module in routers and "mlp.gate.weight" not in quantized_schemes(layer)
            assert torch.equal(layer.mlp.gate.weight, reference[f"{module}.weight"]), module
    original = dict(tiny_bundle.model.named_parameters())
    for name, scheme in quantized_schemes(bundle.model).items():
        assert scheme == LOADED["int4_g32"][1] and name in original


@pytest.fixture(scope="module")
def int4_plain(loaded, tiny_checkpoint):
    from .test_quant_engine import dequantized_copy

    # the unquantized checkpoint it was made from, with the library-compressed weights written in
    return dequantized_copy(loaded("int4_g32"), tiny_checkpoint)


@pytest.mark.parametrize("decoder", ["eager", "fast"])
def test_int4_checkpoint_engine_equals_generate_on_its_dequantized_weights(
        checkpoints, loaded, int4_plain, decoder):
    from .test_engine_fidelity import assert_turns_match_reference, make_conversation

    conv, settings = make_conversation(loaded("int4_g32"), checkpoints["int4_g32"], 2.0,
                                       decoder=decoder)
    assert_turns_match_reference(conv, settings, [(2.4, 2), (1.7, 3)], reference_bundle=int4_plain)


def _refusal(directory) -> str:
    with pytest.raises(DuplexError) as caught:
        load_model(tiny_settings(directory).qwen)
    message = caught.value.message
    assert "\n" not in message and message.endswith(".") and ". " not in message, message
    return message


def test_fp8_checkpoint_is_refused_on_the_cpu(checkpoints):
    assert "compute capability 8.9" in _refusal(checkpoints["fp8_dynamic"])


def test_quantized_audio_tower_is_refused_in_one_sentence(checkpoints):
    message = _refusal(checkpoints["int4_g32_audio_tower"])
    assert "thinker.audio_tower." in message and "decoder layers" in message
