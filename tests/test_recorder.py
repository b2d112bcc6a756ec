"""talk's recording (`--record DIR`): one snake_case naming for the session's, the engine's and
the loop's log lines, with each turn's index and samples; and files that a `kill -9` leaves
readable."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import soundfile as sf

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE
from duplex_chat.cli.recorder import SessionRecorder, snake_case
from duplex_chat.model.events import AudioPacket, StageTimings, TurnFinished
from duplex_chat.session import events as ev

from .test_wav_writer import SOX, declared_samples, ramp, sox_samples


def test_every_log_line_is_snake_case_with_turn_fields(tmp_path):
    recorder = SessionRecorder(tmp_path, clock=lambda: 0.0)
    for event in (
        ev.UserSpeechStarted(9000, 8192, 3392, 3392),
        ev.UserSpeechEnded(30000, 24000),
        ev.TurnCommitted(33600, 0, 3392, 24000),
        ev.EngineEvent(33700, AudioPacket(0, np.zeros(1920, np.float32), 0, 1), 0, True),
        ev.EngineEvent(33700, StageTimings(0, first_packet=61.5), 1920, True),
        ev.ReplyAudible(35000, 0, 702.0, StageTimings(0, first_packet=61.5), 34900),
        ev.Interrupted(40000, 0, 7200, 39000),
        ev.HistoryCut(40010, 0, 7200, "one two", estimated=False),
        ev.EngineEvent(40020, TurnFinished(0, "one two", (1, 2), 7200, "eos"), 7200, False),
        ev.ReplyFinished(60000, 1, 48000),
        ev.BargeInLapsed(70000),
        ev.DeviceTrouble(71000, "streams_reopened", details={"reopens": 1}),
        ev.Interrupted(80000, 2, 100, 80000, cause="close"),
        ev.TurnDiscarded(80000, 3, 75000, 80000),
    ):
        recorder.session_event(event)
    recorder.close()
    log = [json.loads(line) for line in recorder.events_path.read_text().splitlines()]
    types = [line["type"] for line in log]
    assert types == ["speech_started", "user_turn_started", "speech_ended", "user_turn",
                     "audio_packet", "stage_timings", "reply_latency", "barge_in", "history_cut",
                     "turn_finished", "reply_finished", "barge_in_lapsed", "streams_reopened",
                     "reply_stopped", "user_turn_discarded", "session_closed"]
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", t) for t in types)
    by_type = {line["type"]: line for line in log}
    assert by_type["user_turn"] == {"t": 0.0, "type": "user_turn", "turn": 0,
                                    "start_sample": 3392, "end_sample": 24000, "duration_s": 1.288}
    assert by_type["reply_latency"]["stages"] == {"first_packet": 61.5}
    assert by_type["barge_in"]["turn"] == 0 and by_type["barge_in"]["heard_samples"] == 7200
    assert by_type["history_cut"]["text"] == "one two"
    assert by_type["audio_packet"]["samples"] == 1920
    assert by_type["reply_stopped"] == {"t": 0.0, "type": "reply_stopped", "turn": 2,
                                        "heard_samples": 100}


def test_snake_case():
    assert snake_case("TurnFinished") == "turn_finished"
    assert snake_case("HistoryTrimmed") == "history_trimmed"
    assert snake_case("Interrupted") == "interrupted"


# A recording process killed mid-session: it writes CHUNK_S of both sides every CHUNK_S of wall
# time (paced by sleep, so never more than a second of audio per second) and says after each
# chunk how much it has written; the test kills it with SIGKILL after KILL_AFTER_S of audio.
CHUNK_S = 0.05
KILL_AFTER_S = 2.5
CHILD_TIMEOUT_S = 60.0
CHILD = """
import sys, time
import numpy as np
from duplex_chat.cli.recorder import SessionRecorder
from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE

def ramp(n, start):
    return (((np.arange(start, start + n) % 2000) - 1000) / 1000.0).astype(np.float32)

recorder = SessionRecorder(sys.argv[1])
mic_n, out_n = round(SAMPLE_RATE * {chunk}), round(OUTPUT_SAMPLE_RATE * {chunk})
mic = out = 0
for k in range(100_000):
    recorder.audio(ramp(mic_n, mic), ramp(out_n, out))
    mic, out = mic + mic_n, out + out_n
    recorder.note("chunk", k=k)
    print(mic, out, flush=True)
    time.sleep({chunk})
"""


def test_a_recording_killed_mid_session_is_readable_up_to_its_last_flush(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(chunk=CHUNK_S), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    written = (0, 0)
    try:
        while written[0] < KILL_AFTER_S * SAMPLE_RATE and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, "the recording process ended by itself"
            written = tuple(map(int, line.split()))
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    chunks = round(written[0] / (CHUNK_S * SAMPLE_RATE))
    (mic,) = tmp_path.glob("*-mic.wav")
    (assistant,) = tmp_path.glob("*-assistant.wav")
    (events,) = tmp_path.glob("*-events.jsonl")
    for path, rate, total in ((mic, SAMPLE_RATE, written[0]),
                              (assistant, OUTPUT_SAMPLE_RATE, written[1])):
        chunk = round(CHUNK_S * rate)
        counted = declared_samples(path)  # what the header says, as readers take it
        if SOX is not None:  # the check; without sox, the header parsed above
            assert sox_samples(path) == counted
        # Flushed at most FLUSH_INTERVAL_S of audio ago; one more chunk may have been written
        # between the last line read and the kill.
        assert total - (1.0 * rate + chunk) <= counted <= total + chunk, (path.name, counted, total)
        assert counted % chunk == 0  # whole writes only
        back, file_rate = sf.read(str(path), dtype="float32")
        assert file_rate == rate
        np.testing.assert_array_equal(back, ramp(counted))
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert [line["k"] for line in lines if line["type"] == "chunk"][:chunks] == list(range(chunks))
