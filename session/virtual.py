"""A player on a virtual clock: what `replay` plays replies into.

The clock is the session's (the file's position in 16 kHz samples), never the wall clock, so a
replay gives the same timeline however busy the machine is. Each reply is generated whole when its
turn is committed (the session's inline worker), and placed as a live conversation would hear it:
its first sample `first_packet_s` after the end of turn was detected (after the reply was
started, for a speculative start: `speculated_from`), then the rest without a gap, at real
time. That models an engine faster than real time, as on the GPU (real-time factor 0.08,
docs/benchmarks.md). `first_packet_s` defaults to MODELED_FIRST_PACKET_S; None uses the
first packet's compute time as measured on this machine instead (then results vary with load).
While the reply "plays", the session keeps hearing the file: speech over it barges in, and what
was heard is the part of the reply before that moment.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE

from .worker import Progress

MODELED_FIRST_PACKET_S = 0.08  # the design's first-packet target (measured 59 ms on an H200)


class Placement(Protocol):
    """Where a virtual player puts reply audio (replay's timeline writer)."""

    def place(self, start: int, samples: np.ndarray) -> None:
        """Reply audio (n,) float32 that sounds from output sample `start` (24 kHz) on."""

    def cut(self, end: int) -> None:
        """Nothing placed sounds from output sample `end` on (a barge-in stopped it)."""


class VirtualPlayer:
    """A `Player` whose playback follows `clock()` (16 kHz samples): see the module docstring."""

    def __init__(self, clock: Callable[[], int], placement: Placement | None = None,
                 first_packet_s: float | None = MODELED_FIRST_PACKET_S):
        self.clock, self.placement, self.first_packet_s = clock, placement, first_packet_s
        self.reply = 0
        self.start: int | None = None  # output sample where the reply sounds from
        self.samples = 0  # reply samples written
        self.ended = self.stopped = False
        self.ran_out = False  # the input ended: replies play to their end
        self._begun_at = 0  # session sample of begin_reply
        self._begun_wall = 0.0
        self._speculated: tuple[int, float | None] | None = None  # see `speculated_from`

    def begin_reply(self, reply: int) -> None:
        """A new reply: it will sound `first_packet_s` after now (see `write`)."""
        self.reply, self.start, self.samples = reply, None, 0
        self.ended = self.stopped = False
        self._begun_at, self._begun_wall = self.clock(), time.perf_counter()
        self._speculated = None

    def speculated_from(self, sample: int, compute_s: float | None) -> None:
        """The reply just begun was started speculatively at session sample `sample`, before
        its end of turn was decided (TurnCommitted.speculated_from), its first packet computed
        in `compute_s` on this machine: it sounds `first_packet_s` (measuring: `compute_s`)
        after that, or as soon as it is begun if that moment has passed."""
        self._speculated = sample, compute_s

    def room_s(self) -> float:
        """Unlimited: the whole reply is placed at once."""
        return float("inf")

    def write(self, samples: np.ndarray) -> None:
        """Place reply audio (n,) float32 at 24 kHz right after what was written before; the
        first write fixes where the reply starts."""
        if self.start is None:
            self.start = self._first_sample()
        if self.placement is not None:
            self.placement.place(self.start + self.samples, samples)
        self.samples += len(samples)

    def _first_sample(self) -> int:
        """The output sample where the reply begun last starts sounding (module docstring)."""
        if self._speculated is not None:
            since, compute_s = self._speculated
            delay = self.first_packet_s if self.first_packet_s is not None else compute_s or 0.0
            ready = _out_sample(since) + round(delay * OUTPUT_SAMPLE_RATE)
            return max(_out_sample(self._begun_at), ready)
        delay = (self.first_packet_s if self.first_packet_s is not None
                 else time.perf_counter() - self._begun_wall)
        return _out_sample(self._begun_at) + round(delay * OUTPUT_SAMPLE_RATE)

    def end_reply(self) -> None:
        """No more audio: the reply finishes once the clock passes its last sample."""
        self.ended = True

    def stop(self) -> int:
        """Cut the reply at the clock's position; returns the samples (24 kHz) heard by then."""
        heard = self._heard()
        self.stopped, self.samples = True, heard
        if self.placement is not None and self.start is not None:
            self.placement.cut(self.start + heard)
        return heard

    def progress(self) -> Progress:
        """What of the reply the clock has passed, and where it became audible (exact here)."""
        heard = self._heard()
        audible = None if self.start is None or heard == 0 else _in_sample(self.start)
        return Progress(self.reply, heard, self.stopped or (self.ended and heard >= self.samples),
                        audible)

    def run_out(self) -> None:
        """The input ended: every reply plays to its end (the clock no longer limits it)."""
        self.ran_out = True

    def _heard(self) -> int:
        if self.start is None:
            return 0
        if self.ran_out:
            return self.samples
        return int(min(self.samples, max(0, _out_sample(self.clock()) - self.start)))


def _out_sample(sample: int) -> int:
    """The 24 kHz output sample at 16 kHz input sample `sample`."""
    return sample * OUTPUT_SAMPLE_RATE // SAMPLE_RATE


def _in_sample(out: int) -> int:
    """The first 16 kHz input sample at or after 24 kHz output sample `out`."""
    return -(-out * SAMPLE_RATE // OUTPUT_SAMPLE_RATE)
