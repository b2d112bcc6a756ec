"""One way to capture a CUDA graph, for the decoder stacks (`fast.py`, `streams.py`) and the
vocoder (`vocoder.py`): warm up on a side stream, put back the state the warm-up changed,
capture, replay with new inputs copied into static buffers."""

from __future__ import annotations

import contextlib

import torch


class CapturedCall:
    """`fn(*inputs)` captured once as a CUDA graph and replayed with new input values.

    Inputs are copied into static buffers (a Python number is written into its buffer by a
    kernel: no host-to-device copy, which would wait for the GPU); the outputs are static
    tensors overwritten by the next replay (copy what must outlive it). Warm-up runs
    (compilation, allocator) happen on a side stream first, as capture requires; the tensors in
    `preserve`, which fn updates in place, get their values back after them, and so does the
    device's random generator (samplers inside graphs draw from it): capturing a graph draws
    no random numbers, so a graph captured lazily in the middle of a reply, or of a speculative
    start that is later taken back, does not shift the replies' draws.
    """

    def __init__(self, fn, example: tuple[torch.Tensor, ...], pool=None, warmup: int = 2,
                 preserve: tuple[torch.Tensor, ...] = (), device: torch.device | None = None):
        self.inputs = tuple(t.clone() for t in example)
        saved = [t.clone() for t in preserve]
        # `device`: the GPU the work runs on, when it may not be the current one
        with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
            rng = torch.cuda.get_rng_state()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: compilation, lazy inits, workspaces
                for _ in range(warmup):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(stream)
            for tensor, value in zip(preserve, saved):
                tensor.copy_(value)
            torch.cuda.set_rng_state(rng)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = fn(*self.inputs)
            torch.cuda.set_rng_state(rng)

    def __call__(self, *args: torch.Tensor):
        for static, value in zip(self.inputs, args):
            if isinstance(value, torch.Tensor):
                static.copy_(value)
            else:
                static.fill_(value)
        self.graph.replay()
        return self.outputs


