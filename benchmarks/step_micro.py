"""Per-step timings and kernel counts of the decode steps, for comparing compile settings in one
GPU call: `python3 benchmarks/step_micro.py base tuned` runs each named variant in its own process
(compile settings are process-wide) and prints one line per variant and step.

Variants: `base` (no inductor options, predictor steps as separate layer calls), `tuned`
(the product's settings), `aggressive` (tuned plus inductor's aggressive fusion), `sdpa` (tuned,
with every decode attention through SDPA). Steps: `frame` (code 0 and the code predictor),
`step_frame` (talker step, head and frame as one graph: what a reply runs per frame),
`talker_step`, `thinker_step` (512-row window), `thinker_step_2k` (2048-row window).
Timings are CUDA-event medians over 50 replays after warm-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch


def _time(fn, repeat: int = 50, sync_each: bool = True) -> float:
    """Median CUDA-event ms of `fn()` after 3 warm-up calls; with `sync_each` every call starts
    on an idle GPU, else calls queue back to back (as when the host runs ahead of the GPU)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
        if sync_each:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in pairs)
    return times[len(times) // 2]


def _kernels(fn) -> tuple[int, list]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name[:60], []).append(e.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    return len(events), [(n, len(v), round(sum(v), 1)) for n, v in top]


def run_variant(variant: str) -> dict:
    from duplex_chat.config import load_settings
    from duplex_chat.model import bench, engine, fast, streams

    if variant == "aggressive":
        fast.COMPILE_OPTIONS = {**fast.COMPILE_OPTIONS, "aggressive_fusion": True}
    if variant == "base":
        fast.COMPILE_OPTIONS = {}
        streams.TalkerStream._residual_codes_fast = _separate_predictor_steps
    if variant == "sdpa":  # tuned, but every decode attention through SDPA
        fast.WRITTEN_OUT_MAX_ROWS = 0
    engine.GRAPH_WARM_UP_POSITIONS = 512
    device = torch.device("cuda:0")
    settings = load_settings(overrides={"qwen.max_context_tokens": 4096})
    bundle = bench.random_weights_bundle(device, torch.bfloat16)
    began = time.perf_counter()
    conv = engine.StreamingConversation(bundle, settings, seed=0)
    setup_s = time.perf_counter() - began
    talker, thinker = conv.talker, conv.thinker
    result = {"variant": variant, "setup_s": round(setup_s, 1)}
    with torch.inference_mode():
        conv.feed(bench.synthetic_voice(2.0, 1))
        logits = thinker.prefill(thinker.embed([1, 2, 3]))[0]
        token = conv.thinker_sampler(logits)
        t_logits, state = talker.start_reply(talker.project_text(thinker.embed([5])),
                                             talker.project_text(thinker.embed([6, 7])))
        length_t, length_th = talker.length, thinker.length

        def frame():
            talker.frame(t_logits, state, conv.talker_sampler, conv.predictor_sampler)

        def talker_step():
            talker.crop(length_t)
            talker.step(state)

        def step_frame():
            talker.crop(length_t)
            talker.step_frame(state, conv.talker_sampler, conv.predictor_sampler)

        def thinker_step():
            thinker.crop(length_th)
            conv.thinker_sampler(thinker.step(token))

        long_th = 1800  # the benchmark's thinker cache after a few turns (2048-row window)

        def thinker_step_2k():
            thinker.stack.length = long_th  # rows past the prefill hold zeros: timing only
            conv.thinker_sampler(thinker.step(token))

        steps = (frame, step_frame, talker_step, thinker_step, thinker_step_2k)
        result["steps"] = [fn.__name__ for fn in steps]
        for fn in steps:
            name = fn.__name__
            result[name + "_ms"] = round(_time(fn), 3)
            count, top = _kernels(fn)
            result[name + "_kernels"] = count
            result[name + "_top"] = top
    return result


def _separate_predictor_steps(self, talker_state, code0, sample):
    """The previous predictor frame: each step's layers compiled one by one, glue eager."""
    stack = self.predictor_stack
    positions = self._predictor_positions
    first = self.codec_embed(code0.view(1))
    stack.step(talker_state.view(1, -1), positions[0], 16)
    x, codes, embeds = first, [code0.view(1)], [first]
    for group in range(self.groups - 1):
        last, _ = stack.step(x, positions[group + 1], 16)
        code = sample(self.predictor.lm_head[group](last[-1]))
        codes.append(code.view(1))
        x = self.predictor.model.get_input_embeddings()[group](code.view(1))
        embeds.append(x)
    return torch.cat(codes), torch.cat(embeds).sum(0)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print("RESULT " + json.dumps(run_variant(sys.argv[2])), flush=True)
        return
    for variant in sys.argv[1:] or ["base", "tuned"]:
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", variant], capture_output=True,
                              text=True, env=os.environ)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"{variant}: failed\n{proc.stderr[-3000:]}")
            continue
        result = json.loads(lines[0][7:])
        print(f"== {variant} ({time.perf_counter() - began:.0f} s, setup {result['setup_s']} s)")
        for step in result["steps"]:
            print(f"  {step}: {result[step + '_ms']} ms, {result[step + '_kernels']} kernels")
            for name, n, us in result[step + "_top"][:8]:
                print(f"      {us:9.1f} us {n:5d}x {name}")
        out = os.environ.get("OUT")
        if out:  # every kernel, for reading at leisure
            with open(os.path.join(out, f"kernels-{variant}.json"), "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
