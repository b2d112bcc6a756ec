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
        eager = getattr(cls.forward, "__wrapped__", None)
        if eager is not None and "gate_up_proj" in names:
            # transformers' experts dispatch to grouped-mm implementations that read the whole
            # (E, N, K) weight at once; its own loop reads experts[e], one expert at a time, so
            # a quantized layer never holds more than one expert dequantized.
            attrs["forward"] = eager
        _SUBCLASSES[key] = type(f"Quantized{cls.__name__}", (cls,), attrs)
    return _SUBCLASSES[key]


def _reader(name: str):
    def read(self) -> torch.Tensor | ExpertWeights:
        weight = quant_weight(self, name)
        if weight.data.dim() == 3:
            return ExpertWeights(weight, self._quant_dtype)
        return weight.dequantize(self._quant_dtype)
    return read


class ExpertWeights:
    """A fused expert weight (E, N, K) read through a quantized module's property.

    transformers' expert loop reads `gate_up_proj[expert]` once for every expert a token chose:
    indexing by one expert dequantizes that expert only (dequantizing all of them at every read
    would cost the release model 2.4 GB of temporaries per read). Any other use (a tensor
    method, a torch function's argument: transformers' grouped-mm implementation) gets the whole
    tensor dequantized, once per use. Values are the same either way.
    """

    def __init__(self, weight: QuantWeight, dtype: torch.dtype):
        self.weight, self.dtype = weight, dtype

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def __len__(self) -> int:
        return self.weight.shape[0]

    def __getitem__(self, index):
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            w = self.weight
            return QuantWeight(data=w.data[index], scale=w.scale[index], scheme=w.scheme,
                               zero=None if w.zero is None else w.zero[index]
                               ).dequantize(self.dtype)
        return self.full()[index]

    def full(self) -> torch.Tensor:
        """All experts dequantized: (E, N, K)."""
        return self.weight.dequantize(self.dtype)

    def __getattr__(self, name: str):
        # tensor methods (transformers' grouped-mm implementation transposes the whole weight)
        if name.startswith("__") or name in ("weight", "dtype"):
            raise AttributeError(name)
        return getattr(self.full(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def whole(value):
            return value.full() if isinstance(value, ExpertWeights) else value
        args = tuple(whole(a) for a in args)
        kwargs = {k: whole(v) for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)
