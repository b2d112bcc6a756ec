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
    """What torch sees: CUDA usable?, device names, and (free, total) bytes per device."""

    cuda: bool
    names: tuple[str, ...] = ()
    memory: tuple[tuple[int, int], ...] = ()


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
    return GpuState(True, names, memory)


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
        rows.append(Row("system", f"GPU {i}", OK, f"{name}: {_gib(free)} free of {_gib(total)}"))
    index = device_index(device_map)
    if wants_cuda(device_map) and index >= len(gpu.names):
        rows.append(Row("system", "device map", FAIL, f"{device_map} does not exist",
                        f"Use --device-map cuda:0 … cuda:{len(gpu.names) - 1}."))
    return rows


# ---------------------------------------------------------------------------------- the model


def check_model(settings: Settings, gpu: GpuState) -> list[Row]:
    from duplex_chat.model import footprint
    from duplex_chat.model.reference_config import release_config_dict

    q = settings.qwen
    status = footprint.hub_cache_status(q.model_id)
    rows = [_presence_row(status)]
    config = status.config() if status.present else None
    basis = "its config.json" if config is not None else "the release config"
    config = config if config is not None else release_config_dict()
    try:
        need = footprint.gpu_bytes(config, q.torch_dtype, q.load_in_8bit, footprint.cache_for(q))
        weights = footprint.weight_bytes(config, q.torch_dtype, q.load_in_8bit)
        params = sum(footprint.part_params(config).values())
    except (KeyError, TypeError, ValueError) as exc:
        return rows + [Row("model", "memory", WARN, f"cannot size the model from {basis} ({exc})")]
    dtype = footprint.resolve_dtype(config, q.torch_dtype) + (" + 8-bit" if q.load_in_8bit else "")
    detail = (f"{params / 1e9:.2f} B parameters ({basis}); {dtype}: weights {_gib(weights)} "
              f"without vision + margin = {_gib(need)}")
    rows.append(Row("model", "size", OK, detail))
    rows.append(_fit_row(settings, gpu, need, config))
    return rows


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
    if need <= total:
        return Row("model", "fits", FAIL, detail, "Other processes hold GPU memory: stop them "
                   "(see nvidia-smi) or pick another GPU with --device-map cuda:N.")
    return Row("model", "fits", FAIL, detail, _smaller_options(settings, config, total))


def _smaller_options(settings: Settings, config: dict, total: int) -> str:
    """What to try when the model cannot fit in `total` bytes."""
    from duplex_chat.model import footprint

    cache = footprint.cache_for(settings.qwen)
    tries = []
    for dtype, int8, flags in (("bfloat16", False, "--dtype bfloat16"),
                               ("bfloat16", True, "--dtype bfloat16 --load-in-8bit")):
        if (dtype, int8) == (settings.qwen.torch_dtype, settings.qwen.load_in_8bit):
            continue
        need = footprint.gpu_bytes(config, dtype, int8, cache)
        if need <= total:
            tries.append(f"{flags} (about {_gib(need)})")
    smallest = footprint.gpu_bytes(config, "bfloat16", True, cache)
    if tries:
        return "Try " + " or ".join(tries) + "."
    return (f"No setting fits this card: use a GPU with at least {_gib(smallest)} "
            "(an 80 GB H100/A100 or larger); 8-bit barely helps because the MoE experts stay 16-bit.")


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
    import torch

    threads = torch.get_num_threads()  # importing silero_vad sets it to 1 for the whole process
    try:
        from duplex_chat.audio.vad import SileroVad

        SileroVad()
    except DuplexError as exc:
        return [Row("audio", "voice activity", FAIL, exc.message, exc.hint or "")]
    except Exception as exc:  # a broken install can fail in any way
        return [Row("audio", "voice activity", FAIL, f"Silero VAD does not load ({exc})",
                    "Reinstall it: pip install --force-reinstall silero-vad")]
    finally:
        torch.set_num_threads(threads)
    return [Row("audio", "voice activity", OK, "Silero VAD loads")]


# ----------------------------------------------------------------------------------- the report


def collect_rows(settings: Settings) -> list[Row]:
    """Run every check; a check that crashes becomes a failed row instead of a traceback."""
    rows = check_python()
    gpu = _guarded(rows, "system", "GPU", probe_gpu) or GpuState(cuda=False)
    steps: list[tuple[str, str, Callable[[], list[Row]]]] = [
        ("system", "PyTorch", lambda: check_torch(settings, gpu)),
        ("model", "model", lambda: check_model(settings, gpu)),
        ("audio", "audio", lambda: check_audio(settings)),
        ("audio", "echo cancellation", lambda: check_echo(settings)),
        ("audio", "voice activity", check_vad),
    ]
    for section, name, step in steps:
        rows += _guarded(rows, section, name, step) or []
    return rows


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
    rows = collect_rows(settings)
    ok = not any(r.status == FAIL for r in rows)
    if json_out:
        report = {"ok": ok, "checks": [asdict(r) for r in rows], "config": config_entries(settings)}
        sys.stdout.write(json.dumps(report, default=str) + "\n")
    else:
        _print_report(rows, settings, ok)
    return 0 if ok else 1


def _print_report(rows: list[Row], settings: Settings, ok: bool) -> None:
    from rich.console import Console

    console = Console()
    console.print(checks_table(rows))
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
