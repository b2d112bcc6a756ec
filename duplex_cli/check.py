"""`duplex-chat check`: can this machine run `talk`, and what to fix when it cannot.

Each check yields rows (section, name, status, detail, fix); status "fail" means `talk` cannot
work until it is fixed, and makes the exit code 1. It stays fast (a few seconds): torch is
imported lazily, the model is only sized from its config, never loaded.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE
from duplex_chat.config import DuplexError, Settings

OK, WARN, FAIL = "ok", "warn", "fail"
STATUS_MARK = {OK: "[green]✓ ok[/]", WARN: "[yellow]! warn[/]", FAIL: "[red]✗ fail[/]"}
MIN_PYTHON = (3, 11)
GIB = 1024**3
CUDA_TORCH_HINT = ("Install a CUDA build of PyTorch, e.g. pip install torch --index-url "
                   "https://download.pytorch.org/whl/cu128, and check that nvidia-smi sees the GPU.")
RELEASE_MODEL_GB = 70.5  # bf16 download size of Qwen3-Omni-30B-A3B-Instruct (DESIGN.md)


@dataclass(frozen=True)
class Row:
    """One line of the report. `fix` is empty when there is nothing to do."""

    section: str
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class GpuState:
    """What torch sees: CUDA usable?, device names, (free, total) bytes and compute capability
    (major, minor) per device."""

    cuda: bool
    names: tuple[str, ...] = ()
    memory: tuple[tuple[int, int], ...] = ()
    capability: tuple[tuple[int, int], ...] = ()

    def capability_of(self, index: int) -> tuple[int, int] | None:
        return tuple(self.capability[index]) if index < len(self.capability) else None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


# ---------------------------------------------------------------------------- system and GPU


def check_python() -> list[Row]:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] >= MIN_PYTHON:
        return [Row("system", "Python", OK, version)]
    need = ".".join(map(str, MIN_PYTHON))
    return [Row("system", "Python", FAIL, version, f"Use Python {need} or newer.")]


def probe_gpu() -> GpuState:
    """Ask torch about CUDA devices (imports torch; initialises CUDA when there is a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return GpuState(cuda=False)
    count = torch.cuda.device_count()
    names = tuple(torch.cuda.get_device_name(i) for i in range(count))
    memory = tuple(torch.cuda.mem_get_info(i) for i in range(count))
    capability = tuple(tuple(torch.cuda.get_device_capability(i)) for i in range(count))
    return GpuState(True, names, memory, capability)


def wants_cuda(device_map: str) -> bool:
    return device_map.startswith("cuda")


def device_index(device_map: str) -> int:
    """The GPU index "cuda:N" names (0 for "cuda" and "auto")."""
    _, _, index = device_map.partition(":")
    return int(index) if index.isdigit() else 0


def check_torch(settings: Settings, gpu: GpuState) -> list[Row]:
    import torch

    device_map = settings.qwen.device_map
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    rows = [Row("system", "PyTorch", OK, f"{torch.__version__} ({build})")]
    if not gpu.cuda:
        why = "this PyTorch has no CUDA support" if not torch.version.cuda else "no CUDA GPU found"
        blocks = wants_cuda(device_map)
        fix = CUDA_TORCH_HINT if not torch.version.cuda else "Check the NVIDIA driver (nvidia-smi)."
        rows.append(Row("system", "CUDA", FAIL if blocks else WARN,
                        f"{why}; qwen.device_map is {device_map}",
                        fix if blocks else "Without a GPU replies are far slower than speech."))
        return rows
    rows.append(Row("system", "CUDA", OK, f"CUDA {torch.version.cuda}, {len(gpu.names)} GPU(s)"))
    for i, (name, (free, total)) in enumerate(zip(gpu.names, gpu.memory)):
        cc = gpu.capability_of(i)
        arch = f", compute capability {cc[0]}.{cc[1]}" if cc else ""
        rows.append(Row("system", f"GPU {i}", OK,
                        f"{name}: {_gib(free)} free of {_gib(total)}{arch}"))
    index = device_index(device_map)
    if wants_cuda(device_map) and index >= len(gpu.names):
        rows.append(Row("system", "device map", FAIL, f"{device_map} does not exist",
                        f"Use --device-map cuda:0 … cuda:{len(gpu.names) - 1}."))
    return rows


# ---------------------------------------------------------------------------------- the model


def _model_config(q) -> tuple[Any, dict, str]:
    """(cache status, config dict, where the config came from) for `qwen.model_id`: its own
    config.json when on disk, else the release config."""
    from duplex_chat.model import footprint
    from duplex_chat.model.reference_config import release_config_dict

    status = footprint.hub_cache_status(q.model_id)
    config = status.config() if status.present else None
    if config is not None:
        return status, config, "its config.json"
    return status, release_config_dict(), "the release config"


def _mode_label(config: dict, q) -> str:
    """How the weights are stored: "bfloat16", "bfloat16 + int4 (…)", "bfloat16 + 8-bit"."""
    from duplex_chat.model import footprint

    dtype = footprint.resolve_dtype(config, q.torch_dtype)
    fmt = footprint.weight_format(config, q.quantize)
    if footprint.checkpoint_format(config) is not None:
        return f"{dtype} + pre-quantized ({fmt.name})"
    if fmt is not None:
        return f"{dtype} + {q.quantize} ({QUANTIZE_DETAIL[q.quantize]})"
    return dtype + (" + 8-bit" if q.load_in_8bit else "")


QUANTIZE_DETAIL = {  # footprint.QUANTIZE_FORMATS in words
    "int8": "int8, a scale per output channel",
    "int4": "4-bit, a scale per group of 128",
    "fp8": "float8 e4m3, a scale per output channel",
}


def check_model(settings: Settings, gpu: GpuState) -> list[Row]:
    from duplex_chat.model import footprint

    q = settings.qwen
    status, config, basis = _model_config(q)
    rows = [_presence_row(status)]
    try:
        cache = footprint.cache_for(q)
        need = footprint.gpu_bytes(config, q.torch_dtype, q.load_in_8bit, cache, q.quantize)
        weights = footprint.weight_bytes(config, q.torch_dtype, q.load_in_8bit, q.quantize)
        params = sum(footprint.part_params(config).values())
        label = _mode_label(config, q)
    except (KeyError, TypeError, ValueError) as exc:
        return rows + [Row("model", "memory", WARN, f"cannot size the model from {basis} ({exc})")]
    detail = (f"{params / 1e9:.2f} B parameters ({basis}); {label}: weights "
              f"{_gib(weights)} without vision + margin = {_gib(need)} (estimate, "
              f"max_context_tokens {q.max_context_tokens})")
    rows.append(Row("model", "size", OK, detail))
    rows.append(_cards_row(settings, config, need))
    fp8 = _fp8_row(settings, gpu, footprint.weight_format(config, q.quantize))
    if fp8 is not None:
        rows.append(fp8)
    rows.append(_fit_row(settings, gpu, need, config))
    return rows


def _cards_row(settings: Settings, config: dict, need: int) -> Row:
    """Which common cards the estimate fits (footprint.CARDS), and which fit a shorter context."""
    from duplex_chat.model import footprint

    q = settings.qwen
    fits = footprint.fits_cards(need, q.quantize)
    detail = "fits " + (", ".join(c.name for c in fits) if fits else "none of the common cards")
    shorter = ([] if q.load_in_8bit else
               _shorter_context_cards(settings, config, q.torch_dtype, q.quantize, fits))
    if shorter:
        detail += "; with a shorter context: " + ", ".join(shorter)
    fp8 = " (fp8: compute capability 8.9 or newer)" if q.quantize == "fp8" else ""
    return Row("model", "cards", OK, detail + f" (estimate; each card's CUDA memory less "
               f"{_gib(footprint.FIT_HEADROOM_BYTES)} headroom){fp8}")


def _shorter_context_cards(settings: Settings, config: dict, dtype: str, quantize: str,
                           fits: Sequence) -> list[str]:
    """"CARD at max_context_tokens N" for the cards that `quantize` fits only below the
    configured context."""
    from duplex_chat.model import footprint

    q = settings.qwen
    out = []
    for card in footprint.CARDS:
        if card in fits or not footprint.runs_on(card, quantize):
            continue
        context = footprint.context_that_fits(config, dtype, footprint.card_budget(card),
                                              q.max_reply_tokens, q.max_reply_seconds, quantize,
                                              at_most=q.max_context_tokens)
        if context is not None:
            out.append(f"{card.name} at max_context_tokens {context}")
    return out


def fp8_unsupported(gpu: GpuState, index: int) -> str | None:
    """Why fp8 cannot run on GPU `index` (its compute capability is below 8.9), or None."""
    from duplex_chat.model.footprint import fp8_refusal

    cc = gpu.capability_of(index) if gpu.cuda else None
    if cc is None:
        return None
    name = f"GPU {index} ({gpu.names[index]})" if index < len(gpu.names) else f"GPU {index}"
    return fp8_refusal(cc, name)


def _fp8_row(settings: Settings, gpu: GpuState, fmt) -> Row | None:
    """Whether the GPU runs FP8 weights, when the weights are FP8 (`--quantize fp8` or an FP8
    checkpoint: `fmt`, footprint's WeightFormat)."""
    if fmt is None or not fmt.name.startswith(("fp8", "float8")) or not gpu.cuda:
        return None
    index = device_index(settings.qwen.device_map)
    if index >= len(gpu.names):
        return None
    why = fp8_unsupported(gpu, index)
    if why is None:
        cc = gpu.capability_of(index)
        where = f"GPU {index} is {cc[0]}.{cc[1]}" if cc else f"GPU {index}"
        return Row("model", "fp8", OK, f"{where}: FP8 weights run here")
    hint = ("Use --quantize int8 (the same size) or --quantize int4."
            if settings.qwen.quantize == "fp8" else "Use an int8 or int4 checkpoint, or the 16-bit "
            "release with --quantize int8 or int4.")
    return Row("model", "fp8", FAIL, why, hint)


def _presence_row(status) -> Row:
    from duplex_chat.model.tiny import is_tiny_checkpoint

    where = "local directory" if status.kind == "local" else "hub id"
    if status.present:
        tiny = " (tiny random test model)" if is_tiny_checkpoint(status.path) else ""
        return Row("model", "checkpoint", OK, f"{status.model_id} ({where}){tiny}: {status.detail}; "
                   f"{_gib(status.size_bytes)} on disk")
    if status.kind == "local":
        fix = "Point --model or SCA_QWEN_MODEL_ID at a complete Qwen3-Omni checkpoint directory."
    else:
        fix = (f"Download it where the hub is reachable: hf download {status.model_id} "
               f"(about {RELEASE_MODEL_GB:.0f} GB), or point --model at a local copy.")
    return Row("model", "checkpoint", FAIL, f"{where}: {status.detail}", fix)


def _fit_row(settings: Settings, gpu: GpuState, need: int, config: dict) -> Row:
    device_map = settings.qwen.device_map
    if device_map == "cpu":
        return Row("model", "fits", WARN, f"runs on the CPU (needs {_gib(need)} of RAM)",
                   "A CUDA GPU is needed for real-time replies.")
    if not gpu.cuda:
        return Row("model", "fits", WARN, f"needs {_gib(need)} of GPU memory; no GPU to check")
    index = device_index(device_map)  # "auto" loads onto GPU 0 (model.loading.resolve_device)
    if index >= len(gpu.memory):
        return Row("model", "fits", WARN, f"needs {_gib(need)}; {device_map} does not exist")
    (free, total), where = gpu.memory[index], f"GPU {index}"
    if need <= free:
        return Row("model", "fits", OK, f"needs {_gib(need)}, {_gib(free)} free on {where}")
    detail = f"needs {_gib(need)} but {where} has {_gib(free)} free of {_gib(total)}"
    shorter = _context_hint(settings, config, free)
    if need <= total:
        return Row("model", "fits", FAIL, detail, "Other processes hold GPU memory: stop them "
                   f"(see nvidia-smi) or pick another GPU with --device-map cuda:N.{shorter}")
    return Row("model", "fits", FAIL, detail,
               _smaller_options(settings, config, free, gpu, index) + shorter)


def _context_hint(settings: Settings, config: dict, budget: int) -> str:
    """" Or shorten the context: …" when the configured mode fits `budget` at a shorter
    max_context_tokens; "" otherwise."""
    from duplex_chat.model import footprint

    q = settings.qwen
    if q.load_in_8bit:
        return ""
    context = footprint.context_that_fits(config, q.torch_dtype, budget, q.max_reply_tokens,
                                          q.max_reply_seconds, q.quantize,
                                          at_most=q.max_context_tokens - 1)
    if context is None:
        return ""
    cache = footprint.cache_positions(context, q.max_reply_tokens, q.max_reply_seconds)
    need = footprint.gpu_bytes(config, q.torch_dtype, False, cache, q.quantize)
    return (f" Or shorten the context: qwen.max_context_tokens = {context} in the config file "
            f"(or SCA_QWEN_MAX_CONTEXT_TOKENS={context}), about {_gib(need)}.")


@dataclass(frozen=True)
class ModeEstimate:
    """One line of the alternatives table: a `qwen.quantize` mode sized for these settings.

    dtype: what the weights it leaves alone and the KV caches are in; flags: what to pass to get
    it; weights, need: bytes (estimates, model/footprint.py) at the configured context; cards:
    the common cards it fits; shorter: "CARD at max_context_tokens N" for cards it fits only with
    a shorter context; available: False where this GPU cannot run it (fp8 below compute
    capability 8.9), `why` says so; current: the configured mode.
    """

    mode: str
    dtype: str
    flags: str
    weights: int
    need: int
    cards: tuple[str, ...]
    shorter: tuple[str, ...]
    available: bool = True
    why: str = ""
    current: bool = False


def mode_estimates(settings: Settings, gpu: GpuState, config: dict) -> list[ModeEstimate]:
    """The footprint of each `qwen.quantize` mode for these settings (weights in
    `qwen.torch_dtype`, bfloat16 in place of float32), or of the checkpoint's own format when it
    is pre-quantized (modes do not apply to it)."""
    from duplex_chat.model import footprint

    q = settings.qwen
    cache = footprint.cache_for(q)
    dtype = "bfloat16" if q.torch_dtype == "float32" else q.torch_dtype
    base = (" --dtype bfloat16" if q.torch_dtype == "float32" else "") + (
        " --no-load-in-8bit" if q.load_in_8bit else "")
    modes = footprint.QUANTIZE_MODES
    try:
        own = footprint.checkpoint_format(config)
    except ValueError:  # check_model's "memory" row says why
        return []
    if own is not None:
        modes = ("none",)
    index = device_index(q.device_map)
    out = []
    for mode in modes:
        weights = footprint.weight_bytes(config, dtype, False, mode)
        need = footprint.gpu_bytes(config, dtype, False, cache, mode)
        cards = footprint.fits_cards(need, mode)
        shorter = _shorter_context_cards(settings, config, dtype, mode, cards)
        why = fp8_unsupported(gpu, index) if mode == "fp8" else None
        if own is not None:
            flags, current = f"(the checkpoint's own: {own.name})", True
        else:
            flags = (f"--quantize {mode}" + base).strip()
            current = mode == q.quantize and not q.load_in_8bit and dtype == q.torch_dtype
        out.append(ModeEstimate(mode, footprint.resolve_dtype(config, dtype), flags, weights,
                                need, tuple(c.name for c in cards), tuple(shorter), why is None,
                                why or "", current))
    return out


def _smaller_options(settings: Settings, config: dict, budget: int, gpu: GpuState,
                     index: int) -> str:
    """What to try when the model cannot fit in `budget` bytes (the GPU's free memory): the
    quantize modes that fit, at the configured context or a shorter one (fp8 left out where the
    GPU cannot run it)."""
    from duplex_chat.model import footprint

    q = settings.qwen
    dtype = "bfloat16" if q.torch_dtype == "float32" else q.torch_dtype
    estimates = mode_estimates(settings, gpu, config)
    tries = []
    for est in estimates:
        if est.current or not est.available:
            continue
        if est.need <= budget:
            tries.append(f"{est.flags} (about {_gib(est.need)})")
            continue
        context = footprint.context_that_fits(config, dtype, budget, q.max_reply_tokens,
                                              q.max_reply_seconds, est.mode,
                                              at_most=q.max_context_tokens)
        if context is not None:
            cache = footprint.cache_positions(context, q.max_reply_tokens, q.max_reply_seconds)
            need = footprint.gpu_bytes(config, dtype, False, cache, est.mode)
            tries.append(f"{est.flags} with qwen.max_context_tokens = {context} "
                         f"(about {_gib(need)})")
    if tries:
        return "Try " + " or ".join(tries) + "."
    smallest = min(estimates, key=lambda e: e.need)
    cards = f", e.g. {smallest.cards[0]} or larger" if smallest.cards else ""
    return (f"No setting fits this card: use a GPU with at least {_gib(smallest.need)} free "
            f"for {smallest.flags}{cards}.")


# -------------------------------------------------------------------------------------- audio


def check_audio(settings: Settings) -> list[Row]:
    from duplex_chat.audio import devices

    ok, detail = devices.portaudio_status()
    if not ok:
        command = detail.rpartition("install it with: ")[2]  # both failure details end so
        return [Row("audio", "PortAudio", FAIL, detail, f"Run: {command}")]
    rows = [Row("audio", "PortAudio", OK, detail)]
    found = devices.list_devices()
    n_in = sum(d.max_input_channels > 0 for d in found)
    n_out = sum(d.max_output_channels > 0 for d in found)
    rows.append(Row("audio", "devices", OK if found else FAIL,
                    f"{len(found)} device(s): {n_in} with input, {n_out} with output",
                    "" if found else "Connect a microphone and speaker, or start PulseAudio/PipeWire."))
    if not found:
        return rows
    a = settings.audio
    rows.append(_device_row(devices, found, a.input_device, "input", SAMPLE_RATE))
    rows.append(_device_row(devices, found, a.output_device, "output", OUTPUT_SAMPLE_RATE))
    return rows


def _device_row(devices, found: Sequence, spec: str, kind: str, rate: int) -> Row:
    name = f"{kind} device"
    try:
        dev = devices.find_device(spec, kind, found)
    except DuplexError as exc:
        return Row("audio", name, FAIL, exc.message, exc.hint or "")
    chosen = "default" if not spec else f"'{spec}'"
    opens = (f"opens at {rate // 1000} kHz" if devices.supports_rate(dev, kind, rate) else
             f"not at {rate // 1000} kHz: will run at {dev.default_samplerate:.0f} Hz and resample")
    return Row("audio", name, OK, f"{dev.index}: {dev.name} ({dev.hostapi}, {chosen}); {opens}")


def check_echo(settings: Settings) -> list[Row]:
    if not settings.audio.echo_cancellation:
        return [Row("audio", "echo cancellation", OK, "off (headphones)")]
    try:
        from duplex_chat.audio.echo import echo_cancellation_status
    except ImportError:
        return [Row("audio", "echo cancellation", WARN, "not checked")]
    ok, detail = echo_cancellation_status()
    fix = "" if ok else "Use headphones with --headphones, or install the canceller (see detail)."
    return [Row("audio", "echo cancellation", OK if ok else WARN, detail, fix)]


def check_vad() -> list[Row]:
    import numpy as np

    from duplex_chat.audio.constants import VAD_WINDOW_SAMPLES
    from duplex_chat.audio.vad import SileroVad

    try:
        SileroVad().prob(np.zeros(VAD_WINDOW_SAMPLES, np.float32))
    except DuplexError as exc:
        return [Row("audio", "voice activity", FAIL, exc.message, exc.hint or "")]
    except Exception as exc:  # a broken install can fail in any way
        return [Row("audio", "voice activity", FAIL, f"Silero VAD does not run ({exc})",
                    "Reinstall it: pip install --force-reinstall silero-vad onnxruntime")]
    return [Row("audio", "voice activity", OK, "Silero VAD loads")]


SMART_TURN_SLOW_MS = 250  # a Smart Turn call slower than this makes its decisions noticeably late


def check_turn(settings: Settings) -> list[Row]:
    """The turn policy in use; for `smart`, that its model loads and what a call costs here."""
    import time

    turn, vad = settings.turn, settings.vad
    speculate = (f"; replies start speculatively after {turn.speculate_ms} ms of pause"
                 if turn.speculate_ms else "")
    if turn.policy != "smart":
        return [Row("audio", "turn policy", OK,
                    f"silence: {vad.end_of_turn_ms} ms of silence ends a turn{speculate}")]
    import numpy as np

    from duplex_chat.session.smart_turn import WINDOW_SAMPLES, SmartTurnModel

    model = SmartTurnModel()
    quiet = np.zeros(WINDOW_SAMPLES, np.float32)
    model.prob(quiet)  # the first call sets up onnxruntime's kernels
    started = time.perf_counter()
    model.prob(quiet)
    call_ms = 1000 * (time.perf_counter() - started)
    detail = (f"smart: Smart Turn v3.2 loads, {call_ms:.0f} ms a call on this CPU; asked after "
              f"{turn.pause_ms} ms of pause, {turn.fallback_ms} ms of silence always ends a "
              f"turn{speculate}")
    if call_ms > SMART_TURN_SLOW_MS:
        return [Row("audio", "turn policy", WARN, detail,
                    "Its decisions come late on this CPU; turn.policy = silence waits a fixed "
                    f"{vad.end_of_turn_ms} ms instead.")]
    return [Row("audio", "turn policy", OK, detail)]


# ----------------------------------------------------------------------------------- the report


def collect_rows(settings: Settings, gpu: GpuState | None = None) -> list[Row]:
    """Run every check; a check that crashes becomes a failed row instead of a traceback.
    `gpu`: what torch sees (probed when None)."""
    rows = check_python()
    if gpu is None:
        gpu = _guarded(rows, "system", "GPU", probe_gpu) or GpuState(cuda=False)
    steps: list[tuple[str, str, Callable[[], list[Row]]]] = [
        ("system", "PyTorch", lambda: check_torch(settings, gpu)),
        ("model", "model", lambda: check_model(settings, gpu)),
        ("audio", "audio", lambda: check_audio(settings)),
        ("audio", "echo cancellation", lambda: check_echo(settings)),
        ("audio", "voice activity", check_vad),
        ("audio", "turn policy", lambda: check_turn(settings)),
    ]
    for section, name, step in steps:
        rows += _guarded(rows, section, name, step) or []
    return rows


def collect_report(settings: Settings) -> tuple[list[Row], list[ModeEstimate]]:
    """The checks' rows and the alternatives table (memory per quantize mode)."""
    probe_rows: list[Row] = []
    gpu = _guarded(probe_rows, "system", "GPU", probe_gpu) or GpuState(cuda=False)
    rows = collect_rows(settings, gpu)
    rows[1:1] = probe_rows  # where collect_rows puts a failed probe: after the Python row
    estimates = _guarded(rows, "model", "memory per mode",
                         lambda: mode_estimates(settings, gpu, _model_config(settings.qwen)[1]))
    return rows, estimates or []


def _guarded(rows: list[Row], section: str, name: str, step: Callable[[], Any]) -> Any:
    try:
        return step()
    except DuplexError as exc:
        rows.append(Row(section, name, FAIL, exc.message, exc.hint or ""))
    except Exception as exc:  # report and carry on: one broken check must not hide the others
        rows.append(Row(section, name, FAIL, f"check crashed: {type(exc).__name__}: {exc}"))
    return None


def config_entries(settings: Settings) -> dict[str, dict[str, Any]]:
    """{"section.key": {"value": v, "source": origin}} for every setting."""
    return {
        f"{section}.{key}": {"value": value, "source": settings.sources.get(f"{section}.{key}", "?")}
        for section, values in settings.as_dict().items()
        for key, value in values.items()
    }


def run_check(settings: Settings, json_out: bool = False) -> int:
    """Run all checks and print them (Rich tables, or one JSON object with `json_out`).

    Returns the exit code: 1 when any row failed (something blocks `talk`), else 0.
    """
    rows, estimates = collect_report(settings)
    ok = not any(r.status == FAIL for r in rows)
    if json_out:
        report = {"ok": ok, "checks": [asdict(r) for r in rows],
                  "memory": [asdict(e) for e in estimates], "config": config_entries(settings)}
        sys.stdout.write(json.dumps(report, default=str) + "\n")
    else:
        _print_report(rows, settings, ok, estimates)
    return 0 if ok else 1


def _print_report(rows: list[Row], settings: Settings, ok: bool,
                  estimates: Sequence[ModeEstimate] = ()) -> None:
    from rich.console import Console

    console = Console()
    console.print(checks_table(rows))
    if estimates:
        console.print(memory_table(estimates, settings))
    console.print(config_table(settings))
    failed = sum(r.status == FAIL for r in rows)
    if ok:
        console.print("[green]Ready:[/] duplex-chat talk should work on this machine.")
    else:
        console.print(f"[red]{failed} problem(s) block duplex-chat talk:[/] fix the ✗ rows above.")


def checks_table(rows: Iterable[Row]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="duplex-chat check")
    for column in ("", "check", "status", "detail", "what to do"):
        table.add_column(column, overflow="fold")
    for r in rows:  # Text(): details may hold brackets that Rich would read as markup
        table.add_row(r.section, r.name, STATUS_MARK[r.status], Text(r.detail), Text(r.fix))
    return table


def memory_table(estimates: Sequence[ModeEstimate], settings: Settings):
    """The alternatives: each quantize mode's estimated footprint and the cards it fits."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"GPU memory per mode (estimates from model/footprint.py, "
                        f"max_context_tokens {settings.qwen.max_context_tokens})")
    for column in ("mode", "flags", "weights", "for talk", "fits", "note"):
        table.add_column(column, overflow="fold")
    for e in estimates:
        fits = ", ".join(e.cards) or "none of the common cards"
        notes = ([f"shorter context: {'; '.join(e.shorter)}"] if e.shorter else []) + (
            [f"not on this GPU: {e.why}"] if not e.available else [])
        mode = (e.mode if e.mode != "none" else f"none ({e.dtype})") + (
            " (configured)" if e.current else "")
        table.add_row(mode, Text(e.flags), _gib(e.weights), _gib(e.need), Text(fits),
                      Text("; ".join(notes)))
    return table


def config_table(settings: Settings):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Effective configuration")
    for column in ("key", "value", "source"):
        table.add_column(column, overflow="fold")
    for key, entry in config_entries(settings).items():
        table.add_row(key, Text(repr(entry["value"])), Text(entry["source"]))
    return table


def devices_table(devices: Sequence):
    """A Rich table of `DeviceInfo`s for `talk --list-devices` (defaults marked)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Audio devices")
    for column in ("index", "name", "host API", "in", "out", "default rate", "default"):
        table.add_column(column, overflow="fold")
    for d in devices:
        default = ", ".join(k for k, v in (("input", d.is_default_input),
                                           ("output", d.is_default_output)) if v)
        table.add_row(str(d.index), Text(d.name), d.hostapi, str(d.max_input_channels),
                      str(d.max_output_channels), f"{d.default_samplerate:.0f} Hz", default)
    return table
