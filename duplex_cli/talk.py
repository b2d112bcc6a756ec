"""`duplex-chat talk`: a full-duplex conversation through the microphone and speaker.

Threads and what each may do:
  PortAudio callback  copies samples in/out of ring buffers (audio/stream.py), nothing else.
  control (caller's)  every LOOP_PERIOD_S: drain the mic, echo-cancel, VAD, decide turns, feed
                      audio to the worker, handle barge-in, update view and recording. It never
                      waits on the model.
  worker              owns the Conversation: feed / end_turn / discard_turn run here, and the
                      reply's AudioPackets go straight into the output ring.

Turn-taking uses `VoiceActivity` over 32 ms windows ([vad] settings). Barge-in has a faster path:
while the assistant is replying, BARGE_IN_WINDOWS consecutive windows at or above vad.threshold
(64 ms of speech) flush playback at once and cancel the reply with the samples actually heard; the
user turn itself still starts at VoiceActivity's confirmed onset (minus pre-roll), so it keeps the
speech that interrupted. The price of the fast path: a cough of 64 ms can cut the reply short.
With echo cancellation on, an onset that is a delayed copy of what played is never a barge-in,
and a second VAD on the raw microphone covers AEC3 muting the user when no echo reaches the mic
(see ECHO_CORRELATION_MAX and NO_ECHO_DB).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import numpy as np
from rich.console import Console
from rich.table import Table

from duplex_chat.audio.constants import (
    OUTPUT_SAMPLE_RATE,
    SAMPLE_RATE,
    VAD_WINDOW_SAMPLES,
    ms_to_samples,
)
from duplex_chat.config import DuplexError, Settings
from duplex_chat.model.events import (
    AudioPacket,
    Interrupted,
    StageTimings,
    TextDelta,
    TurnFinished,
    TurnStarted,
)

from .recorder import SessionRecorder
from .view import TalkState, TalkView

LOOP_PERIOD_S = 0.01  # control loop period: part of the barge-in reaction time
BARGE_IN_WINDOWS = 2  # consecutive speech windows (32 ms each) that interrupt the reply
VAD_WARMUP_WINDOWS = 4  # silent windows run through each VAD model before use
HISTORY_S = 8.0  # cleaned mic audio kept for the pre-roll of a turn
WORKER_JOIN_TIMEOUT_S = 5.0  # how long shutdown waits for the model to stop
OUTPUT_WAIT_S = 0.01  # worker's wait when the output ring is full
SILENCE_DB = -100.0  # level shown for digital silence
STALL_TIMEOUT_S = 1.5  # no audio callback for this long = the device is gone
INTERRUPTED_TIMEOUT_S = 1.5  # after a barge-in with no confirmed turn, go back to listening
# Echo checks of a barge-in while echo cancellation is on (see TalkSession._barge_in_run):
# - The onset must not look like the reply itself: its raw microphone samples must correlate less
#   than ECHO_CORRELATION_MAX with every stretch of what played in the last ECHO_MAX_DELAY_S.
#   Residual echo that AEC3 lets through after an echo path delay jump (seen after underruns) is
#   a near-exact delayed copy (~1.0); espeak speech against a spoken reply stays under 0.8.
# - AEC3 attenuates the user's voice by 10-50 dB while the reply plays if it has not learnt an
#   echo path (none reaches the mic: a headset with echo cancellation left on, a muted speaker),
#   which hid barge-ins. So a VAD on the raw microphone may also interrupt, but only when no echo
#   reaches the mic: over the last ECHO_PROBE_S the raw mic stayed NO_ECHO_DB below the reply.
ECHO_CORRELATION_MAX = 0.9
ECHO_MAX_DELAY_S = 1.0  # longest echo path (device latencies + room) the checks consider
ECHO_PROBE_S = 0.5  # stretch of the reply whose echo must have arrived within ECHO_MAX_DELAY_S
NO_ECHO_DB = -40.0
AUDIBLE_REPLY_DB = -45.0  # median window level of the reply above which its echo would show

ConversationFactory = Callable[[Settings], ContextManager[Any]]


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


# ---- pieces of the control loop -----------------------------------------------------------------
class OnsetTap:
    """Wraps the VAD model to see every window's probability: counts consecutive speech windows."""

    def __init__(self, vad: Any, threshold: float):
        self.vad, self.threshold = vad, threshold
        self.run = 0  # consecutive windows at or above threshold, up to now
        self.windows = 0  # windows seen since the start
        # TorchScript optimises a model on its first calls: 25-140 ms each (more on a loaded
        # machine) holding the GIL, so a running PortAudio callback misses its deadline. Pay that
        # now, before the streams start (talk_session), not during a reply (it garbled playback
        # and shifted the echo path mid-reply).
        silence = np.zeros(VAD_WINDOW_SAMPLES, np.float32)
        for _ in range(VAD_WARMUP_WINDOWS):
            vad.prob(silence)
        vad.reset()

    def prob(self, window: np.ndarray) -> float:
        p = self.vad.prob(window)
        self.run = self.run + 1 if p >= self.threshold else 0
        self.windows += 1
        return p

    def reset(self) -> None:
        self.vad.reset()
        self.run = 0


class RawOnset:
    """An OnsetTap over a raw stream: cuts it into VAD windows itself (the raw-microphone VAD)."""

    def __init__(self, vad: Any, threshold: float):
        self.tap = OnsetTap(vad, threshold)
        self._carry = np.zeros(0, np.float32)

    @property
    def run(self) -> int:
        return self.tap.run

    def feed(self, samples: np.ndarray) -> None:
        data = np.concatenate([self._carry, samples])
        n = len(data) // VAD_WINDOW_SAMPLES
        for k in range(n):
            self.tap.prob(data[k * VAD_WINDOW_SAMPLES:(k + 1) * VAD_WINDOW_SAMPLES])
        self._carry = data[n * VAD_WINDOW_SAMPLES:]

    def reset(self) -> None:
        self.tap.reset()
        self._carry = np.zeros(0, np.float32)


class History:
    """The last HISTORY_S of cleaned 16 kHz audio, addressed by absolute sample index."""

    def __init__(self, seconds: float = HISTORY_S):
        self._buf = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
        self.total = 0  # samples ever appended

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def append(self, x: np.ndarray) -> None:
        x = x[-len(self._buf):]
        self._buf = np.roll(self._buf, -len(x))
        self._buf[len(self._buf) - len(x):] = x
        self.total += len(x)

    def since(self, start: int) -> np.ndarray:
        """Samples from absolute index `start` to now (clipped to what is kept)."""
        n = min(self.total - start, len(self._buf))
        return self._buf[len(self._buf) - n:].copy() if n > 0 else np.zeros(0, np.float32)


class ReplyGate:
    """Which reply may still reach the speaker. `interrupt` and the worker's writes are atomic,
    so no packet of a cancelled reply is queued after the flush."""

    def __init__(self) -> None:
        self.generation = 0
        self.lock = threading.Lock()


class Worker(threading.Thread):
    """Runs the Conversation; commands in `commands`, (generation, event) pairs out in `events`."""

    def __init__(self, conversation: Any, io: Any, gate: ReplyGate):
        super().__init__(name="duplex-worker", daemon=True)
        self.conversation, self.io, self.gate = conversation, io, gate
        self.commands: queue.Queue = queue.Queue()
        self.events: queue.Queue = queue.Queue()
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while True:
                command, arg = self.commands.get()
                if command == "stop":
                    return
                if command == "feed":
                    self.conversation.feed(arg)
                elif command == "truncate":
                    self.conversation.truncate(arg)
                elif command == "end_turn":
                    self._reply(arg)
        except Exception as exc:  # the control thread re-raises it with its traceback
            self.events.put((-1, exc))

    def _reply(self, generation: int) -> None:
        for event in self.conversation.end_turn():
            if isinstance(event, AudioPacket):
                self._play(event.samples, generation)
            self.events.put((generation, event))
        with self.gate.lock:
            if generation == self.gate.generation:
                self.io.end_reply()
        self.events.put((generation, "done"))

    def _play(self, samples: np.ndarray, generation: int) -> None:
        needed_s = len(samples) / OUTPUT_SAMPLE_RATE
        while self.io.output_free_s < needed_s and not self.stopping.is_set():
            if generation != self.gate.generation:
                return
            time.sleep(OUTPUT_WAIT_S)
        with self.gate.lock:
            if generation == self.gate.generation:
                self.io.write_output(samples)


@dataclass
class ReplyProgress:
    """The control thread's view of the reply in flight."""

    generation: int
    speech_end_time: float  # monotonic time of the end of the user's speech
    audio_produced: int = 0  # reply samples (24 kHz) received from the worker
    first_played_time: float | None = None
    worker_done: bool = False
    drained_time: float | None = None  # when the output ring ran empty after the worker finished
    stages: dict[str, float] = field(default_factory=dict)


def _level_db(x: np.ndarray) -> float:
    if len(x) == 0:
        return SILENCE_DB
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return max(SILENCE_DB, 20.0 * np.log10(rms + 1e-10))


def _median_window_db(x: np.ndarray) -> float:
    """Median level of the VAD windows of x (n,): robust to a short burst of other sound."""
    n = len(x) // VAD_WINDOW_SAMPLES
    if n == 0:
        return SILENCE_DB
    return float(np.median([_level_db(w) for w in x[:n * VAD_WINDOW_SAMPLES].reshape(n, -1)]))


# ---- the session ------------------------------------------------------------------------------
class TalkSession:
    """One talk session's control loop (see the module docstring for the threads)."""

    def __init__(self, settings: Settings, conversation: Any, io: Any, view: TalkView,
                 recorder: SessionRecorder | None, vad_model: Any = None,
                 raw_vad_model: Any = None):
        from duplex_chat.audio.vad import SileroVad, SpeechEnded, SpeechStarted, VoiceActivity

        self._SpeechStarted, self._SpeechEnded = SpeechStarted, SpeechEnded
        self.settings, self.conversation, self.io = settings, conversation, io
        self.view, self.recorder = view, recorder
        self.tap = OnsetTap(vad_model if vad_model is not None else SileroVad(), settings.vad.threshold)
        self.vad = VoiceActivity(settings.vad, self.tap)
        self.history = History()
        self.gate = ReplyGate()
        self.worker = Worker(conversation, io, self.gate)
        self.echo = None
        self.raw_onset: RawOnset | None = None  # raw-mic VAD, run during replies (AEC on only)
        if settings.audio.echo_cancellation:
            from duplex_chat.audio.echo import EchoCanceller

            # No delay hint: AEC3 finds the echo delay itself (measured fine from 0 to ~500 ms),
            # but echo arriving earlier than the hint cannot be cancelled until it re-aligns, so a
            # hint above the true delay let the first ~70 ms of echo through at -6 dB instead of
            # -69 dB: on the session's first reply, enough for a barge-in. PortAudio's reported
            # latencies can overstate the path (PulseAudio null sinks: 70 ms reported for our
            # streams alone, 36-85 ms measured for the whole echo loop through the test's).
            self.echo = EchoCanceller()
            self.raw_onset = RawOnset(raw_vad_model if raw_vad_model is not None else SileroVad(),
                                      settings.vad.threshold)
        echo_span_s = ECHO_MAX_DELAY_S + ECHO_PROBE_S + 0.1
        self.raw_history = History(seconds=echo_span_s)  # raw mic, for the echo checks
        self.played_history = History(seconds=echo_span_s)  # what played, mic's clock
        self.turn_start: int | None = None  # absolute start of the open user turn (with pre-roll)
        self.fed_upto = 0
        self.reply: ReplyProgress | None = None
        self.barge_onset: int | None = None  # fast-path onset of the speech that interrupted
        self.interrupted_time = 0.0

    def note(self, kind: str, **fields: Any) -> None:
        if self.recorder is not None:
            self.recorder.note(kind, **fields)

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> None:
        """Do everything that arrived since the last step. Never blocks on the model."""
        mic, played16, played24 = self.io.read_input()
        if self.recorder is not None:
            self.recorder.audio(mic, played24)
        clean = self.echo.process(mic, played16) if self.echo is not None else mic
        if len(mic):
            self.view.set_level(_level_db(mic))
        self.history.append(clean)
        self.raw_history.append(mic)
        self.played_history.append(played16)
        events = self.vad.feed(clean)
        if self.reply is not None:
            run = self._barge_in_run(mic)
            if run >= BARGE_IN_WINDOWS:
                self._barge_in(run)
        for event in events:
            if isinstance(event, self._SpeechStarted):
                self._speech_started(event)
            else:
                self._speech_ended(event)
        if self.turn_start is not None and self.history.total > self.fed_upto:
            self.worker.commands.put(("feed", self.history.since(self.fed_upto)))
            self.fed_upto = self.history.total
        self._drain_worker()
        self._track_reply()
        if (self.view.state is TalkState.INTERRUPTED and self.turn_start is None
                and time.monotonic() - self.interrupted_time > INTERRUPTED_TIMEOUT_S):
            self.barge_onset = None  # a false start: nothing followed the interruption
            self.view.set_state(TalkState.LISTENING)
        c = self.io.counters
        self.view.set_underruns(c.underruns + c.output_underflows)

    def _barge_in_run(self, raw: np.ndarray) -> int:
        """Consecutive speech windows that count for a barge-in now (0 when they are echo)."""
        run = self.tap.run  # VAD on the echo-cancelled signal
        if self.raw_onset is None or not self.settings.audio.barge_in:
            return run  # headphones: no echo to tell apart (or _barge_in ignores it anyway)
        self.raw_onset.feed(raw)
        if self.raw_onset.run >= BARGE_IN_WINDOWS and run < BARGE_IN_WINDOWS and self._no_echo_path():
            run = self.raw_onset.run
        return run if run >= BARGE_IN_WINDOWS and not self._onset_is_echo() else 0

    def _onset_is_echo(self) -> bool:
        """The onset windows' raw samples are a delayed copy of what played (see ECHO_CORRELATION_MAX)."""
        from duplex_chat.audio.echo import echo_correlation

        span = BARGE_IN_WINDOWS * VAD_WINDOW_SAMPLES
        mic = self.raw_history.since(self.raw_history.total - span)
        played = self.played_history.since(
            self.played_history.total - span - int(ECHO_MAX_DELAY_S * SAMPLE_RATE))
        return echo_correlation(mic, played) >= ECHO_CORRELATION_MAX

    def _no_echo_path(self) -> bool:
        """The reply was audible ECHO_MAX_DELAY_S + ECHO_PROBE_S ago, yet the raw mic stayed
        NO_ECHO_DB under it since: no echo reaches the microphone (see NO_ECHO_DB)."""
        span = BARGE_IN_WINDOWS * VAD_WINDOW_SAMPLES
        probe = int(ECHO_PROBE_S * SAMPLE_RATE)
        reach = probe + int(ECHO_MAX_DELAY_S * SAMPLE_RATE)
        end = self.played_history.total - span
        played = self.played_history.since(end - reach)[:probe]
        mic_end = self.raw_history.total - span
        mic = self.raw_history.since(mic_end - reach)[:reach]
        if len(played) < probe or len(mic) < reach:
            return False  # too early in the session to tell
        reply_db = _median_window_db(played)
        return reply_db >= AUDIBLE_REPLY_DB and _median_window_db(mic) <= reply_db + NO_ECHO_DB

    def _barge_in(self, run: int) -> None:
        if not self.settings.audio.barge_in:
            return
        reply = self.reply
        assert reply is not None
        with self.gate.lock:
            self.gate.generation += 1
            heard = self.io.flush()
        self.conversation.cancel(heard)
        # The reply has often finished generating by now (the engine is faster than real
        # time): then only this cuts the history to what was heard. Queued before the
        # interrupting speech is fed, as truncate requires; after a cancel it changes nothing.
        self.worker.commands.put(("truncate", heard))
        onset = self.history.total - run * VAD_WINDOW_SAMPLES
        self.barge_onset = int(onset)
        self.interrupted_time = time.monotonic()
        self.note("barge_in", heard_samples=heard, onset_sample=int(onset),
                  detect_sample=self.history.total)
        self.view.reply_finished(interrupted=True)
        self.view.set_state(TalkState.INTERRUPTED)
        self.reply = None

    def _speech_started(self, event: Any) -> None:
        self.note("speech_started", onset_sample=event.sample_index,
                  audio_start=event.audio_start_index)
        if self.reply is not None:  # barge-in is off (or did not fire): not a turn
            return
        start = event.audio_start_index
        if self.barge_onset is not None:  # keep the speech that interrupted, even a short first word
            start = max(0, min(start, self.barge_onset - ms_to_samples(self.settings.vad.pre_roll_ms)))
            self.barge_onset = None
        self.turn_start = start
        self.fed_upto = max(start, self.history.total - self.history.capacity)
        self.note("user_turn_started", start_sample=start)
        self.view.set_state(TalkState.USER_SPEAKING)

    def _speech_ended(self, event: Any) -> None:
        self.note("speech_ended", end_sample=event.sample_index)
        if self.turn_start is None:
            return
        duration = (event.sample_index - self.turn_start) / SAMPLE_RATE
        in_latency = self.io.latency_s[0]
        since_end = (self.history.total - event.sample_index) / SAMPLE_RATE
        self.reply = ReplyProgress(self.gate.generation, time.monotonic() - since_end - in_latency)
        if self.raw_onset is not None:
            self.raw_onset.reset()  # it hears only replies: start each from a clean state
        with self.gate.lock:
            self.io.begin_reply()  # before end_turn is queued: played samples count from here
        self.turn_start = None
        self.worker.commands.put(("end_turn", self.gate.generation))
        self.note("user_turn", duration_s=round(duration, 3))
        self.view.user_turn(duration)
        self.view.set_state(TalkState.THINKING)

    def _drain_worker(self) -> None:
        while True:
            try:
                generation, event = self.worker.events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, Exception):
                raise event
            self._worker_event(generation, event)

    def _worker_event(self, generation: int, event: Any) -> None:
        current = self.reply is not None and self.reply.generation == generation
        if event == "done":
            if current:
                self.reply.worker_done = True  # type: ignore[union-attr]
            return
        if self.recorder is not None:
            self.recorder.event(event)
        if isinstance(event, Interrupted):
            self.view.set_heard_text(event.heard_text)
        if not current:
            return
        reply = self.reply
        assert reply is not None
        if isinstance(event, TurnStarted):
            self.view.reply_started()
        elif isinstance(event, TextDelta):
            self.view.reply_text(event.text, reply.audio_produced)
        elif isinstance(event, AudioPacket):
            reply.audio_produced += len(event.samples)
        elif isinstance(event, StageTimings):
            reply.stages.update(event.stages)
            self.view.set_stages(reply.stages)
        elif isinstance(event, TurnFinished):
            reply.audio_produced = max(reply.audio_produced, event.audio_samples)

    def _track_reply(self) -> None:
        reply = self.reply
        if reply is None:
            return
        played = self.io.reply_played_samples()
        if played > 0 and reply.first_played_time is None:
            reply.first_played_time = time.monotonic()
            latency_ms = 1000.0 * (reply.first_played_time - reply.speech_end_time)
            self.note("reply_latency", latency_ms=round(latency_ms, 1), stages=reply.stages)
            self.view.set_latency(latency_ms)
            self.view.set_state(TalkState.SPEAKING)
        self.view.reply_played(played)
        now = time.monotonic()
        if not (reply.worker_done and self.io.queued_output_s == 0):
            return
        if reply.drained_time is None:
            reply.drained_time = now
        if now - reply.drained_time >= self.io.latency_s[1]:  # the last samples are audible now
            self.view.reply_finished()
            self.reply = None
            self.view.set_state(TalkState.LISTENING)

    # ---- run ------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Loop until `stop` is set or Ctrl-C; raise DuplexError when a device fails."""
        self.worker.start()
        last_count, last_change = -1, time.monotonic()
        while stop is None or not stop.is_set():
            self.step()
            if self.io.check():
                self.note("streams_reopened", reopens=self.io.counters.reopens)
            now = time.monotonic()
            if self.io.callback_count != last_count:
                last_count, last_change = self.io.callback_count, now
            elif now - last_change > STALL_TIMEOUT_S:
                raise DuplexError("The audio device stopped delivering sound.",
                                  hint="Was it unplugged? Check it and run `duplex-chat talk` again.")
            self.view.refresh()
            time.sleep(LOOP_PERIOD_S)

    def shutdown(self) -> None:
        """Stop the reply and the worker (via cancel), without waiting long on the model."""
        self.worker.stopping.set()
        with self.gate.lock:
            self.gate.generation += 1
            heard = self.io.flush()
        self.conversation.cancel(heard)
        self.worker.commands.put(("stop", None))
        self.worker.join(WORKER_JOIN_TIMEOUT_S)


def talk_session(settings: Settings, conversation_factory: ConversationFactory, *,
                 console: Console | None = None, stop: threading.Event | None = None,
                 vad_model: Any = None) -> int:
    """Run one session with a conversation from `conversation_factory(settings)`.

    Tests pass a scripted factory, a recording Console and a `stop` event; `run_talk` passes the
    real engine. Returns 0 when stopped by `stop` or Ctrl-C; raises DuplexError when a device
    is missing or fails (after closing everything and flushing the log).
    """
    from duplex_chat.audio.devices import find_device
    from duplex_chat.audio.stream import AudioIO

    inp = find_device(settings.audio.input_device, "input")
    out = find_device(settings.audio.output_device, "output")
    view = TalkView(console, settings.ui.refresh_hz, settings.ui.plain)
    recorder = SessionRecorder(settings.ui.record_dir) if settings.ui.record_dir else None
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


def _session_loop(session, io, view, stop) -> None:
    settings = session.settings
    aec = "on" if session.echo is not None else "off (headphones)"
    view.info(f"mic: {io.input_device.name} @ {io.in_rate} Hz, speaker: {io.output_device.name} "
              f"@ {io.out_rate} Hz, echo cancellation {aec}. Ctrl-C ends.")
    session.note("session_started", input=io.input_device.name, output=io.output_device.name,
                 in_rate=io.in_rate, out_rate=io.out_rate, duplex=io.duplex,
                 latency_s=list(io.latency_s), echo_cancellation=session.echo is not None,
                 barge_in=settings.audio.barge_in)
    try:
        session.run(stop)
    except KeyboardInterrupt:
        view.info("Stopped.")
        session.note("stopped", reason="ctrl-c")
    except DuplexError as exc:
        view.info(f"Session ended: {exc}")
        session.note("error", message=str(exc))
        raise
    finally:
        session.shutdown()
        session.note("session_ended", underruns=io.counters.underruns,
                     output_underflows=io.counters.output_underflows,
                     overruns=io.counters.overruns, reopens=io.counters.reopens)
