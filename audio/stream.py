"""Live microphone and speaker streams (sounddevice/PortAudio) behind lock-light ring buffers.

The PortAudio callbacks only copy: microphone samples into `mic` ring, queued reply samples out of
the `out` ring (silence on underrun) and what was actually played into the `played` ring (the echo
canceller's reference), plus a time stamp of the newest microphone sample. Everything else
(resampling, echo cancellation, VAD, the model) happens on other threads that drain or fill those
rings:

    mic (device rate) --mic ring--> read_input() -> 16 kHz mic + 16 kHz/24 kHz copies of what played
    write_output(24 kHz reply) -> device rate --out ring--> speaker --played ring--> read_input()

One stream per direction, each at the model's rate where the device takes it (see
`_choose_rates`). Not one duplex `sd.Stream`: on
PortAudio's ALSA host API through the ALSA pulse plugin (how PortAudio 19.6 reaches PulseAudio
and PipeWire) a duplex stream is paced by its output, so microphone audio that piles up while
the process is stalled stays queued inside libpulse for ever (a 1 s SIGSTOP left every later
reply 1 s late), and while that queue is longer than the ALSA buffer PortAudio's wait loop spins
on snd_pcm_delay (a whole core). An input stream of its own drains such a backlog at once, and
`read_input` skips what is stale (see STALE_AFTER_S).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from duplex_chat.config import DuplexError

from .constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE
from .devices import DeviceInfo, supports_rate
from .pulse import routed
from .resample import StreamResampler

RING_SECONDS_IN = 10.0  # microphone audio buffered before overruns (the reader drains every ~10 ms)
RING_SECONDS_OUT = 120.0  # reply audio queued ahead of the speaker (the engine is faster than real time)
DEFAULT_LATENCY_S = 0.035  # PortAudio suggested latency ([audio] stream_latency_ms): what is already
# inside the device still plays after a barge-in flush, so it is part of the barge-in reaction time
# Microphone audio older than STALE_AFTER_S when the reader gets it was held up by a stall (the
# process stopped or starved, a suspend): acting on it as live would make every reaction that
# late. It is skipped, all but its newest KEEP_LIVE_S: the session hears silence there (its clock
# stays the microphone's), the recording keeps what the microphone heard, and the count is
# reported. Ordinary jitter (a late loop, a busy core: tens of ms) stays far below it.
STALE_AFTER_S = 0.3
KEEP_LIVE_S = 0.1  # after a skip the input path is this close to the microphone
# A device reports an input time stamp older than this only by mistake: then only our own ring's
# age counts.
MAX_REPORTED_AGE_S = 60.0
# The age a device reports for its input includes its own steady latency (a Bluetooth headset's
# may exceed STALE_AFTER_S): only what goes beyond the lowest age reported over this window counts.
AGE_FLOOR_WINDOW_S = 10
# The echo canceller pairs the k-th microphone sample with the k-th played one. A stall adds
# microphone audio (captured meanwhile) but no played audio (nothing was written meanwhile), so
# the pairing slips by the stall. When it has slipped by more than this since the start, the
# speaker's side gets that much silence (true: nothing played meanwhile).
ALIGN_TOLERANCE_S = 0.05
STALL_TIMEOUT_S = 1.5  # no callback for this long, while the reader itself ran, = the device is gone
# The reader's own gap between two `check` calls beyond which it was stalled itself (SIGSTOP, a
# suspend): callbacks missing over that time say nothing about the device.
READER_GAP_S = 0.5
# ALSA's pulse plugin (how PortAudio reaches PulseAudio/PipeWire on most Linux desktops) sometimes
# fails the very first poll of a new stream ("ContinuePoll ... failed", seen about 1 open in 10 on
# PulseAudio null sinks): the stream stops within milliseconds. A reopen works.
START_ATTEMPTS = 3  # opens tried before giving up on the devices
START_SETTLE_S = 0.25  # a stream still running with callbacks flowing this long after start is up
START_POLL_S = 0.01
# The same happens mid-session: after an underrun (a callback late, e.g. on a loaded machine),
# PortAudio 19.6's ALSA stream may fail the next poll and stop for good, with no callback error;
# a device whose callbacks stop for STALL_TIMEOUT_S is treated alike. Such streams are reopened;
# the rings keep their audio, so the reply resumes where it was. A device that keeps stopping
# (REOPEN_LIMIT times within REOPEN_WINDOW_S) is taken to be gone.
STREAM_STOPPED = "the audio stream stopped"
NO_CALLBACKS = "no audio arrived"
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

    @property
    def written(self) -> int:
        """Samples ever written (the index the next written sample gets)."""
        return self._written

    @property
    def read_count(self) -> int:
        """Samples ever read or dropped (the index of the next one to read)."""
        return self._read

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
    reopens: int = 0  # streams that stopped on their own (or went quiet) and were opened again
    stale_skips: int = 0  # stalls after which stale microphone audio was skipped
    skipped_input: int = 0  # microphone samples (16 kHz) skipped as stale, in all


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


def _choose_rates(inp: DeviceInfo, out: DeviceInfo) -> tuple[int, int]:
    """(input rate, output rate): the model's own (16 kHz in, 24 kHz out) where the device takes
    it, else the device's default (then we resample). A sound server (PulseAudio, PipeWire)
    resamples for us anyway; opening at its source's rate spares both conversions (measured on
    the virtual devices: about 1.5 % of a core less for talk at idle)."""
    in_rate = SAMPLE_RATE if supports_rate(inp, "input", SAMPLE_RATE) else int(inp.default_samplerate)
    out_rate = (OUTPUT_SAMPLE_RATE if supports_rate(out, "output", OUTPUT_SAMPLE_RATE)
                else int(out.default_samplerate))
    return in_rate, out_rate


@dataclass
class InputChunk:
    """What `read_input` drained, all (n,) float32. `mic` is what the microphone heard (for the
    recording); `live` is the same with its first `skipped` samples silenced, stale after a
    stall (for the session); `late_s` is how late the oldest of those arrived. Silence that
    realigns the speaker's side after a stall is at the start of `played16`/`played24` (see
    ALIGN_TOLERANCE_S), so the four stay on one timeline."""

    mic: np.ndarray  # 16 kHz
    live: np.ndarray  # 16 kHz, len(mic)
    played16: np.ndarray  # what the speaker was given, 16 kHz (the echo reference)
    played24: np.ndarray  # the same at 24 kHz (for the recording)
    skipped: int = 0
    late_s: float = 0.0


class AudioIO:
    """The microphone and speaker of one session.

    Threads: the PortAudio callbacks copy; one reader thread calls `read_input` and `check`; one
    writer thread calls `write_output`/`end_reply`; `flush` and `reply_played_samples` from any
    thread. Use as a context manager (opens and starts the streams; `close` stops them).
    `clock` (seconds, monotonic) is replaceable for tests.
    """

    def __init__(self, input_device: DeviceInfo, output_device: DeviceInfo,
                 latency: float | str = DEFAULT_LATENCY_S, clock: Callable[[], float] = time.monotonic):
        import sounddevice as sd

        self._sd = sd
        self._clock = clock
        self.input_device, self.output_device = input_device, output_device
        self.in_rate, self.out_rate = _choose_rates(input_device, output_device)
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
        # (clock at the last input callback, age in s of its newest sample then, mic ring index
        # after it): one tuple, replaced whole by the callback, so the reader sees one callback's
        self._newest: tuple[float, float, int] = (0.0, 0.0, 0)
        self._age_floors: dict[int, float] = {}  # second of the clock -> lowest age reported in it
        self._in_callbacks = self._out_callbacks = 0  # to notice a device that went quiet
        self._seen_callbacks = (-1, -1)
        self._quiet_since = self._last_check = clock()
        self._mic_total = self._played_total = 0  # 16 kHz samples handed out, for the alignment
        self._align_base: int | None = None  # their difference once both streams ran
        self._was_skipping = False
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

    def _input_part(self, indata: np.ndarray, time_info: Any) -> None:
        frames = len(indata)
        kept = self._mic.write(indata[:, 0])
        self.counters.overruns += frames - kept
        self._in_callbacks += 1
        self._newest = (self._clock(), self._reported_age(time_info, frames), self._mic.written)

    def _reported_age(self, time_info: Any, frames: int) -> float:
        """How old the block's newest sample is, by the stream's own time stamps (0 when the
        host API gives none or a nonsense one)."""
        adc = time_info.inputBufferAdcTime
        age = time_info.currentTime - adc - (frames - 1) / self.in_rate
        return age if adc > 0 and 0.0 <= age < MAX_REPORTED_AGE_S else 0.0

    def _output_part(self, outdata: np.ndarray) -> None:
        frames = len(outdata)
        got = self._out.read_into(outdata[:, 0])
        self._consumed += got
        if got < frames and self._expect_more:
            self.counters.underruns += 1
        self._played.write(outdata[:, 0])
        self._out_callbacks += 1

    def _guard(self, body, *args) -> None:
        try:
            body(*args)
        except Exception as exc:  # report through `check()`; PortAudio then stops the stream
            self.error = f"audio callback failed: {exc!r}"
            raise self._sd.CallbackAbort from None

    def _input_cb(self, indata, frames, time_info, status) -> None:
        self._note_status(status)
        self._guard(self._input_part, indata, time_info)

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
                self._quiet_since = self._last_check = self._clock()
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
        # No callback yet is not a failure here (slow devices); check()'s watch covers that.
        return self.error is None

    def _open(self) -> None:
        """Open and start the streams once (DuplexError when PortAudio refuses)."""
        sd = self._sd
        common = dict(channels=1, dtype="float32", latency=self.latency,
                      finished_callback=functools.partial(self._finished, self._attempt))
        try:
            # A sound-server device by name: libpulse reads the route when the stream connects.
            with routed(self.input_device.pulse_name, self.output_device.pulse_name):
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
        if len(self._streams) < 2:
            return 0.0, 0.0
        return float(self._streams[0].latency), float(self._streams[1].latency)

    def check(self) -> bool:
        """Raise DuplexError when a device failed. A stream that stopped on its own, or a
        direction whose callbacks stopped, is reopened first (see REOPEN_LIMIT); returns True
        when that happened. Call it from the reader's loop: its own gaps tell a stall of this
        process (no verdict on the device) from a device gone quiet."""
        self._watch_callbacks()
        if self.error is None and not all(stream.active for stream in self._streams):
            self.error = STREAM_STOPPED
        if self.error in (STREAM_STOPPED, NO_CALLBACKS) and self._reopen():
            return True
        if self.error == NO_CALLBACKS:
            raise DuplexError("The audio device stopped delivering sound.",
                              hint="Was it unplugged? Check it and run `duplex-chat talk` again.")
        if self.error is not None:
            raise DuplexError(f"The audio device stopped working ({self.error}).",
                              hint="Was it unplugged? Check it and run `duplex-chat talk` again.")
        return False

    def _watch_callbacks(self) -> None:
        now = self._clock()
        if now - self._last_check > READER_GAP_S:
            self._quiet_since = now  # this process was stalled itself: the device gets a new chance
        self._last_check = now
        counts = (self._in_callbacks, self._out_callbacks)
        # Both directions must move: a microphone gone quiet beside a working speaker is gone too.
        if all(a != b for a, b in zip(counts, self._seen_callbacks)):
            self._seen_callbacks, self._quiet_since = counts, now
        if self.error is None and now - self._quiet_since > STALL_TIMEOUT_S:
            self.error = NO_CALLBACKS

    def _reopen(self) -> bool:
        """Close and start the streams again, unless that happened too often already."""
        now = time.monotonic()
        self._reopen_times = [t for t in self._reopen_times if now - t < REOPEN_WINDOW_S]
        if len(self._reopen_times) >= REOPEN_LIMIT:
            return False
        self._reopen_times.append(now)
        self.counters.reopens += 1
        failed = self.error
        self.close()
        try:
            self.start()
        except DuplexError:  # the device is gone after all
            self.error = failed
            return False
        return True

    # ---- reader side ----------------------------------------------------------------------
    def read_input(self) -> InputChunk:
        """Drain what arrived (see InputChunk). The played signal is what the speaker callback
        wrote (silence included), for echo cancellation and recording."""
        stale, late_s = self._stale_samples()
        mic = self._mic_to_16k.process(self._mic.read())
        played_dev = self._played.read()
        chunk = InputChunk(mic, mic, self._played_to_16k.process(played_dev),
                           self._played_to_24k.process(played_dev))
        skipped = min(len(mic), round(stale * SAMPLE_RATE / self.in_rate))
        if skipped:
            chunk.live = mic.copy()
            chunk.live[:skipped] = 0.0
            chunk.skipped, chunk.late_s = skipped, late_s
            self.counters.skipped_input += skipped
            self.counters.stale_skips += not self._was_skipping
        self._count(chunk, realign=skipped > 0 or self._was_skipping)
        self._was_skipping = skipped > 0
        return chunk

    def _stale_samples(self) -> tuple[int, float]:
        """(device-rate samples at the front of the mic ring that are stale, age in s of the
        oldest): all but the newest KEEP_LIVE_S once the oldest is older than STALE_AFTER_S."""
        stamped_at, newest_age, end = self._newest
        start = self._mic.read_count
        if end <= start:
            return 0, 0.0
        excess = max(0.0, newest_age - self._age_floor(stamped_at, newest_age))
        newest = self._clock() - stamped_at + excess  # age of sample end - 1 by now, beyond normal
        oldest = newest + (end - 1 - start) / self.in_rate
        if oldest <= STALE_AFTER_S:
            return 0, 0.0
        keep = max(0, int((KEEP_LIVE_S - newest) * self.in_rate))
        return max(0, end - keep - start), oldest

    def _age_floor(self, stamped_at: float, age: float) -> float:
        """The lowest input age reported over the last AGE_FLOOR_WINDOW_S (this one included)."""
        second = int(stamped_at)
        floors = self._age_floors
        floors[second] = min(age, floors.get(second, age))
        for old in [k for k in floors if k <= second - AGE_FLOOR_WINDOW_S]:
            del floors[old]
        return min(floors.values())

    def _count(self, chunk: InputChunk, realign: bool) -> None:
        """Count what each side delivered; during a stall's skip, give the speaker's side the
        silence it played meanwhile (see ALIGN_TOLERANCE_S). Only then: at other times the two
        streams' deliveries jitter against each other, which is no slip."""
        self._mic_total += len(chunk.mic)
        self._played_total += len(chunk.played16)
        if self._align_base is None:
            if self._mic_total and self._played_total:
                self._align_base = self._mic_total - self._played_total
            return
        slip = self._mic_total - self._played_total - self._align_base
        if realign and slip > ALIGN_TOLERANCE_S * SAMPLE_RATE:
            chunk.played16 = _after_silence(chunk.played16, slip)
            chunk.played24 = _after_silence(chunk.played24, slip * OUTPUT_SAMPLE_RATE // SAMPLE_RATE)
            self._played_total += slip

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


def _after_silence(x: np.ndarray, n: int) -> np.ndarray:
    """`x` preceded by `n` zeros."""
    return np.concatenate([np.zeros(int(n), np.float32), x])
