"""`duplex-chat replay FILE`: a recorded conversation played in as if spoken.

This file is the file loop and the timeline writer around `duplex_chat.session`, the same
turn-taking `talk` uses. The file is read block by block (a one-hour file never sits in memory
whole) and fed to the session in 320 ms chunks; the conversation is the streaming engine, or
stock `generate()` with `--stock`, loaded only once speech is found.

The session runs on a virtual clock, the file's own time (session/virtual.py): each reply starts
MODELED_FIRST_PACKET_S after its end of turn was detected and plays at real time, whatever this
machine's speed, so a replay gives the same result on every run; its latency is then modelled,
and says so. `--measured-latency` places each reply after the first packet's compute time as
measured here instead (results then vary with the machine and its load). The file keeps playing
in while a reply "plays": speech over it barges in, the reply is cut where it was heard, and the
history keeps only that. Replay follows `audio.barge_in` like talk: with it off, speech over a
reply does not cut it and becomes the next turn once the reply has played out, so either way
nothing the user said is lost, and a replay shows what talk would do with the same settings.

`--out` writes a stereo wav at 24 kHz on the input's timeline: the input on the left, each reply
on the right where it would have sounded, cut where the user barged in. Its header is kept right
as it grows (audio/files.py's WavWriter), and Ctrl-C or SIGTERM stop the replay where it is: the
file is finished, the summary printed, and the exit code is 128 + the signal (130, 143).

Each turn is timed on the file's timeline: the end of speech, when the turn policy decided the
turn was over, when the reply was asked for (later than the decision when the previous reply was
still playing), when its first packet was ready and when it would be heard. Two latencies come
from them: the reply ready after the end of speech (deciding plus the first packet: what turn
taking and the engine cost) and the reply heard after it (that plus any wait for the previous
reply). On a terminal, the progress bar of a long file sits below the printed lines, with the
reply being written just above it, so they never overwrite each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE, frames_to_samples
from duplex_chat.audio.files import WavWriter, audio_info, iter_audio_blocks
from duplex_chat.audio.resample import StreamResampler
from duplex_chat.config import DuplexError, Settings
from duplex_chat.model.events import Event, HistoryTrimmed, StageTimings, TextDelta
from duplex_chat.model.protocol import Conversation
from duplex_chat.session import (
    EngineEvent,
    HistoryCut,
    MODELED_FIRST_PACKET_S,
    Interrupted,
    ReplyAudible,
    ReplyFinished,
    SessionEvent,
    Session,
    SpeculationCounts,
    TurnCommitted,
    TurnDiscarded,
    UserSpeechEnded,
    VirtualPlayer,
)

BLOCK_S = 30.0  # seconds read from the file at a time
PROGRESS_MIN_S = 60.0  # files at least this long (seconds) get a progress bar on a terminal
REFRESH_S = 0.1  # the live area (bar and reply being written) is redrawn at most this often
LATENCY_DECIMALS = 6  # latencies in --json are rounded to the microsecond
SIGNAL_EXIT_BASE = 128  # stopped by signal N, replay exits 128 + N (130 Ctrl-C, 143 SIGTERM)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class TurnRecord:
    """One user turn and the reply to it, on the input file's timeline (seconds from its start).

    The reply's wait splits into: deciding the turn (end_of_speech_s -> turn_decided_s), waiting
    for the previous reply to play out (-> reply_requested_s; none unless speech that did not
    barge in became the turn), making the first packet (-> first_packet_ready_s) and playing it
    (-> reply_start_s; at once on replay's virtual player)."""

    index: int
    start_s: float  # where the turn's audio starts (pre-roll included)
    end_of_speech_s: float  # where the detector placed the end of the user's speech
    turn_decided_s: float  # when the turn policy decided the turn was over
    reply_requested_s: float  # when the session asked the engine for the reply
    text: str = ""
    stages: StageTimings | None = None  # the engine's timings of the reply (the session's sum)
    # The reply's first packet was ready to play: reply_requested_s plus the first packet's
    # time; for a reply started speculatively at a pause, when that packet was ready, but not
    # before turn_decided_s (a packet made sooner waits for the decision).
    first_packet_ready_s: float | None = None
    reply_start_s: float | None = None  # its first sample would be heard ("would be heard at")
    heard_latency_s: float | None = None  # end_of_speech_s -> reply_start_s (ReplyAudible's)
    latency_modelled: bool = True  # the first packet's time is MODELED_FIRST_PACKET_S, not measured
    # A speculative start at the pause from here (turn.speculate_ms) made the first packet before
    # the turn was decided; None when the reply was started at the decision.
    speculated_from_s: float | None = None
    reply_s: float = 0.0  # seconds of the reply heard (all of it, unless interrupted)
    interrupted_s: float | None = None  # when the user barged in, if they did
    heard_text: str | None = None  # what history kept of an interrupted reply

    @property
    def queued_s(self) -> float:
        """Seconds the decided turn waited for the previous reply to play out."""
        return self.reply_requested_s - self.turn_decided_s

    @property
    def ready_latency_s(self) -> float | None:
        """Reply ready after the end of speech: from there to the first packet, less any wait
        for the previous reply (so deciding the turn plus making the packet). None while no
        packet was ready."""
        if self.first_packet_ready_s is None:
            return None
        return self.first_packet_ready_s - self.end_of_speech_s - self.queued_s


class ReplyTimeline:
    """Places reply audio on the output timeline (24 kHz) and writes the stereo file as it goes."""

    def __init__(self, path: Path | None):
        self.path = path
        self._writer = None
        self._left = StreamResampler(SAMPLE_RATE, OUTPUT_SAMPLE_RATE)
        self._written = 0  # frames written so far
        self._right: list[tuple[int, np.ndarray]] = []  # (start frame, samples) not yet written
        if path is not None:
            self._writer = WavWriter(path, OUTPUT_SAMPLE_RATE, channels=2, subtype="PCM_16")

    def place(self, start: int, samples: np.ndarray) -> None:
        """Reply samples (n,) that sound from output frame `start` on (24 kHz)."""
        if self._writer is not None:
            self._right.append((start, samples))

    def cut(self, end: int) -> None:
        """Nothing of the replies placed sounds from frame `end` on (a barge-in stopped it)."""
        self._right = [(start, x[:max(0, end - start)]) for start, x in self._right if start < end]

    def input(self, block: np.ndarray) -> None:
        """Append input audio (16 kHz) to the left channel, writing what is complete."""
        if self._writer is not None:
            self._write(self._left.process(block))

    def close(self) -> None:
        """Finish the file (idempotent); after an error it still gets a valid header."""
        if self._writer is None or self._writer.closed:
            return
        self._write(self._left.flush())
        end = max([s + x.shape[0] for s, x in self._right], default=self._written)
        if end > self._written:
            self._write(np.zeros(end - self._written, np.float32))
        self._writer.close()

    def _write(self, left: np.ndarray) -> None:
        n = left.shape[0]
        frame = np.zeros((n, 2), np.float32)
        frame[:, 0] = left
        lo, hi = self._written, self._written + n
        keep = []
        for start, samples in self._right:
            a, b = max(lo, start), min(hi, start + samples.shape[0])
            if a < b:
                frame[a - lo:b - lo, 1] += samples[a - start:b - start]
            if start + samples.shape[0] > hi:
                keep.append((start, samples))
        self._right = keep
        self._writer.write(frame)
        self._written = hi


class LiveArea:
    """The bottom of a terminal while a long file plays in: a progress bar, with the reply being
    written just above it. Lines printed on the same console meanwhile go above both (rich's
    Live), so nothing overwrites anything. Redrawn at most every REFRESH_S; `line` is the reply
    in progress (None between replies)."""

    def __init__(self, console: Console, total_s: float, redirect_stderr: bool):
        self.bar = Progress(console=console)  # drawn by the Live below, never started itself
        self.task = self.bar.add_task("listening", total=total_s)
        self.line: Text | None = None
        self.live = Live(console=console, get_renderable=self._view, auto_refresh=False,
                         transient=True, redirect_stdout=False, redirect_stderr=redirect_stderr)
        self._drawn_at = 0.0

    def __enter__(self) -> Callable[[float], None]:
        self.live.start()
        return self.advance

    def __exit__(self, *exc) -> bool:
        line = self.take_line()
        if line is not None:  # stopped mid-reply: what was written stays on the screen
            self.live.console.print(line, soft_wrap=True)
        self.live.stop()
        return False

    def advance(self, seconds: float) -> None:
        self.bar.advance(self.task, seconds)
        self.refresh()

    def start_line(self, line: Text) -> None:
        """Show `line` (a reply about to be written) above the bar."""
        self.line = line
        self.refresh(force=True)

    def take_line(self) -> Text | None:
        """The reply's line, removed from the area (redrawn at once, so that the line printed
        next is not also drawn there)."""
        line, self.line = self.line, None
        self.refresh(force=True)
        return line

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._drawn_at >= REFRESH_S:
            self._drawn_at = now
            self.live.refresh()

    def _view(self):
        return self.bar if self.line is None else Group(self.line, self.bar)


def _stderr_bar(err: Console, total_s: float) -> ContextManager[Callable[[float], None]]:
    """A transient bar on stderr while stdout goes elsewhere (a file, a pipe): stdout stays
    untouched, stderr's own lines print above the bar."""
    bar = Progress(console=err, transient=True, redirect_stdout=False)
    task = bar.add_task("listening", total=total_s)

    @contextlib.contextmanager
    def shown():
        with bar:
            yield lambda seconds: bar.advance(task, seconds)

    return shown()


@contextlib.contextmanager
def _no_progress():
    yield lambda seconds: None


class Printer:
    """Human output on `console`: text as it is known, timing lines per turn, a table at the
    end; loading messages on `err`. Lines are never hard-wrapped (a terminal wraps them itself,
    and a file or pipe gets them whole). With a progress bar on this terminal, the reply being
    written shows in the LiveArea above the bar and is printed whole once the reply is over."""

    def __init__(self, console: Console, err: Console | None = None):
        self.console = console
        self.err = err if err is not None else Console(stderr=True)
        self._area: LiveArea | None = None

    def progress(self, total_s: float) -> ContextManager[Callable[[float], None]]:
        """A progress bar for a file of `total_s` seconds, where it cannot collide with other
        output: a long file only; in the LiveArea when stdout is a terminal (stderr's lines, on
        the same screen, are routed above it), else on stderr when that is one."""
        if total_s < PROGRESS_MIN_S:
            return _no_progress()
        if self.console.is_terminal:
            self._area = LiveArea(self.console, total_s, redirect_stderr=self.err.is_terminal)
            return self._area
        return _stderr_bar(self.err, total_s) if self.err.is_terminal else _no_progress()

    def status(self, message: str) -> None:
        """A loading message: on stderr, or above the live area when stderr shares its screen
        (rich writes a Console's lines past the redirection, so they would land on the bar)."""
        shared = self._live() and self.err.is_terminal
        (self.console if shared else self.err).print(f"[dim]{message}[/]")

    def turn_started(self, record: TurnRecord) -> None:
        self.console.print(
            f"\n[bold cyan]user[/] {_clock(record.start_s)}–{_clock(record.end_of_speech_s)} "
            f"({record.end_of_speech_s - record.start_s:.1f} s)", soft_wrap=True
        )
        if self._live():
            self._area.start_line(Text.assemble(("assistant ", "bold green")))
        else:
            self.console.print("[bold green]assistant[/] ", end="")

    def text(self, text: str, turn: int) -> None:
        if self._live() and self._area.line is not None:
            self._area.line.append(text)
            self._area.refresh()
        else:
            self.console.print(text, end="", markup=False, highlight=False, soft_wrap=True)

    def turn_finished(self, record: TurnRecord) -> None:
        line = self._area.take_line() if self._live() else None
        if line is not None:
            self.console.print(line, soft_wrap=True)
        else:
            self.console.print()  # ends the streamed line
        for line in _timing_lines(record):
            self.console.print(f"[dim]  {line}[/]", highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        self.console.print(f"[yellow]{message}[/]", soft_wrap=True)

    def summary(self, records: list[TurnRecord], out: Path | None, seconds: float,
                stopped: Stop | None, speculations: SpeculationCounts | None = None) -> None:
        if records:
            self.console.print()
            self.console.print(_turn_table(records))
        how = (f"stopped by {stopped.name} at {_clock(stopped.at_s)}: " if stopped else "")
        self.console.print(f"\n{how}{len(records)} turn(s) in {seconds:.1f} s"
                           + (f"; reply audio written to {out}" if out else ""), soft_wrap=True)
        if speculations is not None and speculations.started:
            s = speculations
            self.console.print(f"speculative starts: {s.started}, {s.used} played, {s.taken_back} "
                               f"taken back ({s.wasted_ms:.0f} ms of engine time wasted)",
                               soft_wrap=True)

    def _live(self) -> bool:
        return self._area is not None and self._area.live.is_started


def _timing_lines(r: TurnRecord) -> list[str]:
    """The per-turn lines under a reply: when it was ready and heard, a cut, this machine's
    stages."""
    if r.ready_latency_s is None:
        lines = ["no audio"]
    else:
        how = "modelled" if r.latency_modelled else "measured"
        decided = r.turn_decided_s - r.end_of_speech_s
        if r.speculated_from_s is not None:  # its packet was there when the turn was decided
            packet = (f"first packet made during the pause, from "
                      f"{_span(r.speculated_from_s - r.end_of_speech_s)} after the end of speech")
        else:
            packet = f"first packet {_span(r.first_packet_ready_s - r.reply_requested_s)}"
        heard = (f"heard from {_clock(r.reply_start_s)}, {_span(r.heard_latency_s)} after the "
                 "end of speech")
        if r.queued_s > 0:
            heard += f": it waited {_span(r.queued_s)} for the previous reply to end"
        lines = [f"reply ready {_span(r.ready_latency_s)} after the end of speech (turn decided "
                 f"{_span(decided)}, {packet}, {how})", heard]
    if r.interrupted_s is not None:
        lines.append(f"interrupted at {_clock(r.interrupted_s)} after {r.reply_s:.1f} s, kept "
                     f"{r.heard_text!r}")
    s = r.stages.stages if r.stages is not None else {}
    stages = [f"{label} {s[key]:.{2 if '/' in unit else 0}f} {unit}"
              for key, label, unit in (("first_token", "first token", "ms"),
                                       ("first_packet", "first packet", "ms"),
                                       ("thinker_ms_per_token", "thinker", "ms/token"),
                                       ("talker_ms_per_frame", "talker", "ms/frame"))
              if key in s]
    if stages:
        lines.append("on this machine: " + ", ".join(stages))
    return lines


def _span(seconds: float) -> str:
    """A duration as people read it: "688 ms" below a second, "118.0 s" from there."""
    return f"{1000 * seconds:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _turn_table(records: list[TurnRecord]) -> Table:
    """Every turn's timeline and latencies, one row each."""
    table = Table("turn", "end of speech", "decided", "first packet", "heard from",
                  "ready after", "heard after", title="turns (file time; latencies from the "
                  "end of speech)", title_justify="left")
    for r in records:
        ready, heard = r.ready_latency_s, r.heard_latency_s
        table.add_row(
            str(r.index), _clock(r.end_of_speech_s), _clock(r.turn_decided_s),
            _clock(r.first_packet_ready_s) if r.first_packet_ready_s is not None else "-",
            _clock(r.reply_start_s) if r.reply_start_s is not None else "-",
            _span(ready) if ready is not None else "-",
            _span(heard) if heard is not None else "-")
    return table


class JsonPrinter:
    """`--json`: one object per line on stdout, flushed as it happens; loading messages and the
    progress bar on `err`."""

    def __init__(self, err: Console | None = None):
        self.err = err if err is not None else Console(stderr=True)

    def progress(self, total_s: float) -> ContextManager[Callable[[float], None]]:
        """A bar on stderr for a long file, only when stdout is not that terminal too: raw JSON
        lines and a redrawn bar cannot share one screen."""
        if total_s >= PROGRESS_MIN_S and self.err.is_terminal and not sys.stdout.isatty():
            return _stderr_bar(self.err, total_s)
        return _no_progress()

    def status(self, message: str) -> None:
        """A loading message, on stderr (the bar's console: printed above it)."""
        self.err.print(f"[dim]{message}[/]")

    def _emit(self, **obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def turn_started(self, r: TurnRecord) -> None:
        self._emit(event="turn_started", turn=r.index, start_s=r.start_s,
                   end_of_speech_s=r.end_of_speech_s, turn_decided_s=r.turn_decided_s,
                   reply_requested_s=r.reply_requested_s)

    def text(self, text: str, turn: int) -> None:
        self._emit(event="text", turn=turn, text=text)

    def turn_finished(self, r: TurnRecord) -> None:
        self._emit(event="turn_finished", turn=r.index, text=r.text,
                   end_of_speech_s=r.end_of_speech_s, turn_decided_s=r.turn_decided_s,
                   reply_requested_s=r.reply_requested_s,
                   first_packet_ready_s=r.first_packet_ready_s, reply_start_s=r.reply_start_s,
                   ready_latency_s=_round(r.ready_latency_s),
                   heard_latency_s=_round(r.heard_latency_s),
                   first_packet_timing="modelled" if r.latency_modelled else "measured",
                   speculated_from_s=r.speculated_from_s, reply_s=r.reply_s,
                   interrupted_s=r.interrupted_s, heard_text=r.heard_text,
                   stages=_rounded(r.stages))

    def note(self, message: str) -> None:
        self._emit(event="note", message=message)

    def summary(self, records, out, seconds, stopped: Stop | None,
                speculations: SpeculationCounts | None = None) -> None:
        self._emit(event="summary", turns=len(records), out=str(out) if out else None,
                   seconds=seconds, stopped=stopped.name if stopped else None,
                   stopped_at_s=stopped.at_s if stopped else None,
                   speculations=dataclasses.asdict(speculations) if speculations else None)


def _round(seconds: float | None) -> float | None:
    return round(seconds, LATENCY_DECIMALS) if seconds is not None else None


def _rounded(stages: StageTimings | None) -> dict[str, float]:
    """The measured stages by name for JSON, to the microsecond."""
    return {k: round(v, 3) for k, v in stages.stages.items()} if stages is not None else {}


def _clock(seconds: float) -> str:
    """mm:ss.s, rounded to the tenth first (59.96 s is 01:00.0, not 00:60.0)."""
    minutes, tenths = divmod(round(seconds * 10), 600)
    return f"{minutes:02d}:{tenths / 10:04.1f}"


class LazyConversation:
    """A Conversation opened on first use: the model is loaded only once speech is found."""

    def __init__(self, open_conversation: Callable[[], Conversation]):
        self._open = open_conversation
        self._conversation: Conversation | None = None

    @property
    def opened(self) -> Conversation:
        if self._conversation is None:
            self._conversation = self._open()
        return self._conversation

    def feed(self, samples: np.ndarray) -> None:
        self.opened.feed(samples)

    def end_turn(self) -> Iterator[Event]:
        return self.opened.end_turn()

    def cancel(self, heard_samples: int) -> None:
        if self._conversation is not None:  # nothing to stop before the model exists
            self._conversation.cancel(heard_samples)

    def truncate(self, heard_samples: int) -> str:
        return self.opened.truncate(heard_samples)

    def discard_turn(self) -> None:
        if self._conversation is not None:
            self._conversation.discard_turn()

    def checkpoint(self) -> object:
        return self.opened.checkpoint()

    def rollback(self, checkpoint: object) -> None:
        self.opened.rollback(checkpoint)

    def reset(self) -> None:
        if self._conversation is not None:
            self._conversation.reset()


class ReplaySession:
    """The file loop around a `Session` on a virtual clock (duplex_chat.session.virtual): feeds
    it 16 kHz chunks in order and turns its events into TurnRecords, printed lines and the
    timeline."""

    def __init__(self, settings: Settings, open_conversation: Callable[[], Conversation], printer,
                 timeline: ReplyTimeline, vad_model=None, measured_latency: bool = False,
                 uninterrupted: Callable[[], ContextManager] = contextlib.nullcontext):
        self.printer, self.timeline = printer, timeline
        self.uninterrupted = uninterrupted  # where a stop signal waits (StopSignals.deferred)
        self.records: list[TurnRecord] = []
        self._chunk: np.ndarray | None = None  # the chunk the session hears, not yet the timeline
        self._timeline_samples = 0  # 16 kHz samples the timeline has been given
        self.measured_latency = measured_latency
        first_packet_s = None if measured_latency else MODELED_FIRST_PACKET_S
        self.player = VirtualPlayer(lambda: self.session.now, timeline, first_packet_s)
        self._decided: dict[int, int] = {}  # end of speech -> when it was decided (samples)
        # Echo cancellation and its checks are for a live speaker: a file has no echo path.
        self.session = Session(settings, LazyConversation(open_conversation), self.player,
                               self._on_event, vad_model=vad_model, threaded=False)

    @property
    def position_s(self) -> float:
        """How far into the file the session has heard (seconds)."""
        return self.session.now / SAMPLE_RATE

    def process(self, chunk: np.ndarray) -> None:
        """One chunk (n,) at 16 kHz, in order. A stop may come while the session hears it (the
        model may run there for long); the timeline takes it whole or not at all."""
        self._chunk = chunk
        self.session.hear(chunk)  # first: a reply it places may start inside this chunk
        self._to_timeline(chunk)

    def finish(self) -> None:
        """End of the file: close an open turn and let the last reply play out."""
        self.session.finish()
        self.player.run_out()
        self.session.hear(np.zeros(0, np.float32))
        self.timeline.close()

    def stop(self) -> None:
        """Stopped before the end (Ctrl-C, SIGTERM): the session ends where the file was, a reply
        in flight is cut there and reported with what was heard of it; the timeline gets the
        part of the last chunk the session heard, so it ends where the session did."""
        self.session.close()
        if self._chunk is not None:
            self._to_timeline(self._chunk[:max(0, self.session.now - self._timeline_samples)])

    def _to_timeline(self, chunk: np.ndarray) -> None:
        with self.uninterrupted():
            self.timeline.input(chunk)
            self._timeline_samples += len(chunk)
            self._chunk = None

    def _on_event(self, event: SessionEvent) -> None:
        if isinstance(event, UserSpeechEnded):
            self._decided[event.end_sample] = event.sample
        elif isinstance(event, TurnCommitted):
            self._committed(event)
        elif isinstance(event, EngineEvent) and event.current:
            self._engine_event(self.records[-1], event.event)
        elif isinstance(event, ReplyAudible):
            self._audible(event)
        elif isinstance(event, Interrupted) and event.cause == "close":
            self._stopped(event)
        elif isinstance(event, Interrupted):
            self.records[-1].interrupted_s = event.sample / SAMPLE_RATE
        elif isinstance(event, (ReplyFinished, HistoryCut)):
            self._reply_over(event)
        elif isinstance(event, TurnDiscarded):
            self.printer.note(f"the turn from {_clock(event.start_sample / SAMPLE_RATE)} was "
                              "still open when the replay stopped: it got no reply")

    def _committed(self, event: TurnCommitted) -> None:
        """The reply is asked for. The turn was decided when its speech's end was known, which
        is earlier when the previous reply was still playing (speech that did not barge in)."""
        decided = self._decided.pop(event.end_sample, event.sample)
        self._decided.clear()
        record = TurnRecord(event.turn, event.start_sample / SAMPLE_RATE,
                            event.end_sample / SAMPLE_RATE, decided / SAMPLE_RATE,
                            event.sample / SAMPLE_RATE, latency_modelled=not self.measured_latency)
        if event.speculated_from is not None:  # started at the pause: ready sooner
            self.player.speculated_from(event.speculated_from, None if event.speculation_ms is None
                                        else event.speculation_ms / 1000)
            record.speculated_from_s = event.speculated_from / SAMPLE_RATE
        self.records.append(record)
        self.printer.turn_started(record)

    def _audible(self, event: ReplyAudible) -> None:
        record = self.records[event.turn]
        # The virtual player starts a reply the moment its first packet is ready to play.
        record.first_packet_ready_s = self.player.start / OUTPUT_SAMPLE_RATE
        record.reply_start_s = event.audible_sample / SAMPLE_RATE
        record.heard_latency_s = event.latency_ms / 1000.0

    def _engine_event(self, record: TurnRecord, event: Event) -> None:
        if isinstance(event, TextDelta) and event.text:
            record.text += event.text
            self.printer.text(event.text, record.index)
        elif isinstance(event, StageTimings):
            record.stages = self.session.reply_stages
        elif isinstance(event, HistoryTrimmed):
            self.printer.note(f"dropped the {event.dropped_turns} oldest turn(s) to fit the context")

    def _reply_over(self, event: ReplyFinished | HistoryCut) -> None:
        """The reply played out, or was cut (HistoryCut follows the barge-in at once here)."""
        record = self.records[event.turn]
        record.reply_s = event.heard_samples / OUTPUT_SAMPLE_RATE
        if isinstance(event, HistoryCut):
            record.heard_text = event.text
        self.printer.turn_finished(record)

    def _stopped(self, event: Interrupted) -> None:
        """The replay stopped while this reply was in flight: report what was heard of it."""
        if event.turn >= len(self.records):
            return  # stopped between deciding the turn and telling of it: nothing was heard
        record = self.records[event.turn]
        record.reply_s = (event.heard_samples or 0) / OUTPUT_SAMPLE_RATE
        self.printer.turn_finished(record)


@dataclass(frozen=True)
class Stop:
    """Why and where a replay stopped early."""

    name: str  # "SIGINT" (Ctrl-C) or "SIGTERM"
    signum: int
    at_s: float  # how far into the file (seconds)


class StopSignals:
    """While active, SIGTERM stops the replay as Ctrl-C does: the first SIGINT or SIGTERM raises
    KeyboardInterrupt and is remembered (`signum`), at once or, inside `deferred`, as that block
    ends; once `disarm`ed (the replay is finishing its files) further ones are ignored, so a
    second Ctrl-C cannot cut the wav's last write. The previous handlers come back on exit. Off
    the main thread (no signals there) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._armed = True
        self._deferring = False
        self._pending = False  # a signal came inside `deferred`
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def disarm(self) -> None:
        self._armed = False

    @contextlib.contextmanager
    def deferred(self):
        """A block a signal must not stop halfway (writing the wav: a resampler's state and the
        frames written must stay together): the signal takes effect when it ends."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending and self._armed:
            self._pending = False
            raise KeyboardInterrupt

    def _handle(self, signum, frame) -> None:
        if self._armed and self.signum is None:
            self.signum = signum
            if self._deferring:
                self._pending = True
            else:
                raise KeyboardInterrupt


def run_replay(settings: Settings, file: Path, out: Path | None = None, stock: bool = False,
               json_out: bool = False, measured_latency: bool = False) -> int:
    """Replay `file`; returns the exit code: 0, or 128 + the signal that stopped it early
    (Ctrl-C 130, SIGTERM 143) after finishing `out` and printing the summary. `measured_latency`:
    place each reply after its first packet's compute time measured on this machine, not the
    modelled MODELED_FIRST_PACKET_S."""
    info = audio_info(file)
    if out is not None and not out.parent.exists():
        raise DuplexError(f"Cannot write {out}: folder {out.parent} does not exist.")
    err = Console(stderr=True)
    printer = JsonPrinter(err) if json_out else Printer(Console(), err)

    def open_conversation():
        return _open_conversation(settings, stock, printer.status)

    timeline = ReplyTimeline(out)
    signals = StopSignals()
    session = ReplaySession(settings, open_conversation, printer, timeline,
                            measured_latency=measured_latency, uninterrupted=signals.deferred)
    started = time.perf_counter()
    with signals:
        with printer.progress(info.duration_s) as advance:
            try:
                _play_in(file, session, frames_to_samples(settings.audio.frames_per_chunk),
                         advance)
                session.finish()
            except KeyboardInterrupt:
                signals.disarm()
                signals.signum = signals.signum or signal.SIGINT
                session.stop()
            finally:
                signals.disarm()
                timeline.close()
        stopped = (Stop(signal.Signals(signals.signum).name, signals.signum, session.position_s)
                   if signals.signum is not None else None)
        if not session.records and stopped is None:
            if out is not None:
                out.unlink(missing_ok=True)
            raise DuplexError(f"No speech found in {file} ({info.duration_s:.1f} s of audio).",
                              hint="Check the recording level, or lower vad.threshold.")
        printer.summary(session.records, out, time.perf_counter() - started, stopped,
                        session.session.speculations)
    return 0 if stopped is None else SIGNAL_EXIT_BASE + stopped.signum


def _play_in(file: Path, session: ReplaySession, chunk: int,
             advance: Callable[[float], None]) -> None:
    """Feed the file to the session chunk by chunk, moving the progress bar along."""
    for block in iter_audio_blocks(file, block_s=BLOCK_S):
        for i in range(0, block.shape[0], chunk):
            piece = block[i:i + chunk]
            session.process(piece)
            advance(piece.shape[0] / SAMPLE_RATE)


def _open_conversation(settings: Settings, stock: bool, status: Callable[[str], None]):
    from duplex_chat.model.loading import load_model

    bundle = load_model(settings.qwen, progress=status)
    if stock:
        from duplex_chat.model.reference import StockConversation

        return StockConversation(bundle, settings.qwen)
    from duplex_chat.model.engine import StreamingConversation

    return StreamingConversation(bundle, settings)
