"""The talker's decode steps alone (talker + code predictor, full size, random weights), under
several compile variants at once: `python3 benchmarks/talker_micro.py tuned pdl combo ...`.

Each variant builds and compiles in its own process (compile settings are process-wide), all in
parallel since compiling is CPU work; then they time one at a time (a lock), once every variant
is ready (and the file named by $MICRO_WAIT_FOR exists, if set: other GPU work of the same call).
Steps: `frame` (code 0 and the code predictor), `talker_step`, `step_frame` (the two as one
graph: what a reply runs per frame) with a 512-row talker window, `step_frame_2k` with a
2048-row one (the benchmark's later turns). CUDA-event medians over 50 replays after warm-up.

Variants, each from the same base: `tuned` (coordinate-descent tuning only: the options before
2026-12-04's afternoon); `product` (`model/fast.py`'s COMPILE_OPTIONS, whatever they are now);
added to `tuned`: `pdl` (inductor's programmatic dependent launch: a kernel starts while its
predecessor finishes), `combo` (inductor's combo kernels: independent small kernels merged),
`talker_sdpa` (the talker's one-token attention through SDPA at every window); joined with `+`
they combine, as in `pdl+talker_sdpa`. Differences under ~0.1 ms are within run-to-run noise
(variants that time the same kernels have differed by that much).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from step_micro import _kernels, _time  # noqa: E402

BASE = {"coordinate_descent_tuning": True}
OPTIONS = {"pdl": {"triton.enable_pdl": True}, "combo": {"combo_kernels": True}}
WAIT_LIMIT_S = 300  # for the other variants' compiles; they take 2-2.5 min on an H200 machine
LONG_TALKER = 1800  # talker cache positions in the 2048-row window


def random_talker(max_len: int):
    """The talker and its code predictor alone (full size from the release config, random
    weights, MoE drawn, bf16 on cuda:0) as a fast TalkerStream with `max_len` positions."""
    from transformers import Qwen3OmniMoeTalkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeTalkerForConditionalGeneration,
    )

    from duplex_chat.model.reference_config import release_config_dict
    from duplex_chat.model.streams import TalkerStream
    from duplex_chat.model.tiny import init_talker_moe

    config = Qwen3OmniMoeTalkerConfig(**release_config_dict()["talker_config"])
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        model = Qwen3OmniMoeTalkerForConditionalGeneration._from_config(config,
                                                                        dtype=torch.bfloat16)
    init_talker_moe(model)
    model.eval()
    return TalkerStream(model, fast=True, max_len=max_len)


def _build(variant: str):
    from duplex_chat.config import load_settings
    from duplex_chat.model import engine, fast

    parts = variant.split("+")
    options = dict(BASE)
    for part in parts:
        if part == "product":
            options.update(fast.COMPILE_OPTIONS)
        elif part in OPTIONS:
            options.update(OPTIONS[part])
        elif part not in ("tuned", "talker_sdpa"):
            raise SystemExit(f"unknown variant part {part!r}")
    fast.COMPILE_OPTIONS = fast.inductor_options(options)
    device = torch.device("cuda:0")
    talker = random_talker(max_len=4096)
    if "talker_sdpa" in parts:
        talker.stack.written_out_rows = 0
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    _, code0, rest = engine.stage_samplers(load_settings().qwen, talker.talker.config, device,
                                           generator)
    return talker, code0, rest


def run_variant(variant: str, ready_dir: str, count: int) -> dict:
    began = time.perf_counter()
    talker, code0, rest = _build(variant)
    d = talker.codec_head.in_features
    with torch.inference_mode():
        talker.warm_up_frames(2048, code0, rest)
        logits, state = talker.start_reply(torch.randn(3, d, device="cuda", dtype=torch.bfloat16),
                                           torch.randn(4, d, device="cuda", dtype=torch.bfloat16))
        talker.step(state)  # the one-token graph, too
        length = talker.length
    setup_s = time.perf_counter() - began
    alone = _wait_for_others(ready_dir, variant, count)

    def frame():
        talker.frame(logits, state, code0, rest)

    def talker_step():
        talker.crop(length)
        talker.step(state)

    def step_frame():
        talker.crop(length)
        talker.step_frame(state, code0, rest)

    def step_frame_2k():
        talker.stack.length = LONG_TALKER  # rows past the prefill hold zeros: timing only
        talker.step_frame(state, code0, rest)

    from duplex_chat.model import fast

    result = {"variant": variant, "setup_s": round(setup_s, 1), "options": fast.COMPILE_OPTIONS,
              "timed_alone": alone}
    steps = (frame, talker_step, step_frame, step_frame_2k)
    result["steps"] = [fn.__name__ for fn in steps]
    with open(os.path.join(ready_dir, "lock"), "w") as lock, torch.inference_mode():
        fcntl.flock(lock, fcntl.LOCK_EX)  # one variant on the GPU at a time
        for fn in steps:
            result[fn.__name__ + "_ms"] = round(_time(fn), 3)
            count_, top = _kernels(fn)
            result[fn.__name__ + "_kernels"] = count_
            result[fn.__name__ + "_top"] = top
    return result


def _wait_for_others(ready_dir: str, variant: str, count: int) -> bool:
    """Timing waits until no variant is still compiling (compiles tune kernels on the GPU).
    Returns False if it gave up waiting: then the timings may be disturbed."""
    open(os.path.join(ready_dir, variant + ".ready"), "w").close()
    other = os.environ.get("MICRO_WAIT_FOR")
    deadline = time.monotonic() + WAIT_LIMIT_S
    while time.monotonic() < deadline:
        ready = [f for f in os.listdir(ready_dir) if f.endswith(".ready")]
        if len(ready) >= count and (not other or os.path.exists(other)):
            return True
        time.sleep(1)
    return False


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        variant, ready_dir = sys.argv[2], sys.argv[3]
        try:
            result = run_variant(variant, ready_dir, int(sys.argv[4]))
        except BaseException:
            # counts as ready, so the other variants do not wait for it
            open(os.path.join(ready_dir, variant + ".ready"), "w").close()
            raise
        print("RESULT " + json.dumps(result), flush=True)
        return
    variants = sys.argv[1:] or ["tuned", "product"]
    ready_dir = tempfile.mkdtemp(prefix="talker-micro-")
    procs = {}
    for v in variants:  # output to files: a pipe nobody reads yet could fill and block a child
        log = open(os.path.join(ready_dir, v + ".log"), "w+")
        procs[v] = (subprocess.Popen([sys.executable, __file__, "--one", v, ready_dir,
                                      str(len(variants))], stdout=log, stderr=subprocess.STDOUT,
                                     text=True), log)
    results, failed = [], 0
    for variant, (proc, log) in procs.items():
        proc.wait()
        log.seek(0)
        output = log.read()
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        if not lines:
            failed += 1
            print(f"== {variant}: failed\n{output[-3000:]}")
            continue
        result = json.loads(lines[0][7:])
        note = "" if result["timed_alone"] else ", TIMED WHILE OTHERS STILL COMPILED"
        print(f"== {variant} (setup {result['setup_s']} s{note}; options {result['options']})")
        for step in result["steps"]:
            print(f"  {step}: {result[step + '_ms']} ms, {result[step + '_kernels']} kernels")
            for name, n, us in result[step + "_top"][:6]:
                print(f"      {us:9.1f} us {n:5d}x {name}")
        results.append(result)
    out = os.environ.get("OUT")
    if out:  # every kernel, for reading at leisure
        with open(os.path.join(out, "talker-micro.json"), "w") as f:
            json.dump(results, f, indent=1)
    if failed:
        sys.exit(f"{failed} of {len(variants)} variants failed")


if __name__ == "__main__":
    main()
