"""Where the time goes: torch.profiler over one listening window, one end of turn and a short reply
of the full-size random-weights model, the GPU's idle gaps during that reply, and one talker frame
timed in the engine's own context against the same frame of a talker built alone (run on the GPU:
`python3 benchmarks/profile_steps.py`; the quantized model with `SCA_QWEN_QUANTIZE=int4`)."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from duplex_chat.audio.features import StreamingMel
from duplex_chat.config import load_settings
from duplex_chat.model import bench
from duplex_chat.model.engine import StreamingConversation
from duplex_chat.model.events import StageTimings
from step_micro import _time  # noqa: E402  (benchmarks/ is on the path when run as a script)
from talker_micro import random_talker  # noqa: E402


def timed(label, fn, device, repeat=5):
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    print(f"{label}: median {sorted(times)[len(times) // 2]:.2f} ms over {repeat}")


def frame_in_context(label, talker, code0, rest, between=None, repeat=30) -> None:
    """One talker step + frame (what a reply runs per frame) at the current talker length:
    on an idle GPU, back to back, and right after `between()` (a thinker step, say)."""
    length = talker.length
    embed = torch.zeros(talker.codec_head.in_features, device="cuda", dtype=torch.bfloat16)

    def frame():
        talker.crop(length)
        talker.step_frame(embed, code0, rest)

    idle = _time(frame, repeat, sync_each=True)
    queued = _time(frame, repeat, sync_each=False)
    line = f"{label}: step+frame idle start {idle:.3f} ms, back to back {queued:.3f} ms"
    if between is not None:
        pairs = []
        for _ in range(repeat):
            between()
            began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
            frame()
            ended.record()
            pairs.append((began, ended))
        torch.cuda.synchronize()
        after = statistics.median(a.elapsed_time(b) for a, b in pairs)
        line += f", right after a thinker step {after:.3f} ms"
    talker.crop(length)
    print(line, flush=True)


def gpu_gaps(trace_path: str) -> None:
    """GPU busy time against the span of a profiled stretch, from its Chrome trace: idle gaps
    between GPU work are host time the GPU waited for (launches, syncs, Python)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not gpu:
        print("no GPU events in the trace")
        return
    busy, gaps, end = 0.0, [], gpu[0][0]
    for start, stop in gpu:
        if start > end:
            gaps.append(start - end)
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - gpu[0][0]
    big = [g for g in gaps if g > 10]
    print(f"GPU over the reply: span {span / 1000:.1f} ms, busy {busy / 1000:.1f} ms, idle "
          f"{(span - busy) / 1000:.1f} ms in {len(gaps)} gaps ({len(big)} over 10 us, "
          f"{sum(big) / 1000:.1f} ms); largest (us): {[round(g) for g in sorted(gaps)[-12:]]}")
    runtime: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            runtime.setdefault(e["name"], []).append(e.get("dur", 0))
    top = sorted(runtime.items(), key=lambda kv: -sum(kv[1]))[:10]
    print("host CUDA calls: " + "; ".join(f"{n} {len(v)}x {sum(v) / 1000:.2f} ms" for n, v in top))


def main() -> None:
    device = torch.device("cuda:0")
    settings = load_settings(overrides={"qwen.max_reply_seconds": 1.6, "qwen.max_reply_tokens": 8})
    bundle = bench.random_weights_bundle(device, torch.bfloat16,  # SCA_QWEN_QUANTIZE=int4, say
                                         schemes=bench.random_schemes(settings.qwen.quantize))
    conv = StreamingConversation(bundle, settings, seed=0)
    other = os.environ.get("MICRO_WAIT_FOR")  # other GPU work of the same call (the GPU tests)
    deadline = time.monotonic() + 420  # well inside gpu_bench.sh's timeout for this script
    while other and not os.path.exists(other) and time.monotonic() < deadline:
        time.sleep(1)
    for i in range(2):  # warm-up turns
        bench.run_turn(conv, bench.synthetic_voice(4.0, i), 5120)
    conv.feed(bench.synthetic_voice(3.0, 12))
    stages = [e.stages for e in conv.end_turn() if isinstance(e, StageTimings)][0]
    print("a reply unprofiled: " + ", ".join(
        f"{k} {stages[k]:.3f}" for k in ("thinker_ms_per_token", "talker_ms_per_frame",
                                        "vocoder_ms_per_frame", "reply_frames")), flush=True)
    _frames_in_contexts(conv, alone=False)
    out = os.environ.get("OUT", "/tmp")
    conv.feed(bench.synthetic_voice(3.0, 11))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in conv.end_turn():
            pass
    print("one reply (8 tokens, 20 frames):")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    trace = os.path.join(out, "trace.json")
    prof.export_chrome_trace(trace)
    gpu_gaps(trace)
    os.remove(trace)  # too large to bring back
    _listening(conv, device)
    _frames_in_contexts(conv, alone=True)


def _listening(conv, device) -> None:
    """The audio encoder and the thinker's prefill of one window: timed, then profiled."""
    window = bench.synthetic_voice(2.0, 5)
    listener = conv.listener
    mel = StreamingMel()
    frames = torch.cat([mel.feed(window), mel.finish()], dim=1)[:, :200]
    with torch.inference_mode():
        timed("audio encoder, one 2 s window", lambda: listener._encode(frames), device)
        audio = listener._encode(frames)
        start = conv.thinker.length

        def prefill():
            conv.thinker.crop(start)
            conv.thinker.prefill(audio, hidden_layer=conv.accept_layer)

        timed(f"thinker prefill of {audio.shape[0]} audio tokens", prefill, device)
        conv.thinker.crop(start)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU,
                                                     ProfilerActivity.CUDA]) as prof:
        conv.thinker.prefill(audio, hidden_layer=conv.accept_layer)
    conv.thinker.crop(start)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


def _frames_in_contexts(conv, alone: bool) -> None:
    """Is a frame slower in the whole model's company than alone (benchmarks/talker_micro.py)?
    The engine's own talker, or (`alone`) talkers built by themselves in this process."""
    code0, rest = conv.talker_sampler, conv.predictor_sampler
    token = torch.tensor(0, device="cuda")
    thinker_length = conv.thinker.length

    def thinker_step():
        conv.thinker.crop(thinker_length)
        conv.thinker.step(token)

    with torch.inference_mode():
        if not alone:
            frame_in_context("engine's talker", conv.talker, code0, rest, thinker_step)
            return
        for max_len in (conv.talker.stack.max_len, 4096):
            single = random_talker(max_len)
            d = single.codec_head.in_features
            single.warm_up_frames(512, code0, rest)
            single.start_reply(torch.randn(3, d, device="cuda", dtype=torch.bfloat16),
                               torch.randn(4, d, device="cuda", dtype=torch.bfloat16))
            frame_in_context(f"talker alone, {max_len} positions", single, code0, rest,
                             thinker_step)
            del single
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
