"""`Session`: turn-taking around one Conversation, driven by microphone audio and playback progress.

The loop around it (talk's device loop, replay's file loop) calls `hear(mic, played)` with each
new stretch of microphone audio and, while a reply plays, its player's `progress()` is read after
every VAD window. The session's clock is the number of microphone samples heard. It decides:

- turns: the `TurnPolicy` starts and ends them; a turn's audio (from its pre-roll on) is fed to
  the worker while it lasts, and at its end the reply is asked for (`TurnCommitted`);
- barge-in: while a reply plays, `BargeIn` may interrupt it. The player stops at once, the
  engine is cancelled, and the history is cut to what was heard (`truncate`: the reply has often
  finished generating by then). The new turn keeps the speech that interrupted. When the player
  learns what was heard only later, feeding the new turn waits for that report (or
  HEARD_TIMEOUT_S), because `truncate` must come before the next turn's first `feed`;
- speech over a reply that does not give way (barge-in off): it is kept, and once the reply
  has played out it becomes the next turn (nothing the user said is lost);
- the latency of each reply: from the end of the user's speech to its first audible sample.
"""

from __future__ import annotations

import dataclasses
import queue
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from duplex_chat.audio.constants import (
    OUTPUT_SAMPLE_RATE,
    SAMPLE_RATE,
    VAD_WINDOW_SAMPLES,
    ms_to_samples,
)
from duplex_chat.audio.vad import SileroVad, SpeechEnded, SpeechProbability, SpeechStarted
from duplex_chat.config import Settings
from duplex_chat.model.events import AudioPacket, StageTimings, TurnFinished, TurnStarted
from duplex_chat.model.protocol import Conversation, check_instructions, pick_voice

from . import events as ev
from .bargein import BARGE_IN_WINDOWS, BargeIn, History
from .policy import TurnPolicy, make_policy
from .worker import (
    EndTurn,
    EngineOutput,
    Failed,
    Feed,
    InlineWorker,
    Player,
    ReplyDone,
    Progress,
    ReplyGate,
    Speculate,
    Speculated,
    Stop,
    Configure,
    TakeBack,
    TakenBack,
    Truncate,
    Truncated,
    Worker,
)

INTERRUPTED_TIMEOUT_S = 1.5  # after a barge-in with no turn, listen again (BargeInLapsed)
HELD_MARGIN_S = 1.0  # a speculation is taken back this long before History would drop audio
# it holds back from the conversation (in a pause longer than HISTORY_S less this)
HEARD_TIMEOUT_S = 1.0  # how long a late "heard" report is waited for before the last one counts
WORKER_JOIN_TIMEOUT_S = 5.0  # how long `close` waits for the model to stop


class Echo(Protocol):
    """What the session needs from an echo canceller (audio/echo.py's `EchoCanceller`)."""

    def process(self, mic: np.ndarray, played: np.ndarray) -> np.ndarray:
        """Cleaned microphone audio (16 kHz); may lag the input by a frame."""


@dataclass
class _Reply:
    """The reply in flight."""

    id: int  # the ReplyGate generation it plays under
    turn: int
    speech_end: int  # session sample where the user's speech ended
    produced: int = 0  # reply samples (24 kHz) the worker delivered
    heard: int = 0  # reply samples the player reports heard
    heard_at: int = 0  # session sample when `heard` last changed
    audible: bool = False
    worker_done: bool = False
    stages: StageTimings | None = None  # the engine's marks so far (see `Session.reply_stages`)


@dataclass
class _PendingCut:
    """An interrupted reply whose heard count the player has yet to report."""

    reply: _Reply
    since: int  # session sample of the barge-in
    written: int  # reply samples (24 kHz) the player had been given by then

    def estimate(self) -> int:
        """What was heard, the report overdue: a reply that was audible kept playing from its
        last report until the stop, up to what the player had."""
        reply = self.reply
        if not reply.audible:
            return reply.heard
        played = (self.since - reply.heard_at) * OUTPUT_SAMPLE_RATE // SAMPLE_RATE
        return max(reply.heard, min(self.written, reply.heard + played))


@dataclass
class _Speculation:
    """A reply started ahead of the end of turn, at the pause that began at `pause`."""

    turn: int
    pause: int  # session sample where the pause's silence began
    since: int  # session sample when it was started (the turn's audio was fed up to here)
    key: int  # which speculation of the session (its worker reports name it)
    compute_ms: float | None = None  # the worker's time to the first packet, once reported


@dataclass
class _Speech:
    """Speech the policy confirmed while a reply played, not (yet) a turn."""

    onset: int
    audio_start: int
    real: bool  # the echo checks call it the user's (always, with no echo path)
    end: int | None = None  # where it ended, if it did before the reply


@dataclass
class SpeculationCounts:
    """Speculative starts of a session: started, used (their turn ended at that pause and the
    reply played from it), taken back (the user went on), and the engine time those wasted."""

    started: int = 0
    used: int = 0
    taken_back: int = 0
    wasted_ms: float = 0.0


class Session:
    """Turn-taking for one conversation. All methods run on one thread (the loop's), except that
    the worker runs the Conversation (a thread with `threaded=True`, else inline).

    `on_event` receives every `SessionEvent` as it happens. `echo`: an echo canceller for the
    microphone (None: headphones or a file); `raw_vad`: the second VAD model its echo checks use
    (made when echo is given and none is passed). `policy` defaults to the one `turn.policy`
    names (`make_policy`), on the session's own clock when `threaded` is False (replay).
    `input_latency_s` (settable) is added to each latency: the mic delivers sound that late.
    """

    def __init__(self, settings: Settings, conversation: Conversation, player: Player,
                 on_event: Callable[[ev.SessionEvent], None], *, policy: TurnPolicy | None = None,
                 vad_model: SpeechProbability | None = None, echo: Echo | None = None,
                 raw_vad: SpeechProbability | None = None, threaded: bool = True):
        self.conversation, self.player, self.emit = conversation, player, on_event
        self.barge_in_enabled = settings.audio.barge_in
        self.pre_roll = ms_to_samples(settings.vad.pre_roll_ms)
        self.policy = (policy if policy is not None
                       else make_policy(settings, vad_model, virtual_clock=not threaded))
        self.echo = echo
        if echo is not None and raw_vad is None:
            raw_vad = SileroVad()
        self.barge = BargeIn(settings.vad.threshold, raw_vad if echo is not None else None)
        self.history = History()  # cleaned mic: a turn's audio, pre-roll included
        self.gate = ReplyGate()
        self.worker = (Worker if threaded else InlineWorker)(conversation, player, self.gate)
        self.input_latency_s = 0.0
        self.turns = 0  # replies asked for so far
        self.turn_start: int | None = None  # start of the open user turn (with pre-roll)
        self.fed_upto = 0
        self.reply: _Reply | None = None
        self.pending: _PendingCut | None = None
        self.barge_onset: int | None = None  # onset of the speech that interrupted
        self.speech: _Speech | None = None  # speech over the reply, not a turn
        self.interrupted_at: int | None = None
        self.speculate_after = ms_to_samples(settings.turn.speculate_ms) or None  # None: off
        self.speculation: _Speculation | None = None
        self.speculations = SpeculationCounts()
        self.closed = False

    @property
    def now(self) -> int:
        """The session's clock: microphone samples heard (after echo cancellation, which delays
        them by up to one 10 ms frame)."""
        return self.history.total

    @property
    def reply_stages(self) -> StageTimings | None:
        """The engine's stage timings of the reply in flight so far (every StageTimings it sent,
        later fields over earlier ones), None before the first or when no reply is in flight.
        Up to date when the EngineEvent carrying a StageTimings is emitted."""
        return self.reply.stages if self.reply is not None else None

    @property
    def replying(self) -> bool:
        """A reply is in flight (asked for, not yet played out or interrupted)."""
        return self.reply is not None

    @property
    def idle(self) -> bool:
        """Nothing is under way that a quick reaction matters to: no user turn open, no reply in
        flight, no speech over a reply being weighed. A live caller may look less often then
        (talk halves its loop rate: speech that starts is caught from the audio, not the clock)."""
        return (self.reply is None and self.turn_start is None and self.pending is None
                and self.speech is None)

    def start(self) -> None:
        """Start the worker (a no-op for the inline one)."""
        self.worker.start()

    # ---- inputs --------------------------------------------------------------------------
    def hear(self, mic: np.ndarray, played: np.ndarray | None = None) -> None:
        """The next stretch of microphone audio (n,) float32 at 16 kHz, and what the speaker
        played meanwhile (16 kHz, the same clock; None: nothing, or no echo path). Raises the
        worker's exception if it failed."""
        mic = np.asarray(mic, np.float32)
        played = np.zeros(0, np.float32) if played is None else np.asarray(played, np.float32)
        clean = self.echo.process(mic, played) if self.echo is not None else mic
        done = 0
        # Pieces end on VAD window boundaries, so barge-in and turn decisions land on the window
        # that made them, whatever the caller's chunk size (10 ms in talk, 320 ms in replay). The
        # echo checks get the same piece of raw mic and playback: what they judge is that window,
        # not audio still to come in the chunk.
        while done < len(clean):
            n = min(len(clean) - done, VAD_WINDOW_SAMPLES - self.now % VAD_WINDOW_SAMPLES)
            self.barge.hear(mic[done:done + n], played[done:done + n], self.reply is not None)
            self._step(clean[done:done + n])
            done += n
            self._update()
        # The canceller may lag the mic by a frame: the checks still hear every raw sample.
        self.barge.hear(mic[done:], played[done:], self.reply is not None)
        if not len(clean):
            self._update()

    def finish(self) -> None:
        """End of input (replay): close an open turn as the policy says."""
        self._turn_events(self.policy.finish())
        self._update()

    def device_trouble(self, kind: str, message: str = "", **details: int) -> None:
        """Pass the loop's device trouble on to every observer (a DeviceTrouble event)."""
        self.emit(ev.DeviceTrouble(self.now, kind, message, details))

    def close(self) -> None:
        """End the session: stop the reply and the worker, without waiting long on the model.

        What it cuts is told like anything else: a reply in flight (asked for, not yet played
        out) ends with `Interrupted(cause="close")` and what was heard, with no HistoryCut after
        it; a user turn still open ends with `TurnDiscarded` (it is never committed: no reply
        would come). A cut whose heard report was still awaited after a barge-in is dropped.
        Call nothing else on the session afterwards; a second close does nothing."""
        if self.closed:
            return
        self.closed = True
        self.worker.stopping.set()
        heard, kept = self.gate.stop(self.player)
        self.conversation.cancel(kept)
        self.worker.submit(Stop())
        self.worker.join(WORKER_JOIN_TIMEOUT_S)
        self.policy.close()
        reply, self.reply, self.pending = self.reply, None, None
        if reply is not None:
            self.emit(ev.Interrupted(self.now, reply.turn, heard, self.now, cause="close"))
        if self.turn_start is not None:
            start, self.turn_start = self.turn_start, None
            self.emit(ev.TurnDiscarded(self.now, self.turns, start, self.now))

    def interrupt(self) -> bool:
        """The client stops the reply in flight (a Realtime client's `response.cancel`, or its
        `conversation.item.truncate` while the reply still plays): a barge-in with no speech
        behind it. The player's `stop` says what was heard, or reports it later, and the history
        is cut to it (a HistoryCut follows). False when no reply is in flight."""
        reply = self.reply
        if reply is None or self.closed:
            return False
        heard, kept = self.gate.stop(self.player)
        self.conversation.cancel(kept)
        self.reply = None
        self.emit(ev.Interrupted(self.now, reply.turn, heard, self.now, cause="client"))
        if heard is None:
            self.pending = _PendingCut(reply, self.now, kept)
        else:
            self._cut(reply, heard)
        return True

    def truncate_played(self, turn: int, heard_samples: int) -> bool:
        """Cut reply `turn`, already played out, to `heard_samples` (24 kHz) heard: a client that
        learns what was heard after the reply ended (a Realtime client's late truncate). Only the
        last reply, and only before the next user turn opens (`Conversation.truncate`'s rule);
        False when that is too late. A HistoryCut follows."""
        if (self.closed or self.reply is not None or self.pending is not None
                or self.turn_start is not None or turn != self.turns - 1):
            return False
        self.worker.submit(Truncate(turn, heard_samples))
        return True

    def configure(self, voice: str | None = None, system_prompt: str | None = None) -> None:
        """Speak as `voice` and follow `system_prompt` from the next reply the worker starts
        (None: keep): a reply in progress keeps what it started with. Checked here, so a bad
        value raises DuplexError (one plain sentence) and changes nothing; the engine takes it
        between commands, with no rebuild (`Conversation.configure`)."""
        if voice is not None:
            voice = pick_voice(voice, self.conversation.voices())
        if system_prompt is not None:
            system_prompt = check_instructions(system_prompt)
        if not self.closed:
            if self.speculation is not None:  # started under the old ones: start it again
                self._take_back()
                self._feed_held()
            self.worker.submit(Configure(voice, system_prompt))

    # ---- one window's worth of audio ------------------------------------------------------
    def _step(self, clean: np.ndarray) -> None:
        self.history.append(clean)
        events = self.policy.feed(clean)
        run = self.barge.run(self.policy.speech_run) if self.reply is not None else 0
        if run >= BARGE_IN_WINDOWS and self.barge_in_enabled:
            self._barge_in(run)
        self._turn_events(events)
        if run >= BARGE_IN_WINDOWS and self.speech is not None:
            self.speech.real = True  # it got past the echo checks: the user's, not the reply's
        self._speculate_or_take_back()
        if self.speculation is None:  # a speculation holds the audio back until it is decided
            self._feed_held()

    def _turn_events(self, events) -> None:
        for event in events:
            if isinstance(event, SpeechStarted):
                self._speech_started(event)
            elif isinstance(event, SpeechEnded):
                self._speech_ended(event)

    def _feed(self) -> None:
        self.worker.submit(Feed(self.history.since(self.fed_upto)))
        self.fed_upto = self.now

    def _speech_started(self, event: SpeechStarted) -> None:
        if self.reply is not None:  # barge-in is off (or has not fired yet): not a turn yet
            earlier = self.speech
            if earlier is not None and earlier.real:  # more words over the same reply: one turn
                self.speech = _Speech(earlier.onset, earlier.audio_start, True)
            else:
                self.speech = _Speech(event.sample_index, event.audio_start_index,
                                      self.echo is None)
            self.emit(ev.UserSpeechStarted(self.now, event.sample_index, event.audio_start_index, None))
            return
        self._open_turn(event.audio_start_index, event.sample_index, event.audio_start_index)

    def _open_turn(self, start: int, onset: int, audio_start: int) -> None:
        """The user's turn begins at session sample `start` (its audio is fed from there)."""
        if self.barge_onset is not None:  # keep the speech that interrupted, even a short first word
            start = max(0, min(start, self.barge_onset - self.pre_roll))
        self.barge_onset = self.interrupted_at = None
        self.speech = None
        self.turn_start = start
        self.fed_upto = max(start, self.now - self.history.capacity)
        self.emit(ev.UserSpeechStarted(self.now, onset, audio_start, start))

    def _speech_ended(self, event: SpeechEnded) -> None:
        self.emit(ev.UserSpeechEnded(self.now, event.sample_index))
        if self.turn_start is not None:
            self._commit(event.sample_index)
        elif self.speech is not None:  # over a reply that went on: a turn once it has played
            self.speech.end = event.sample_index

    def _overheard(self) -> None:
        """The reply played out over speech that did not interrupt it (barge-in off): that
        speech is the next turn, open or over, so nothing the user said is lost. Only what
        History keeps (HISTORY_S) can still be fed."""
        speech, self.speech = self.speech, None
        if speech is None or not speech.real:
            return  # none, or the reply's own echo
        self._open_turn(speech.audio_start, speech.onset, speech.audio_start)
        if speech.end is not None:
            self._commit(speech.end)

    # ---- speculative start --------------------------------------------------------------
    def _speculate_or_take_back(self) -> None:
        """At a pause of `turn.speculate_ms` in the open turn, start its reply unplayed; when
        the pause is over (the user went on), take it back and feed what was held."""
        pause = self.policy.pause_start if self.turn_start is not None else None
        spec = self.speculation
        if spec is not None:
            # the user went on; or the pause outlasts what History keeps of the held audio
            held_limit = self.history.capacity - HELD_MARGIN_S * SAMPLE_RATE
            if pause != spec.pause or self.now - spec.since >= held_limit:
                self._take_back()
            return
        if (self.speculate_after is not None and pause is not None and self.pending is None
                and self.reply is None and self.now - pause >= self.speculate_after):
            if self.now > self.fed_upto:
                self._feed()
            self.speculations.started += 1
            self.speculation = _Speculation(self.turns, pause, self.now, self.speculations.started)
            self.emit(ev.SpeculationStarted(self.now, self.turns, pause))
            self.worker.submit(Speculate(self.turns, self.speculation.key))

    def _take_back(self) -> None:
        """The engine finishes the speculation to its first packet before it rolls back (a
        cancel could reach a reply still stopping after a barge-in and lose what was heard);
        the audio since is fed after the rollback, in order (`_feed_held`, or the next step)."""
        spec, self.speculation = self.speculation, None
        self.worker.submit(TakeBack(spec.turn))

    def _feed_held(self) -> None:
        """Feed the open turn's audio heard since the last feed (none while a cut is pending)."""
        if self.turn_start is not None and self.pending is None and self.now > self.fed_upto:
            self._feed()

    def _commit(self, end: int) -> None:
        """The turn is over: feed what is left of it and ask for the reply (a speculative one
        started at this pause plays as it is: the turn's audio ends where it was started)."""
        if self.pending is not None:  # its report is overdue now: cut with what is known
            self._cut(self.pending.reply, self.pending.estimate(), estimated=True)
        spec = self.speculation
        if spec is not None and spec.pause != end:  # started at another pause: not this turn's
            self._take_back()
            spec = None
        self.speculation = None
        if spec is None and self.now > self.fed_upto:
            self._feed()
        if spec is not None:
            self.speculations.used += 1
        self.reply = _Reply(self.gate.begin(self.player), self.turns, end, heard_at=self.now)
        self.barge.reply_started()
        self.emit(ev.TurnCommitted(self.now, self.turns, self.turn_start, end,
                                   spec.since if spec else None, spec.compute_ms if spec else None))
        self.turns += 1
        self.turn_start = None
        self.worker.submit(EndTurn(self.reply.id))

    def _barge_in(self, run: int) -> None:
        reply = self.reply
        assert reply is not None
        # Stop generating now. Unsure what was heard, keep everything the player was given:
        # the cut below, once the player reports, only shortens the history.
        heard, kept = self.gate.stop(self.player)
        self.conversation.cancel(kept)
        self.reply = None
        self.barge_onset = self.now - run * VAD_WINDOW_SAMPLES
        self.interrupted_at = self.now
        self.emit(ev.Interrupted(self.now, reply.turn, heard, self.barge_onset))
        if heard is None:
            self.pending = _PendingCut(reply, self.now, kept)
        else:
            self._cut(reply, heard)
        if self.speech is not None:  # the policy already confirmed this speech: the turn is open
            speech = self.speech
            self._open_turn(speech.audio_start, speech.onset, speech.audio_start)

    def _cut(self, reply: _Reply, heard: int, estimated: bool = False) -> None:
        """Cut the history to what was heard, before any audio of the next turn is fed."""
        self.pending = None
        reply.heard = heard
        self.worker.submit(Truncate(reply.turn, heard, estimated))

    # ---- what the worker and the player say ------------------------------------------------
    def _update(self) -> None:
        self._drain_worker()
        self._track_reply()
        self._track_pending()
        if (self.interrupted_at is not None and self.turn_start is None
                and self.now - self.interrupted_at > INTERRUPTED_TIMEOUT_S * SAMPLE_RATE):
            self.barge_onset = self.interrupted_at = None  # a false start: nothing followed
            self.emit(ev.BargeInLapsed(self.now))

    def _drain_worker(self) -> None:
        while True:
            try:
                out = self.worker.outputs.get_nowait()
            except queue.Empty:
                return
            if isinstance(out, Failed):
                raise out.error
            if isinstance(out, Speculated):
                if self.speculation is not None and self.speculation.key == out.key:
                    self.speculation.compute_ms = 1000 * out.compute_s
            elif isinstance(out, TakenBack):
                self.speculations.taken_back += 1
                self.speculations.wasted_ms += 1000 * out.compute_s
                self.emit(ev.SpeculationTakenBack(self.now, out.turn, 1000 * out.compute_s))
            elif isinstance(out, Truncated):
                self.emit(ev.HistoryCut(self.now, out.turn, out.heard_samples, out.text,
                                        out.estimated))
            elif isinstance(out, ReplyDone):
                if self.reply is not None and self.reply.id == out.reply:
                    self.reply.worker_done = True
            elif isinstance(out, EngineOutput):
                self._engine_event(out)

    def _engine_event(self, out: EngineOutput) -> None:
        reply = self.reply if self.reply is not None and self.reply.id == out.reply else None
        event = out.event
        if reply is not None and isinstance(event, StageTimings):
            reply.stages = (event if reply.stages is None
                            else dataclasses.replace(reply.stages, **event.stages))
        self.emit(ev.EngineEvent(self.now, event, reply.produced if reply else 0, reply is not None))
        if reply is None:
            return
        if isinstance(event, TurnStarted):
            self.emit(ev.ReplyStarted(self.now, reply.turn))
        elif isinstance(event, AudioPacket):
            reply.produced += len(event.samples)
        elif isinstance(event, TurnFinished):
            reply.produced = max(reply.produced, event.audio_samples)

    def _track_reply(self) -> None:
        reply = self.reply
        if reply is None:
            return
        progress = self.player.progress()
        if progress.reply != reply.id:
            return
        if progress.heard != reply.heard:
            reply.heard, reply.heard_at = progress.heard, self.now
        if progress.heard > 0 and not reply.audible:
            reply.audible = True
            self._audible(reply, progress)
        if progress.finished and reply.worker_done:
            self.reply = None
            self.emit(ev.ReplyFinished(self.now, reply.turn, progress.heard))
            self._overheard()

    def _audible(self, reply: _Reply, progress: Progress) -> None:
        audible_at = progress.audible_since
        if audible_at is None:
            # The player cannot say: it has played without a gap since it became audible (a
            # live speaker), so place that moment from what was heard, not at this later look.
            audible_at = round(self.now - progress.heard * SAMPLE_RATE / OUTPUT_SAMPLE_RATE)
        latency_s = (audible_at - reply.speech_end) / SAMPLE_RATE + self.input_latency_s
        self.emit(ev.ReplyAudible(self.now, reply.turn, 1000.0 * latency_s, reply.stages,
                                  audible_at))

    def _track_pending(self) -> None:
        pending = self.pending
        if pending is None:
            return
        progress = self.player.progress()
        if progress.reply == pending.reply.id:
            if progress.heard > pending.reply.heard:
                pending.reply.heard, pending.reply.heard_at = progress.heard, self.now
            if progress.finished:
                self._cut(pending.reply, progress.heard)
                return
        if self.now - pending.since > HEARD_TIMEOUT_S * SAMPLE_RATE:
            self._cut(pending.reply, pending.estimate(), estimated=True)

