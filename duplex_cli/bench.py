"""`duplex-chat bench`: the engine's speed on this GPU, as a table next to the targets."""

from __future__ import annotations

import json
import platform
import signal
import sys
import time

from rich.console import Console
from rich.table import Table

from duplex_chat.config import DuplexError, Settings

LABELS = {
    "first_packet_ms": ("first audio packet after end of turn", "ms"),
    "thinker_ms_per_token": ("thinker decode", "ms/token"),
    "talker_ms_per_frame": ("talker step + 15 code-predictor steps", "ms/frame"),
    "vocoder_ms_per_frame": ("vocoder, streamed", "ms/frame"),
    "rtf": ("real-time factor over the reply", ""),
    "listen_ms_per_s": ("GPU time listening, per s of user audio", "ms"),
    "peak_gib": ("peak GPU memory over the conversation", "GiB"),
}


def run_bench(settings: Settings, random_weights: bool, turns: int, user_s: float,
              reply_s: float, baseline: bool, verify: bool, json_out: bool,
              memory_limit_gib: float | None = None, layout: str | None = None) -> int:
    import torch

    from duplex_chat.model import bench
    from duplex_chat.model.loading import load_model, resolve_device, resolve_dtype

    err = Console(stderr=True)
    device = resolve_device(settings.qwen.device_map)
    if device.type != "cuda":
        raise DuplexError("bench measures the GPU path and needs CUDA (qwen.device_map is cpu).")
    settings = settings.replace("qwen", max_reply_seconds=reply_s,
                                max_reply_tokens=max(8, int(reply_s * 4)))
    if memory_limit_gib is not None:
        total = torch.cuda.get_device_properties(device).total_memory / 1024**3
        if memory_limit_gib > total:
            raise DuplexError(f"--memory-limit-gib {memory_limit_gib:g} is more than this GPU's "
                              f"{total:.1f} GiB.")
        # what a smaller card leaves: the allocator refuses more than this (out of memory)
        torch.cuda.set_per_process_memory_fraction(memory_limit_gib / total, device)
    if layout is not None and (not random_weights or layout not in bench.LAYOUTS):
        raise DuplexError(f"--layout {layout}: layouts are {', '.join(bench.LAYOUTS)}, and only "
                          "with --random-weights (a real checkpoint brings its own).")
    if random_weights:
        schemes = bench.random_schemes(settings.qwen.quantize, layout)
        err.print("[dim]building the full-size model with random weights[/]")
        bundle = bench.random_weights_bundle(device, resolve_dtype(settings.qwen.torch_dtype, {}),
                                             schemes=schemes)
    else:
        bundle = load_model(settings.qwen, progress=lambda m: err.print(f"[dim]{m}[/]"))
    err.print(f"[dim]model ready in {bundle.load_seconds:.1f} s; {turns} turns after 2 warm-up[/]")
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "model": bundle.source,
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "quantize": settings.qwen.quantize,
        "layout": layout,
        "memory_limit_gib": memory_limit_gib,
        "user_s": user_s, "reply_s": reply_s, "turns": turns,
        "command": "duplex-chat " + " ".join(sys.argv[1:]),
    }
    summary, _ = bench.engine_benchmark(bundle, settings, turns=turns, warmup=2, user_s=user_s)
    report["engine"] = summary
    short = bench.verify_settings(settings)
    extras = []
    if verify:
        extras.append(("verify", "verifying the fast path against the eager path (greedy)",
                       lambda: bench.verify(bundle, short, user_s=5.0)))
    if baseline:
        extras.append(("stock", "stock generate() baseline (one turn)",
                       lambda: bench.stock_benchmark(bundle, settings.replace(
                           "qwen", max_reply_seconds=8.0, max_reply_tokens=32), user_s=5.0)))
    if verify and random_weights:
        def float32_check():
            nonlocal bundle
            bundle = None  # the bf16 model's memory goes to the float32 one
            torch.cuda.empty_cache()
            return bench.verify_float32(short)

        extras.append(("verify_float32", "the same in float32 on a 4-layer model of the full "
                       "shapes", float32_check))
    stopped = _run_extras(report, extras, err)
    if json_out:
        print(json.dumps(report), flush=True)
    else:
        render(Console(), report)
    if stopped:
        return 130
    goals = bench.targets(report["layout"] or report["quantize"])
    met = all(_met(goals[name], report["engine"][name]["median"]) for name in goals)
    return 0 if met else 3


def _run_extras(report: dict, extras: list, err: Console) -> bool:
    """Run the optional checks in order, each adding its section to `report`. A Ctrl-C or a
    SIGTERM (a `timeout` around a long run) stops them but keeps what was measured: the report
    then says where it stopped. Returns whether it was stopped."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for key, message, run in extras:
            err.print(f"[dim]{message}[/]")
            try:
                report[key] = run()
            except KeyboardInterrupt:
                report["stopped"] = f"during {key}; later checks were not run"
                err.print(f"[yellow]stopped {report['stopped']}[/]")
                return True
    finally:
        signal.signal(signal.SIGTERM, previous)
    return False


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _met(target: float, value: float) -> bool:
    return value == value and value <= target


def _verdict(target: float, median: float) -> str:
    """'met', or by how much the median misses its target."""
    if _met(target, median):
        return "[green]met[/]"
    if median != median:
        return "[red]not measured[/]"
    over = max(1, round(100 * (median / target - 1)))  # at least 1 %, never "by 0 %"
    return f"[red]missed by {over} %[/]"


def render(console: Console, report: dict) -> None:
    from duplex_chat.model.bench import targets

    # reports from before quantization have neither key
    mode = report.get("layout") or report.get("quantize") or "none"
    goals = targets(mode)
    weights = report["dtype"] + ("" if mode == "none" else f", {mode}")
    table = Table(title=f"duplex-chat bench — {report['gpu']}, {weights}, "
                        f"torch {report['torch']}, transformers {report['transformers']}")
    for column in ("metric", "median", "p90", "stock generate()", "target", ""):
        table.add_column(column, justify="left" if column == "metric" else "right")
    stock = report.get("stock", {})
    for name, (label, unit) in LABELS.items():
        value = report["engine"][name]
        base = stock.get(name)
        table.add_row(
            f"{label}" + (f" ({unit})" if unit else ""),
            _fmt(value["median"]), _fmt(value["p90"]),
            _fmt(base) if base is not None else "—",
            f"≤ {_fmt(goals[name])}",
            _verdict(goals[name], value["median"]),
        )
    console.print(table)
    if "peak_growth_gib" in report["engine"]:
        console.print(f"peak GPU memory grew {report['engine']['peak_growth_gib']:+.2f} GiB "
                      f"from the first measured turn to the last")
    memory = report["engine"].get("memory_gib")
    if memory:
        console.print(f"GPU memory: weights {memory['weights']:.2f} GiB, at most "
                      f"{memory['allocated_peak']:.2f} GiB allocated and "
                      f"{memory['reserved_peak']:.2f} GiB reserved by torch")
    speculation = report["engine"].get("speculation_median")
    if speculation:
        console.print(
            f"speculative start: the engine's {speculation['speculation_ms']:.0f} ms to a first "
            f"packet done during the pause; first audio "
            f"{speculation['first_audio_after_decision_ms']:.1f} ms after the turn is decided; a "
            f"take-back costs {speculation['take_back_ms']:.0f} ms")
    stages = report["engine"].get("stages_median", {})
    marks = [f"{k} {stages[k]:.0f} ms" for k in ("encode_tail", "prefill", "first_token",
                                                  "first_frame", "first_packet") if k in stages]
    if marks:
        console.print("end of turn → " + ", ".join(marks))
    for key, label in (("verify", "fast vs eager, bf16"),
                       ("verify_float32", "fast vs eager, float32, 4 layers")):
        if key in report:
            v = report[key]
            console.print(
                f"{label} (greedy): identical tokens for {v['tokens_identical_prefix']}/"
                f"{v['tokens_compared']}, identical frames for {v['frames_identical_prefix']}/"
                f"{v['frames_compared']}, codes agreeing {100 * v['code_agreement']:.1f}%")


def _fmt(value: float) -> str:
    if value != value:
        return "n/a"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
