"""`duplex-chat replay FILE`: a recorded conversation played in as if spoken.

The file is read block by block (a one-hour file never sits in memory whole), cut into 320 ms
chunks and run through the same voice-activity detector as `talk`. While the user speaks, the
chunks go to the conversation (the streaming engine, or stock `generate()` with `--stock`); when
the detector ends the turn, the reply streams back. The model is loaded only once speech is found.

`--out` writes a stereo wav at 24 kHz on the input's timeline: the input on the left, each reply on
the right from the moment its first packet was ready (end-of-turn detection + measured latency),
later packets no earlier than they were made. Latency can be read off it in any audio editor.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from rich.console import Console

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE, frames_to_samples
from duplex_chat.audio.files import audio_info, iter_audio_blocks
from duplex_chat.audio.resample import StreamResampler
from duplex_chat.audio.vad import SpeechEnded, SpeechStarted, VoiceActivity
from duplex_chat.config import DuplexError, Settings
from duplex_chat.model.events import (
    AudioPacket,
    Event,
    HistoryTrimmed,
    Interrupted,
    StageTimings,
    TextDelta,
    TurnFinished,
    TurnStarted,
)

BLOCK_S = 30.0  # seconds read from the file at a time
RECENT_SLACK_S = 2.0  # audio kept beyond pre-roll for a turn's start, seconds


@dataclass
class TurnRecord:
    """One user turn and the reply to it, on the input's timeline (seconds)."""

    index: int
    start_s: float
    end_s: float  # where the detector placed the end of speech
    detected_s: float  # when the end of turn was known (the reply could start)
    text: str = ""
    stages: dict = field(default_factory=dict)
    reply_start_s: float | None = None  # first reply sample on the timeline
    reply_samples: int = 0


class ReplyTimeline:
    """Places reply audio on the output timeline (24 kHz) and writes the stereo file as it goes."""

    def __init__(self, path: Path | None):
        self.path = path
        self._writer = None
        self._left = StreamResampler(SAMPLE_RATE, OUTPUT_SAMPLE_RATE)
        self._written = 0  # frames written so far
        self._right: list[tuple[int, np.ndarray]] = []  # (start frame, samples) not yet written
        self._cursor = 0  # where the next reply packet may start at the earliest
        if path is not None:
            import soundfile as sf

            try:
                self._writer = sf.SoundFile(str(path), "w", OUTPUT_SAMPLE_RATE, 2, "PCM_16")
            except (sf.LibsndfileError, OSError) as exc:
                raise DuplexError(f"Cannot write {path}: {exc}.") from None

    def place(self, samples: np.ndarray, ready_s: float) -> int:
        """Schedule reply samples that were ready at `ready_s`; returns their start frame."""
        start = max(self._cursor, int(round(ready_s * OUTPUT_SAMPLE_RATE)))
        self._cursor = start + samples.shape[0]
        if self._writer is not None:
            self._right.append((start, samples))
        return start

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

    def text(self, text: str) -> None:
        self.console.print(text, end="", markup=False, highlight=False, soft_wrap=True)

    def turn_finished(self, record: TurnRecord) -> None:
        s = record.stages
        latency = (record.reply_start_s - record.end_s) if record.reply_start_s is not None else None
        parts = [f"latency {latency * 1000:.0f} ms" if latency is not None else "no audio"]
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

    def text(self, text: str) -> None:
        self._emit(event="text", text=text)

    def turn_finished(self, r: TurnRecord) -> None:
        latency = None if r.reply_start_s is None else r.reply_start_s - r.end_s
        self._emit(event="turn_finished", turn=r.index, text=r.text, latency_s=latency,
                   reply_start_s=r.reply_start_s, reply_samples=r.reply_samples, stages=r.stages)

    def note(self, message: str) -> None:
        self._emit(event="note", message=message)

    def summary(self, records, out, seconds) -> None:
        self._emit(event="summary", turns=len(records), out=str(out) if out else None,
                   seconds=seconds)


def _clock(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes):02d}:{rest:04.1f}"


class ReplaySession:
    """Drives VAD and a conversation over a stream of 16 kHz chunks."""

    def __init__(self, settings: Settings, open_conversation: Callable[[], object], printer,
                 timeline: ReplyTimeline):
        self.settings = settings
        self._open = open_conversation
        self.conversation = None
        self.printer = printer
        self.timeline = timeline
        self.vad = VoiceActivity(settings.vad)
        self.records: list[TurnRecord] = []
        self._recent = np.zeros(0, np.float32)  # the latest audio, for pre-roll
        self._recent_start = 0  # absolute index of _recent[0]
        self._in_turn = False
        self._turn_start = 0
        self._position = 0  # samples processed

    def process(self, chunk: np.ndarray) -> None:
        """One chunk (n,) at 16 kHz, in order."""
        self.timeline.input(chunk)
        self._remember(chunk)
        end = self._position + chunk.shape[0]
        fed_to = self._position
        for event in self.vad.feed(chunk):
            if isinstance(event, SpeechStarted):
                self._start_turn(event)
                fed_to = self._feed_range(event.audio_start_index, end)
            elif isinstance(event, SpeechEnded):
                if self._in_turn:
                    self._feed_range(fed_to, end)
                    self._end_turn(event, detected=end)
                    fed_to = end
        if self._in_turn and fed_to < end:
            self._feed_range(fed_to, end)
        self._position = end

    def finish(self) -> None:
        for event in self.vad.finish():
            if isinstance(event, SpeechEnded) and self._in_turn:
                self._end_turn(event, detected=self._position)
        self.timeline.close()

    def _remember(self, chunk: np.ndarray) -> None:
        # Speech start is reported min_speech_ms after the onset, and the turn starts pre_roll_ms
        # before it: keep that much plus slack.
        vad = self.settings.vad
        keep = int(SAMPLE_RATE * ((vad.pre_roll_ms + vad.min_speech_ms) / 1000 + RECENT_SLACK_S))
        self._recent = np.concatenate([self._recent, chunk])
        if self._recent.shape[0] > keep:
            drop = self._recent.shape[0] - keep
            self._recent = self._recent[drop:]
            self._recent_start += drop

    def _feed_range(self, start: int, end: int) -> int:
        lo = max(start, self._recent_start) - self._recent_start
        hi = end - self._recent_start
        if hi > lo:
            self.conversation.feed(self._recent[lo:hi])
        return end

    def _start_turn(self, event: SpeechStarted) -> None:
        if self.conversation is None:
            self.conversation = self._open()
        self._in_turn = True
        self._turn_start = event.audio_start_index

    def _end_turn(self, event: SpeechEnded, detected: int) -> None:
        self._in_turn = False
        record = TurnRecord(len(self.records), self._turn_start / SAMPLE_RATE,
                            event.sample_index / SAMPLE_RATE, detected / SAMPLE_RATE)
        self.records.append(record)
        self.printer.turn_started(record)
        started = time.perf_counter()
        for item in self.conversation.end_turn():
            self._on_event(record, item, started)
        self.printer.turn_finished(record)

    def _on_event(self, record: TurnRecord, event: Event, started: float) -> None:
        if isinstance(event, TextDelta):
            if event.text:
                record.text += event.text
                self.printer.text(event.text)
        elif isinstance(event, AudioPacket) and event.samples.size:
            ready = record.detected_s + (time.perf_counter() - started)
            start = self.timeline.place(event.samples, ready)
            if record.reply_start_s is None:
                record.reply_start_s = start / OUTPUT_SAMPLE_RATE
            record.reply_samples += event.samples.shape[0]
        elif isinstance(event, StageTimings):
            record.stages = {k: round(v, 3) for k, v in event.stages.items()}
        elif isinstance(event, HistoryTrimmed):
            self.printer.note(f"dropped the {event.dropped_turns} oldest turn(s) to fit the context")
        elif isinstance(event, (TurnStarted, TurnFinished, Interrupted)):
            pass


def run_replay(settings: Settings, file: Path, out: Path | None = None, stock: bool = False,
               json_out: bool = False) -> int:
    """Replay `file`; returns the exit code."""
    info = audio_info(file)
    if out is not None and not out.parent.exists():
        raise DuplexError(f"Cannot write {out}: folder {out.parent} does not exist.")
    err = Console(stderr=True)
    printer = JsonPrinter() if json_out else Printer(Console())

    def open_conversation():
        return _open_conversation(settings, stock, err)

    timeline = ReplyTimeline(out)
    session = ReplaySession(settings, open_conversation, printer, timeline)
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
