"""The terminal view of `talk`: what was said, what is happening now, and how fast it was.

`TalkView` keeps a small model of the session (turns, state, latency, level) that `talk` updates
from its control thread, and shows it either as a Rich Live panel redrawn at `ui.refresh_hz` or,
when stdout is not a terminal or `ui.plain` is set, as plain lines printed when something happens.
It knows nothing about tensors or the model: only words, numbers and states.

Assistant words are shown as they are spoken: each text delta is tagged with how much reply audio
had been produced when it arrived, and revealed once the speaker has played that far.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

MAX_SHOWN_ENTRIES = 12  # conversation lines kept on screen
METER_WIDTH = 20  # characters of the input level bar
METER_FLOOR_DB = -60.0  # level shown as an empty bar
STAGE_KEYS = ("encode_tail", "prefill", "first_token", "first_frame", "first_packet")
STEP_COSTS = (("thinker_ms_per_token", "thinker", "token"),
              ("talker_ms_per_frame", "talker", "frame"),
              ("vocoder_ms_per_frame", "vocoder", "frame"))
COUNTS = (("reply_tokens", "tokens"), ("reply_frames", "frames"))


class TalkState(enum.Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user speaking"
    THINKING = "thinking"
    SPEAKING = "speaking"
    INTERRUPTED = "interrupted"


STATE_STYLES = {
    TalkState.LISTENING: "green",
    TalkState.USER_SPEAKING: "bold cyan",
    TalkState.THINKING: "yellow",
    TalkState.SPEAKING: "bold magenta",
    TalkState.INTERRUPTED: "bold red",
}


@dataclass
class Entry:
    """One line of the conversation."""

    role: str  # "user", "assistant" or "info"
    text: str = ""
    duration_s: float = 0.0
    interrupted: bool = False
    pending: list[tuple[int, str]] = field(default_factory=list)  # (audio position, text) unspoken


class TalkView:
    """Session view. Call the update methods from one thread, then `refresh()` often."""

    def __init__(self, console: Console | None = None, refresh_hz: float = 4.0, plain: bool = False,
                 clock=time.monotonic):
        self.console = console or Console()
        self.plain = plain or not self.console.is_terminal
        self.refresh_interval = 1.0 / refresh_hz
        self._clock = clock
        self.entries: list[Entry] = []
        self.state = TalkState.LISTENING
        self.latency_ms: float | None = None
        self.stages: dict[str, float] = {}
        self.level_db = METER_FLOOR_DB
        self.underruns = 0
        self._live: Live | None = None
        self._last_refresh = float("-inf")
        self._reply: Entry | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "TalkView":
        if not self.plain:
            self._live = Live(self.render(), console=self.console, auto_refresh=False,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.__exit__(*exc)
            self._live = None

    def refresh(self, force: bool = False) -> None:
        """Redraw the live view if `1/refresh_hz` has passed (or `force`); no-op in plain mode."""
        now = self._clock()
        if self._live is None or (not force and now - self._last_refresh < self.refresh_interval):
            return
        self._last_refresh = now
        self._live.update(self.render(), refresh=True)

    def _say(self, line: str) -> None:
        if self.plain:
            self.console.print(line, highlight=False, markup=False)

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

    def reply_played(self, samples: int) -> None:
        """The speaker has played `samples` of the current reply: reveal the words said so far."""
        reply = self._reply
        if reply is None:
            return
        while reply.pending and reply.pending[0][0] <= samples:
            reply.text += reply.pending.pop(0)[1]

    def reply_finished(self, interrupted: bool = False, heard_text: str | None = None) -> None:
        """The reply ended; when interrupted, `heard_text` (what was played) replaces the text."""
        reply, self._reply = self._reply, None
        if reply is None:
            return
        if interrupted:
            reply.interrupted = True
            reply.pending.clear()
            if heard_text is not None:
                reply.text = heard_text
        else:
            reply.text += "".join(text for _, text in reply.pending)
            reply.pending.clear()
        self._say(f"assistant: {reply.text.strip()}" + (" [interrupted]" if interrupted else ""))

    def set_heard_text(self, text: str) -> None:
        """The engine says what of the last interrupted reply was heard: show exactly that."""
        for entry in reversed(self.entries):
            if entry.role == "assistant" and entry.interrupted:
                if text:
                    entry.text = text
                return

    def set_latency(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self._say(f"latency: {latency_ms:.0f} ms (end of speech -> first reply sound)")

    def set_stages(self, stages: dict[str, float]) -> None:
        self.stages = dict(stages)
        if self.plain and stages:
            self._say("stages: " + _stage_text(stages))

    def set_level(self, level_db: float) -> None:
        self.level_db = level_db

    def set_underruns(self, count: int) -> None:
        self.underruns = count

    # ---- rendering --------------------------------------------------------------------------
    def render(self) -> RenderableType:
        """The whole view as one Rich renderable."""
        lines = [self._entry_text(e) for e in self.entries[-MAX_SHOWN_ENTRIES:]]
        return Group(*lines, Text(""), self._status_table())

    @staticmethod
    def _entry_text(entry: Entry) -> Text:
        if entry.role == "user":
            return Text.assemble(("you ", "bold cyan"), (f"({entry.duration_s:.1f} s of speech)", "cyan"))
        if entry.role == "info":
            return Text(entry.text, style="dim")
        text = Text.assemble(("assistant ", "bold magenta"), entry.text.strip())
        if entry.interrupted:
            text.append(" [interrupted]", style="red")
        return text

    def _status_table(self) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_row(Text("state", style="dim"), Text(self.state.value, style=STATE_STYLES[self.state]))
        latency = "—" if self.latency_ms is None else f"{self.latency_ms:.0f} ms"
        table.add_row(Text("last latency", style="dim"), Text(latency))
        table.add_row(Text("stages", style="dim"), Text(_stage_text(self.stages) or "—"))
        table.add_row(Text("input", style="dim"), _meter(self.level_db))
        table.add_row(Text("underruns", style="dim"),
                      Text(str(self.underruns), style="red" if self.underruns else ""))
        return table


def _stage_text(stages: dict[str, float]) -> str:
    """The engine's marks (ms since the end of the turn), per-step costs and counts, each in its
    own unit; keys this view does not know are shown as they come."""
    parts = [f"{k} {stages[k]:.0f} ms" for k in (*STAGE_KEYS, "total") if k in stages]
    parts += [f"{label} {stages[k]:.2f} ms/{unit}" for k, label, unit in STEP_COSTS if k in stages]
    if "listen_ms" in stages:
        parts.append(f"listening {stages['listen_ms']:.0f} ms")
    parts += [f"{stages[k]:.0f} {noun}" for k, noun in COUNTS if k in stages]
    known = {*STAGE_KEYS, "total", "listen_ms", *(k for k, _, _ in STEP_COSTS),
             *(k for k, _ in COUNTS)}
    parts += [f"{k} {v:g}" for k, v in stages.items() if k not in known]
    return ", ".join(parts)


def _meter(level_db: float) -> Text:
    fraction = min(max((level_db - METER_FLOOR_DB) / -METER_FLOOR_DB, 0.0), 1.0)
    filled = int(round(fraction * METER_WIDTH))
    style = "green" if level_db < -12 else "yellow" if level_db < -3 else "red"
    return Text.assemble(("█" * filled, style), ("░" * (METER_WIDTH - filled), "dim"),
                         f" {level_db:5.1f} dB")
