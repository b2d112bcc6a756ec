"""Quantized weight formats (model/quant/formats.py) and the compressed-tensors checkpoint reader
(model/quant/compressed.py), checked against compressed-tensors itself.

The library checks build a small model with Qwen3-Omni's module names (attention, a router, one
Linear per expert, lm_head), quantize it with compressed-tensors' own API
(apply_quantization_config, min-max scales from its calculate_qparams, compressed by ModelCompressor
as llm-compressor does when saving), save it as a checkpoint (model.safetensors + config.json with
quantization_config), read it back with our reader and require our dequantized weights to be bit
for bit what the library's own decompressors give. compressed-tensors is a test-only dependency.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from duplex_chat.config import DuplexError
from duplex_chat.model.quant import compressed
from duplex_chat.model.quant.formats import (
    MODES, QuantWeight, Scheme, expand_blocks, pack_int4, quantize, unpack_int4)

# compressed-tensors is in the test extras (pyproject.toml), never a runtime dependency
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import (
    QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config)
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils.match import match_quantizable_tensors
from safetensors.torch import load_file, save_file

H, INTER, E = 256, 128, 4  # hidden, expert intermediate, experts: wide enough for groups of 128
EXPERTS = "thinker.model.layers.0.mlp.experts"
IGNORE = ["thinker.lm_head", "re:.*mlp\\.gate$"]


def _weight(shape, dtype=torch.bfloat16, seed=0) -> torch.Tensor:
    """Random weights whose rows and columns differ in size, like trained ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w *= torch.rand(shape[:-1], generator=g).unsqueeze(-1) * 2 + 0.1
    w *= torch.rand(shape[-1], generator=g) * 2 + 0.1
    return w.to(dtype)


# --- formats: layout, round trip -------------------------------------------------------------

def test_int4_layout_is_compressed_tensors_pack_quantized():
    q = torch.randint(-8, 8, (6, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    words = pack_int4(q)
    assert words.dtype == torch.int32 and words.shape == (6, 8)
    assert torch.equal(words, pack_to_int32(q, 4))  # the library's packer, same words
    assert torch.equal(unpack_int4(words), q)
    assert torch.equal(unpack_from_int32(words, 4, q.shape), q)
    # element k: nibble k % 8 of word k // 8, stored as q + 8
    u = (words[2, 3].item() >> (4 * 5)) & 0xF
    assert u - 8 == q[2, 3 * 8 + 5].item()
    assert torch.equal(compressed.unpack_int32(pack_to_int32(q, 8), 8, 64), q)


SCHEMES = {
    "int4 g32 sym": Scheme("int", 4, 32, True),
    "int4 g128 sym": Scheme("int", 4, 128, True),
    "int4 g32 asym": Scheme("int", 4, 32, False),
    "int4 g128 asym": Scheme("int", 4, 128, False),
    "int8 channel": Scheme("int", 8, None, True),
    "fp8 channel": Scheme("float", 8),
    "fp8 block 128": Scheme("float", 8, block=(128, 128)),
}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_round_trip_error_is_within_half_a_step(name):
    scheme = SCHEMES[name]
    w = _weight((192, 384), seed=2)  # 192 rows: a partial FP8 block at the edge
    qw = quantize(w, scheme)
    assert qw.shape == w.shape and qw.scale.dtype == torch.bfloat16
    err = (qw.dequantize(torch.float32) - w.float()).abs()
    if scheme.kind == "float":
        scale = (expand_blocks(qw.scale.float(), scheme.block, *w.shape) if scheme.block
                 else qw.scale.float())
        # e4m3: 3 mantissa bits (half an ulp is 2**-4 relative), subnormal spacing 2**-9
        bound = torch.maximum(w.float().abs() * 2**-4, scale * 2**-10) * 1.001
    else:
        g = scheme.group_size or w.shape[1]
        scale = qw.scale.float().repeat_interleave(g, dim=1)
        # half a step symmetric, one step asymmetric (the zero point is rounded by up to half a
        # step); + up to 8 steps times the bf16 rounding (2**-9) of the scale at the clamped end
        bound = scale * ((0.5 if scheme.symmetric else 1.0) + 2**-5)
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_experts_quantize_as_each_expert_alone(name):
    scheme = SCHEMES[name]
    w = _weight((3, 2 * INTER, H), seed=3)
    fused = quantize(w, scheme)
    assert fused.shape == w.shape
    for e in range(3):
        alone = quantize(w[e], scheme)
        assert torch.equal(fused.data[e].view(torch.uint8), alone.data.view(torch.uint8))
        assert torch.equal(fused.scale[e], alone.scale)
        assert (fused.zero is None) == (alone.zero is None)
        if alone.zero is not None:
            assert torch.equal(fused.zero[e], alone.zero)
    assert torch.equal(fused.dequantize()[1], quantize(w[1], scheme).dequantize())
    assert fused.nbytes == sum(t.nbytes for t in (fused.data, fused.scale, fused.zero)
                               if t is not None)


def test_modes_and_describe():
    assert MODES["int4"] == Scheme("int", 4, 128, True)
    assert MODES["int8"] == Scheme("int", 8, None, True)
    assert MODES["fp8"] == Scheme("float", 8, None, True, None)
    assert MODES["int4"].describe() == "int4 symmetric, groups of 128"
    assert Scheme("float", 8, block=(128, 128)).describe() == "fp8 e4m3, blocks of 128x128"
    with pytest.raises(ValueError):
        Scheme("int", 3)
    with pytest.raises(ValueError):
        QuantWeight(data=torch.zeros(4, 8, dtype=torch.int8), scale=torch.ones(4, 2),
                    scheme=MODES["int8"])


# --- our round to nearest against compressed-tensors' ------------------------------------------

def _ct_args(scheme: Scheme) -> QuantizationArgs:
    if scheme.block is not None:
        return QuantizationArgs(num_bits=8, type="float", strategy="block",
                                block_structure=list(scheme.block))
    strategy = "group" if scheme.group_size else "channel"
    return QuantizationArgs(num_bits=scheme.bits, type=scheme.kind, symmetric=scheme.symmetric,
                            strategy=strategy, group_size=scheme.group_size)


def _observe(w: torch.Tensor, args: QuantizationArgs):
    """llm-compressor's min-max weight observer (observers/helpers.py flatten_for_calibration,
    min_max.py _get_min_max) feeding compressed-tensors' calculate_qparams."""
    if args.strategy == "group":
        flat = w.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    elif args.strategy == "channel":
        flat = w.unsqueeze(-2).unsqueeze(0)
    elif args.strategy == "tensor":
        flat = w.reshape(1, 1, -1)
    else:
        bn, bk = args.block_structure
        pad = torch.nn.functional.pad(w, (0, -w.shape[1] % bk, 0, -w.shape[0] % bn))
        flat = (pad.reshape(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk).transpose(1, 2)
                .flatten(-2, -1).unsqueeze(0))
    lo, hi = torch.amin(flat, dim=(0, -1)), torch.amax(flat, dim=(0, -1))
    return calculate_qparams(lo, hi, args)


def _ours_q(qw: QuantWeight) -> torch.Tensor:
    if qw.scheme.kind == "int" and qw.scheme.bits == 4:
        return unpack_int4(qw.data)
    return qw.data


@pytest.mark.parametrize("name", ["int4", "int8", "fp8", "int4 g32 asym", "fp8 block 128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_round_to_nearest_is_compressed_tensors(name, dtype):
    scheme = MODES.get(name) or SCHEMES[name]
    args = _ct_args(scheme)
    w = _weight((256, 512), dtype=dtype, seed=4)
    ours = quantize(w, scheme)
    scale, zp = _observe(w, args)
    assert torch.equal(ours.scale, scale)  # same formulas, same dtype: same bits
    if not scheme.symmetric:
        assert torch.equal(ours.zero, zp)
    zp = None if scheme.symmetric else zp
    qdtype = torch.int8 if scheme.kind == "int" else torch.float8_e4m3fn
    # compressed-tensors' GPU kernel divides in float32; on the CPU the library does the same
    # when given float32 values, which is how it is run here for a bf16 weight
    theirs = ct_quantize(x=w.float(), scale=scale.float(), zero_point=zp, args=args, dtype=qdtype)
    assert torch.equal(_ours_q(ours).view(torch.uint8), theirs.view(torch.uint8))
    if dtype == torch.float32:  # float32 weights: the library's CPU path is the same computation
        cpu = ct_quantize(x=w, scale=scale, zero_point=zp, args=args, dtype=qdtype)
        assert torch.equal(_ours_q(ours).view(torch.uint8), cpu.view(torch.uint8))


def test_the_libraries_cpu_path_differs_only_by_rounding_x_over_scale_to_bf16():
    """On a bf16 weight compressed-tensors' CPU fallback computes x / scale in bf16 and rounds
    that; our quantize (and its GPU kernel) round the float32 quotient. They differ exactly where
    rounding the quotient to 8 significant bits moves it across a rounding boundary."""
    scheme, args = MODES["int4"], _ct_args(MODES["int4"])
    w = _weight((256, 512), seed=5)
    ours = _ours_q(quantize(w, scheme))
    scale, _ = _observe(w, args)
    cpu = ct_quantize(x=w, scale=scale, zero_point=None, args=args, dtype=torch.int8)
    q32 = (w.float().unflatten(-1, (-1, 128)) / scale.float().unsqueeze(-1)).flatten(-2)
    q16 = (w.unflatten(-1, (-1, 128)) / scale.unsqueeze(-1)).flatten(-2).float()
    crosses = q32.clamp(-8, 7).round() != q16.clamp(-8, 7).round()
    assert torch.equal(ours != cpu, crosses)
    assert 0 < int(crosses.sum()) < w.numel() // 100  # a few ties, by one step
    assert int((ours.int() - cpu.int()).abs().max()) == 1


# --- the reader against checkpoints compressed-tensors writes --------------------------------

class _Node(nn.Module):
    pass


def _tiny_omni(dtype=torch.bfloat16) -> nn.Module:
    """The names a Qwen3-Omni checkpoint holds for one thinker layer, experts unfused."""
    root, thinker, model, layer = _Node(), _Node(), _Node(), _Node()
    attn, mlp = _Node(), _Node()
    seed = iter(range(100, 200))

    def linear(n_in, n_out):
        m = nn.Linear(n_in, n_out, bias=False, dtype=dtype)
        m.weight.data = _weight((n_out, n_in), dtype, seed=next(seed))
        return m

    attn.q_proj, attn.o_proj = linear(H, H), linear(H, H)
    mlp.gate = linear(H, E)  # the router: ignored
    experts = nn.ModuleList()
    for _ in range(E):
        ex = _Node()
        ex.gate_proj, ex.up_proj = linear(H, INTER), linear(H, INTER)
        ex.down_proj = linear(INTER, H)
        experts.append(ex)
    mlp.experts = experts
    layer.self_attn, layer.mlp = attn, mlp
    model.layers = nn.ModuleList([layer])
    thinker.model, thinker.lm_head = model, linear(H, 64)
    root.thinker = thinker
    return root


def _write_checkpoint(tmp_path, weights: dict, inputs: dict | None = None, fmt: str | None = None,
                      targets=("Linear",)):
    """Quantize `_tiny_omni` with compressed-tensors and save it as llm-compressor does: the
    compressed state dict in model.safetensors, the quantization_config in config.json."""
    model = _tiny_omni()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    scheme = QuantizationScheme(
        targets=list(targets), weights=QuantizationArgs(**weights),
        input_activations=None if inputs is None else QuantizationArgs(**inputs))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=list(IGNORE)))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            scale, zp = _observe(module.weight.data, module.quantization_scheme.weights)
            module.weight_scale.data.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zp)
            if hasattr(module, "input_scale"):  # static activations: a calibrated value
                module.input_scale.data.fill_(0.05)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe"}))
    compressor.update_config(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    return load_file(str(tmp_path / "model.safetensors")), config, original


def _library_dequantized(tensors: dict, config: dict) -> dict[str, torch.Tensor]:
    """compressed-tensors' own decompression of every quantized Linear, found as its model-free
    dequantizer finds them (entrypoints/convert/converters/ct_dequantizer.py)."""
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    out = {}
    for scheme in qconfig.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        names = compressor.compression_param_names(scheme)
        for module, _ in match_quantizable_tensors(tensors, ignore=qconfig.ignore,
                                                   targets=scheme.targets,
                                                   param_targets=[names[0]]):
            local = {n: tensors[f"{module}.{n}"] for n in names}
            out[module] = compressor.decompress(local, scheme)["weight"]
    return out


LINEARS = (["thinker.model.layers.0.self_attn.q_proj", "thinker.model.layers.0.self_attn.o_proj",
            "thinker.model.layers.0.mlp.gate", "thinker.lm_head"]
           + [f"{EXPERTS}.{e}.{p}" for e in range(E)
              for p in ("gate_proj", "up_proj", "down_proj")])

CHECKPOINTS = {  # name: (weights, input activations, forced format, expected format)
    "W4A16 g32 sym": (dict(num_bits=4, strategy="group", group_size=32), None, None,
                      "pack-quantized"),
    "W4A16 g128 sym": (dict(num_bits=4, strategy="group", group_size=128), None, None,
                       "pack-quantized"),
    "W4A16 g32 asym": (dict(num_bits=4, strategy="group", group_size=32, symmetric=False), None,
                       None, "pack-quantized"),
    "W4A16 g128 asym": (dict(num_bits=4, strategy="group", group_size=128, symmetric=False), None,
                        None, "pack-quantized"),
    "W8A16 channel": (dict(num_bits=8, strategy="channel"), None, None, "pack-quantized"),
    "W8A16 g128": (dict(num_bits=8, strategy="group", group_size=128), None, None,
                   "pack-quantized"),
    "W8A16 channel asym": (dict(num_bits=8, strategy="channel", symmetric=False), None, None,
                           "pack-quantized"),
    "W8A8 int": (dict(num_bits=8, strategy="channel"),
                 dict(num_bits=8, strategy="token", dynamic=True), None, "int-quantized"),
    "W4A16 naive asym": (dict(num_bits=4, strategy="group", group_size=128, symmetric=False),
                         None, "naive-quantized", "naive-quantized"),
    "FP8 channel, dynamic activations": (
        dict(num_bits=8, type="float", strategy="channel"),
        dict(num_bits=8, type="float", strategy="token", dynamic=True), None, "float-quantized"),
    "FP8 channel weight-only": (dict(num_bits=8, type="float", strategy="channel"), None, None,
                                "naive-quantized"),
    "FP8 tensor, static activations": (
        dict(num_bits=8, type="float", strategy="tensor"),
        dict(num_bits=8, type="float", strategy="tensor"), None, "float-quantized"),
    "FP8 block 128": (
        dict(num_bits=8, type="float", strategy="block", block_structure=[128, 128]),
        dict(num_bits=8, type="float", strategy="group", group_size=128, dynamic=True), None,
        "float-quantized"),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_reader_equals_compressed_tensors_decompression(tmp_path, name):
    weights, inputs, fmt, expected_format = CHECKPOINTS[name]
    tensors, config, original = _write_checkpoint(tmp_path, weights, inputs, fmt)
    cfg = compressed.read_scheme(config)
    assert cfg is not None and [g.format for g in cfg.groups] == [expected_format]
    reference = _library_dequantized(tensors, config)
    # the quantized modules are the ones the library finds: all but the ignored router, lm_head
    assert sorted(reference) == sorted(n for n in LINEARS if cfg.is_quantized(n))
    assert sorted(reference) == sorted(n for n in LINEARS if n not in
                                       ("thinker.lm_head", "thinker.model.layers.0.mlp.gate"))

    read: set[str] = set()

    def get_tensor(name):
        read.add(name)
        return tensors[name]  # KeyError when absent, as the reader expects

    for module in LINEARS:
        w = compressed.load_linear(get_tensor, module, cfg)
        if module in reference:
            assert isinstance(w, QuantWeight)
            assert w.shape == original[f"{module}.weight"].shape
            ours = w.dequantize(reference[module].dtype)
            assert torch.equal(ours, reference[module]), module
        else:
            assert isinstance(w, torch.Tensor) and torch.equal(w, original[f"{module}.weight"])
        assert set(compressed.tensor_names(module, cfg)) <= read

    fused = compressed.load_experts(get_tensor, EXPERTS, E, cfg)
    gate_up = torch.stack([torch.cat([reference[f"{EXPERTS}.{e}.gate_proj"],
                                      reference[f"{EXPERTS}.{e}.up_proj"]]) for e in range(E)])
    down = torch.stack([reference[f"{EXPERTS}.{e}.down_proj"] for e in range(E)])
    assert fused["gate_up_proj"].shape == (E, 2 * INTER, H)
    assert fused["down_proj"].shape == (E, H, INTER)
    assert torch.equal(fused["gate_up_proj"].dequantize(gate_up.dtype), gate_up)
    assert torch.equal(fused["down_proj"].dequantize(down.dtype), down)
    # everything left unread is an activation scale, which weight-only loading ignores
    unread = {n for n in tensors if n not in read and not n.endswith(".weight")}
    assert all(n.endswith(".input_scale") for n in unread), sorted(unread)[:4]
    assert all(compressed.is_quant_param(n) for n in unread)


def test_regex_ignore_entries_match_as_the_library_matches(tmp_path):
    """llm-compressor saves the ignore list as module names; hand-written configs use "re:"
    patterns, which must pick the same modules as compressed-tensors' own matching."""
    tensors, config, _ = _write_checkpoint(tmp_path, dict(num_bits=4, strategy="group",
                                                          group_size=32))
    config["quantization_config"]["ignore"] = IGNORE + [f"re:{EXPERTS}\\.1\\."]
    cfg = compressed.read_scheme(config)
    reference = _library_dequantized(tensors, config)
    assert sorted(n for n in LINEARS if cfg.is_quantized(n)) == sorted(reference)
    assert f"{EXPERTS}.1.up_proj" not in reference and f"{EXPERTS}.0.up_proj" in reference


def test_experts_left_unquantized_are_fused_too(tmp_path):
    """Targets that leave the experts in bf16 (the talker-like case): plain fused tensors."""
    tensors, config, original = _write_checkpoint(
        tmp_path, dict(num_bits=4, strategy="group", group_size=32),
        targets=["re:.*self_attn\\..*_proj$"])
    cfg = compressed.read_scheme(config)
    assert cfg.is_quantized("thinker.model.layers.0.self_attn.q_proj")
    assert not cfg.is_quantized(f"{EXPERTS}.0.gate_proj")
    fused = compressed.load_experts(tensors.__getitem__, EXPERTS, E, cfg)
    want = torch.stack([torch.cat([original[f"{EXPERTS}.{e}.gate_proj.weight"],
                                   original[f"{EXPERTS}.{e}.up_proj.weight"]]) for e in range(E)])
    assert torch.equal(fused["gate_up_proj"], want)


def test_a_missing_expert_is_named(tmp_path):
    tensors, config, _ = _write_checkpoint(tmp_path, dict(num_bits=4, strategy="group",
                                                          group_size=128))
    del tensors[f"{EXPERTS}.2.up_proj.weight_packed"]
    cfg = compressed.read_scheme(config)
    with pytest.raises(DuplexError, match=r"expert 2 of the 4 .*is missing"):
        compressed.load_experts(tensors.__getitem__, EXPERTS, E, cfg)
    with pytest.raises(DuplexError, match=r"has no tensor .*experts\.2\.up_proj\.weight_packed"):
        compressed.load_linear(tensors.get, f"{EXPERTS}.2.up_proj", cfg)


def test_groups_that_do_not_fit_the_columns_are_refused():
    cfg = compressed.read_scheme({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": 64}}}}})
    q = torch.zeros(8, 96, dtype=torch.int8)
    tensors = {"x.weight_packed": pack_int4(q), "x.weight_shape": torch.tensor([8, 96]),
               "x.weight_scale": torch.ones(8, 1, dtype=torch.bfloat16)}
    with pytest.raises(DuplexError, match="96 input columns do not split into groups of 64"):
        compressed.load_linear(tensors.__getitem__, "x", cfg)


def test_scheme_selection_follows_compressed_tensors_priority():
    cfg = compressed.read_scheme({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "ignore": ["thinker.lm_head", "re:.*mlp\\.gate$"],
        "config_groups": {
            "a": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"}},
            "b": {"targets": ["re:.*experts.*"], "weights": {
                "num_bits": 4, "strategy": "group", "group_size": 32}},
            "c": {"targets": ["thinker.model.layers.0.mlp.experts.0.down_proj"], "weights": {
                "num_bits": 4, "strategy": "group", "group_size": 128}}}}})
    assert cfg.scheme_for("thinker.model.layers.0.self_attn.q_proj") == MODES["int8"]
    assert cfg.scheme_for(f"{EXPERTS}.1.down_proj") == Scheme("int", 4, 32)
    assert cfg.scheme_for(f"{EXPERTS}.0.down_proj") == MODES["int4"]  # exact name first
    assert cfg.scheme_for("thinker.model.layers.0.mlp.gate") is None
    assert cfg.scheme_for("thinker.lm_head") is None
    assert compressed.read_scheme({"model_type": "qwen3_omni_moe"}) is None
    # groups without their own format under "mixed-precision": inferred as compressed-tensors does
    mixed = compressed.read_scheme({"quant_method": "compressed-tensors",
                                    "format": "mixed-precision", "config_groups": {
        "int": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128}},
        "fp8": {"targets": ["re:.*experts.*"], "weights": {"num_bits": 8, "type": "float",
                                                           "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "float", "dynamic": True,
                                      "strategy": "token"}}}})
    assert [g.format for g in mixed.groups] == ["pack-quantized", "float-quantized"]
    assert mixed.describe() == ("fp8 e4m3, per channel (float-quantized); "
                                "int4 symmetric, groups of 128 (pack-quantized)")


def _config(weights=None, fmt="pack-quantized", **extra):
    group = {"targets": ["Linear"], "weights": weights or {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": fmt,
                                    "config_groups": {"group_0": group}, **extra}}


REFUSED = {
    "nvfp4-pack-quantized": _config(fmt="nvfp4-pack-quantized"),
    "mxfp4-pack-quantized": _config(fmt="mxfp4-pack-quantized"),
    "fp4": _config({"num_bits": 4, "type": "float", "strategy": "tensor_group",
                    "group_size": 16}, fmt="naive-quantized"),
    "int2": _config({"num_bits": 2, "type": "int", "strategy": "group", "group_size": 128}),
    "int3": _config({"num_bits": 3, "type": "int", "strategy": "group", "group_size": 128}),
    "'tensor'": _config({"num_bits": 8, "type": "int", "strategy": "tensor"}),
    "'block'": _config({"num_bits": 8, "type": "int", "strategy": "block",
                        "block_structure": [128, 128]}),
    "sparse-24-bitmask": _config(sparsity_config={"format": "sparse-24-bitmask",
                                                  "sparsity_structure": "2:4"}),
    "'awq'": {"quantization_config": {"quant_method": "awq", "bits": 4}},
    "actorder": _config({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                         "actorder": "group"}),
    "asymmetric FP8": _config({"num_bits": 8, "type": "float", "strategy": "channel",
                               "symmetric": False}, fmt="float-quantized"),
    "marlin-24": _config(fmt="marlin-24"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_schemes_are_refused_by_name(name):
    with pytest.raises(DuplexError) as caught:
        compressed.read_scheme(REFUSED[name])
    assert name in caught.value.message
    assert caught.value.message.count(". ") == 0  # one sentence
