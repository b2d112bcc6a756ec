"""AudioIO's bookkeeping without devices: stale microphone audio after a stall, the echo
reference kept paired, and the difference between this process stalling and a device gone quiet;
the device watch over a scripted sound server."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from duplex_chat.audio import stream
from duplex_chat.config import DuplexError
from duplex_chat.audio.stream import (
    ALIGN_TOLERANCE_S,
    KEEP_LIVE_S,
    NO_CALLBACKS,
    READER_GAP_S,
    STALE_AFTER_S,
    STALL_TIMEOUT_S,
    AudioIO,
    RingBuffer,
    StreamCounters,
    _Resampler,
)

RATE = 16_000  # both "devices" at the model's input rate: no resampling in these tests


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def bare_io(clock: Clock) -> AudioIO:
    """An AudioIO with rings and counters but no streams, on `clock`."""
    io = AudioIO.__new__(AudioIO)
    io._clock, io.in_rate, io.out_rate = clock, RATE, RATE
    io.counters, io.error, io._streams, io._reopen_times = StreamCounters(), None, [], []
    io._mic, io._played = RingBuffer(RATE * 10), RingBuffer(RATE * 10)
    io._mic_to_16k, io._played_to_16k = _Resampler(RATE, RATE), _Resampler(RATE, RATE)
    io._played_to_24k = _Resampler(RATE, RATE)
    io._newest, io._was_skipping, io._age_floors = (0.0, 0.0, 0), False, {}
    io._mic_total = io._played_total = 0
    io._align_base = None
    io._in_callbacks = io._out_callbacks = 0
    io._seen_callbacks = (-1, -1)
    io._quiet_since = io._last_check = clock()
    return io


def callbacks(io: AudioIO, seconds: float, mic: bool = True, played: bool = True,
              reported_age: float = 0.0) -> None:
    """What the input and output callbacks did over `seconds` (10 ms blocks); the clock moves."""
    block = RATE // 100
    for _ in range(round(seconds * 100)):
        io._clock.t += 0.01
        if mic:
            info = SimpleNamespace(currentTime=io._clock.t + 1000.0,
                                   inputBufferAdcTime=io._clock.t + 1000.0 - reported_age
                                   - (block - 1) / RATE)
            io._input_part(np.full((block, 1), 0.5, np.float32), info)
        if played:
            io._played.write(np.full(block, 0.25, np.float32))
            io._out_callbacks += 1


def test_live_input_passes_untouched():
    io = bare_io(Clock())
    callbacks(io, 0.1)
    chunk = io.read_input()
    assert chunk.skipped == 0 and chunk.live is chunk.mic and np.all(chunk.mic == 0.5)
    assert len(chunk.mic) == len(chunk.played16) == 0.1 * RATE


def test_audio_held_up_in_our_ring_by_a_stall_is_skipped_but_recorded():
    io = bare_io(Clock())
    callbacks(io, 0.1)
    io.read_input()
    callbacks(io, 1.0)  # the reader did not run for 1 s (both sides kept arriving)
    chunk = io.read_input()
    assert len(chunk.mic) == RATE and np.all(chunk.mic == 0.5)  # the recording keeps it all
    kept = len(chunk.live) - chunk.skipped
    assert abs(kept - KEEP_LIVE_S * RATE) <= RATE // 100  # back within ~100 ms of the mic
    assert np.all(chunk.live[:chunk.skipped] == 0) and np.all(chunk.live[chunk.skipped:] == 0.5)
    assert chunk.late_s == pytest.approx(1.0, abs=0.02)
    assert len(chunk.played16) == RATE  # nothing slipped: the speaker ran all along
    assert io.counters.stale_skips == 1 and io.counters.skipped_input == chunk.skipped


def test_a_backlog_the_device_reports_is_skipped_and_the_echo_reference_realigned():
    """A SIGSTOP: the server queued the mic meanwhile (the stream's time stamps say how old it
    is), while nothing was played; the reference gets that silence so the pairing holds."""
    io = bare_io(Clock())
    callbacks(io, 0.2)
    io.read_input()
    callbacks(io, 1.0, played=False, reported_age=0.9)  # arrived in a burst after the stop
    callbacks(io, 0.05)
    chunk = io.read_input()
    assert chunk.skipped > 0.9 * RATE and chunk.late_s > 0.9
    slip = (io._mic_total - io._played_total) - io._align_base
    assert abs(slip) <= ALIGN_TOLERANCE_S * RATE
    assert np.all(chunk.played16[:int(0.9 * RATE)] == 0)  # silence where nothing played


def test_a_device_that_always_reports_a_long_latency_is_not_stalled():
    io = bare_io(Clock())
    for _ in range(5):
        callbacks(io, 0.2, reported_age=STALE_AFTER_S + 0.2)  # e.g. a Bluetooth headset
        assert io.read_input().skipped == 0


def test_ordinary_jitter_is_not_a_stall():
    io = bare_io(Clock())
    callbacks(io, STALE_AFTER_S - 0.05, reported_age=0.04)
    chunk = io.read_input()
    assert chunk.skipped == 0
    callbacks(io, 0.2, played=False)  # one side late for a moment: no realignment outside a stall
    chunk = io.read_input()
    assert chunk.skipped == 0 and len(chunk.played16) == 0


def test_a_stall_of_this_process_is_not_a_device_gone_quiet(monkeypatch):
    clock = Clock()
    io = bare_io(clock)
    reopened = []
    monkeypatch.setattr(AudioIO, "_reopen", lambda self: reopened.append(self.error) or False)
    callbacks(io, 0.1)
    io.check()
    clock.t += STALL_TIMEOUT_S + 1.0  # stopped as a whole: no callbacks, no checks
    io.check()
    assert io.error is None and not reopened
    with pytest.raises(DuplexError, match="stopped delivering sound"):
        for _ in range(round(STALL_TIMEOUT_S / 0.1) + 2):  # the checks run; only the speaker moves
            clock.t += min(0.1, READER_GAP_S / 2)
            io._out_callbacks += 1
            io.check()
    assert reopened == [NO_CALLBACKS]  # a reopen was tried before giving up


def test_stream_constants_are_consistent():
    assert KEEP_LIVE_S < STALE_AFTER_S < STALL_TIMEOUT_S
    assert stream.READER_GAP_S < STALL_TIMEOUT_S


def test_the_device_watch_reports_a_swap_a_rate_change_and_a_loop(monkeypatch):
    """PulseWatch over a scripted server: where our streams are, one look after another."""
    from duplex_chat.audio import pulse
    from duplex_chat.audio.pulse import PulseWatch, StreamPlace

    looks = iter([
        {"input": StreamPlace("usb_mic", 16000), "output": StreamPlace("speakers", 48000)},
        {"input": StreamPlace("usb_mic", 16000), "output": StreamPlace("speakers", 48000)},
        None,  # the server did not answer once: nothing to say
        {"input": StreamPlace("usb_mic", 16000), "output": StreamPlace("speakers", 44100)},
        {"input": StreamPlace("speakers.monitor", 48000, monitor_of="speakers"),
         "output": StreamPlace("speakers", 44100)},
    ])
    monkeypatch.setattr(pulse, "our_streams", lambda: next(looks))
    monkeypatch.setattr(pulse.ServerEvents, "open", classmethod(lambda cls: None))  # polls
    watch = PulseWatch()
    turns = []  # one look per turn of the watch's loop, no waiting; it stops after the script
    monkeypatch.setattr(watch._stop, "wait", lambda period: len(turns.append(1) or turns) > 5)
    watch._run()
    said = [sentence for _, sentence, _ in watch.changes()]
    assert said == [
        "The speaker 'speakers' now runs at 44100 Hz instead of 48000 Hz.",
        "The sound server moved the microphone from 'usb_mic' to 'speakers.monitor' (was the "
        "device unplugged or the default changed?).",
        "The microphone is now 'speakers.monitor', which hears our own speaker 'speakers', not you.",
    ]


def _events_from(script: str):
    """ServerEvents over a shell script standing in for `pactl subscribe`."""
    import subprocess

    from duplex_chat.audio.pulse import ServerEvents

    return ServerEvents(subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE))


def test_server_events_tell_device_and_stream_changes_not_clients():
    events = _events_from(
        "echo \"Event 'new' on client #5\"; echo \"Event 'remove' on client #5\"; sleep 0.3; "
        "echo \"Event 'change' on source-output #7\"; sleep 0.05; "
        "echo \"Event 'change' on sink #0\"; sleep 0.6; exec sleep 30")
    try:
        assert events.wait(0.2) is False  # pactl's own calls show up as clients: nothing
        started = time.monotonic()
        assert events.wait(5.0) is True  # the stream's move and the sink's change: one burst
        assert time.monotonic() - started < 0.6  # told once the burst settled, not at the end
        assert events.wait(0.1) is False
        events.stop()
        assert events.wait(5.0) is None  # pactl is gone: the watch falls back to polling
    finally:
        events.close()


def test_the_device_watch_looks_when_the_server_tells_and_polls_when_it_cannot(monkeypatch):
    from duplex_chat.audio import pulse
    from duplex_chat.audio.pulse import PulseWatch, StreamPlace

    mic, spk = StreamPlace("usb_mic", 16000), StreamPlace("speakers", 48000)
    moved = StreamPlace("hdmi.monitor", 48000, monitor_of="hdmi")
    # looks: the first, after the change, after the quiet recheck, when the subscription ended,
    # and one more after a poll
    looks = iter([{"input": mic, "output": spk}] + [{"input": moved, "output": spk}] * 4)
    monkeypatch.setattr(pulse, "our_streams", lambda: next(looks))

    class Told:  # the server's word, scripted: a change, a quiet recheck, then gone
        def __init__(self):
            self.said, self.closed = [True, False, None], 0

        def wait(self, timeout_s):
            return self.said.pop(0)

        def stop(self):
            pass

        def close(self):
            self.closed += 1

    told = Told()
    monkeypatch.setattr(pulse.ServerEvents, "open", classmethod(lambda cls: told))
    watch = PulseWatch()
    polls = []  # the first look's wait, then the polling after the subscription ended
    monkeypatch.setattr(watch._stop, "wait", lambda period: len(polls.append(period) or polls) > 2)
    watch._run()
    assert told.said == [] and told.closed >= 1
    assert polls == [pulse.WATCH_PERIOD_S] * 3
    said = [sentence for _, sentence, _ in watch.changes()]
    assert said == ["The sound server moved the microphone from 'usb_mic' to 'hdmi.monitor' (was "
                    "the device unplugged or the default changed?)."]
