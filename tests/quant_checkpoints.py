"""Compressed-tensors checkpoints of the tiny model, written as llm-compressor writes them.

The tensors come from compressed-tensors itself, not from `model/quant/formats.py`: the
checkpoint's Linears are rebuilt as `nn.Linear` modules under their hub names (one Linear per
expert, routers included, as llm-compressor sees a Qwen3-Omni checkpoint), the library applies
the recipe (`apply_quantization_config`: its own target and ignore matching), each weight gets
min-max qparams from the library's `calculate_qparams` over the strategy's groups or channels
(what llm-compressor's memoryless min-max observer feeds it), and `ModelCompressor` compresses
the modules and writes the `quantization_config` (config groups, explicit ignore list, format,
version) into config.json, as llm-compressor's `save_pretrained` does. Everything else in the
checkpoint (norms, embeddings, convolutions) is copied as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# What llm-compressor recipes for Qwen3-Omni leave out: the heads, the routers, everything but the
# thinker's and the talker's decoder layers.
IGNORE_OUTSIDE_LAYERS = [
    "thinker.lm_head",
    r"re:.*mlp\.gate$",
    r"re:thinker\.audio_tower\..*",
    r"re:thinker\.visual\..*",
    r"re:talker\.code_predictor\..*",
    "talker.codec_head",
    r"re:talker\.(text|hidden)_projection\..*",
    r"re:code2wav\..*",
]


def int_weights(bits: int, symmetric: bool, group_size: int | None) -> dict:
    strategy = "group" if group_size else "channel"
    return dict(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                group_size=group_size, dynamic=False)


# The recipes (config groups and ignore lists) of the variants the tests load.
RECIPES: dict[str, dict] = {
    # W4A16 symmetric groups of 32, every Linear of both decoder stacks.
    "int4_g32": dict(config_groups={"group_0": dict(targets=["Linear"],
                                                    weights=int_weights(4, True, 32))},
                     ignore=IGNORE_OUTSIDE_LAYERS),
    # The community layout: int4 asymmetric groups of 32, the talker left in 16 bits.
    "int4_asym_g32_talker_bf16": dict(
        config_groups={"group_0": dict(targets=["Linear"], weights=int_weights(4, False, 32))},
        ignore=IGNORE_OUTSIDE_LAYERS + [r"re:talker\..*"]),
    # W8A16 per channel, targeted by a pattern instead of the class.
    "int8_channel": dict(
        config_groups={"group_0": dict(targets=[r"re:.*model\.layers\.\d+\..*_proj$"],
                                       weights=int_weights(8, True, None))},
        ignore=IGNORE_OUTSIDE_LAYERS),
    # FP8 weights per channel, dynamic per-token FP8 activations (the FP8_DYNAMIC preset).
    "fp8_dynamic": dict(
        config_groups={"group_0": dict(
            targets=["Linear"],
            weights=dict(num_bits=8, type="float", symmetric=True, strategy="channel",
                         dynamic=False),
            input_activations=dict(num_bits=8, type="float", symmetric=True,
                                   strategy="token", dynamic=True))},
        ignore=IGNORE_OUTSIDE_LAYERS),
    # int4 groups of 32 with the routers quantized too (made where a router was a Linear and
    # the recipe did not ignore it).
    "int4_g32_routers": dict(
        config_groups={"group_0": dict(targets=["Linear"],
                                       weights=int_weights(4, True, 32))},
        ignore=[e for e in IGNORE_OUTSIDE_LAYERS if "mlp" not in e]),
    # int4 groups of 32 with the audio encoder's Linears quantized too.
    "int4_g32_audio_tower": dict(
        config_groups={"group_0": dict(targets=["Linear"],
                                       weights=int_weights(4, True, 32))},
        ignore=[e for e in IGNORE_OUTSIDE_LAYERS if "audio_tower" not in e]),
}


def is_hub_linear(name: str, tensor: torch.Tensor) -> bool:
    """Whether the checkpoint tensor `name` is the weight of a Linear in the hub model (2-D,
    not an embedding): the modules a "Linear" target matches in llm-compressor."""
    return name.endswith(".weight") and tensor.ndim == 2 and "embed" not in name


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _shadow_model(linears: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> torch.nn.Module:
    """A plain module tree holding one nn.Linear per hub Linear, under the hub names."""
    root = torch.nn.Module()
    for name, (weight, bias) in linears.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                parent.add_module(part, child)
            parent = child
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                 device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias, requires_grad=False)
        parent.add_module(leaf, linear)
    return root


def _calibrate(module: torch.nn.Linear) -> None:
    """Min-max weight qparams through compressed-tensors' `calculate_qparams`, reduced over the
    strategy's groups (N, K // G) or channels (N, 1), as llm-compressor's observer does."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = module.quantization_scheme.weights
    weight = module.weight.data
    if args.strategy == "group":
        grouped = weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size))
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    elif args.strategy == "channel":
        lo, hi = weight.amin(dim=-1, keepdim=True), weight.amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"the builder calibrates groups and channels, not {args.strategy}")
    scale, zero = calculate_qparams(lo, hi, args)
    module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data.copy_(zero.to(module.weight_zero_point.dtype))


def write_compressed_checkpoint(source: Path, destination: Path, recipe: dict,
                                dtype: torch.dtype | None = None) -> Path:
    """`source` (a 16/32-bit checkpoint in the hub layout) compressed by compressed-tensors under
    `recipe` ({"config_groups", "ignore"}), written to `destination` with the config.json
    quantization_config llm-compressor writes. `dtype`: cast floating-point weights first (the
    dtype llm-compressor loaded the model in, so also the scales' dtype)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils import is_module_quantized
    from safetensors.torch import save_file

    source, destination = Path(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    tensors = _read_all(source)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    linears = {name.removesuffix(".weight"): (t, tensors.get(name.removesuffix("weight") + "bias"))
               for name, t in tensors.items() if is_hub_linear(name, t)}
    model = _shadow_model(linears)
    config = QuantizationConfig.model_validate(dict(recipe, quantization_status="initialized"))
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if is_module_quantized(module):
            _calibrate(module)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)

    out = {k: v for k, v in tensors.items()
           if k.removesuffix(".weight").removesuffix(".bias") not in linears}
    out.update({k: v.contiguous() for k, v in model.state_dict().items()})
    save_file(out, destination / "model.safetensors", metadata={"format": "pt"})
    for item in source.iterdir():
        if item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            shutil.copy(item, destination / item.name)
    compressor.update_config(str(destination))
    return destination


def quantized_modules(directory: Path) -> set[str]:
    """Names of the modules a compressed checkpoint stores quantized (those with a scale)."""
    from safetensors import safe_open

    with safe_open(Path(directory) / "model.safetensors", "pt") as f:
        return {k.removesuffix(".weight_scale") for k in f.keys() if k.endswith(".weight_scale")}


def decompressed_by_library(directory: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint with its quantized weights decompressed by
    compressed-tensors' own model-free dequantizer (`CompressedTensorsDequantizer`)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer,
    )

    return CompressedTensorsDequantizer(str(directory), dtype=dtype).process(
        _read_all(Path(directory)))


def quantization_config(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())["quantization_config"]

