"""The talk view, driven by scripted session events: every state renders, the state and the words
follow what the user hears, both meters, underruns only while a reply plays, stages in plain words
on one line, "stopped" with the partial reply kept, plain lines never wrapped, and what native
libraries print kept out of the live view."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from duplex_chat.cli.talk import TalkSession, native_log_path
from duplex_chat.cli.view import NativeStderrLog, TalkState, TalkView, stage_text
from duplex_chat.config import load_settings
from duplex_chat.model.events import AudioPacket, StageTimings, TextDelta
from duplex_chat.session import events as ev

from .fake_engine import ScriptedConversation
from .test_session import LevelVad

WIDTH = 100  # the narrowest terminal the live view must fit without wrapping a row
README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = ("mic: USB Audio Device @ 48000 Hz, speaker: USB Audio Device @ 48000 Hz, "
          "echo cancellation on. Ctrl-C ends.")  # as talk's loop writes it
LOUD = 0.3  # amplitude of a reply that sounds
SAMPLES_24K_PER_STEP = 240  # 10 ms of speaker audio per loop step


def snapshot(view: TalkView, width: int = WIDTH) -> str:
    console = Console(file=io.StringIO(), record=True, width=width, color_system=None)
    console.print(view.render())
    return console.export_text()


def row(text: str, label: str) -> str:
    """The value of the status row `label` in the last frame (one line, trailing blanks dropped)."""
    values = re.findall(rf"^{label}\s{{2,}}(.*)$", text, re.MULTILINE)
    assert values, f"no {label!r} row in\n{text}"
    return values[-1].rstrip()


# ---- the view alone -------------------------------------------------------------------------------
def test_each_state_renders_with_turns_latency_levels_and_underruns():
    view = TalkView(Console(record=True, width=WIDTH), refresh_hz=10, plain=True)
    assert row(snapshot(view), "state") == "listening"

    view.set_state(TalkState.USER_SPEAKING)
    view.set_level(-20.0)
    text = snapshot(view)
    assert row(text, "state") == "user speaking"
    assert "-20.0 dB" in row(text, "microphone") and "█" in row(text, "microphone")

    view.user_turn(1.84)
    view.set_state(TalkState.THINKING)
    view.reply_started()
    view.reply_text("Sunny", 0)
    view.reply_text(" and warm.", 24_000)
    view.reply_played(100)  # the player counts samples, but none is audible yet
    text = snapshot(view)
    assert row(text, "state") == "thinking" and "you (1.8 s of speech)" in text
    assert "Sunny" not in text  # no word shows before the reply is heard

    view.reply_audible(812.0)
    view.set_output_level(-18.0)
    view.reply_played(100)
    text = snapshot(view)
    assert row(text, "state") == "speaking" and row(text, "last latency") == "812 ms"
    assert "assistant Sunny" in text and "and warm." not in text
    assert "-18.0 dB" in row(text, "speaker")

    view.reply_finished(interrupted=True)
    view.set_heard_text("Sunny and")
    view.set_state(TalkState.INTERRUPTED)
    view.set_underruns(3)
    text = snapshot(view)
    assert row(text, "state") == "interrupted" and "assistant Sunny and [interrupted]" in text
    assert row(text, "underruns") == "3"


def test_a_reply_that_plays_without_a_sound_says_so():
    view = TalkView(Console(record=True, width=WIDTH), plain=True)
    view.reply_text("Hello there.", 0)
    view.reply_audible(700.0)
    view.set_output_level(-100.0)  # the speaker got digital silence
    view.reply_played(24_000)
    text = snapshot(view)
    assert row(text, "speaker").endswith("silent") and "█" not in row(text, "speaker")
    view.reply_finished()
    assert "assistant Hello there. [no sound]" in snapshot(view)

    view.reply_text("Loud enough.", 0)
    view.reply_audible(700.0)
    view.set_output_level(20 * np.log10(LOUD))
    view.reply_finished()
    text = snapshot(view)
    assert "assistant Loud enough." in text and "Loud enough. [no sound]" not in text


def test_meters_show_the_loudest_moment_since_the_last_frame():
    view = TalkView(Console(record=True, width=WIDTH), plain=True)
    for level in (-30.0, -100.0, -100.0):  # a word, then a pause shorter than a frame
        view.set_output_level(level)
    assert "-30.0 dB" in row(snapshot(view), "speaker")
    view.set_output_level(-100.0)  # a whole frame of silence
    assert row(snapshot(view), "speaker").endswith("silent")


def test_stages_are_plain_words_on_one_line_of_the_narrowest_terminal():
    stages = StageTimings(0, encode_tail=9.0, prefill=14.0, first_token=19.0, first_frame=24.0,
                          first_packet=99_999.0, total=999_999.0, thinker_ms_per_token=4.38,
                          talker_ms_per_frame=5.08, vocoder_ms_per_frame=0.8, listen_ms=31.0,
                          reply_tokens=19, reply_frames=38).stages
    view = TalkView(Console(record=True, width=WIDTH), plain=True)
    view.set_stages(stages)
    text = snapshot(view)
    model = row(text, "model")
    assert model == "first sound made 99999 ms after your turn ended; whole reply made in 1000.0 s"
    assert re.search(r"^model .*\n^microphone ", text, re.MULTILINE)  # not wrapped
    assert not re.search(r"[a-z]_[a-z]|ms/", model)  # no field names, no per-step costs
    assert stage_text({}) == "" and row(snapshot(TalkView(plain=True)), "model") == "—"


def test_stopping_keeps_the_partial_reply_and_says_stopped():
    console = Console(record=True, width=WIDTH, force_terminal=False)
    view = TalkView(console, plain=True)
    with view:
        view.user_turn(1.0)
        view.reply_text("First, preheat", 0)
        view.reply_text(" the oven.", 48_000)
        view.reply_audible(650.0)
        view.reply_played(24_000)
        view.set_state(TalkState.SPEAKING)
    out = console.export_text()
    assert "assistant: First, preheat [stopped]" in out and "the oven" not in out
    assert out.rstrip().endswith("[stopped]")
    assert row(snapshot(view), "state") == "stopped"


def test_plain_mode_prints_events_as_lines():
    console = Console(record=True, width=WIDTH, force_terminal=False)
    view = TalkView(console, plain=False)  # not a terminal: plain lines
    assert view.plain
    with view:
        view.set_state(TalkState.USER_SPEAKING)
        view.user_turn(2.0)
        view.reply_started()
        view.reply_text("Hi.", 0)
        view.reply_audible(700.0)
        view.set_stages({"first_packet": 27.0, "total": 3120.0})
        view.reply_finished()
    out = console.export_text()
    assert "[user speaking]" in out and "you: (2.0 s of speech)" in out
    assert "latency: 700 ms" in out and "[speaking]" in out and "assistant: Hi." in out
    assert "model: first sound made 27 ms after your turn ended; whole reply made in 3.1 s" in out


def test_plain_lines_piped_to_a_file_are_never_wrapped():
    file = io.StringIO()
    view = TalkView(Console(file=file, width=40), plain=True)  # a pipe: Rich assumes 80 columns or less
    long_reply = "Tomorrow in Paris it will be sunny, around twenty degrees, with a light wind."
    view.info("mic: USB Audio Device @ 48000 Hz, speaker: USB Audio Device @ 48000 Hz, echo on.")
    view.reply_text(long_reply, 0)
    view.reply_finished()
    lines = file.getvalue().splitlines()
    assert lines == ["mic: USB Audio Device @ 48000 Hz, speaker: USB Audio Device @ 48000 Hz, echo on.",
                     f"assistant: {long_reply}"]


def test_live_mode_refreshes_on_a_terminal_and_ends_stopped():
    console = Console(record=True, width=WIDTH, force_terminal=True, color_system=None)
    view = TalkView(console, refresh_hz=100, plain=False)
    with view:
        view.set_state(TalkState.SPEAKING)
        view.refresh(force=True)
        assert "speaking" in console.export_text(clear=False)
    assert row(console.export_text(), "state") == "stopped"  # the frame left on screen


# ---- native stderr ------------------------------------------------------------------------------
def test_native_stderr_goes_to_the_log_while_the_live_view_runs(tmp_path, capfd):
    log = tmp_path / "state" / "talk-stderr.log"
    console = Console(record=True, width=WIDTH, force_terminal=True, color_system=None)
    with TalkView(console, refresh_hz=100, plain=False, native_log=log) as view:
        os.write(2, b"ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred\n")  # as C code does
        print("a Python warning", file=sys.stderr)
        view.refresh(force=True)
    os.write(2, b"after the session\n")

    assert "underrun occurred" in log.read_text()
    err = capfd.readouterr().err
    assert "underrun occurred" not in err and "after the session" in err  # fd 2 is back
    shown = console.export_text()
    assert "underrun occurred" not in shown and "a Python warning" in shown + err
    assert f"Audio libraries printed 1 line(s) during the session; they are in {log}." in shown


def test_plain_mode_leaves_stderr_alone(tmp_path, capfd):
    log = tmp_path / "talk-stderr.log"
    with TalkView(Console(file=io.StringIO()), plain=True, native_log=log):
        os.write(2, b"underrun occurred\n")
    assert "underrun occurred" in capfd.readouterr().err and not log.exists()


def test_an_unwritable_log_leaves_stderr_as_it_was(tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with NativeStderrLog(blocker / "talk-stderr.log") as redirect:  # its folder cannot be made
        os.write(2, b"still here\n")
    assert "still here" in capfd.readouterr().err and redirect.lines == 0


def test_the_native_log_sits_beside_the_recording_or_in_the_state_directory(tmp_path, monkeypatch):
    recorder = SimpleNamespace(events_path=tmp_path / "20250101-120000-events.jsonl")
    assert native_log_path(recorder) == tmp_path / "20250101-120000-stderr.log"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert native_log_path(None) == tmp_path / "state" / "duplex-chat" / "talk-stderr.log"


# ---- talk's adapter: scripted session events in, the view out ------------------------------------
class FakeIO:
    """The parts of AudioIO that TalkSession touches; the test sets what the devices did."""

    def __init__(self) -> None:
        self.counters = SimpleNamespace(underruns=0, output_underflows=0)
        self.latency_s = (0.01, 0.05)
        self.output_free_s, self.queued_output_s = 10.0, 0.0
        self.played_reply = 0  # reply samples (24 kHz) audible so far
        self.speaker = np.zeros(SAMPLES_24K_PER_STEP, np.float32)  # what plays in the next step

    def read_input(self):
        from duplex_chat.audio.stream import InputChunk

        mic = np.zeros(160, np.float32)
        return InputChunk(mic, mic, np.zeros(160, np.float32), self.speaker.copy())

    def begin_reply(self) -> None: ...

    def write_output(self, samples) -> int:
        return 0

    def end_reply(self) -> None: ...

    def flush(self) -> int:
        return self.played_reply

    def reply_played_samples(self) -> int:
        return self.played_reply


class StubSession:
    """What the adapter asks of the `Session`, set by the test (its events come from the test)."""

    def __init__(self) -> None:
        self.replying = False
        self.reply_stages: StageTimings | None = None
        self.input_latency_s = 0.0

    def hear(self, mic, played) -> None: ...

    def close(self) -> None: ...


@pytest.fixture
def talk():
    settings = load_settings(overrides={"audio.echo_cancellation": False}, environ={})
    device = FakeIO()
    view = TalkView(Console(record=True, width=WIDTH, force_terminal=False), plain=True)
    session = TalkSession(settings, ScriptedConversation([]), device, view, None, LevelVad())
    session.session = StubSession()
    return SimpleNamespace(session=session, io=device, view=view, console=view.console)


def engine(event, audio_at: int = 0) -> ev.EngineEvent:
    return ev.EngineEvent(0, event, audio_at, True)


def start_reply(talk) -> None:
    """The user's turn ends and the reply's first packet is written (not audible yet)."""
    talk.session.on_event(ev.TurnCommitted(0, 0, 0, 16_000))
    talk.session.on_event(ev.ReplyStarted(0, 0))
    talk.session.on_event(engine(TextDelta(0, "Sure. First,", (1,))))
    talk.session.on_event(engine(TextDelta(0, " preheat the oven.", (2,)), audio_at=24_000))
    talk.session.on_event(engine(AudioPacket(0, np.zeros(1920, np.float32), 0, 1)))


def test_the_state_and_words_follow_what_the_user_hears(talk):
    start_reply(talk)
    talk.session.session.replying = True
    talk.session.step()
    assert talk.view.state is TalkState.THINKING and "Sure" not in snapshot(talk.view)

    talk.session.on_event(ev.ReplyAudible(0, 0, 702.0))
    talk.io.played_reply = 10
    talk.session.step()
    text = snapshot(talk.view)
    assert row(text, "state") == "speaking" and "assistant Sure. First," in text
    assert "preheat" not in text and row(text, "last latency") == "702 ms"


def test_the_speaker_meter_shows_what_is_played(talk):
    talk.io.speaker[:] = LOUD
    talk.session.step()
    assert f"{20 * np.log10(LOUD):5.1f} dB" in row(snapshot(talk.view), "speaker")
    talk.io.speaker[:] = 0.0
    talk.session.step()
    assert row(snapshot(talk.view), "speaker").endswith("silent")


def test_underruns_count_only_while_a_reply_plays(talk):
    talk.io.counters.output_underflows = 5  # PortAudio's flags at start-up: nobody heard them
    talk.session.step()
    assert talk.view.underruns == 0

    start_reply(talk)
    talk.io.counters.output_underflows += 1
    talk.io.counters.underruns += 2
    talk.session.step()
    assert talk.view.underruns == 3

    talk.session.on_event(ev.ReplyFinished(0, 0, 48_000))
    talk.io.counters.output_underflows += 4  # idle again
    talk.session.step()
    assert row(snapshot(talk.view), "underruns") == "3"


def test_ctrl_c_keeps_the_heard_words_and_says_stopped(talk):
    start_reply(talk)
    talk.session.on_event(ev.ReplyAudible(0, 0, 702.0))
    talk.session.on_event(ev.Interrupted(0, 0, 30_000, 0, cause="close"))  # Session.close()
    with talk.view:
        pass
    out = talk.console.export_text()
    assert "assistant: Sure. First, preheat the oven. [stopped]" in out
    assert row(snapshot(talk.view), "state") == "stopped"
    assert "[speaking]" in out and "[interrupted]" not in out


def test_a_barge_in_says_interrupted_and_keeps_what_was_heard(talk):
    start_reply(talk)
    talk.session.on_event(ev.ReplyAudible(0, 0, 702.0))
    talk.session.on_event(ev.Interrupted(0, 0, 100, 0))
    talk.session.on_event(ev.HistoryCut(0, 0, 100, "Sure."))
    text = snapshot(talk.view)
    assert row(text, "state") == "interrupted" and "assistant Sure. [interrupted]" in text


def test_stage_timings_reach_the_view_as_the_session_sums_them(talk):
    start_reply(talk)
    talk.session.session.reply_stages = StageTimings(0, first_packet=27.0, total=3120.0)
    talk.session.on_event(engine(StageTimings(0, total=3120.0)))
    assert row(snapshot(talk.view), "model") == ("first sound made 27 ms after your turn ended; "
                                                  "whole reply made in 3.1 s")


# ---- the README's pictures of the view ------------------------------------------------------------
def say(view: TalkView, duration_s: float, reply: str, latency_ms: float = 702.0) -> None:
    """One exchange as talk's adapter drives the view: the user's turn, then the reply audible."""
    view.set_state(TalkState.USER_SPEAKING)
    view.user_turn(duration_s)
    view.set_state(TalkState.THINKING)
    view.reply_started()
    view.reply_text(reply, 0)
    view.reply_audible(latency_ms)
    view.set_output_level(-24.0)
    view.reply_played(1)


def readme_live_scene(view: TalkView) -> None:
    view.info(HEADER)
    say(view, 2.3, "Tomorrow in Paris it will be sunny, around twenty degrees.")
    view.reply_finished()
    view.set_state(TalkState.LISTENING)
    say(view, 1.6, "Sure. First, preheat the oven to two hundred degrees.")
    view.reply_finished(interrupted=True)
    view.set_heard_text("Sure. First, preheat the oven")
    view.set_state(TalkState.INTERRUPTED)
    say(view, 1.1, "Two hundred degrees.")
    view.set_stages({"first_packet": 27.0, "total": 3120.0})
    view.set_level(-31.5)


def readme_plain_scene(view: TalkView) -> None:
    """A plain session ended by Ctrl-C mid-reply (talk's loop says "Stopped." first)."""
    view.info(HEADER)
    say(view, 1.6, "Sure. First, preheat the oven to two hundred degrees.")
    view.info("Stopped.")
    view.reply_finished(interrupted=True, heard_text="Sure. First, preheat the oven",
                        ending="stopped")


def readme_block(after: str) -> str:
    """The README's first code block after the sentence `after`."""
    text = README.read_text()
    start = text.index(after)
    block = re.search(r"```\n(.*?)```", text[start:], re.DOTALL)
    assert block, f"no code block after {after!r} in the README"
    return block.group(1)


def test_the_readme_shows_the_live_view_as_it_renders():
    view = TalkView(Console(file=io.StringIO()), plain=True)
    readme_live_scene(view)
    frame = "\n".join(line.rstrip() for line in snapshot(view).splitlines())
    assert readme_block("Below is the live view").strip() == frame.strip()


def test_the_readme_shows_the_plain_lines_as_printed():
    file = io.StringIO()
    with TalkView(Console(file=file, width=40), plain=True) as view:
        readme_plain_scene(view)
    assert readme_block("With `--plain`").strip() == file.getvalue().strip()


def test_skipped_input_and_a_swapped_device_are_told_in_the_view(talk):
    """The device trouble a user should know of reaches the screen in its own words; trouble
    without a message (counters only) stays in the log."""
    skipped = "The microphone's audio arrived 1.2 s late (this program was held up), so 1.1 s of it was skipped."
    swapped = "The microphone is now the speaker's own monitor."
    talk.session.on_event(ev.DeviceTrouble(0, "input_skipped", skipped, {"skipped_samples": 1}))
    talk.session.on_event(ev.DeviceTrouble(0, "device_changed", swapped, {"input": 1}))
    talk.session.on_event(ev.DeviceTrouble(0, "input_skipped", "", {"skipped_samples": 1}))
    text = talk.console.export_text()
    assert skipped in text and swapped in text
