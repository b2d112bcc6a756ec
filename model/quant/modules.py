"""Quantized weights inside transformers' own modules: the reference path.

`quantize_module(module, {"weight": qw})` swaps a module's floating-point parameters for the
tensors of `QuantWeight`s (registered as buffers, so `.to()` and `named_buffers` see them) and
gives the module a subclass of its own class in which each swapped name is a property that
dequantizes on read. Everything that reads `module.weight` (nn.Linear.forward) or
`experts.gate_up_proj` (transformers' expert implementations) then computes exactly what the
same module with the dequantized weights computes: same code, same order of summation. That is
what `generate()` runs, `replay --stock` and the eager decoder; it is slow (a weight is
dequantized at every read) but it is the definition the fast kernels are checked against.

The fast decoder does not read the properties: it asks `quant_weight(module, name)` for the
packed weight and runs the kernels (`model/quant/kernels.py`) on it.
"""

from __future__ import annotations

import torch

from .formats import QuantWeight, Scheme

_PREFIX = "_q_"  # buffer names: _q_<name>_data, _q_<name>_scale, _q_<name>_zero
_SUBCLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def quantize_module(module: torch.nn.Module, weights: dict[str, QuantWeight],
                    dtype: torch.dtype) -> None:
    """Replace `module`'s parameters named in `weights` by those quantized weights (in place).

    `dtype` is what reading a swapped name dequantizes to (the model's compute dtype)."""
    schemes = dict(getattr(module, "_quant_schemes", {}))
    for name, qw in weights.items():
        module._parameters.pop(name, None)
        module.__dict__.pop(name, None)
        module.register_buffer(f"{_PREFIX}{name}_data", qw.data, persistent=False)
        module.register_buffer(f"{_PREFIX}{name}_scale", qw.scale, persistent=False)
        module.register_buffer(f"{_PREFIX}{name}_zero", qw.zero, persistent=False)
        schemes[name] = qw.scheme
    module._quant_schemes = schemes
    module._quant_dtype = dtype
    module.__class__ = _subclass(_original_class(module), tuple(sorted(schemes)))


def quant_weight(module: torch.nn.Module, name: str = "weight") -> QuantWeight | None:
    """The quantized weight behind `module.<name>`, or None if that name is not quantized."""
    scheme = getattr(module, "_quant_schemes", {}).get(name)
    if scheme is None:
        return None
    return QuantWeight(data=getattr(module, f"{_PREFIX}{name}_data"),
                       scale=getattr(module, f"{_PREFIX}{name}_scale"),
                       zero=getattr(module, f"{_PREFIX}{name}_zero"), scheme=scheme)


def quantized_schemes(model: torch.nn.Module) -> dict[str, Scheme]:
    """{"<module>.<name>": scheme} for every quantized weight of `model`."""
    found = {}
    for prefix, module in model.named_modules():
        for name, scheme in getattr(module, "_quant_schemes", {}).items():
            found[f"{prefix}.{name}" if prefix else name] = scheme
    return found


def _original_class(module: torch.nn.Module) -> type:
    cls = type(module)
    return getattr(cls, "_quant_original", cls)


def _subclass(cls: type, names: tuple[str, ...]) -> type:
    """`cls` with a dequantizing property for each of `names` (one class per combination)."""
    key = (cls, names)
    if key not in _SUBCLASSES:
        attrs = {name: property(_reader(name), doc=f"{name}, dequantized on every read")
                 for name in names}
        attrs["_quant_original"] = cls
        _SUBCLASSES[key] = type(f"Quantized{cls.__name__}", (cls,), attrs)
    return _SUBCLASSES[key]


def _reader(name: str):
    def read(self) -> torch.Tensor:
        return quant_weight(self, name).dequantize(self._quant_dtype)
    return read
