"""A device that vanishes mid-session ends `talk` cleanly: clear error, streams closed, log intact."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from duplex_chat.audio.stream import REOPEN_LIMIT, STREAM_STOPPED, AudioIO, RingBuffer, StreamCounters
from duplex_chat.config import DuplexError

from .fake_engine import Reply, ScriptedConversation, chirp, factory_for
from .talk_harness import TEST_RATE, assert_heard, espeak, read_log, run_conversation, session_settings
from .virtual_audio import virtual_audio_or_skip


@pytest.mark.audio_devices
def test_unplugged_microphone_ends_session_cleanly(tmp_path, monkeypatch):
    unplugged = threading.Event()
    real_input = AudioIO._input_part

    def input_part(self, indata, time_info):  # the device vanishes: PortAudio's read fails
        if unplugged.is_set():
            raise OSError("Device unavailable [PaErrorCode -9985]")
        real_input(self, indata, time_info)

    monkeypatch.setattr(AudioIO, "_input_part", input_part)
    with virtual_audio_or_skip():
        conversation = ScriptedConversation([Reply(chirp(1.0))])

        def unplug(thread) -> None:
            time.sleep(0.5)
            unplugged.set()

        result = run_conversation(session_settings(tmp_path), factory_for(conversation),
                                  np.zeros(4 * TEST_RATE, np.float32), during=unplug)
    assert isinstance(result.error, DuplexError), result.error
    assert "audio device" in str(result.error)
    kinds = [e["type"] for e in read_log(tmp_path)]
    assert kinds[0] == "session_started" and "error" in kinds
    assert kinds[-2:] == ["session_ended", "session_closed"]


@pytest.mark.audio_devices
def test_stream_that_stops_on_its_own_is_reopened(tmp_path, monkeypatch):
    """PortAudio's full-duplex ALSA stream may stop after an underrun without any error: the
    session opens it again and the conversation goes on."""
    opened: list[AudioIO] = []
    real_open = AudioIO._open

    def track_open(self) -> None:
        real_open(self)
        opened.append(self)

    monkeypatch.setattr(AudioIO, "_open", track_open)
    with virtual_audio_or_skip():
        reply = chirp(1.0)
        conversation = ScriptedConversation([Reply(reply)])

        def stop_stream(thread) -> None:  # what PortAudio does after the failed poll
            time.sleep(0.3)
            opened[-1]._streams[0].abort()

        speech = espeak("Hello there, what is the weather like today?")
        script = np.concatenate([np.zeros(TEST_RATE // 2, np.float32), speech,
                                 np.zeros(3 * TEST_RATE, np.float32)])
        result = run_conversation(session_settings(tmp_path), factory_for(conversation), script,
                                  during=stop_stream)
    assert result.error is None
    assert [e["reopens"] for e in result.events("streams_reopened")] == [1]
    assert len(conversation.called("end_turn")) == 1
    assert_heard(result.recorded, reply)


def _bare_io(clock=time.monotonic) -> AudioIO:
    """An AudioIO without devices or streams: its bookkeeping alone."""
    io = AudioIO.__new__(AudioIO)
    io.error, io._streams, io._reopen_times, io.counters = None, [], [], StreamCounters()
    io._clock, io._quiet_since, io._last_check = clock, clock(), clock()
    io._in_callbacks = io._out_callbacks = 0
    io._seen_callbacks = (-1, -1)
    return io


def test_stream_that_keeps_stopping_is_taken_for_gone():
    io = _bare_io()
    io.close = lambda: None
    io.start = lambda: setattr(io, "error", None)  # a reopen that works, for a while
    for _ in range(REOPEN_LIMIT):
        io.error = STREAM_STOPPED
        assert io.check()
    io.error = STREAM_STOPPED
    with pytest.raises(DuplexError, match="stopped working"):
        io.check()
    assert io.counters.reopens == REOPEN_LIMIT


class _Status:
    input_overflow = output_underflow = False


def test_callback_error_is_reported_not_raised_into_portaudio():
    """A failing callback (what a vanished device looks like to us) surfaces through check()."""
    sd = pytest.importorskip("sounddevice")
    io = _bare_io()
    io._sd = sd

    def broken(*args):
        raise OSError("device disappeared")

    with pytest.raises(sd.CallbackAbort):
        io._guard(broken)
    with pytest.raises(DuplexError, match="stopped working"):
        io.check()


def test_ring_buffer_wraps_drops_and_pads_with_silence():
    ring = RingBuffer(8)
    assert ring.write(np.arange(6, dtype=np.float32)) == 6
    out = np.empty(4, np.float32)
    assert ring.read_into(out) == 4 and out.tolist() == [0, 1, 2, 3]
    assert ring.write(np.arange(10, 20, dtype=np.float32)) == 6  # 2 left + 6 free, 4 dropped
    out = np.empty(10, np.float32)
    assert ring.read_into(out) == 8
    assert out.tolist() == [4, 5, 10, 11, 12, 13, 14, 15, 0, 0]  # underrun: silence
    ring.write(np.ones(3, np.float32))
    assert ring.clear() == 3 and ring.available == 0
