"""talk's JSONL log (`--record DIR`): one snake_case naming for the session's, the engine's and
the loop's lines, with each turn's index and samples."""

from __future__ import annotations

import json
import re

import numpy as np

from duplex_chat.cli.recorder import SessionRecorder, snake_case
from duplex_chat.model.events import AudioPacket, StageTimings, TurnFinished
from duplex_chat.session import events as ev


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
