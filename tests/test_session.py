"""The session on scripted audio and a scripted conversation: no devices, no model, no wall clock.

Speech is noise at speech level and the VAD a level detector (LevelVad), so every decision lands
on a known 32 ms window. Replies play on the session's own clock (VirtualPlayer), so a reply's
timing follows the audio fed, not the machine.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE, VAD_WINDOW_SAMPLES
from duplex_chat.config import load_settings
from duplex_chat.model.events import Interrupted as EngineInterrupted
from duplex_chat.model.events import StageTimings, TurnFinished
from duplex_chat.session import MODELED_FIRST_PACKET_S, Progress, Session, VirtualPlayer
from duplex_chat.session import events as ev

from .fake_engine import Reply, ScriptedConversation, chirp

W = VAD_WINDOW_SAMPLES
PRE_ROLL = int(0.3 * SAMPLE_RATE)  # [vad] pre_roll_ms, default
REPLY_S = 2.0
WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")


class LevelVad:
    """A VAD stand-in: speech wherever a window's RMS exceeds 0.01."""

    def prob(self, window: np.ndarray) -> float:
        return 0.9 if np.sqrt(np.mean(np.square(window))) > 0.01 else 0.0

    def reset(self) -> None:
        pass


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


class Harness:
    """A session with a scripted conversation, a virtual player and a list of its events."""

    def __init__(self, threaded: bool = False, player_class=VirtualPlayer, echo=None, realtime_factor=0.0,
                 reply_s: float = REPLY_S, environ: dict | None = None, vad=LevelVad,
                 conversation_class=ScriptedConversation, speculate_ms: int = 0):
        # speculative starts off unless asked for: these tests count feeds to the decision
        settings = load_settings(environ=environ or {},
                                 overrides={"turn.speculate_ms": speculate_ms})
        self.conversation = conversation_class([Reply(chirp(reply_s), WORDS)], first_packet_s=0.0,
                                               realtime_factor=realtime_factor)
        self.events: list = []
        self.player = player_class(lambda: self.session.now)
        self.session = Session(settings, self.conversation, self.player, self.events.append,
                               vad_model=vad(), echo=echo,
                               raw_vad=vad() if echo else None, threaded=threaded)
        self.session.start()

    def hear(self, *parts: np.ndarray, played: np.ndarray | None = None, chunk: int = 160) -> None:
        """Feed in 10 ms chunks, as talk's loop does."""
        mic = np.concatenate(parts)
        for i in range(0, len(mic), chunk):
            self.session.hear(mic[i:i + chunk], None if played is None else played[i:i + chunk])

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def calls(self, name: str) -> list:
        return [a for _, a in self.conversation.called(name)]


def test_onset_end_of_turn_and_pre_roll():
    h = Harness()
    h.hear(silence(1.0), speech(1.0), silence(1.0))
    (started,) = h.of(ev.UserSpeechStarted)
    onset = SAMPLE_RATE // W * W  # the first window holding speech
    assert started.onset_sample == onset and started.turn_start == onset - PRE_ROLL
    (committed,) = h.of(ev.TurnCommitted)
    assert committed.start_sample == onset - PRE_ROLL  # the pre-roll is part of the turn
    assert abs(committed.end_sample - 2 * SAMPLE_RATE) < W
    assert committed.sample - committed.end_sample == pytest.approx(0.6 * SAMPLE_RATE, abs=W)
    # Everything from the pre-roll to the decision was fed, then the reply asked for.
    assert h.calls("end_turn") == [committed.sample - committed.start_sample]
    assert sum(h.calls("feed")) == committed.sample - committed.start_sample


def test_two_turns_back_to_back_with_their_latency():
    h = Harness()
    h.hear(silence(0.5), speech(1.0), silence(3.0), speech(1.0, seed=1), silence(3.0))
    committed = h.of(ev.TurnCommitted)
    assert [c.turn for c in committed] == [0, 1]
    assert [f.turn for f in h.of(ev.ReplyFinished)] == [0, 1]
    assert all(f.heard_samples == REPLY_S * OUTPUT_SAMPLE_RATE for f in h.of(ev.ReplyFinished))
    for c, audible in zip(committed, h.of(ev.ReplyAudible)):
        expected_ms = 1000 * ((c.sample - c.end_sample) / SAMPLE_RATE + MODELED_FIRST_PACKET_S)
        assert audible.latency_ms == pytest.approx(expected_ms, abs=0.1)
    assert h.of(ev.Interrupted) == [] and h.calls("truncate") == []


def test_barge_in_after_the_reply_finished_generating_cuts_history_to_what_was_heard():
    """The inline worker generates the whole reply at once (the engine is faster than real
    time): cancel is too late, truncate cuts the history."""
    h = Harness()
    h.hear(silence(0.5), speech(1.0), silence(1.0))
    assert h.of(ev.ReplyAudible)
    assert any(isinstance(e.event, TurnFinished) for e in h.of(ev.EngineEvent))
    h.hear(speech(1.0, seed=1), silence(1.0))
    (interrupted,) = h.of(ev.Interrupted)
    start = h.of(ev.TurnCommitted)[0].sample * 3 // 2 + MODELED_FIRST_PACKET_S * OUTPUT_SAMPLE_RATE
    assert interrupted.heard_samples == interrupted.sample * 3 // 2 - start
    assert interrupted.sample - interrupted.onset_sample == 2 * W  # the 64 ms fast path
    assert h.calls("cancel") == [interrupted.heard_samples]
    assert h.calls("truncate") == [interrupted.heard_samples]
    (cut,) = h.of(ev.HistoryCut)
    kept = -(-len(WORDS) * interrupted.heard_samples // int(REPLY_S * OUTPUT_SAMPLE_RATE))
    assert cut.text == " ".join(WORDS[:kept]) and kept < len(WORDS)
    # The truncate came before any audio of the interrupting turn was fed.
    calls = [name for _, name, _ in h.conversation.calls]
    assert calls.index("truncate") < len(calls) - 1 - calls[::-1].index("feed")
    assert calls[calls.index("truncate") - 1] == "cancel"
    # The new turn keeps the speech that interrupted, with its pre-roll.
    second = h.of(ev.TurnCommitted)[1]
    assert second.start_sample == interrupted.onset_sample - PRE_ROLL
    assert h.of(ev.ReplyFinished) == []  # the first reply never finished; the second still plays


def test_a_cough_shorter_than_the_barge_in_window_does_not_interrupt():
    h = Harness()
    h.hear(silence(0.5), speech(1.0), silence(1.0))
    align = np.zeros(-h.session.now % W, np.float32)  # the cough fills exactly one VAD window
    h.hear(align, speech(W / SAMPLE_RATE, seed=2), silence(2.0))  # 32 ms
    assert h.of(ev.Interrupted) == [] and len(h.of(ev.ReplyFinished)) == 1


def test_a_longer_cough_interrupts_then_the_session_listens_again():
    h = Harness()
    h.hear(silence(0.5), speech(1.0), silence(1.0))
    h.hear(speech(3 * W / SAMPLE_RATE, seed=2), silence(2.0))  # 96 ms: over the window
    assert len(h.of(ev.Interrupted)) == 1 and len(h.of(ev.BargeInLapsed)) == 1
    assert len(h.of(ev.TurnCommitted)) == 1  # no turn: shorter than min_speech_ms


class PassThroughEcho:
    """An echo canceller that has not learnt the echo path yet: it leaves the mic as it is."""

    def process(self, mic: np.ndarray, played: np.ndarray) -> np.ndarray:
        return mic


@pytest.mark.parametrize("chunk", [160, 5120], ids=["10ms", "320ms"])
@pytest.mark.parametrize("user_speaks", [False, True], ids=["echo-only", "user"])
def test_barge_in_with_echo_checks(user_speaks, chunk):
    """With echo cancellation on, the reply's own echo (a delayed copy of what played) never
    interrupts it, while the user's voice over it does, and becomes the next turn. The echo
    counts as speech for the turn policy (the canceller has not learnt the path), so the policy
    is mid-speech when the user's voice comes in. In 320 ms chunks (replay's) the checks judge
    each window, not audio later in the chunk: no barge-in before the user spoke."""
    h = Harness(echo=PassThroughEcho())
    h.hear(silence(0.5), speech(1.0), silence(0.8), chunk=chunk)
    played = np.concatenate([speech(1.4, seed=3), silence(0.1)])  # what the speaker plays (16 kHz)
    delay = int(0.1 * SAMPLE_RATE)
    mic = 0.5 * np.concatenate([np.zeros(delay, np.float32), played[:-delay]])  # its whole echo
    user = (h.session.now + int(0.5 * SAMPLE_RATE), h.session.now + int(1.0 * SAMPLE_RATE))
    if user_speaks:
        mic[int(0.5 * SAMPLE_RATE):int(1.0 * SAMPLE_RATE)] += speech(0.5, seed=4)
    h.hear(mic.astype(np.float32), played=played, chunk=chunk)
    h.hear(silence(3.0), played=silence(3.0), chunk=chunk)  # the reply's end played, then nothing
    assert bool(h.of(ev.Interrupted)) == user_speaks
    if user_speaks:
        (interrupted,) = h.of(ev.Interrupted)
        assert user[0] <= interrupted.sample <= user[0] + 4 * W
        assert user[0] - 2 * W <= interrupted.onset_sample <= user[0] + W  # not where the echo began
        second = h.of(ev.TurnCommitted)[1]  # the user's words are a turn
        assert second.start_sample <= user[0] - PRE_ROLL and second.end_sample >= user[1]


class TwoLevelVad:
    """Loud windows 0.9, soft ones 0.4: between neg_threshold (0.35) and threshold (0.5), so
    they keep speech going but do not count for the barge-in's run."""

    def prob(self, window: np.ndarray) -> float:
        rms = float(np.sqrt(np.mean(np.square(window))))
        return 0.9 if rms > 0.05 else (0.4 if rms > 0.01 else 0.0)

    def reset(self) -> None:
        pass


def test_barge_in_after_the_policy_confirmed_the_speech_keeps_it_as_a_turn():
    """Speech of alternating loud and soft windows is confirmed by the policy (hysteresis)
    before two loud windows in a row barge in: the turn opens at the barge-in, from its onset."""
    h = Harness(vad=TwoLevelVad)
    h.hear(silence(0.5), speech(1.0), silence(1.0))
    h.hear(np.zeros(-h.session.now % W, np.float32))
    onset = h.session.now
    alternating = [speech(W / SAMPLE_RATE, seed=k) * (1.0 if k % 2 == 0 else 0.3) for k in range(12)]
    h.hear(*alternating, speech(0.5, seed=9))
    end = h.session.now
    h.hear(silence(2.0))
    assert h.of(ev.UserSpeechStarted)[1].turn_start is None  # confirmed over the reply
    (interrupted,) = h.of(ev.Interrupted)
    assert interrupted.onset_sample > onset + 4 * W
    second = h.of(ev.TurnCommitted)[1]
    assert second.start_sample == onset - PRE_ROLL and abs(second.end_sample - end) <= W


def test_speech_over_a_reply_that_does_not_give_way_is_the_next_turn():
    """Barge-in off: the reply plays on over the user's words, which become the next turn once
    it has played out (nothing the user said is lost)."""
    h = Harness(environ={"SCA_AUDIO_BARGE_IN": "false"})
    h.hear(silence(0.5), speech(1.0), silence(1.0))
    onset = h.session.now
    h.hear(speech(1.0, seed=1), silence(3.0))
    assert h.of(ev.Interrupted) == []
    first_done = h.of(ev.ReplyFinished)[0]
    second = h.of(ev.TurnCommitted)[1]
    assert second.sample == first_done.sample  # asked for as soon as the reply played out
    assert second.start_sample <= onset - PRE_ROLL // 2 and abs(second.end_sample - onset - SAMPLE_RATE) < W
    assert h.calls("end_turn")[1] == second.sample - second.start_sample  # all of it was fed


def test_two_utterances_over_a_reply_that_does_not_give_way_are_one_turn():
    """Barge-in off, the user says two things while one reply plays: both are the next turn
    (the second used to replace the first, which was never heard by the model)."""
    h = Harness(environ={"SCA_AUDIO_BARGE_IN": "false"}, reply_s=4.0)
    h.hear(silence(0.5), speech(1.0), silence(0.9))  # the reply starts playing
    first = h.session.now
    h.hear(speech(0.5, seed=1), silence(0.8), speech(0.5, seed=2), silence(4.0))
    assert h.of(ev.Interrupted) == []
    second = h.of(ev.TurnCommitted)[1]
    assert second.start_sample <= first - PRE_ROLL // 2  # from the first utterance's pre-roll
    assert h.calls("end_turn")[1] == second.sample - second.start_sample  # all of it was fed


def test_speech_still_going_when_the_reply_ends_continues_as_a_turn():
    h = Harness(environ={"SCA_AUDIO_BARGE_IN": "false"})
    h.hear(silence(0.5), speech(1.0), silence(1.0))
    onset = h.session.now
    h.hear(speech(3.0, seed=1))  # the reply (2 s) ends while the user still talks
    assert h.of(ev.ReplyFinished) and len(h.of(ev.TurnCommitted)) == 1
    h.hear(silence(1.0))
    second = h.of(ev.TurnCommitted)[1]
    assert second.start_sample <= onset and abs(second.end_sample - onset - 3 * SAMPLE_RATE) < W


class SlowPrefill(ScriptedConversation):
    """Each feed takes longer than the 10 ms of audio it holds: the worker falls behind."""

    def feed(self, samples: np.ndarray) -> None:
        time.sleep(0.015)
        super().feed(samples)


def test_a_barge_in_before_the_worker_reaches_end_turn_still_stops_the_reply():
    """The session's cancel comes while the worker is still feeding its backlog; the reply,
    once it starts, is stopped all the same (the engine clears a cancel when a reply starts)."""
    h = Harness(threaded=True, realtime_factor=1.0, reply_s=3.0, conversation_class=SlowPrefill)
    h.hear(silence(0.5), speech(1.0), silence(0.8))
    h.hear(speech(0.2, seed=1))  # the user goes on at once: barge-in
    assert h.of(ev.Interrupted) and h.calls("end_turn") == []  # still feeding

    def ended():
        h.hear(silence(0.01))
        return [e.event for e in h.of(ev.EngineEvent) if isinstance(e.event, (EngineInterrupted, TurnFinished))]

    _wait(ended, 20)
    assert [type(e) for e in ended()] == [EngineInterrupted]
    assert h.player.samples == 0  # nothing of it was played
    h.session.close()


def test_cancel_while_generating_passes_the_heard_samples():
    """A threaded worker still generating at real time: the barge-in cancels it with what was
    heard, and the engine's own Interrupted follows."""
    h = Harness(threaded=True, realtime_factor=1.0, reply_s=5.0)
    h.hear(silence(0.5), speech(1.0), silence(0.8))
    _wait(lambda: h.player.samples > 0)  # the first packet is out
    h.hear(silence(0.5), speech(0.3, seed=1))
    (interrupted,) = h.of(ev.Interrupted)
    assert interrupted.heard_samples > 0
    assert h.calls("cancel") == [interrupted.heard_samples]
    _wait(lambda: (h.hear(silence(0.01)), h.of(ev.HistoryCut))[1])
    engine = [e.event for e in h.of(ev.EngineEvent) if isinstance(e.event, EngineInterrupted)]
    assert [e.heard_samples for e in engine] == [interrupted.heard_samples]
    assert h.calls("truncate") == [interrupted.heard_samples]
    h.session.close()


class LatePlayer(VirtualPlayer):
    """A player that learns what was heard only after the fact (a browser): `stop` says nothing,
    `report` delivers it later."""

    reported: Progress | None = None

    def stop(self):
        super().stop()
        return None

    def progress(self) -> Progress:
        if self.stopped:
            return self.reported or Progress(self.reply, 0, False)
        return super().progress()


def test_heard_reported_late():
    h = Harness(player_class=LatePlayer)
    h.hear(silence(0.5), speech(1.0), silence(1.0))
    h.hear(speech(0.5, seed=1))
    (interrupted,) = h.of(ev.Interrupted)
    assert interrupted.heard_samples is None
    fed_before = len(h.calls("feed"))
    h.hear(speech(0.3, seed=1))
    # Nothing of the new turn is fed, nor is history cut, until the player reports.
    assert len(h.calls("feed")) == fed_before and h.calls("truncate") == []
    h.player.reported = Progress(h.player.reply, 12_345, True)
    h.hear(speech(0.2, seed=1), silence(1.0))
    assert h.calls("truncate") == [12_345]
    assert h.of(ev.HistoryCut)[0].heard_samples == 12_345
    calls = [name for _, name, _ in h.conversation.calls]
    assert "feed" in calls[calls.index("truncate"):]  # then the new turn was fed, whole
    second = h.of(ev.TurnCommitted)[1]
    assert h.calls("end_turn")[1] == second.sample - second.start_sample


class SteppedPlayer(VirtualPlayer):
    """A player that reports what was heard only every 0.5 s (a browser), and after a stop
    never again."""

    def stop(self):
        self.true_heard = super().stop()
        return None

    def progress(self) -> Progress:
        if self.stopped:
            return Progress(self.reply, self.reported, False)
        if self.clock() // (SAMPLE_RATE // 2) != getattr(self, "_step", None):
            self._step, self.reported = self.clock() // (SAMPLE_RATE // 2), super().progress().heard
        return Progress(self.reply, self.reported, False)


@pytest.mark.parametrize("commit_first", [False, True], ids=["timeout", "turn-ended"])
def test_heard_never_reported_is_estimated_from_the_last_report(commit_first):
    """The report never comes: after HEARD_TIMEOUT_S, or when the interrupting turn ends first,
    the history is cut where the reply had got to (last report plus the time since), marked as
    an estimate, and before the new turn's audio is fed."""
    h = Harness(player_class=SteppedPlayer)
    h.hear(silence(0.5), speech(1.0), silence(1.0))
    h.hear(silence(0.4))  # well after the last report (every 0.5 s)
    h.hear(speech(0.3 if commit_first else 1.5, seed=1), silence(1.0))
    (cut,) = h.of(ev.HistoryCut)
    assert cut.estimated and abs(cut.heard_samples - h.player.true_heard) <= 160 * 3 // 2
    assert h.calls("truncate") == [cut.heard_samples]
    calls = [name for _, name, _ in h.conversation.calls]
    assert calls.index("truncate") < len(calls) - 1 - calls[::-1].index("feed")
    second = h.of(ev.TurnCommitted)[1]
    assert (second.sample < h.of(ev.Interrupted)[0].sample + SAMPLE_RATE) == commit_first


def test_latency_when_the_reply_is_first_looked_at_after_it_played():
    """The input ends right after the turn (replay's run_out): the reply is first looked at
    once it has played whole, and its latency is still from its first audible sample."""
    h = Harness()
    h.hear(silence(0.5), speech(1.0), silence(0.1))
    h.session.finish()
    h.player.run_out()
    h.session.hear(np.zeros(0, np.float32))
    (committed,) = h.of(ev.TurnCommitted)
    (audible,) = h.of(ev.ReplyAudible)
    expected_ms = 1000 * ((committed.sample - committed.end_sample) / SAMPLE_RATE + MODELED_FIRST_PACKET_S)
    assert audible.latency_ms == pytest.approx(expected_ms, abs=0.1)
    assert audible.audible_sample == committed.sample + MODELED_FIRST_PACKET_S * SAMPLE_RATE


def _wait(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_fake_refuses_truncate_once_the_next_turn_started():
    """As the engine does: the session's ordering (truncate before feed) is checked by it."""
    conversation = ScriptedConversation([Reply(chirp(0.5), WORDS)], first_packet_s=0.0, realtime_factor=0.0)
    list(conversation.end_turn())
    conversation.truncate(100)
    conversation.feed(np.zeros(160, np.float32))
    with pytest.raises(RuntimeError):
        conversation.truncate(100)


class LateTimings(ScriptedConversation):
    """Sends a second StageTimings after the reply, as an engine may add its totals at the end."""

    def end_turn(self):
        turn = self._turn
        yield from super().end_turn()
        yield StageTimings(turn, prefill=7.0, total=123.0)


def test_stage_timings_add_up_typed_for_the_reply_in_flight():
    h = Harness(conversation_class=LateTimings)
    h.hear(silence(0.5), speech(1.0), silence(1.0))
    (audible,) = h.of(ev.ReplyAudible)
    # The scripted engine's first StageTimings (first_packet 0, prefill 5), then the late one.
    assert audible.stages == StageTimings(0, prefill=7.0, first_packet=0.0, total=123.0)
    assert h.session.reply_stages == audible.stages
    h.hear(silence(REPLY_S + 0.5))
    assert h.of(ev.ReplyFinished) and h.session.reply_stages is None


def test_close_during_a_reply_stops_it_and_the_worker():
    h = Harness(threaded=True, realtime_factor=1.0, reply_s=5.0)
    h.hear(silence(0.5), speech(1.0), silence(0.8))
    _wait(lambda: h.player.samples > 0)
    heard = h.player.progress().heard
    h.session.close()
    assert not h.session.worker._thread.is_alive()
    engine = [e for _, name, e in h.conversation.calls if name == "stopped"]
    assert engine  # the engine stopped mid-reply, not after 5 s of it
    written = h.player.samples
    time.sleep(0.1)
    assert h.player.samples == written  # nothing more reaches the player
    # A listener learns the reply was cut, and how much of it was heard; nothing else follows.
    assert h.events[-1] == ev.Interrupted(h.session.now, 0, heard, h.session.now, cause="close")
    assert h.of(ev.ReplyFinished) == [] and h.of(ev.TurnDiscarded) == []
    h.session.close()
    assert len(h.of(ev.Interrupted)) == 1  # closing twice tells nothing twice


def test_close_with_the_user_turn_open_discards_it():
    h = Harness()
    h.hear(silence(0.5), speech(1.0))
    (started,) = h.of(ev.UserSpeechStarted)
    h.session.close()
    assert h.events[-1] == ev.TurnDiscarded(h.session.now, 0, started.turn_start, h.session.now)
    assert h.of(ev.TurnCommitted) == [] and h.calls("end_turn") == []
    assert h.of(ev.Interrupted) == []


def test_close_when_idle_tells_nothing():
    h = Harness()
    h.hear(silence(0.5), speech(1.0), silence(1.0))
    h.hear(silence(REPLY_S + 0.5))
    assert h.of(ev.ReplyFinished)
    count = len(h.events)
    h.session.close()
    assert len(h.events) == count


def test_importing_the_session_pulls_in_no_ui_or_device_library():
    import subprocess
    import sys

    code = ("import sys, duplex_chat.session; "
            "print(sorted(m for m in ('rich', 'typer', 'sounddevice') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_history_keeps_the_last_samples_across_every_wrap():
    """The session's audio history is a ring: whatever the chunk sizes (one sample, a wrap, more
    than it holds), `since` returns exactly the samples a plain list would, clipped to capacity;
    before the first sample it reads silence, as the session's first turn expects."""
    from duplex_chat.session.bargein import History

    history = History(seconds=0.01)  # 160 samples
    rng = np.random.default_rng(0)
    everything = np.zeros(history.capacity, np.float32)  # the silence it starts with
    for n in [1, 159, 7, 160, 0, 333, 50, 110, 1, 400, *rng.integers(0, 200, 40)]:
        chunk = rng.standard_normal(n).astype(np.float32)
        history.append(chunk)
        everything = np.concatenate([everything, chunk])
        assert history.total == len(everything) - history.capacity
        for back in (0, 1, 17, 159, 160, 161, 1000):
            expected = everything[len(everything) - min(back, history.capacity):]
            assert np.array_equal(history.since(history.total - back), expected), (n, back)
    assert len(history.since(-5)) == history.capacity
    assert len(history.since(history.total + 3)) == 0
