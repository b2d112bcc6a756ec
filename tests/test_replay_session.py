"""replay's file loop (ReplaySession) on scripted audio and a scripted conversation: no model, no
espeak. The latency it reports is the session's, modelled unless asked to be measured."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from duplex_chat.audio.constants import SAMPLE_RATE
from duplex_chat.cli.replay import JsonPrinter, Printer, ReplaySession, ReplyTimeline
from duplex_chat.config import load_settings
from duplex_chat.model.events import StageTimings
from duplex_chat.session import MODELED_FIRST_PACKET_S

from .fake_engine import Reply, ScriptedConversation, chirp
from .test_session import LevelVad, silence, speech

COMPUTE_S = 0.25  # the scripted engine's first packet takes this long


def replay(parts, measured: bool, printer=None) -> ReplaySession:
    conversation = ScriptedConversation([Reply(chirp(1.0))], first_packet_s=COMPUTE_S,
                                        realtime_factor=0.0)
    printer = printer or Printer(Console(file=io.StringIO()))
    session = ReplaySession(load_settings(environ={}), lambda: conversation, printer,
                            ReplyTimeline(None), vad_model=LevelVad(), measured_latency=measured)
    audio = np.concatenate(parts)
    for i in range(0, len(audio), 5120):  # replay's 320 ms chunks
        session.process(audio[i:i + 5120])
    session.finish()
    return session


@pytest.mark.parametrize("measured", [False, True], ids=["modelled", "measured"])
def test_latency_is_the_sessions_modelled_or_measured(measured):
    (record,) = replay([silence(0.5), speech(1.0), silence(2.0)], measured).records
    first_packet_s = COMPUTE_S if measured else MODELED_FIRST_PACKET_S
    assert record.latency_modelled is not measured
    assert record.reply_start_s - record.detected_s == pytest.approx(first_packet_s, abs=0.05 if measured else 1e-4)
    assert record.latency_s == pytest.approx(record.reply_start_s - record.end_s, abs=1e-4)


def test_a_file_ending_right_after_the_speech_still_times_the_reply():
    """The reply is first looked at once the file has ended and it has played whole."""
    (record,) = replay([silence(0.5), speech(1.0), silence(0.1)], measured=False).records
    assert record.latency_s == pytest.approx(record.detected_s - record.end_s + MODELED_FIRST_PACKET_S,
                                             abs=1e-4)
    assert record.latency_s > 0


def test_the_record_keeps_the_sessions_typed_stage_timings():
    (record,) = replay([silence(0.5), speech(1.0), silence(2.0)], measured=False).records
    assert record.stages == StageTimings(0, prefill=5.0, first_packet=COMPUTE_S * 1000.0)


def test_json_gives_the_reply_heard_in_seconds(capsys):
    replay([silence(0.5), speech(1.0), silence(2.0)], False, JsonPrinter())
    (finished,) = [e for e in map(json.loads, capsys.readouterr().out.splitlines())
                   if e["event"] == "turn_finished"]
    assert finished["reply_s"] == 1.0 and "reply_samples" not in finished  # chirp(1.0), whole
    assert finished["stages"] == {"prefill": 5.0, "first_packet": COMPUTE_S * 1000.0}


def test_printed_and_json_latency_say_how_they_were_got(capsys):
    out = io.StringIO()
    replay([silence(0.5), speech(1.0), silence(2.0)], False, Printer(Console(file=out, width=200)))
    assert "(modelled)" in out.getvalue()
    replay([silence(0.5), speech(1.0), silence(2.0)], True, JsonPrinter())
    assert '"latency": "measured"' in capsys.readouterr().out
