"""`duplex-chat bench` around the GPU measurement: what the user sees when it is cut short."""

from __future__ import annotations

import os
import signal
import threading
import time

from rich.console import Console

from duplex_chat.cli.bench import _run_extras, render


def test_sigterm_keeps_the_finished_sections():
    report = {}

    def killed():
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        time.sleep(10)

    before = signal.getsignal(signal.SIGTERM)
    began = time.monotonic()
    stopped = _run_extras(report, [("verify", "first", lambda: {"ok": 1}),
                                   ("stock", "second", killed),
                                   ("verify_float32", "third", lambda: {"ok": 3})],
                          Console(file=open(os.devnull, "w")))
    assert stopped and time.monotonic() - began < 5
    assert report == {"verify": {"ok": 1}, "stopped": "during stock; later checks were not run"}
    assert signal.getsignal(signal.SIGTERM) is before


def test_report_without_optional_sections_renders():
    metric = {"median": 0.05, "p90": 0.06}  # under every target
    report = {"gpu": "NVIDIA H200", "dtype": "bfloat16", "torch": "2.11", "transformers": "5.17",
              "engine": {name: dict(metric) for name in (
                  "first_packet_ms", "thinker_ms_per_token", "talker_ms_per_frame",
                  "vocoder_ms_per_frame", "rtf", "listen_ms_per_s", "peak_gib")}}
    report["engine"]["talker_ms_per_frame"] = {"median": 5.4, "p90": 5.5}
    report["engine"]["rtf"] = {"median": 0.1001, "p90": 0.11}  # just over: rounds to 1 %
    report["engine"]["peak_gib"] = {"median": float("nan"), "p90": float("nan")}
    console = Console(width=140, record=True, file=open(os.devnull, "w"))
    render(console, report)
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in console.export_text().splitlines() if line.startswith("│")}
    assert rows["talker step + 15 code-predictor steps (ms/frame)"] == [
        "5.4", "5.5", "—", "≤ 4", "missed by 35 %"]
    assert rows["real-time factor over the reply"][-1] == "missed by 1 %"
    assert rows["peak GPU memory over the conversation (GiB)"][1:] == [
        "n/a", "—", "≤ 72", "not measured"]
    assert [cells[-1] for cells in rows.values()].count("met") == 4


def test_the_bench_measures_a_speculative_start(tiny_bundle, tiny_checkpoint):
    """On the tiny model (CPU): the speculated turns' medians are in the report and rendered; a
    speculation already holds its first packet, so the first audio follows the decision at once."""
    from duplex_chat.model import bench

    from .conftest import tiny_settings

    settings = tiny_settings(tiny_checkpoint, max_reply_tokens=10, max_reply_seconds=14 / 12.5)
    summary, _ = bench.engine_benchmark(tiny_bundle, settings, turns=1, warmup=0, user_s=1.5)
    spec = summary["speculation_median"]
    assert set(spec) == {"speculation_ms", "take_back_ms", "first_audio_after_decision_ms"}
    assert spec["speculation_ms"] > 0 and spec["take_back_ms"] >= spec["speculation_ms"] * 0.5
    assert 0 <= spec["first_audio_after_decision_ms"] < spec["speculation_ms"]
    report = {"gpu": "cpu", "dtype": "float32", "torch": "x", "transformers": "y",
              "engine": summary}
    console = Console(width=140, record=True, file=open(os.devnull, "w"))
    render(console, report)
    assert "speculative start: the engine's" in console.export_text()
