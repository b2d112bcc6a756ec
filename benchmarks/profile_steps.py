"""Where the time goes: torch.profiler over one listening window, one end of turn and a short reply
of the full-size random-weights model (run on the GPU: `python3 benchmarks/profile_steps.py`)."""

from __future__ import annotations

import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from duplex_chat.audio.features import StreamingMel
from duplex_chat.config import load_settings
from duplex_chat.model import bench
from duplex_chat.model.engine import StreamingConversation


def timed(label, fn, device, repeat=5):
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    print(f"{label}: median {sorted(times)[len(times) // 2]:.2f} ms over {repeat}")


def main() -> None:
    device = torch.device("cuda:0")
    settings = load_settings(overrides={"qwen.max_reply_seconds": 1.6, "qwen.max_reply_tokens": 8})
    bundle = bench.random_weights_bundle(device, torch.bfloat16)
    conv = StreamingConversation(bundle, settings, seed=0)
    for i in range(2):  # warm-up turns
        bench.run_turn(conv, bench.synthetic_voice(4.0, i), 5120)
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
    out = os.environ.get("OUT", "/tmp")
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU,
                                                     ProfilerActivity.CUDA]) as prof:
        conv.thinker.prefill(audio, hidden_layer=conv.accept_layer)
    conv.thinker.crop(start)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    conv.feed(bench.synthetic_voice(3.0, 11))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in conv.end_turn():
            pass
    print("one reply (8 tokens, 20 frames):")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    prof.export_chrome_trace(os.path.join(out, "trace.json"))


if __name__ == "__main__":
    main()
