"""replay's file loop (ReplaySession) on scripted audio and a scripted conversation: no model, no
espeak. The latency it reports is the session's, modelled unless asked to be measured."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from duplex_chat.audio.constants import SAMPLE_RATE, VAD_WINDOW_SAMPLES
from duplex_chat.cli.replay import JsonPrinter, Printer, ReplaySession, ReplyTimeline
from duplex_chat.config import load_settings
from duplex_chat.model.events import StageTimings
from duplex_chat.session import MODELED_FIRST_PACKET_S

from .fake_engine import Reply, ScriptedConversation, chirp
from .terminal_screen import Screen
from .test_session import LevelVad, silence, speech

COMPUTE_S = 0.25  # the scripted engine's first packet takes this long


def replay(parts, measured: bool, printer=None, reply_s: float = 1.0, environ=None,
           advance=None) -> ReplaySession:
    conversation = ScriptedConversation([Reply(chirp(reply_s))], first_packet_s=COMPUTE_S,
                                        realtime_factor=0.0)
    printer = printer or Printer(Console(file=io.StringIO()))
    session = ReplaySession(load_settings(environ=environ or {}), lambda: conversation, printer,
                            ReplyTimeline(None), vad_model=LevelVad(), measured_latency=measured)
    audio = np.concatenate(parts)
    for i in range(0, len(audio), 5120):  # replay's 320 ms chunks
        session.process(audio[i:i + 5120])
        if advance is not None:
            advance(len(audio[i:i + 5120]) / SAMPLE_RATE)
    session.finish()
    return session


@pytest.mark.parametrize("measured", [False, True], ids=["modelled", "measured"])
def test_latency_is_the_sessions_modelled_or_measured(measured):
    (record,) = replay([silence(0.5), speech(1.0), silence(2.0)], measured).records
    first_packet_s = COMPUTE_S if measured else MODELED_FIRST_PACKET_S
    assert record.latency_modelled is not measured
    assert record.reply_start_s - record.turn_decided_s == pytest.approx(
        first_packet_s, abs=0.05 if measured else 1e-4)
    assert record.heard_latency_s == pytest.approx(
        record.reply_start_s - record.end_of_speech_s, abs=1e-4)


def test_a_file_ending_right_after_the_speech_still_times_the_reply():
    """The reply is first looked at once the file has ended and it has played whole."""
    (record,) = replay([silence(0.5), speech(1.0), silence(0.1)], measured=False).records
    assert record.heard_latency_s == pytest.approx(
        record.turn_decided_s - record.end_of_speech_s + MODELED_FIRST_PACKET_S, abs=1e-4)
    assert record.heard_latency_s > 0


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
    assert "first packet 80 ms, modelled)" in out.getvalue()
    replay([silence(0.5), speech(1.0), silence(2.0)], True, JsonPrinter())
    assert '"first_packet_timing": "measured"' in capsys.readouterr().out


# ---- a reply that queues behind the previous one ------------------------------------------------
# Barge-in off: the second sentence is spoken while the first reply (QUEUE_REPLY_S long) plays, so
# it becomes the next turn only once that reply has played out. Its reply is ready the usual
# decision plus first packet after the end of speech, but heard only after the first one ends.
QUEUE_REPLY_S = 3.0
NO_BARGE_IN = {"SCA_AUDIO_BARGE_IN": "false"}
WINDOW_S = VAD_WINDOW_SAMPLES / SAMPLE_RATE  # the session decides on 32 ms windows


def queued(printer=None) -> list:
    parts = [silence(0.5), speech(1.0), silence(1.0), speech(1.0, seed=1), silence(5.0)]
    return replay(parts, False, printer, reply_s=QUEUE_REPLY_S, environ=NO_BARGE_IN).records


def test_a_queued_reply_is_ready_in_time_but_heard_after_the_previous_one():
    first, second = queued()
    assert first.queued_s == 0 and first.ready_latency_s == pytest.approx(first.heard_latency_s)
    first_end = first.reply_start_s + QUEUE_REPLY_S
    # The second turn was decided while the first reply played, and asked for once it ended.
    assert first.reply_start_s < second.turn_decided_s < first_end
    assert first_end <= second.reply_requested_s <= first_end + WINDOW_S
    assert second.first_packet_ready_s - second.reply_requested_s == pytest.approx(
        MODELED_FIRST_PACKET_S, abs=1e-4)
    # Ready: deciding (as for the first turn) plus the modelled first packet, not the queue.
    decided_s = second.turn_decided_s - second.end_of_speech_s
    assert decided_s == pytest.approx(first.turn_decided_s - first.end_of_speech_s, abs=WINDOW_S)
    assert second.ready_latency_s == pytest.approx(decided_s + MODELED_FIRST_PACKET_S, abs=1e-4)
    # Heard: the session's latency, which includes the wait.
    assert second.heard_latency_s == pytest.approx(
        second.reply_start_s - second.end_of_speech_s, abs=1e-4)
    assert second.heard_latency_s == pytest.approx(
        second.ready_latency_s + second.queued_s, abs=1 / SAMPLE_RATE)
    assert second.queued_s > 1.0


def test_a_queued_reply_in_json_and_in_words(capsys):
    queued(JsonPrinter())
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    second = [e for e in lines if e["event"] == "turn_finished"][1]
    timeline = [second[k] for k in ("end_of_speech_s", "turn_decided_s", "reply_requested_s",
                                    "first_packet_ready_s", "reply_start_s")]
    assert timeline == sorted(timeline) and second["reply_requested_s"] > second["turn_decided_s"]
    assert second["heard_latency_s"] - second["ready_latency_s"] == pytest.approx(
        second["reply_requested_s"] - second["turn_decided_s"], abs=1 / SAMPLE_RATE)
    out = io.StringIO()
    printer = Printer(Console(file=out, width=200))
    records = queued(printer)
    printer.summary(records, None, 1.0, None)
    text = out.getvalue()
    assert text.count("waited") == 1 and "for the previous reply to end" in text
    table = text[text.index("turns (file time"):]
    assert len([line for line in table.splitlines() if line.startswith("│")]) == 2


# ---- a long file on a terminal: the bar and the text share the screen ---------------------------
SCREEN_WIDTH = 120  # wide enough that no timing line wraps
LONG_S = 90.0  # past PROGRESS_MIN_S, so the bar shows


def test_on_a_terminal_the_progress_bar_never_covers_the_text(monkeypatch):
    """What a user sees on a terminal, replayed by a small emulator: every user line, every
    reply's whole text on its assistant line and every timing line survive, in order, and the
    bar (drawn many times meanwhile) is gone at the end. Before, the bar's redraw erased the
    "assistant" line and the reply's text was printed after the bar."""
    from duplex_chat.cli import replay as replay_module

    monkeypatch.setattr(replay_module, "REFRESH_S", 0.0)  # draw at every chance: the worst case
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=SCREEN_WIDTH, color_system=None)
    err = Console(file=io.StringIO(), force_terminal=True)
    printer = Printer(console, err)
    parts = [silence(0.5)]
    for k in range(3):
        parts += [speech(1.0, seed=k), silence(3.0)]
    parts.append(silence(LONG_S - 12.5))
    with printer.progress(LONG_S) as advance:
        session = replay(parts, False, printer, advance=advance)
        drawn = stream.getvalue().count("listening")
    assert drawn > 10  # the bar was redrawn all along, around the printed lines
    printer.summary(session.records, None, 1.0, None)
    screen = Screen(SCREEN_WIDTH)
    screen.feed(stream.getvalue())
    lines = screen.lines()
    assert not any("listening" in line for line in lines)  # the transient bar is gone
    assistant = [line for line in lines if line.startswith("assistant ")]
    assert assistant == ["assistant Hello there."] * 3
    users = [i for i, line in enumerate(lines) if line.startswith("user ")]
    assert len(users) == 3
    for i in users:
        assert lines[i + 1] == "assistant Hello there."
        assert lines[i + 2].startswith("  reply ready ")
        assert lines[i + 3].startswith("  heard from ")
    assert "3 turn(s)" in lines[-1]


def test_a_stop_mid_reply_keeps_what_was_written_on_the_terminal():
    console = Console(file=io.StringIO(), force_terminal=True, width=SCREEN_WIDTH)
    printer = Printer(console, Console(file=io.StringIO()))
    with printer.progress(LONG_S):
        from duplex_chat.cli.replay import TurnRecord

        printer.turn_started(TurnRecord(0, 0.0, 1.0, 1.6, 1.6))
        printer.text("half a rep", 0)
    screen = Screen(SCREEN_WIDTH)
    screen.feed(console.file.getvalue())
    assert screen.lines()[-1] == "assistant half a rep"


def test_lines_are_never_hard_wrapped_for_a_file_or_a_pipe():
    out = io.StringIO()
    replay([silence(0.5), speech(1.0), silence(2.0)], False, Printer(Console(file=out, width=40)))
    lines = out.getvalue().splitlines()
    ready = next(line for line in lines if line.startswith("  reply ready"))
    assert len(ready) > 40 and ready.endswith("modelled)")


def test_the_summary_counts_the_speculative_starts(capsys):
    """turn.speculate_ms on: the pause inside the turn starts a reply that is taken back, the
    end of turn plays the second; the summary says so, in words and in --json."""
    env = {"SCA_TURN_SPECULATE_MS": "160"}
    session = replay([silence(0.5), speech(1.0), silence(0.4), speech(0.8, seed=1),
                      silence(2.0)], False, environ=env)
    counts = session.session.speculations
    assert (counts.started, counts.used, counts.taken_back) == (2, 1, 1)
    text = io.StringIO()
    Printer(Console(file=text, width=200)).summary(session.records, None, 1.0, None, counts)
    assert "speculative starts: 2, 1 played, 1 taken back" in text.getvalue()
    capsys.readouterr()
    JsonPrinter(Console(file=io.StringIO())).summary(session.records, None, 1.0, None, counts)
    summary = json.loads(capsys.readouterr().out)
    assert summary["speculations"]["started"] == 2 and summary["speculations"]["used"] == 1
    # the speculated reply sounds at the decision: the modelled first packet was made in the pause
    (record,) = session.records
    assert record.reply_start_s == pytest.approx(record.turn_decided_s, abs=1e-3)
    assert record.end_of_speech_s < record.speculated_from_s < record.turn_decided_s
    lines = io.StringIO()
    Printer(Console(file=lines, width=200)).turn_finished(record)
    assert "first packet made during the pause, from 160 ms after the end of speech" in (
        lines.getvalue())
    assert "first packet 0 ms" not in lines.getvalue()
