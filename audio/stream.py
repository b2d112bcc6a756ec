"""Live microphone and speaker streams (sounddevice/PortAudio) behind lock-light ring buffers.

The PortAudio callbacks only copy: microphone samples into `mic` ring, queued reply samples out of
the `out` ring (silence on underrun) and what was actually played into the `played` ring (the echo
canceller's reference). Everything else (resampling, echo cancellation, VAD, the model) happens
on other threads that drain or fill those rings:

    mic (device rate) --mic ring--> read_input() -> 16 kHz mic + 16 kHz/24 kHz copies of what played
    write_output(24 kHz reply) -> device rate --out ring--> speaker --played ring--> read_input()

Streams run at the devices' own default rates. When both devices can run at one rate we open one
duplex `sd.Stream` (input and output share a clock, so the echo reference is sample-aligned with
the microphone); otherwise one stream each.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from duplex_chat.config import DuplexError

from .constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE
from .devices import DeviceInfo, supports_rate
from .resample import StreamResampler

RING_SECONDS_IN = 10.0  # microphone audio buffered before overruns (the reader drains every ~10 ms)
RING_SECONDS_OUT = 120.0  # reply audio queued ahead of the speaker (the engine is faster than real time)
DEFAULT_LATENCY_S = 0.035  # PortAudio suggested latency ([audio] stream_latency_ms): what is already
# inside the device still plays after a barge-in flush, so it is part of the barge-in reaction time
STALL_TIMEOUT_S = 1.5  # no callback for this long while running = the device is gone
# ALSA's pulse plugin (how PortAudio reaches PulseAudio/PipeWire on most Linux desktops) sometimes
# fails the very first poll of a new stream ("ContinuePoll ... failed", seen about 1 open in 10 on
# PulseAudio null sinks): the stream stops within milliseconds. A reopen works.
START_ATTEMPTS = 3  # opens tried before giving up on the devices
START_SETTLE_S = 0.25  # a stream still running with callbacks flowing this long after start is up
START_POLL_S = 0.01
# The same happens mid-session: after an underrun (a callback late, e.g. on a loaded machine),
# PortAudio 19.6's full-duplex ALSA stream fails the next poll and stops for good, with no callback
# error. Such a stream is reopened; the rings keep their audio, so the reply resumes where it was.
# A device that keeps stopping (REOPEN_LIMIT times within REOPEN_WINDOW_S) is taken to be gone.
STREAM_STOPPED = "the audio stream stopped"
REOPEN_LIMIT = 3
REOPEN_WINDOW_S = 60.0


class RingBuffer:
    """Fixed-capacity float32 FIFO for one producer and one consumer; preallocated, never grows.

    The lock is held only for the two slice copies of a read or write.
    """

    def __init__(self, capacity: int):
        self._buf = np.zeros(int(capacity), np.float32)
        self._written = 0  # samples ever written
        self._read = 0  # samples ever read or dropped
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return len(self._buf)

    @property
    def available(self) -> int:
        """Samples waiting to be read."""
        return self._written - self._read

    def write(self, samples: np.ndarray) -> int:
        """Append (n,) samples; returns how many fitted (the rest is dropped)."""
        with self._lock:
            n = min(len(samples), self.capacity - (self._written - self._read))
            start = self._written % self.capacity
            first = min(n, self.capacity - start)
            self._buf[start:start + first] = samples[:first]
            self._buf[:n - first] = samples[first:n]
            self._written += n
        return n

    def read_into(self, out: np.ndarray) -> int:
        """Fill `out` (n,) from the front; returns samples read; the rest of `out` is zeroed."""
        with self._lock:
            n = min(len(out), self._written - self._read)
            start = self._read % self.capacity
            first = min(n, self.capacity - start)
            out[:first] = self._buf[start:start + first]
            out[first:n] = self._buf[:n - first]
            self._read += n
        out[n:] = 0.0
        return n

    def read(self, max_samples: int | None = None) -> np.ndarray:
        """Everything waiting (or at most `max_samples`) as a new array. Not for callbacks."""
        n = self.available if max_samples is None else min(max_samples, self.available)
        out = np.empty(n, np.float32)
        got = self.read_into(out)
        return out[:got]

    def clear(self) -> int:
        """Drop everything waiting; returns how many samples were dropped."""
        with self._lock:
            dropped = self._written - self._read
            self._read = self._written
        return dropped


@dataclass
class StreamCounters:
    """What went wrong so far. Underruns: the speaker wanted reply audio that was not there yet."""

    underruns: int = 0  # callbacks that ran short of queued reply audio mid-reply
    overruns: int = 0  # microphone samples dropped because nobody read them in time
    input_overflows: int = 0  # PortAudio's own flags
    output_underflows: int = 0
    reopens: int = 0  # streams that stopped on their own and were opened again


class _Resampler:
    """StreamResampler, or nothing at all when the rates already match."""

    def __init__(self, in_rate: int, out_rate: int):
        self._inner = StreamResampler(in_rate, out_rate) if in_rate != out_rate else None

    def process(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32, copy=False) if self._inner is None else self._inner.process(x)

    def reset(self) -> None:
        if self._inner is not None:
            self._inner.reset()

    def flush_tail(self) -> np.ndarray:
        """The samples still inside the filter (end of a signal); resets it."""
        return np.zeros(0, np.float32) if self._inner is None else self._inner.flush()


def _choose_rates(inp: DeviceInfo, out: DeviceInfo) -> tuple[int, int, bool]:
    """(input rate, output rate, duplex): one shared native rate if both take it, else each its own."""
    in_rate, out_rate = int(inp.default_samplerate), int(out.default_samplerate)
    for rate in (out_rate, in_rate):
        if supports_rate(inp, "input", rate) and supports_rate(out, "output", rate):
            return rate, rate, True
    return in_rate, out_rate, False


class AudioIO:
    """The microphone and speaker of one session.

    Threads: the PortAudio callback(s) copy; one reader thread calls `read_input`; one writer
    thread calls `write_output`/`end_reply`; `flush` and `reply_played_samples` from any thread.
    Use as a context manager (opens and starts the streams; `close` stops them).
    """

    def __init__(self, input_device: DeviceInfo, output_device: DeviceInfo,
                 latency: float | str = DEFAULT_LATENCY_S):
        import sounddevice as sd

        self._sd = sd
        self.input_device, self.output_device = input_device, output_device
        self.in_rate, self.out_rate, self.duplex = _choose_rates(input_device, output_device)
        self.latency = latency
        self.counters = StreamCounters()
        self._mic = RingBuffer(int(self.in_rate * RING_SECONDS_IN))
        self._out = RingBuffer(int(self.out_rate * RING_SECONDS_OUT))
        self._played = RingBuffer(int(self.out_rate * RING_SECONDS_IN))
        self._mic_to_16k = _Resampler(self.in_rate, SAMPLE_RATE)
        self._played_to_16k = _Resampler(self.out_rate, SAMPLE_RATE)
        self._played_to_24k = _Resampler(self.out_rate, OUTPUT_SAMPLE_RATE)
        self._reply_to_device = _Resampler(OUTPUT_SAMPLE_RATE, self.out_rate)
        self._write_lock = threading.Lock()  # reply resampler + ring writes vs. flush
        self._expect_more = False  # a reply is still arriving: running dry is an underrun
        self._consumed = 0  # reply samples (device rate) the speaker callback took, ever
        self._reply_start = 0  # value of _consumed when the current reply began
        self._callbacks = 0  # callback count, to notice a stalled device
        self.error: str | None = None
        self._streams: list[Any] = []
        self._closing = False
        self._attempt = 0  # which open of the streams is current (see start)
        self._reopen_times: list[float] = []  # when the streams were reopened mid-session

    # ---- PortAudio callbacks: copies only ------------------------------------------------
    def _note_status(self, status: Any) -> None:
        if status.input_overflow:
            self.counters.input_overflows += 1
        if status.output_underflow:
            self.counters.output_underflows += 1

    def _input_part(self, indata: np.ndarray) -> None:
        frames = len(indata)
        kept = self._mic.write(indata[:, 0])
        self.counters.overruns += frames - kept

    def _output_part(self, outdata: np.ndarray) -> None:
        frames = len(outdata)
        got = self._out.read_into(outdata[:, 0])
        self._consumed += got
        if got < frames and self._expect_more:
            self.counters.underruns += 1
        self._played.write(outdata[:, 0])

    def _guard(self, body, *args) -> None:
        try:
            self._callbacks += 1
            body(*args)
        except Exception as exc:  # report through `check()`; PortAudio then stops the stream
            self.error = f"audio callback failed: {exc!r}"
            raise self._sd.CallbackAbort from None

    def _duplex_cb(self, indata, outdata, frames, time_info, status) -> None:
        self._note_status(status)
        self._guard(self._duplex_body, indata, outdata)

    def _duplex_body(self, indata, outdata) -> None:
        self._input_part(indata)
        self._output_part(outdata)

    def _input_cb(self, indata, frames, time_info, status) -> None:
        self._note_status(status)
        self._guard(self._input_part, indata)

    def _output_cb(self, outdata, frames, time_info, status) -> None:
        self._note_status(status)
        self._guard(self._output_part, outdata)

    def _finished(self, attempt: int) -> None:
        if attempt == self._attempt and not self._closing and self.error is None:
            self.error = STREAM_STOPPED

    # ---- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "AudioIO":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Open and start the streams, reopening those that die at once (up to START_ATTEMPTS).
        Raises DuplexError when a device is missing, busy, or keeps failing."""
        for _ in range(START_ATTEMPTS):
            self._attempt += 1  # a late finished-callback of a closed attempt is ignored
            self._closing, self.error = False, None
            self._open()
            if self._settled():
                return
            self.close()
        raise DuplexError(
            f"The audio devices '{self.input_device.name}' / '{self.output_device.name}' stopped "
            f"right after opening, {START_ATTEMPTS} times ({self.error}).",
            hint="Is another program using them? See `duplex-chat talk --list-devices`.")

    def _settled(self) -> bool:
        """Wait START_SETTLE_S; True when every stream is still active and none failed."""
        deadline = time.monotonic() + START_SETTLE_S
        while time.monotonic() < deadline:
            if self.error is not None or not all(s.active for s in self._streams):
                return False
            time.sleep(START_POLL_S)
        # No callback yet is not a failure here (slow devices); run()'s stall check covers that.
        return self.error is None

    def _open(self) -> None:
        """Open and start the streams once (DuplexError when PortAudio refuses)."""
        sd = self._sd
        common = dict(channels=1, dtype="float32", latency=self.latency,
                      finished_callback=functools.partial(self._finished, self._attempt))
        try:
            if self.duplex:
                self._streams = [sd.Stream(
                    device=(self.input_device.index, self.output_device.index),
                    samplerate=self.in_rate, callback=self._duplex_cb, **common)]
            else:
                self._streams = [
                    sd.InputStream(device=self.input_device.index, samplerate=self.in_rate,
                                   callback=self._input_cb, **common),
                    sd.OutputStream(device=self.output_device.index, samplerate=self.out_rate,
                                    callback=self._output_cb, **common),
                ]
            for stream in self._streams:
                stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            self.close()
            raise DuplexError(
                f"Could not open the audio devices '{self.input_device.name}' / "
                f"'{self.output_device.name}': {exc}.",
                hint="Is another program using them, or was one unplugged? "
                     "See `duplex-chat talk --list-devices`.") from None

    def close(self) -> None:
        """Stop and close the streams (idempotent)."""
        self._closing = True
        for stream in self._streams:
            try:
                stream.abort()
                stream.close()
            except Exception:  # closing a stream of a vanished device may fail; it is gone anyway
                pass
        self._streams = []

    @property
    def latency_s(self) -> tuple[float, float]:
        """(input, output) latency in seconds as PortAudio reports it (0 before start)."""
        if not self._streams:
            return 0.0, 0.0
        if self.duplex:
            return tuple(float(x) for x in self._streams[0].latency)  # type: ignore[return-value]
        return float(self._streams[0].latency), float(self._streams[1].latency)

    @property
    def callback_count(self) -> int:
        """How many callbacks ran; the caller compares over time to notice a stalled device."""
        return self._callbacks

    def check(self) -> bool:
        """Raise DuplexError when a device failed. A stream that stopped on its own is reopened
        first (see REOPEN_LIMIT); returns True when that happened."""
        if self.error is None and not all(stream.active for stream in self._streams):
            self.error = STREAM_STOPPED
        if self.error == STREAM_STOPPED and self._reopen():
            return True
        if self.error is not None:
            raise DuplexError(f"The audio device stopped working ({self.error}).",
                              hint="Was it unplugged? Check it and run `duplex-chat talk` again.")
        return False

    def _reopen(self) -> bool:
        """Close and start the streams again, unless that happened too often already."""
        now = time.monotonic()
        self._reopen_times = [t for t in self._reopen_times if now - t < REOPEN_WINDOW_S]
        if len(self._reopen_times) >= REOPEN_LIMIT:
            return False
        self._reopen_times.append(now)
        self.counters.reopens += 1
        self.close()
        try:
            self.start()
        except DuplexError:  # the device is gone after all
            self.error = STREAM_STOPPED
            return False
        return True

    # ---- reader side ----------------------------------------------------------------------
    def read_input(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Drain what arrived: (mic 16 kHz, played 16 kHz, played 24 kHz), each (n,) float32.

        The played signal is what the speaker callback wrote (silence included), for echo
        cancellation and recording. In duplex mode it is sample-aligned with the mic.
        """
        mic = self._mic_to_16k.process(self._mic.read())
        played_dev = self._played.read()
        return mic, self._played_to_16k.process(played_dev), self._played_to_24k.process(played_dev)

    # ---- writer side ----------------------------------------------------------------------
    def begin_reply(self) -> None:
        """A new reply starts: count played samples from here; running dry is an underrun now."""
        with self._write_lock:
            self._reply_to_device.reset()
            self._reply_start = self._consumed + self._out.available
            self._expect_more = False  # set by the first write: waiting for it is not an underrun

    def write_output(self, samples: np.ndarray) -> int:
        """Queue reply audio (n,) float32 at 24 kHz; returns device-rate samples not queued
        because the ring is full (the caller waits and retries with `queued_output_s`)."""
        with self._write_lock:
            converted = self._reply_to_device.process(np.asarray(samples, np.float32))
            kept = self._out.write(converted)
            self._expect_more = True
        return len(converted) - kept

    def end_reply(self) -> None:
        """No more audio is coming for this reply: queue the resampler's tail; running dry is no
        longer an underrun."""
        with self._write_lock:
            self._out.write(self._reply_to_device.flush_tail())
            self._expect_more = False

    @property
    def queued_output_s(self) -> float:
        """Seconds of reply audio waiting to be played."""
        return self._out.available / self.out_rate

    @property
    def output_free_s(self) -> float:
        return (self._out.capacity - self._out.available) / self.out_rate

    def reply_played_samples(self) -> int:
        """Samples (24 kHz) of the current reply the speaker has taken, minus those still inside
        the output latency (taken but not yet audible)."""
        out_latency = self.latency_s[1] * self.out_rate
        played_dev = max(0.0, self._consumed - self._reply_start - out_latency)
        return int(played_dev * OUTPUT_SAMPLE_RATE / self.out_rate)

    def flush(self) -> int:
        """Barge-in: drop all queued reply audio at once; returns reply samples (24 kHz) heard."""
        with self._write_lock:
            self._out.clear()
            self._reply_to_device.reset()
            self._expect_more = False
        return self.reply_played_samples()
