"""Loading Qwen3-Omni (hub id or local directory) for voice: thinker, talker and code2wav, no vision.

Every way this can fail for a user's reason (wrong path, not a Qwen3-Omni checkpoint, no network and
no cached copy, no CUDA, not enough GPU memory) becomes a `DuplexError` with what to do next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from duplex_chat.config import DuplexError, QwenSettings

from .checkpoint import inspect_checkpoint
from .footprint import FP8_MIN_CAPABILITY, cache_for, fp8_refusal, gpu_bytes, looks_like_path
from .footprint import resolve_dtype as footprint_dtype

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GIB = 1024**3

Progress = Callable[[str], None]


@dataclass
class ModelBundle:
    """A loaded model and what is needed to talk to it. One per session; nothing global."""

    model: Any  # Qwen3OmniMoeForConditionalGeneration, eval mode, vision tower removed
    tokenizer: Any
    source: str  # the directory the weights came from
    device: torch.device
    dtype: torch.dtype
    load_seconds: float

    @property
    def config(self):
        return self.model.config


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def resolve_checkpoint(model_id: str, progress: Progress | None = None) -> Path:
    """The local directory holding `model_id`: the directory itself, or the hub cache (downloading
    if the hub is reachable)."""
    if looks_like_path(model_id):
        path = Path(model_id).expanduser()
        if not path.exists():
            raise DuplexError(f"Model directory {path} does not exist.",
                              hint="Check qwen.model_id / --model.")
        if not path.is_dir():
            raise DuplexError(f"Model path {path} is a file; it must be a checkpoint directory.")
        check_checkpoint_dir(path)
        return path
    return _from_hub(model_id, progress)


def check_checkpoint_dir(path: Path) -> dict:
    """Raise unless `path` is a loadable Qwen3-Omni checkpoint (the rule `check` uses too);
    returns its config as a dict."""
    found = inspect_checkpoint(path)
    if found.problem is not None:
        raise DuplexError(found.problem)
    return found.config


def _from_hub(model_id: str, progress: Progress | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    _say(progress, f"{model_id} is not in the local cache; downloading (about 70 GB)")
    try:
        return Path(snapshot_download(model_id))
    except RepositoryNotFoundError:
        raise DuplexError(f"The Hugging Face hub has no model named {model_id}.") from None
    except Exception as exc:  # connection errors come in many types
        raise DuplexError(
            f"Could not download {model_id} ({type(exc).__name__}) and it is not in the local cache.",
            hint="Copy the checkpoint to this machine and point --model or SCA_QWEN_MODEL_ID at "
            "its directory.",
        ) from None


def resolve_dtype(name: str, config: dict) -> torch.dtype:
    """The torch dtype for `qwen.torch_dtype` (`auto`: the checkpoint's own, as footprint says)."""
    return DTYPES[footprint_dtype(config, name)]


def quiet_transformers() -> None:
    """Keep transformers' config and generation warnings (harmless for this model) off the
    user's terminal; errors still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def resolve_device(device_map: str) -> torch.device:
    """One device for the whole model (`auto` picks the first GPU, or the CPU without one)."""
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_map)
    except RuntimeError:
        raise DuplexError(f"qwen.device_map {device_map!r} is not a device; use cuda, cuda:N, cpu "
                          "or auto.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DuplexError(
                f"CUDA was requested (qwen.device_map = {device_map}) but torch sees no CUDA GPU.",
                hint="Install a CUDA build of torch and check nvidia-smi, or use --device-map cpu "
                "(very slow).",
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DuplexError(f"{device_map} does not exist: torch sees "
                              f"{torch.cuda.device_count()} GPU(s).")
        # "cuda" means GPU 0, as for "auto"; an explicit index keeps the device map, the
        # parameters' device and `ModelBundle.device` equal (torch.device("cuda") != "cuda:0").
        device = torch.device("cuda", index)
    return device


def _vision_module_name(config) -> str:
    """Where the vision tower sits in this transformers version's module tree."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    with torch.device("meta"):
        skeleton = Qwen3OmniMoeForConditionalGeneration(config)
    for name, module in skeleton.named_modules():
        if type(module).__name__.endswith("VisionEncoder"):
            return name
    raise RuntimeError("no vision encoder found in Qwen3OmniMoeForConditionalGeneration")


def _device_map(config, device: torch.device) -> dict[str, str]:
    """Everything on `device` except the vision tower, which stays on the CPU until it is dropped."""
    vision = _vision_module_name(config)
    parts = vision.split(".")
    mapping: dict[str, str] = {vision: "cpu"}
    from transformers import Qwen3OmniMoeForConditionalGeneration

    with torch.device("meta"):
        skeleton = Qwen3OmniMoeForConditionalGeneration(config)
    # Map every sibling along the path to the vision tower to the target device.
    for depth in range(len(parts)):
        parent = skeleton.get_submodule(".".join(parts[:depth])) if depth else skeleton
        prefix = ".".join(parts[:depth])
        for child, _ in parent.named_children():
            if child != parts[depth]:
                mapping[f"{prefix}.{child}" if prefix else child] = str(device)
    return mapping


def load_model(settings: QwenSettings, progress: Progress | None = None) -> ModelBundle:
    """Load model and tokenizer as `settings` say. Shows progress through `progress(message)`."""
    from transformers import AutoTokenizer, Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    started = time.perf_counter()
    quiet_transformers()
    source = resolve_checkpoint(settings.model_id, progress)
    raw_config = check_checkpoint_dir(source)
    device = resolve_device(settings.device_map)
    dtype = resolve_dtype(settings.torch_dtype, raw_config)
    config = Qwen3OmniMoeConfig.from_pretrained(source)
    scheme, ct = weight_quantization(settings, raw_config, device)
    device_map = _device_map(config, device) if device.type == "cuda" else None
    how = f"{str(dtype).removeprefix('torch.')}, {device}"
    how += f", {(scheme or ct).describe()}" if (scheme or ct) is not None else ""
    _say(progress, f"loading {source.name} ({how})")
    try:
        if scheme is not None or ct is not None:
            from .quant.load import load_quantized

            model = load_quantized(source, config, dtype, device, scheme, ct, device_map, progress)
        else:
            kwargs: dict[str, Any] = {"dtype": dtype}
            if settings.load_in_8bit:
                kwargs["quantization_config"] = _int8_config(device)
            if device_map is not None:
                kwargs["device_map"] = device_map
            model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(source, config=config,
                                                                         **kwargs)
    except torch.OutOfMemoryError:
        raise _oom_error(device, settings, raw_config) from None
    _drop_vision(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    seconds = time.perf_counter() - started
    _say(progress, f"model ready in {seconds:.1f} s")
    return ModelBundle(model, tokenizer, str(source), device, dtype, seconds)


def _drop_vision(model) -> None:
    """Voice never uses the vision tower: free it (it was kept on the CPU while loading)."""
    from accelerate.hooks import remove_hook_from_module

    name = _vision_module_name(model.config)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, None)
    remove_hook_from_module(model, recurse=True)


def fp8_problem(device: torch.device) -> str | None:
    """Why FP8 weights cannot run on `device`, or None if they can."""
    if device.type != "cuda":
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        return (f"FP8 weights run on a CUDA GPU of compute capability {need} or newer only, "
                f"not {device}")
    return fp8_refusal(torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))


def weight_quantization(settings: QwenSettings, raw_config: dict, device: torch.device):
    """(scheme to quantize with while loading, or None; the checkpoint's own compressed-tensors
    quantization, or None). Refuses combinations that cannot work, in one sentence each."""
    from .quant import compressed
    from .quant.formats import MODES

    ct = compressed.read_scheme(raw_config)
    scheme = MODES.get(settings.quantize)
    if ct is not None and scheme is not None:
        raise DuplexError(f"The checkpoint is already quantized ({ct.describe()}); "
                          f"qwen.quantize = {settings.quantize} cannot quantize it again.",
                          hint="Drop --quantize / SCA_QWEN_QUANTIZE for this checkpoint.")
    if ct is not None and settings.load_in_8bit:
        raise DuplexError(f"The checkpoint is already quantized ({ct.describe()}); "
                          "qwen.load_in_8bit cannot quantize it again.",
                          hint="Drop --load-in-8bit for this checkpoint.")
    from .quant.kernels import FP8_BLOCK, GROUP_SIZES

    for group in ct.groups if ct is not None else ():
        s = group.scheme
        if s.block not in (None, (FP8_BLOCK, FP8_BLOCK)) or (
                s.group_size is not None and s.group_size not in GROUP_SIZES):
            raise DuplexError(
                f"The checkpoint's weights use {group.describe()}; duplex-chat's kernels take "
                f"groups of {', '.join(map(str, GROUP_SIZES))} and FP8 blocks of "
                f"{FP8_BLOCK}x{FP8_BLOCK} only.", hint="Use a checkpoint quantized with one of those.")
    from .quant import kernels

    if (scheme is not None or ct is not None) and device.type == "cuda" and kernels.triton is None:
        raise DuplexError("Quantized weights on the GPU need the triton package, which is not "
                          "installed.", hint="pip install triton (Linux), or drop --quantize.")
    uses_fp8 = (scheme is not None and scheme.kind == "float") or (
        ct is not None and any(g.scheme.kind == "float" for g in ct.groups))
    problem = fp8_problem(device) if uses_fp8 else None
    if problem is not None:
        hint = ("Use --quantize int8 or int4." if ct is None else
                "Use an int8 or int4 checkpoint, or the 16-bit release with --quantize int8 or int4.")
        raise DuplexError(f"{problem}.", hint=hint)
    return scheme, ct


def _int8_config(device: torch.device):
    if device.type != "cuda":  # e.g. device_map auto on a machine without a GPU
        raise DuplexError(
            f"qwen.load_in_8bit needs a CUDA GPU, but the model would load on {device}.",
            hint="Drop --load-in-8bit / SCA_QWEN_LOAD_IN_8BIT, or fix CUDA.",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DuplexError("qwen.load_in_8bit needs the bitsandbytes package.",
                          hint="pip install 'duplex-chat[int8]'.") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["code2wav", "lm_head"])


def _oom_error(device: torch.device, settings: QwenSettings, config: dict) -> DuplexError:
    free, total = torch.cuda.mem_get_info(device)
    need = gpu_bytes(config, settings.torch_dtype, settings.load_in_8bit, cache_for(settings),
                     quantize=settings.quantize) / GIB
    smaller = {"none": "try --quantize int8 (48 GB cards) or int4 (24-32 GB cards)",
               "int8": "try --quantize int4", "fp8": "try --quantize int4"}.get(
        settings.quantize, "lower qwen.max_context_tokens")
    from .footprint import fits_cards

    cards = fits_cards(int(need * GIB), settings.quantize)  # smallest first
    fits = f" (the smallest common card it fits: {cards[0].name})" if cards else ""
    return DuplexError(
        f"Out of GPU memory while loading: the model needs about {need:.0f} GiB{fits}, "
        f"{device} has {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB.",
        hint=f"Close other GPU programs, {smaller}, or use a larger GPU.",
    )
