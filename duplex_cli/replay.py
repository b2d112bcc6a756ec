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
on the right where it would have sounded, cut where the user barged in.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from rich.console import Console

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE, frames_to_samples
from duplex_chat.audio.files import audio_info, iter_audio_blocks
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
    TurnCommitted,
    VirtualPlayer,
)

BLOCK_S = 30.0  # seconds read from the file at a time


@dataclass
class TurnRecord:
    """One user turn and the reply to it, on the input's timeline (seconds)."""

    index: int
    start_s: float
    end_s: float  # where the detector placed the end of speech
    detected_s: float  # when the end of turn was known (the reply could start)
    text: str = ""
    stages: StageTimings | None = None  # the engine's timings of the reply (the session's sum)
    reply_start_s: float | None = None  # first reply sample on the timeline
    latency_s: float | None = None  # from end_s to reply_start_s (the session's ReplyAudible)
    latency_modelled: bool = True  # the first packet's time is MODELED_FIRST_PACKET_S, not measured
    reply_s: float = 0.0  # seconds of the reply heard (all of it, unless interrupted)
    interrupted_s: float | None = None  # when the user barged in, if they did
    heard_text: str | None = None  # what history kept of an interrupted reply


class ReplyTimeline:
    """Places reply audio on the output timeline (24 kHz) and writes the stereo file as it goes."""

    def __init__(self, path: Path | None):
        self.path = path
        self._writer = None
        self._left = StreamResampler(SAMPLE_RATE, OUTPUT_SAMPLE_RATE)
        self._written = 0  # frames written so far
        self._right: list[tuple[int, np.ndarray]] = []  # (start frame, samples) not yet written
        if path is not None:
            import soundfile as sf

            try:
                self._writer = sf.SoundFile(str(path), "w", OUTPUT_SAMPLE_RATE, 2, "PCM_16")
            except (sf.LibsndfileError, OSError) as exc:
                raise DuplexError(f"Cannot write {path}: {exc}.") from None

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


class Printer:
    """Human output: text as it is known, a timing line per turn."""

    def __init__(self, console: Console):
        self.console = console

    def turn_started(self, record: TurnRecord) -> None:
        self.console.print(
            f"\n[bold cyan]user[/] {_clock(record.start_s)}–{_clock(record.end_s)} "
            f"({record.end_s - record.start_s:.1f} s)"
        )
        self.console.print("[bold green]assistant[/] ", end="")

    def text(self, text: str, turn: int) -> None:
        self.console.print(text, end="", markup=False, highlight=False, soft_wrap=True)

    def turn_finished(self, record: TurnRecord) -> None:
        s = record.stages.stages if record.stages is not None else {}
        latency = record.latency_s
        how = "modelled" if record.latency_modelled else "measured"
        parts = [f"latency {latency * 1000:.0f} ms ({how})" if latency is not None else "no audio"]
        if record.interrupted_s is not None:
            parts.append(f"interrupted at {_clock(record.interrupted_s)} after "
                         f"{record.reply_s:.1f} s, kept "
                         f"{record.heard_text!r}")
        for key, label, unit in (("first_token", "first token", "ms"),
                                 ("first_packet", "first packet", "ms"),
                                 ("thinker_ms_per_token", "thinker", "ms/token"),
                                 ("talker_ms_per_frame", "talker", "ms/frame")):
            if key in s:
                parts.append(f"{label} {s[key]:.{2 if '/' in unit else 0}f} {unit}")
        self.console.print(f"\n[dim]  {', '.join(parts)}[/]")

    def note(self, message: str) -> None:
        self.console.print(f"[yellow]{message}[/]")

    def summary(self, records: list[TurnRecord], out: Path | None, seconds: float) -> None:
        self.console.print(f"\n{len(records)} turn(s) in {seconds:.1f} s"
                           + (f"; reply audio written to {out}" if out else ""))


class JsonPrinter:
    """`--json`: one object per line on stdout, flushed as it happens."""

    def _emit(self, **obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def turn_started(self, r: TurnRecord) -> None:
        self._emit(event="turn_started", turn=r.index, start_s=r.start_s, end_s=r.end_s,
                   detected_s=r.detected_s)

    def text(self, text: str, turn: int) -> None:
        self._emit(event="text", turn=turn, text=text)

    def turn_finished(self, r: TurnRecord) -> None:
        self._emit(event="turn_finished", turn=r.index, text=r.text, latency_s=r.latency_s,
                   latency="modelled" if r.latency_modelled else "measured",
                   reply_start_s=r.reply_start_s, reply_s=r.reply_s,
                   interrupted_s=r.interrupted_s, heard_text=r.heard_text,
                   stages=_rounded(r.stages))

    def note(self, message: str) -> None:
        self._emit(event="note", message=message)

    def summary(self, records, out, seconds) -> None:
        self._emit(event="summary", turns=len(records), out=str(out) if out else None,
                   seconds=seconds)


def _rounded(stages: StageTimings | None) -> dict[str, float]:
    """The measured stages by name for JSON, to the microsecond."""
    return {k: round(v, 3) for k, v in stages.stages.items()} if stages is not None else {}


def _clock(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes):02d}:{rest:04.1f}"


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

    def reset(self) -> None:
        if self._conversation is not None:
            self._conversation.reset()


class ReplaySession:
    """The file loop around a `Session` on a virtual clock (duplex_chat.session.virtual): feeds
    it 16 kHz chunks in order and turns its events into TurnRecords, printed lines and the
    timeline."""

    def __init__(self, settings: Settings, open_conversation: Callable[[], Conversation], printer,
                 timeline: ReplyTimeline, vad_model=None, measured_latency: bool = False):
        self.printer, self.timeline = printer, timeline
        self.records: list[TurnRecord] = []
        self.measured_latency = measured_latency
        first_packet_s = None if measured_latency else MODELED_FIRST_PACKET_S
        self.player = VirtualPlayer(lambda: self.session.now, timeline, first_packet_s)
        # Echo cancellation and its checks are for a live speaker: a file has no echo path.
        self.session = Session(settings, LazyConversation(open_conversation), self.player,
                               self._on_event, vad_model=vad_model, threaded=False)

    def process(self, chunk: np.ndarray) -> None:
        """One chunk (n,) at 16 kHz, in order."""
        self.session.hear(chunk)  # first: a reply it places may start inside this chunk
        self.timeline.input(chunk)

    def finish(self) -> None:
        """End of the file: close an open turn and let the last reply play out."""
        self.session.finish()
        self.player.run_out()
        self.session.hear(np.zeros(0, np.float32))
        self.timeline.close()

    def _on_event(self, event: SessionEvent) -> None:
        if isinstance(event, TurnCommitted):
            record = TurnRecord(event.turn, event.start_sample / SAMPLE_RATE,
                                event.end_sample / SAMPLE_RATE, event.sample / SAMPLE_RATE,
                                latency_modelled=not self.measured_latency)
            self.records.append(record)
            self.printer.turn_started(record)
        elif isinstance(event, EngineEvent) and event.current:
            self._engine_event(self.records[-1], event.event)
        elif isinstance(event, ReplyAudible):
            record = self.records[event.turn]
            record.reply_start_s = event.audible_sample / SAMPLE_RATE
            record.latency_s = round(event.latency_ms / 1000.0, 6)
        elif isinstance(event, Interrupted):
            self.records[-1].interrupted_s = event.sample / SAMPLE_RATE
        elif isinstance(event, (ReplyFinished, HistoryCut)):
            self._reply_over(event)

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


def run_replay(settings: Settings, file: Path, out: Path | None = None, stock: bool = False,
               json_out: bool = False, measured_latency: bool = False) -> int:
    """Replay `file`; returns the exit code. `measured_latency`: place each reply after its first
    packet's compute time measured on this machine, not the modelled MODELED_FIRST_PACKET_S."""
    info = audio_info(file)
    if out is not None and not out.parent.exists():
        raise DuplexError(f"Cannot write {out}: folder {out.parent} does not exist.")
    err = Console(stderr=True)
    printer = JsonPrinter() if json_out else Printer(Console())

    def open_conversation():
        return _open_conversation(settings, stock, err)

    timeline = ReplyTimeline(out)
    session = ReplaySession(settings, open_conversation, printer, timeline,
                            measured_latency=measured_latency)
    started = time.perf_counter()
    chunk = frames_to_samples(settings.audio.frames_per_chunk)
    try:
        with _progress(err, info.duration_s, enabled=err.is_terminal) as advance:
            for block in iter_audio_blocks(file, block_s=BLOCK_S):
                for i in range(0, block.shape[0], chunk):
                    session.process(block[i:i + chunk])
                advance(block.shape[0] / SAMPLE_RATE)
            session.finish()
    finally:
        timeline.close()
    if not session.records:
        if out is not None:
            out.unlink(missing_ok=True)
        raise DuplexError(f"No speech found in {file} ({info.duration_s:.1f} s of audio).",
                          hint="Check the recording level, or lower vad.threshold.")
    printer.summary(session.records, out, time.perf_counter() - started)
    return 0


def _open_conversation(settings: Settings, stock: bool, err: Console):
    from duplex_chat.model.loading import load_model

    bundle = load_model(settings.qwen, progress=lambda m: err.print(f"[dim]{m}[/]"))
    if stock:
        from duplex_chat.model.reference import StockConversation

        return StockConversation(bundle, settings.qwen)
    from duplex_chat.model.engine import StreamingConversation

    return StreamingConversation(bundle, settings)


class _progress:
    """A transient progress bar on stderr for long files (none when stderr is not a terminal)."""

    def __init__(self, console: Console, total_s: float, enabled: bool):
        self.console, self.total, self.enabled = console, total_s, enabled and total_s > 60

    def __enter__(self):
        if not self.enabled:
            return lambda seconds: None
        from rich.progress import Progress

        self._bar = Progress(console=self.console, transient=True)
        self._bar.start()
        task = self._bar.add_task("listening", total=self.total)
        return lambda seconds: self._bar.advance(task, seconds)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.stop()
        return False
