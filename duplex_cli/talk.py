"""`duplex-chat talk`: a full-duplex conversation through the microphone and speaker.

This file is the device loop, the view adapter and the recorder around `duplex_chat.session`,
which decides who speaks when (turns, barge-in and its echo checks, what was heard, latency).

Threads and what each may do:
  PortAudio callback  copies samples in/out of ring buffers (audio/stream.py), nothing else.
  control (caller's)  every LOOP_PERIOD_S (IDLE_LOOP_PERIOD_S while idle): drain the mic, hand
                      it to the session, show its events, record, watch the devices. It never
                      waits on the model.
  worker              the session's: owns the Conversation, and writes the reply's audio straight
                      into the output ring through `SpeakerPlayer`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

import numpy as np
from rich.console import Console
from rich.table import Table

from duplex_chat.audio.constants import SAMPLE_RATE
from duplex_chat.audio.levels import level_db
from duplex_chat.audio import pulse
from duplex_chat.audio.vad import SpeechProbability
from duplex_chat.config import DuplexError, Settings
from duplex_chat.model.events import AudioPacket, StageTimings, TextDelta
from duplex_chat.model.protocol import Conversation
from duplex_chat.session import Echo, Progress, Session
from duplex_chat.session import events as ev

from .recorder import SessionRecorder
from .view import TalkState, TalkView

if TYPE_CHECKING:  # only for types: the streams import sounddevice when they open
    from duplex_chat.audio.stream import AudioIO

LOOP_PERIOD_S = 0.01  # control loop period: part of the barge-in reaction time
# ... and while the session is idle (nobody speaking, no reply): each wake-up costs about 0.6 ms
# of CPU whatever it does, so waking half as often saves ~3 % of a core at idle. The audio
# waiting meanwhile is all read at the next step; only the moment the view shows "you" moves.
IDLE_LOOP_PERIOD_S = 0.02
SHOWN_TROUBLE = ("input_skipped", "device_changed")  # device trouble whose message the view shows
# the live view's native stderr log sits beside the recording: <stamp>-stderr.log
EVENTS_SUFFIX, NATIVE_LOG_SUFFIX = "-events.jsonl", "-stderr.log"

ConversationFactory = Callable[[Settings], ContextManager[Conversation]]


def run_talk(settings: Settings, list_devices_only: bool = False) -> int:
    """Entry point of `duplex-chat talk`. Returns the exit code; raises DuplexError for the user."""
    if list_devices_only:
        print_devices(Console())
        return 0
    return talk_session(settings, engine_factory())


def engine_factory() -> ConversationFactory:
    """The real engine's `open_conversation(settings)` (a context manager yielding a Conversation)."""
    try:
        from duplex_chat.model.engine import open_conversation
    except ImportError as exc:
        raise DuplexError(f"The streaming engine is not available in this installation ({exc}).",
                          hint="Reinstall duplex-chat.") from None
    return open_conversation


def print_devices(console: Console) -> None:
    """Print the audio devices as a table (DuplexError when PortAudio is missing)."""
    from duplex_chat.audio.devices import list_devices

    devices = list_devices()
    if not devices:
        console.print("PortAudio sees no audio devices. Connect a microphone and a speaker, or "
                      "start PulseAudio or PipeWire, then run this again.")
        return
    table = Table(title="Audio devices")
    for column in ("index", "name", "host API", "in", "out", "rate", "default"):
        table.add_column(column)
    for d in devices:
        default = ", ".join(k for k, on in (("input", d.is_default_input),
                                             ("output", d.is_default_output)) if on)
        table.add_row(str(d.index), d.name, d.hostapi, str(d.max_input_channels),
                      str(d.max_output_channels), f"{d.default_samplerate:.0f}", default)
    console.print(table)
    _print_pulse_devices(console)


def _print_pulse_devices(console: Console) -> None:
    """The sound server's sources and sinks, which PortAudio 19.6 only knows as `pulse`."""
    found = pulse.pulse_devices()  # looked up at call time: tests stand in for the server
    if not found:
        return
    table = Table(title="PulseAudio / PipeWire (use as --input-device / --output-device "
                        f"{pulse.PREFIX}NAME)")
    for column in ("kind", "name", "description", "rate", "default"):
        table.add_column(column)
    for d in found:
        kind = "speaker" if d.kind == "output" else (
            f"monitor of {d.monitor_of}" if d.monitor_of else "microphone")
        table.add_row(kind, d.name, d.description, f"{d.rate}", "yes" if d.is_default else "")
    console.print(table)


# ---- the speaker as the session's player ------------------------------------------------------
class OutputRing(Protocol):
    """What `SpeakerPlayer` uses of `AudioIO` (audio/stream.py): its output ring and latencies."""

    @property
    def output_free_s(self) -> float: ...

    @property
    def queued_output_s(self) -> float: ...

    @property
    def latency_s(self) -> tuple[float, float]: ...

    def begin_reply(self) -> None: ...

    def write_output(self, samples: np.ndarray) -> int: ...

    def end_reply(self) -> None: ...

    def flush(self) -> int: ...

    def reply_played_samples(self) -> int: ...


class SpeakerPlayer:
    """The session's `Player` over `AudioIO`'s output ring. A reply has played out once the worker
    ended it, the ring ran dry and the output latency has passed since (its last samples are
    audible then)."""

    def __init__(self, io: OutputRing):
        self.io = io
        self.reply = 0
        self.ended = False  # set by the worker thread
        self._drained_at: float | None = None

    def begin_reply(self, reply: int) -> None:
        self.reply, self.ended, self._drained_at = reply, False, None
        self.io.begin_reply()  # played samples count from here

    def room_s(self) -> float:
        return self.io.output_free_s

    def write(self, samples: np.ndarray) -> None:
        self.io.write_output(samples)

    def end_reply(self) -> None:
        self.io.end_reply()
        self.ended = True

    def stop(self) -> int:
        return self.io.flush()

    def progress(self) -> Progress:
        return Progress(self.reply, self.io.reply_played_samples(), self._played_out())

    def _played_out(self) -> bool:
        if not (self.ended and self.io.queued_output_s == 0):
            return False
        now = time.monotonic()
        if self._drained_at is None:
            self._drained_at = now
        return now - self._drained_at >= self.io.latency_s[1]


# ---- the control loop ---------------------------------------------------------------------------
class TalkSession:
    """One talk session: the device loop around a `Session`, its view and its recording."""

    watch: pulse.PulseWatch | None = None  # set by _session_loop: devices swapped under our streams

    def __init__(self, settings: Settings, conversation: Conversation, io: AudioIO, view: TalkView,
                 recorder: SessionRecorder | None, vad_model: SpeechProbability | None = None):
        self.settings, self.io, self.view, self.recorder = settings, io, view, recorder
        self.echo: Echo | None = None
        if settings.audio.echo_cancellation:
            from duplex_chat.audio.echo import EchoCanceller

            # No delay hint: AEC3 finds the echo delay itself (measured fine from 0 to ~500 ms),
            # but echo arriving earlier than the hint cannot be cancelled until it re-aligns, so a
            # hint above the true delay let the first ~70 ms of echo through at -6 dB instead of
            # -69 dB: on the session's first reply, enough for a barge-in. PortAudio's reported
            # latencies can overstate the path (PulseAudio null sinks: 70 ms reported for our
            # streams alone, 36-85 ms measured for the whole echo loop through the test's).
            self.echo = EchoCanceller()
        self.player = SpeakerPlayer(io)
        self._reply_playing = False  # a reply's audio is on its way out: underruns count
        self._underruns, self._underruns_seen = 0, 0  # the view's count; the io's total last seen
        self._skipped, self._skipped_late_s = 0, 0.0  # stale mic audio of the stall under way
        self.session = Session(settings, conversation, self.player, self.on_event,
                               vad_model=vad_model, echo=self.echo)

    def note(self, kind: str, **fields: Any) -> None:
        if self.recorder is not None:
            self.recorder.note(kind, **fields)

    def step(self) -> None:
        """Do everything that arrived since the last step. Never blocks on the model."""
        chunk = self.io.read_input()
        if self.recorder is not None:
            self.recorder.audio(chunk.mic, chunk.played24)  # what the microphone really heard
        self.session.input_latency_s = self.io.latency_s[0]
        self.session.hear(chunk.live, chunk.played16)  # stale audio after a stall silenced
        self._note_skip(chunk.skipped, chunk.late_s)
        self._show_audio(chunk.mic, chunk.played24)

    def _note_skip(self, skipped: int, late_s: float) -> None:
        """Tell the session (so the log and the view) about stale microphone audio skipped after
        a stall, once per stall: a skip may span several reads."""
        if skipped:
            self._skipped += skipped
            self._skipped_late_s = max(self._skipped_late_s, late_s)
            return
        if not self._skipped:
            return
        total, late = self._skipped, self._skipped_late_s
        self._skipped, self._skipped_late_s = 0, 0.0
        self.session.device_trouble(
            "input_skipped",
            f"The microphone's audio arrived {late:.1f} s late (this program was held up), "
            f"so {total / SAMPLE_RATE:.1f} s of it was skipped.",
            skipped_samples=total, late_ms=round(1000 * late))

    # ---- session events: the recording and the view ----------------------------------------
    def on_event(self, event: ev.SessionEvent) -> None:
        if self.recorder is not None:
            self.recorder.session_event(event)  # the log's names: recorder.py
        self._show(event)

    def _show_audio(self, mic: np.ndarray, played24: np.ndarray) -> None:
        """Levels, the words heard so far, and underruns: only those while a reply's audio is on
        its way out count (PortAudio flags output underflows at start-up and while idle too,
        which nobody hears)."""
        if len(mic):
            self.view.set_level(level_db(mic))
        if len(played24):
            self.view.set_output_level(level_db(played24))
        if self.session.replying:
            self.view.reply_played(self.player.progress().heard)
        c = self.io.counters
        total = c.underruns + c.output_underflows
        if self._reply_playing:
            self._underruns += total - self._underruns_seen
        self._underruns_seen = total
        self.view.set_underruns(self._underruns)

    def _show(self, event: ev.SessionEvent) -> None:
        view = self.view
        if isinstance(event, ev.UserSpeechStarted) and event.turn_start is not None:
            view.set_state(TalkState.USER_SPEAKING)
        elif isinstance(event, ev.TurnCommitted):
            view.user_turn(event.duration_s)
            view.set_state(TalkState.THINKING)
        elif isinstance(event, ev.ReplyStarted):
            view.reply_started()
        elif isinstance(event, ev.EngineEvent) and event.current:
            self._show_engine(event)
        elif isinstance(event, ev.ReplyAudible):
            view.reply_audible(event.latency_ms)  # "speaking" from the first sample heard
        elif isinstance(event, ev.Interrupted):
            self._show_cut(event)
        elif isinstance(event, ev.HistoryCut):
            view.set_heard_text(event.text)
        elif isinstance(event, ev.ReplyFinished):
            self._reply_playing = False
            view.reply_finished()
            view.set_state(TalkState.LISTENING)
        elif isinstance(event, ev.BargeInLapsed):
            view.set_state(TalkState.LISTENING)
        elif isinstance(event, ev.DeviceTrouble) and event.kind == "streams_reopened":
            view.info("The audio streams stopped and were opened again; a moment of sound may "
                      "be missing.")
        elif isinstance(event, ev.DeviceTrouble) and event.kind in SHOWN_TROUBLE and event.message:
            view.info(event.message)  # written for the user where it is raised

    def _show_cut(self, event: ev.Interrupted) -> None:
        """A reply cut short keeps the words heard up to the cut; a barge-in says "interrupted",
        the end of the session "stopped"."""
        self._reply_playing = False
        if event.heard_samples is not None:
            self.view.reply_played(event.heard_samples)
        closing = event.cause == "close"
        self.view.reply_finished(interrupted=True, ending="stopped" if closing else "interrupted")
        if closing:
            self.view.set_state(TalkState.STOPPED)
        elif event.cause == "barge_in":
            self.view.set_state(TalkState.INTERRUPTED)

    def _show_engine(self, event: ev.EngineEvent) -> None:
        if isinstance(event.event, TextDelta):
            self.view.reply_text(event.event.text, event.audio_at)
        elif isinstance(event.event, AudioPacket):
            self._reply_playing = True  # written to the speaker's ring before this event
        elif isinstance(event.event, StageTimings):
            stages = self.session.reply_stages  # the session's sum of the reply's timings
            if stages is not None:
                self.view.set_stages(stages.stages)

    # ---- run ------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Loop until `stop` is set or Ctrl-C; raise DuplexError when a device fails."""
        self.session.start()
        while stop is None or not stop.is_set():
            self.step()
            if self.io.check():  # raises DuplexError when a device is gone for good
                self.session.device_trouble("streams_reopened", reopens=self.io.counters.reopens)
            self._report_swaps()
            self.view.refresh()
            time.sleep(IDLE_LOOP_PERIOD_S if self.session.idle else LOOP_PERIOD_S)

    def _report_swaps(self) -> None:
        """A device the sound server swapped under our streams (audio/pulse.py PulseWatch)."""
        if self.watch is None:
            return
        for kind, sentence, place in self.watch.changes():
            self.session.device_trouble("device_changed", sentence, rate=place.rate,
                                        input=int(kind == "input"))

    def shutdown(self) -> None:
        """Stop the reply and the worker, without waiting long on the model."""
        if self.watch is not None:
            self.watch.stop()
        self.session.close()


def talk_session(settings: Settings, conversation_factory: ConversationFactory, *,
                 console: Console | None = None, stop: threading.Event | None = None,
                 vad_model: SpeechProbability | None = None) -> int:
    """Run one session with a conversation from `conversation_factory(settings)`.

    Tests pass a scripted factory, a recording Console and a `stop` event; `run_talk` passes the
    real engine. Returns 0 when stopped by `stop` or Ctrl-C; raises DuplexError when a device
    is missing or fails (after closing everything and flushing the log).
    """
    from duplex_chat.audio.devices import find_device
    from duplex_chat.audio.stream import AudioIO

    inp = find_device(settings.audio.input_device, "input")
    out = find_device(settings.audio.output_device, "output")
    recorder = SessionRecorder(settings.ui.record_dir) if settings.ui.record_dir else None
    view = TalkView(console, settings.ui.refresh_hz, settings.ui.plain,
                    native_log=native_log_path(recorder))
    try:
        with contextlib.ExitStack() as stack:
            conversation = stack.enter_context(conversation_factory(settings))
            io = AudioIO(inp, out, settings.audio.stream_latency_ms / 1000.0)
            # The session loads and warms up its VAD models (0.2-0.4 s holding the GIL) before the
            # streams start: a PortAudio callback starved that long makes ALSA underrun, and
            # PortAudio 19.6's full-duplex ALSA stream then stops for good ("ContinuePoll failed").
            session = TalkSession(settings, conversation, io, view, recorder, vad_model)
            stack.enter_context(io)
            stack.enter_context(view)
            _session_loop(session, io, view, stop)
    finally:
        if recorder is not None:
            recorder.close()
    return 0


def native_log_path(recorder: SessionRecorder | None) -> Path:
    """Where the live view sends what native libraries print: beside the recording, else the
    user's state directory (one file, overwritten by each session)."""
    if recorder is not None:
        return recorder.events_path.with_name(
            recorder.events_path.name.replace(EVENTS_SUFFIX, NATIVE_LOG_SUFFIX))
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "duplex-chat" / "talk-stderr.log"

def _session_loop(session: TalkSession, io: AudioIO, view: TalkView,
                  stop: threading.Event | None) -> None:
    settings = session.settings
    aec = "on" if session.echo is not None else "off (headphones)"
    view.info(f"mic: {io.input_device.name} @ {io.in_rate} Hz, speaker: {io.output_device.name} "
              f"@ {io.out_rate} Hz, echo cancellation {aec}. Ctrl-C ends.")
    session.note("session_started", input=io.input_device.name, output=io.output_device.name,
                 in_rate=io.in_rate, out_rate=io.out_rate,
                 latency_s=list(io.latency_s), echo_cancellation=session.echo is not None,
                 barge_in=settings.audio.barge_in)
    session.watch = pulse.PulseWatch().start()  # says nothing where no sound server answers
    try:
        session.run(stop)
    except KeyboardInterrupt:
        view.info("Stopped.")
        session.note("stopped", reason="ctrl-c")
    except DuplexError as exc:
        view.info(f"Session ended: {exc}")
        session.session.device_trouble("error", str(exc))
        raise
    finally:
        session.shutdown()
        session.note("session_ended", underruns=io.counters.underruns,
                     output_underflows=io.counters.output_underflows,
                     overruns=io.counters.overruns, reopens=io.counters.reopens,
                     stale_skips=io.counters.stale_skips, skipped_input=io.counters.skipped_input)
