"""The talk view, driven by a scripted session: every state renders, plain mode prints lines."""

from __future__ import annotations

import re

from rich.console import Console

from duplex_chat.cli.view import TalkState, TalkView


def snapshot(view: TalkView) -> str:
    console = Console(record=True, width=100, color_system=None)
    console.print(view.render())
    return console.export_text()


def test_each_state_renders_with_turns_latency_level_and_underruns():
    view = TalkView(Console(record=True, width=100), refresh_hz=10, plain=True)
    assert "listening" in snapshot(view)

    view.set_state(TalkState.USER_SPEAKING)
    view.set_level(-20.0)
    text = snapshot(view)
    assert "user speaking" in text and "-20.0 dB" in text and "█" in text

    view.user_turn(1.84)
    view.set_state(TalkState.THINKING)
    view.reply_started()
    view.reply_text("Sunny", 0)
    view.reply_text(" and warm.", 24_000)
    view.set_stages({"first_packet": 62.0, "prefill": 11.0, "thinker_ms_per_token": 4.6,
                     "reply_frames": 38.0, "new_stage": 1.5})
    text = snapshot(view)
    assert "thinking" in text and "you (1.8 s of speech)" in text
    assert "Sunny" not in text  # nothing played yet: words appear as they are spoken

    view.set_latency(812.0)
    view.set_state(TalkState.SPEAKING)
    view.reply_played(100)
    text = snapshot(view)
    assert "speaking" in text and "812 ms" in text and "assistant Sunny" in text
    assert "and warm." not in text
    # marks in ms, step costs per token, counts without a unit, unknown keys as they come
    assert "prefill 11 ms, first_packet 62 ms, thinker 4.60 ms/token, 38 frames, new_stage 1.5" in text

    view.reply_finished(interrupted=True)
    view.set_heard_text("Sunny and")
    view.set_state(TalkState.INTERRUPTED)
    view.set_underruns(3)
    text = snapshot(view)
    assert "interrupted" in text and "assistant Sunny and [interrupted]" in text
    assert re.search(r"underruns\s+3", text)


def test_plain_mode_prints_events_as_lines():
    console = Console(record=True, width=100, force_terminal=False)
    view = TalkView(console, plain=False)  # not a terminal: plain lines
    assert view.plain
    with view:
        view.set_state(TalkState.USER_SPEAKING)
        view.user_turn(2.0)
        view.reply_started()
        view.reply_text("Hi.", 0)
        view.reply_finished()
        view.set_latency(700.0)
    out = console.export_text()
    assert "[user speaking]" in out and "you: (2.0 s of speech)" in out
    assert "assistant: Hi." in out and "latency: 700 ms" in out


def test_live_mode_refreshes_on_a_terminal():
    console = Console(record=True, width=100, force_terminal=True, color_system=None)
    view = TalkView(console, refresh_hz=100, plain=False)
    with view:
        view.set_state(TalkState.SPEAKING)
        view.refresh(force=True)
    assert "speaking" in console.export_text()
