"""Loading Qwen3-Omni with quantized decoder layers, one layer at a time.

The decoder layers of the thinker and the talker hold almost all the weights (61 of the 65 GiB
in bf16). They are what gets quantized, so they are what must never sit in memory whole:

1. transformers loads everything else (`from_pretrained` on a copy of the config whose two
   decoder stacks have no layers): embeddings, heads, the audio encoder, the code predictor,
   code2wav. Small, and loaded by the library's own rules.
2. Each decoder layer is then built empty (on the meta device), its tensors are read from the
   safetensors shards one by one (memory-mapped: only that tensor is read), put on the device,
   quantized there if they are to be (`QUANTIZED`), and the layer is appended to its stack.
   At most one layer's 16-bit weights exist at once, on the host or the GPU.

A pre-quantized checkpoint (compressed-tensors, as llm-compressor writes it) goes the same way,
its weights read by `compressed.py` instead of quantized here. Random weights
(`bench --random-weights --quantize`) use the same loop with a different tensor source.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from duplex_chat.config import DuplexError
from duplex_chat.model.footprint import rounded_in_layer

from . import compressed
from .formats import QuantWeight, Scheme, quantize
from .modules import quantize_module

# The routed experts' fused 3-D tensors, built here from one Linear per expert.
FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

Progress = Callable[[str], None]
# (stack, layer index, the empty layer) -> {parameter name in the layer: tensor or QuantWeight}
LayerSource = Callable[[str, int, torch.nn.Module], dict[str, Any]]


# Where each decoder stack's layers are in the checkpoint (the hub layout; stable) and which
# transformers class builds one.
STACKS = {
    "thinker": ("thinker.model.layers", "Qwen3OmniMoeThinkerTextDecoderLayer"),
    "talker": ("talker.model.layers", "Qwen3OmniMoeTalkerDecoderLayer"),
}


def stack_modules(model) -> dict[str, torch.nn.Module]:
    """The thinker's and the talker's decoder stacks (modules with `.layers`), in this
    transformers version's module tree."""
    from duplex_chat.model.listener import thinker_text_model

    return {"thinker": thinker_text_model(model.thinker), "talker": model.talker.model}


def layerless_config(config):
    """A copy of `config` whose thinker and talker decoder stacks have no layers, and no
    quantization_config (the layers are ours to load; transformers must not try)."""
    bare = copy.deepcopy(config)
    bare.thinker_config.text_config.num_hidden_layers = 0
    bare.talker_config.text_config.num_hidden_layers = 0
    if hasattr(bare, "quantization_config"):
        del bare.quantization_config
    return bare


def add_layers(model, source: LayerSource, device: torch.device, dtype: torch.dtype,
               schemes: dict[str, Scheme | None], counts: dict[str, int],
               progress: Progress | None = None) -> None:
    """Build `counts[stack]` layers per stack from `source`, quantizing what `rounded_in_layer`
    names with `schemes[stack]` (None: keep 16-bit tensors as they come), and append them."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as modeling

    stacks = stack_modules(model)
    total, done = sum(counts.values()), 0
    for stack_name, count in counts.items():
        stack = stacks[stack_name]
        stack.config.num_hidden_layers = count
        layer_class = getattr(modeling, STACKS[stack_name][1])
        for index in range(count):
            with torch.device("meta"):
                layer = layer_class(stack.config, index)
            tensors = source(stack_name, index, layer)
            _fill_layer(layer, tensors, device, dtype, schemes[stack_name],
                        f"{stack_name} layer {index}")
            stack.layers.append(layer.eval())
            done += 1
            if progress is not None and (done % 8 == 0 or done == total):
                progress(f"decoder layers {done}/{total}")


def _fill_layer(layer: torch.nn.Module, tensors: dict[str, Any], device: torch.device,
                dtype: torch.dtype, scheme: Scheme | None, what: str) -> None:
    """Put `tensors` into the meta-device `layer`: every parameter must be given."""
    wanted = dict(layer.named_parameters())
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise DuplexError(f"The checkpoint lacks {what}'s {', '.join(missing[:3])}"
                          f"{' and more' if len(missing) > 3 else ''}.",
                          hint="The download may be incomplete.")
    for name, value in tensors.items():
        if name not in wanted:
            raise DuplexError(f"The checkpoint's {what} has a tensor {name} that this "
                              "transformers version's layer does not.")
        module_name, _, leaf = name.rpartition(".")
        module = layer.get_submodule(module_name)
        expected, got = tuple(wanted[name].shape), tuple(value.shape)  # QuantWeight: logical
        if got != expected:  # before any copy or rounding of a tensor that cannot be used
            raise DuplexError(f"The checkpoint's {what} {name} has shape {got}, the config "
                              f"says {expected}.")
        if not isinstance(value, QuantWeight):
            value = value.to(device=device, dtype=dtype)
            if scheme is not None and rounded_in_layer(name):
                value = _quantize(value, scheme, what, name)
        if isinstance(value, QuantWeight):
            quantize_module(module, {leaf: _as_kernels_read(value.to(device))}, dtype)
        else:
            module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def _as_kernels_read(weight: QuantWeight) -> QuantWeight:
    """FP8 scales in float32, as the kernels read them (a bf16 or fp16 scale converts exactly)."""
    if weight.scheme.kind == "float" and weight.scale.dtype != torch.float32:
        return replace(weight, scale=weight.scale.float())
    return weight


def _quantize(weight: torch.Tensor, scheme: Scheme, what: str, name: str) -> QuantWeight:
    try:
        return quantize(weight, scheme)
    except ValueError as problem:
        raise DuplexError(f"Cannot quantize {what}'s {name} ({tuple(weight.shape)}) as "
                          f"{scheme.describe()}: {problem}.") from None


class CheckpointTensors:
    """The tensors of a safetensors checkpoint by name, read one at a time (memory-mapped)."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            weight_map = {}
            for shard in sorted(directory.glob("*.safetensors")):
                with safe_open(shard, "pt") as f:
                    weight_map.update(dict.fromkeys(f.keys(), shard.name))
        self.directory = directory
        self.weight_map: dict[str, str] = weight_map
        self._open: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self, prefix: str) -> Iterator[str]:
        return (n for n in self.weight_map if n.startswith(prefix))

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor `name` on the CPU, or None if the checkpoint has none."""
        shard = self.weight_map.get(name)
        if shard is None:
            return None
        if shard not in self._open:
            from safetensors import safe_open

            self._open[shard] = safe_open(self.directory / shard, "pt")
        return self._open[shard].get_tensor(name)


def checkpoint_source(tensors: CheckpointTensors,
                      ct: compressed.CompressedConfig | None) -> LayerSource:
    """A LayerSource reading the hub layout: one Linear per expert, fused here into the 3-D
    tensors transformers' layers hold; compressed-tensors Linears read by `compressed.py`."""

    def source(stack: str, index: int, layer: torch.nn.Module) -> dict[str, Any]:
        prefix = f"{STACKS[stack][0]}.{index}"
        out: dict[str, Any] = {}
        for name, param in layer.named_parameters():
            if name in FUSED_EXPERTS:
                continue
            module_name, _, leaf = name.rpartition(".")
            if leaf == "weight" and isinstance(layer.get_submodule(module_name), torch.nn.Linear):
                out[name] = compressed.load_linear(tensors.get, f"{prefix}.{module_name}", ct)
            elif (leaf == "weight" and f"{prefix}.{name}" not in tensors
                  and f"{prefix}.{module_name}.weight_scale" in tensors):
                # A router (no nn.Linear in this transformers version, but one where the
                # checkpoint was made) stored quantized: routers stay 16-bit here, so it is
                # dequantized (exactly; _fill_layer casts it to the model's dtype).
                weight = compressed.load_linear(tensors.get, f"{prefix}.{module_name}", ct)
                if isinstance(weight, QuantWeight):
                    weight = weight.dequantize(torch.float32)
                out[name] = weight
            else:
                value = tensors.get(f"{prefix}.{name}")
                if value is not None:
                    out[name] = value
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            fused = compressed.load_experts(tensors.get, f"{prefix}.mlp.experts",
                                            experts.num_experts, ct)
            out.update({f"mlp.experts.{k}": v for k, v in fused.items()})
        return out

    return source


def layer_counts(config) -> dict[str, int]:
    return {"thinker": config.thinker_config.text_config.num_hidden_layers,
            "talker": config.talker_config.text_config.num_hidden_layers}


def load_quantized(source_dir: Path, config, dtype: torch.dtype, device: torch.device,
                   scheme: Scheme | None, ct: compressed.CompressedConfig | None,
                   device_map: dict | None, progress: Progress | None = None):
    """Qwen3OmniMoeForConditionalGeneration from `source_dir` with quantized decoder layers:
    rounded to `scheme` while loading (a 16-bit checkpoint), or as the compressed-tensors
    checkpoint `ct` stores them."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    counts = layer_counts(config)
    tensors = CheckpointTensors(source_dir)
    if ct is not None:
        _refuse_quantized_outside_layers(tensors, ct)
    kwargs = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        source_dir, config=layerless_config(config), **kwargs)
    add_layers(model, checkpoint_source(tensors, ct), device, dtype,
               dict.fromkeys(counts, scheme), counts, progress)
    _restore_config(model, config)
    if device.type == "cuda":  # the layers' 16-bit copies' blocks: back to the driver
        torch.cuda.empty_cache()
    return model


def _restore_config(model, config) -> None:
    """The loaded model describes the whole checkpoint again (layer counts, quantization)."""
    model.config.thinker_config.text_config.num_hidden_layers = layer_counts(config)["thinker"]
    model.config.talker_config.text_config.num_hidden_layers = layer_counts(config)["talker"]
    if getattr(config, "quantization_config", None) is not None:
        model.config.quantization_config = config.quantization_config


def _refuse_quantized_outside_layers(tensors: CheckpointTensors,
                                     ct: compressed.CompressedConfig) -> None:
    """Only decoder layers are read here; transformers loads the rest as plain 16-bit weights,
    so a checkpoint that quantizes anything else cannot be loaded."""
    layer_prefixes = tuple(f"{p}." for p, _ in STACKS.values())
    for name in tensors.weight_map:
        if compressed.is_quant_param(name) and not name.startswith(layer_prefixes):
            module = name.rpartition(".")[0]
            raise DuplexError(f"This checkpoint quantizes {module} ({ct.describe()}); duplex-chat "
                              "reads quantized weights only in the thinker's and the talker's "
                              "decoder layers.")
