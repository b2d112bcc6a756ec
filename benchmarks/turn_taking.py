"""Both turn policies over the espeak-ng test set of tests/turn_taking.py, several settings each:
the curve of median end-of-speech -> turn-decided latency against the false cut-off rate.

    python -m benchmarks.turn_taking            # from the repository root; about a minute here
    python -m benchmarks.turn_taking --write    # also rewrite docs/turn-taking.md's table and
                                                # benchmarks/results/turn-taking.json

CPU only (the policies run on the CPU in the product too); needs espeak-ng.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch

from duplex_chat.audio.vad import SileroVad
from duplex_chat.config import load_settings
from duplex_chat.session.smart_turn import MODELED_INFERENCE_S, SmartTurnModel
from tests.turn_taking import (
    CachedModel,
    Point,
    make_test_set,
    measure,
    silence_policy,
    smart_policy,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "turn-taking.md"
RESULTS = ROOT / "benchmarks" / "results" / "turn-taking.json"
SILENCE_MS = (200, 300, 400, 500, 600, 800, 1000)
SMART = [(pause, threshold, fallback) for pause in (100, 250) for threshold in (0.3, 0.5, 0.7, 0.9)
         for fallback in (1000, 2500)]
SPECULATE_MS = 160  # speculative starts counted at pauses this long
TABLE_START, TABLE_END = "<!-- curve:start -->", "<!-- curve:end -->"


def sweep() -> list[Point]:
    settings = load_settings(environ={})
    utterances = make_test_set()
    points = [measure("silence", f"end_of_turn_ms={ms}",
                      lambda ms=ms: silence_policy(settings, ms, SileroVad()), utterances,
                      SPECULATE_MS) for ms in SILENCE_MS]
    model = CachedModel(SmartTurnModel())
    for pause, threshold, fallback in SMART:
        points.append(measure(
            "smart", f"pause_ms={pause} threshold={threshold} fallback_ms={fallback}",
            lambda p=pause, t=threshold, f=fallback: smart_policy(
                settings, model, SileroVad(), pause_ms=p, threshold=t, fallback_ms=f),
            utterances, SPECULATE_MS))
    return points


def table(points: list[Point]) -> str:
    rows = ["| policy | setting | median latency (ms) | false cut-offs | of hesitations | "
            "speculations per turn |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for p in points:
        latency = "—" if p.median_latency_ms is None else f"{p.median_latency_ms:.0f}"
        rows.append(f"| {p.policy} | `{p.setting}` | {latency} | {100 * p.cut_off_rate:.0f} % | "
                    f"{100 * p.hesitant_cut_off_rate:.0f} % | {p.speculations_per_turn:.2f} |")
    return "\n".join(rows)


def versions() -> dict:
    import onnxruntime

    return {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "machine": platform.machine(), "modelled_inference_s": MODELED_INFERENCE_S}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs and results")
    args = parser.parse_args(argv)
    points = sweep()
    text = table(points)
    print(text)
    if args.write:
        RESULTS.write_text(json.dumps({
            **versions(), "command": "python -m benchmarks.turn_taking --write",
            "points": [{k: v for k, v in dataclasses.asdict(p).items() if k != "outcomes"}
                       | {"outcomes": [dataclasses.asdict(o) for o in p.outcomes]}
                       for p in points]}, indent=1) + "\n")
        doc = DOC.read_text()
        block = f"{TABLE_START}\n{text}\n{TABLE_END}"
        DOC.write_text(re.sub(f"{TABLE_START}.*?{TABLE_END}", lambda _: block, doc, flags=re.S))
    return 0


if __name__ == "__main__":
    sys.exit(main())
