"""The terminal view of `talk`: what was said, what is happening now, and how fast it was.

`TalkView` keeps a small model of the session (turns, state, latency, levels) that `talk` updates
from its control thread, and shows it either as a Rich Live panel redrawn at `ui.refresh_hz` or,
when stdout is not a terminal or `ui.plain` is set, as plain lines printed when something happens.
It knows nothing about tensors or the model: only words, numbers and states.

The view tells only what the user can check with their ears:
- assistant words are shown as they are spoken: each text delta is tagged with how much reply
  audio had been produced when it arrived, and revealed once the reply is audible and the
  speaker has played that far; the state says "speaking" from that first audible sample;
- the speaker has its own meter, and a reply that played without a sound says so;
- while the live panel runs, what native libraries write to stderr (ALSA's "underrun occurred")
  goes to a log file instead of tearing the panel (`NativeStderrLog`).
"""

from __future__ import annotations

import enum
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

MAX_SHOWN_ENTRIES = 12  # conversation lines kept on screen
METER_WIDTH = 20  # characters of a level bar
METER_FLOOR_DB = -60.0  # level shown as an empty bar that says "silent"
LOUD_DB = -12.0  # meter turns yellow from here
CLIPPING_DB = -3.0  # and red from here
NO_VALUE = "—"


class TalkState(enum.Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user speaking"
    THINKING = "thinking"
    SPEAKING = "speaking"
    INTERRUPTED = "interrupted"
    STOPPED = "stopped"


STATE_STYLES = {
    TalkState.LISTENING: "green",
    TalkState.USER_SPEAKING: "bold cyan",
    TalkState.THINKING: "yellow",
    TalkState.SPEAKING: "bold magenta",
    TalkState.INTERRUPTED: "bold red",
    TalkState.STOPPED: "dim",
}


@dataclass
class Entry:
    """One line of the conversation."""

    role: str  # "user", "assistant" or "info"
    text: str = ""
    duration_s: float = 0.0
    ending: str = ""  # how an assistant reply was cut short: "interrupted", "stopped" or ""
    audible: bool = False  # its first sample has reached the user's ears
    loudest_db: float = float("-inf")  # the loudest the speaker got while it was audible
    pending: list[tuple[int, str]] = field(default_factory=list)  # (audio position, text) unspoken

    @property
    def silent(self) -> bool:
        """It played, but the speaker stayed below the meter's floor all along."""
        return self.audible and self.loudest_db <= METER_FLOOR_DB

    def marks(self) -> str:
        """The tags after the reply's words: how it ended, and whether it made no sound."""
        tags = [self.ending] if self.ending else []
        if self.silent:
            tags.append("no sound")
        return "".join(f" [{tag}]" for tag in tags)


class _Meter:
    """A level shown a few times a second: the loudest 10 ms since the last frame drawn, so a
    short pause between two words does not read as silence, and a silent stretch does."""

    def __init__(self) -> None:
        self.shown = METER_FLOOR_DB
        self._peak: float | None = None

    def add(self, level_db: float) -> None:
        self._peak = level_db if self._peak is None else max(self._peak, level_db)

    def take(self) -> float:
        if self._peak is not None:
            self.shown, self._peak = self._peak, None
        return self.shown


class TalkView:
    """Session view. Call the update methods from one thread, then `refresh()` often.

    `native_log`: where fd 2 goes while the live panel runs (None: left alone). Plain mode leaves
    stderr alone: its lines cannot be torn, and a pipe keeps stdout and stderr apart anyway.
    """

    def __init__(self, console: Console | None = None, refresh_hz: float = 4.0, plain: bool = False,
                 clock=time.monotonic, native_log: Path | None = None):
        self.console = console or Console()
        self.plain = plain or not self.console.is_terminal
        self.refresh_interval = 1.0 / refresh_hz
        self._clock = clock
        self.entries: list[Entry] = []
        self.state = TalkState.LISTENING
        self.latency_ms: float | None = None
        self.stages: dict[str, float] = {}
        self.input_meter, self.output_meter = _Meter(), _Meter()
        self.underruns = 0
        self._live: Live | None = None
        self._last_refresh = float("-inf")
        self._reply: Entry | None = None
        live_log = native_log is not None and not self.plain
        self._stderr = NativeStderrLog(native_log) if live_log else None

    # ---- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "TalkView":
        if not self.plain:
            if self._stderr is not None:
                self._stderr.__enter__()  # before Live, which then proxies Python's stderr above it
            self._live = Live(self.render(), console=self.console, auto_refresh=False,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.__exit__(*exc)
            self._live = None
        if self._stderr is not None:
            self._stderr.__exit__(*exc)
            if self._stderr.lines:
                self.console.print(f"Audio libraries printed {self._stderr.lines} line(s) during "
                                   f"the session; they are in {self._stderr.path}.",
                                   style="dim", highlight=False, markup=False,
                                   soft_wrap=True)  # a path stays whole, for copying

    def refresh(self, force: bool = False) -> None:
        """Redraw the live view if `1/refresh_hz` has passed (or `force`); no-op in plain mode."""
        now = self._clock()
        if self._live is None or (not force and now - self._last_refresh < self.refresh_interval):
            return
        self._last_refresh = now
        self._live.update(self.render(), refresh=True)

    def _say(self, line: str) -> None:
        # soft_wrap: a line piped into a file stays one line, whatever the console's width
        if self.plain:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    # ---- updates ----------------------------------------------------------------------------
    def set_state(self, state: TalkState) -> None:
        if state is not self.state:
            self.state = state
            self._say(f"[{state.value}]")

    def info(self, text: str) -> None:
        """A line about the session itself (devices, errors)."""
        self.entries.append(Entry("info", text))
        self._say(text)

    def user_turn(self, duration_s: float) -> None:
        self.entries.append(Entry("user", duration_s=duration_s))
        self._say(f"you: ({duration_s:.1f} s of speech)")

    def reply_started(self) -> None:
        self._reply = Entry("assistant")
        self.entries.append(self._reply)

    def reply_text(self, text: str, audio_position: int) -> None:
        """New reply text, to be shown once `audio_position` reply samples have been played."""
        if self._reply is None:
            self.reply_started()
        assert self._reply is not None
        self._reply.pending.append((audio_position, text))

    def reply_audible(self, latency_ms: float) -> None:
        """The reply's first sample reached the speaker's output: the assistant is speaking now,
        `latency_ms` after the end of the user's speech."""
        if self._reply is None:
            self.reply_started()
        assert self._reply is not None
        self._reply.audible = True
        self.set_latency(latency_ms)
        self.set_state(TalkState.SPEAKING)

    def reply_played(self, samples: int) -> None:
        """The speaker has played `samples` of the current reply: reveal the words said so far.
        Nothing is revealed before the reply is audible, not even text tagged at position 0."""
        reply = self._reply
        if reply is None or not reply.audible:
            return
        while reply.pending and reply.pending[0][0] <= samples:
            reply.text += reply.pending.pop(0)[1]

    def reply_finished(self, interrupted: bool = False, heard_text: str | None = None,
                       ending: str = "interrupted") -> None:
        """The reply ended. When cut short (`interrupted`), the words not yet played are dropped,
        `heard_text` (what was played) replaces the text when known, and `ending` tags it."""
        reply, self._reply = self._reply, None
        if reply is None:
            return
        if interrupted:
            reply.ending = ending
            if heard_text is not None:
                reply.text = heard_text
        else:
            reply.text += "".join(text for _, text in reply.pending)
        reply.pending.clear()
        self._say(f"assistant: {reply.text.strip()}{reply.marks()}")

    def set_heard_text(self, text: str) -> None:
        """The engine says what of the last interrupted reply was heard: show exactly that."""
        for entry in reversed(self.entries):
            if entry.role == "assistant" and entry.ending:
                if text:
                    entry.text = text
                return

    def stop(self) -> None:
        """The session is over: a reply still open keeps the words heard so far, and the state
        says "stopped" (the last frame stays on screen)."""
        if self._reply is not None:
            self.reply_finished(interrupted=True, ending="stopped")
        self.set_state(TalkState.STOPPED)

    def set_latency(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self._say(f"latency: {latency_ms:.0f} ms (end of speech -> first reply sound)")

    def set_stages(self, stages: dict[str, float]) -> None:
        self.stages = dict(stages)
        text = stage_text(stages)
        if text:
            self._say(f"model: {text}")

    def set_level(self, level_db: float) -> None:
        """The microphone's level over the latest stretch (dBFS)."""
        self.input_meter.add(level_db)

    def set_output_level(self, level_db: float) -> None:
        """The speaker's level over the latest stretch (dBFS), silence between replies included."""
        self.output_meter.add(level_db)
        if self._reply is not None and self._reply.audible:
            self._reply.loudest_db = max(self._reply.loudest_db, level_db)

    def set_underruns(self, count: int) -> None:
        self.underruns = count

    # ---- rendering --------------------------------------------------------------------------
    def render(self) -> RenderableType:
        """The whole view as one Rich renderable (each frame shows the loudest levels since the
        previous one)."""
        lines = [self._entry_text(e) for e in self.entries[-MAX_SHOWN_ENTRIES:]]
        return Group(*lines, Text(""), self._status_table())

    @staticmethod
    def _entry_text(entry: Entry) -> Text:
        if entry.role == "user":
            said = f"({entry.duration_s:.1f} s of speech)"
            return Text.assemble(("you ", "bold cyan"), (said, "cyan"))
        if entry.role == "info":
            return Text(entry.text, style="dim")
        text = Text.assemble(("assistant ", "bold magenta"), entry.text.strip())
        text.append(entry.marks(), style="red")
        return text

    def _status_table(self) -> Table:
        table = Table.grid(padding=(0, 2))
        state = Text(self.state.value, style=STATE_STYLES[self.state])
        table.add_row(Text("state", style="dim"), state)
        latency = NO_VALUE if self.latency_ms is None else f"{self.latency_ms:.0f} ms"
        table.add_row(Text("last latency", style="dim"), Text(latency))
        table.add_row(Text("model", style="dim"), Text(stage_text(self.stages) or NO_VALUE))
        table.add_row(Text("microphone", style="dim"), _meter(self.input_meter.take()))
        speaking = self.state is TalkState.SPEAKING
        speaker = _meter(self.output_meter.take(), alarm=speaking)
        table.add_row(Text("speaker", style="dim"), speaker)
        table.add_row(Text("underruns", style="dim"),
                      Text(str(self.underruns), style="red" if self.underruns else ""))
        return table


def stage_text(stages: dict[str, float]) -> str:
    """The engine's marks for the last reply in plain words, on one short line; the rest (per-step
    costs, token and frame counts) is for developers: the `--record` log keeps all of it."""
    parts = []
    if "first_packet" in stages:
        first_sound = stages["first_packet"]
        parts.append(f"first sound made {first_sound:.0f} ms after your turn ended")
    if "total" in stages:
        parts.append(f"whole reply made in {stages['total'] / 1000:.1f} s")
    return "; ".join(parts)


def _meter(level_db: float, alarm: bool = False) -> Text:
    """A level bar; below the floor it says "silent", in red when `alarm` (sound is expected)."""
    fraction = min(max((level_db - METER_FLOOR_DB) / -METER_FLOOR_DB, 0.0), 1.0)
    filled = int(round(fraction * METER_WIDTH))
    style = "green" if level_db < LOUD_DB else "yellow" if level_db < CLIPPING_DB else "red"
    if level_db <= METER_FLOOR_DB:
        value = (" silent", "bold red" if alarm else "dim")
    else:
        value = (f" {level_db:5.1f} dB", "")
    return Text.assemble(("█" * filled, style), ("░" * (METER_WIDTH - filled), "dim"), value)


# ---- native stderr ----------------------------------------------------------------------------
class NativeStderrLog:
    """While active, file descriptor 2 (where C libraries such as ALSA and PortAudio print) goes
    to `path`, truncated first; Python's own `sys.stderr` keeps writing where it did, so Python
    errors and warnings still show. `lines` counts what landed in the file.

    Redirecting the descriptor, not `sys.stderr`, is the only way to catch libraries that write
    to it directly from their own threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lines = 0
        self._saved_fd: int | None = None
        self._python_stderr: TextIO | None = None
        self._own_stderr: TextIO | None = None

    def __enter__(self) -> "NativeStderrLog":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError:
            return self  # no log file: native lines stay on the terminal, as before
        if sys.stderr is not None:  # None without a console (pythonw)
            sys.stderr.flush()
        self._saved_fd = os.dup(2)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        if _writes_to_fd2(sys.stderr):
            self._python_stderr = sys.stderr
            self._own_stderr = open(self._saved_fd, "w", buffering=1, closefd=False,
                                    encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                                    errors="backslashreplace")
            sys.stderr = self._own_stderr
        return self

    def __exit__(self, *exc) -> None:
        if self._saved_fd is None:
            return
        if self._own_stderr is not None:
            self._own_stderr.flush()
            if sys.stderr is self._own_stderr:
                sys.stderr = self._python_stderr
            self._own_stderr.close()
            self._own_stderr = self._python_stderr = None
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._saved_fd = None
        self.lines = _count_lines(self.path)


def _writes_to_fd2(stream: TextIO | None) -> bool:
    """`stream` is a real file on descriptor 2 (not a test's capture buffer)."""
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0
