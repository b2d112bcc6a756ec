"""The session's speculative start (turn.speculate_ms): at a pause the reply is started unplayed;
the end of turn at that pause plays it, the user going on takes it back.

Scripted audio, the level VAD and the scripted conversation of test_session.py; the engine's
exact rollback is tests/test_speculation.py's.
"""

from __future__ import annotations

import numpy as np
import pytest

from duplex_chat.audio.constants import SAMPLE_RATE
from duplex_chat.session import MODELED_FIRST_PACKET_S
from duplex_chat.session import events as ev

from .test_session import W, Harness, silence, speech

SPECULATE_MS = 160
END_OF_TURN_S = 0.6  # vad.end_of_turn_ms, default


class SpeculatingHarness(Harness):
    """Harness with speculation on; like replay, it tells the virtual player where a
    speculative reply was started, so the reply sounds when it would be ready."""

    def __init__(self, **kw):
        super().__init__(speculate_ms=SPECULATE_MS, **kw)
        self.session.emit = self._on_event

    def _on_event(self, event) -> None:
        self.events.append(event)
        if isinstance(event, ev.TurnCommitted) and event.speculated_from is not None:
            self.player.speculated_from(event.speculated_from, None)


def _fed(h) -> int:
    return sum(h.calls("feed"))


def test_a_pause_the_user_speaks_through_is_taken_back_and_the_last_one_used():
    """Speech, a 400 ms pause, more speech, the end: the first speculation is taken back (the
    conversation rolled back to where it was, then fed the held audio), the second plays."""
    h = SpeculatingHarness()
    h.hear(silence(0.5), speech(1.0), silence(0.4), speech(0.8, seed=1), silence(1.5))
    started = h.of(ev.SpeculationStarted)
    assert len(started) == 2
    first_pause = int(1.5 * SAMPLE_RATE)  # the first speech's end, to the VAD window
    assert abs(started[0].pause_sample - first_pause) < W
    assert started[0].sample - started[0].pause_sample == pytest.approx(
        SPECULATE_MS / 1000 * SAMPLE_RATE, abs=W)
    (taken,) = h.of(ev.SpeculationTakenBack)
    assert taken.turn == 0 and taken.compute_ms >= 0
    (committed,) = h.of(ev.TurnCommitted)
    assert committed.speculated_from == started[1].sample
    assert committed.end_sample == started[1].pause_sample
    # The conversation: checkpoint, reply to the first packet, rollback (back to what was fed
    # then), the held audio fed, the second speculation, and its reply played: no third end_turn.
    names = [name for _, name, _ in h.conversation.calls if name != "feed"]
    assert names == ["checkpoint", "end_turn", "rollback", "checkpoint", "end_turn"]
    (_, back_to), = h.conversation.called("rollback")
    (_, at_first), (_, at_second) = h.conversation.called("checkpoint")
    assert back_to == at_first
    # Everything up to the second speculation was fed, nothing after it.
    assert at_second == started[1].sample - committed.start_sample
    assert _fed(h) == at_second
    counts = h.session.speculations
    assert (counts.started, counts.used, counts.taken_back) == (2, 1, 1)
    h.hear(silence(2.5))
    assert h.of(ev.ReplyFinished)  # and it played


def test_the_speculated_reply_sounds_when_it_is_ready_not_after_the_decision():
    """With the reply ready (modelled: 80 ms after its speculative start) long before the end
    of turn is decided, it sounds at the decision: the latency is the decision alone."""
    h = SpeculatingHarness()
    h.hear(silence(0.5), speech(1.0), silence(2.0))
    (committed,) = h.of(ev.TurnCommitted)
    assert committed.speculated_from is not None
    (audible,) = h.of(ev.ReplyAudible)
    decided_ms = 1000 * (committed.sample - committed.end_sample) / SAMPLE_RATE
    assert decided_ms == pytest.approx(1000 * END_OF_TURN_S, abs=1000 * W / SAMPLE_RATE)
    assert audible.latency_ms == pytest.approx(decided_ms, abs=1000 / SAMPLE_RATE * 2)
    # without speculation the modelled first packet comes on top
    plain = Harness()
    plain.hear(silence(0.5), speech(1.0), silence(2.0))
    (late,) = plain.of(ev.ReplyAudible)
    assert late.latency_ms - audible.latency_ms == pytest.approx(
        1000 * MODELED_FIRST_PACKET_S, abs=1000 / SAMPLE_RATE * 2)


def test_short_gaps_between_words_start_nothing():
    h = SpeculatingHarness()
    gaps = [speech(0.3, seed=i) if i % 2 == 0 else silence(0.12) for i in range(7)]
    h.hear(silence(0.5), *gaps, silence(0.05))
    assert not h.of(ev.SpeculationStarted)
    h.hear(silence(1.0))
    assert len(h.of(ev.SpeculationStarted)) == 1 and len(h.of(ev.TurnCommitted)) == 1


def test_no_speculation_over_a_reply_that_does_not_give_way():
    """Barge-in off: speech over a playing reply is not a turn yet, so its pauses start
    nothing; once the reply has played out it becomes the next turn as usual."""
    h = SpeculatingHarness(environ={"SCA_AUDIO_BARGE_IN": "false"}, reply_s=3.0)
    h.hear(silence(0.5), speech(1.0), silence(0.8))  # turn 0, its reply starts
    assert len(h.of(ev.SpeculationStarted)) == 1
    h.hear(speech(0.5, seed=3), silence(0.3), speech(0.4, seed=4), silence(0.3))
    assert len(h.of(ev.SpeculationStarted)) == 1  # the pause over the reply started nothing
    h.hear(silence(3.0))
    assert len(h.of(ev.TurnCommitted)) == 2


def test_a_speculation_still_held_when_the_session_closes_is_dropped():
    h = SpeculatingHarness()
    h.hear(silence(0.5), speech(1.0), silence(0.3))
    assert len(h.of(ev.SpeculationStarted)) == 1 and not h.of(ev.TurnCommitted)
    h.session.close()
    (discarded,) = h.of(ev.TurnDiscarded)
    assert discarded.turn == 0
    assert not h.of(ev.ReplyStarted)


def test_threaded_the_take_back_comes_before_the_held_audio_is_fed():
    """On the worker thread too: commands stay in order, so the rollback is done before the
    audio held during the speculation reaches the conversation."""
    import time

    h = SpeculatingHarness(threaded=True)
    h.hear(silence(0.5), speech(1.0), silence(0.4), speech(0.8, seed=1), silence(1.5))
    deadline = time.monotonic() + 10
    while not h.conversation.called("rollback") or len(h.conversation.called("end_turn")) < 2:
        assert time.monotonic() < deadline
        h.session.hear(np.zeros(160, np.float32))
        time.sleep(0.01)
    order = [name for _, name, _ in h.conversation.calls]
    back = order.index("rollback")
    assert "feed" in order[back:]  # the held audio, after the rollback
    assert order[:back].count("end_turn") == 1
    h.session.close()


def test_a_speculate_ms_at_or_past_the_decision_is_one_clear_error():
    from duplex_chat.config import DuplexError, load_settings

    with pytest.raises(DuplexError, match="turn.speculate_ms .* must be shorter"):
        load_settings(overrides={"turn.speculate_ms": 600}, environ={})
    assert load_settings(overrides={"turn.speculate_ms": 0}, environ={}).turn.speculate_ms == 0


def test_a_pause_longer_than_the_history_loses_no_audio():
    """With a deciding silence near its 10 s maximum, a speculation is taken back before the
    session's History (8 s) would drop audio it holds back, and started again: the turn fed to
    the conversation is the same as without speculating, up to the last speculation."""
    env = {"SCA_VAD_END_OF_TURN_MS": "9800"}
    h = SpeculatingHarness(environ=env)
    h.hear(silence(0.5), speech(1.0), silence(9.0), speech(1.0, seed=1), silence(10.5))
    (committed,) = h.of(ev.TurnCommitted)
    last = h.of(ev.SpeculationStarted)[-1]
    assert committed.speculated_from == last.sample
    # every sample of the turn up to the last speculation was fed, once
    assert _fed(h) == last.sample - committed.start_sample
    assert len(h.of(ev.SpeculationTakenBack)) >= 2  # the long pause restarted it at least once


def test_a_new_voice_or_prompt_while_a_speculation_is_held_restarts_it():
    """The held reply was started under the old settings: it is taken back, the held audio fed,
    the change applied, and the turn speculated again under the new ones."""
    h = SpeculatingHarness()
    h.hear(silence(0.5), speech(1.0), silence(0.3))
    assert len(h.of(ev.SpeculationStarted)) == 1
    h.session.configure(voice="Chelsie")
    h.hear(silence(1.0))
    (committed,) = h.of(ev.TurnCommitted)
    names = [name for _, name, _ in h.conversation.calls if name != "feed"]
    assert names == ["checkpoint", "end_turn", "rollback", "configure", "checkpoint", "end_turn"]
    assert committed.speculated_from == h.of(ev.SpeculationStarted)[-1].sample
