"""Typed events from the engine to whoever shows or plays them.

The engine knows nothing about terminals; a view, a recorder or `replay` only consumes these.
Interruption is an event like any other. Audio is float32 mono at `OUTPUT_SAMPLE_RATE` (24 kHz).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class TurnStarted:
    """The assistant starts replying to user turn `turn` (0-based)."""

    turn: int
    user_audio_s: float  # length of the user's turn, seconds


@dataclass(frozen=True)
class TextDelta:
    """New reply text, decoded from `token_ids` (the text may be empty for partial characters)."""

    turn: int
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class AudioPacket:
    """A piece of the reply's waveform.

    samples: (n,) float32 in [-1, 1] at 24 kHz. `start_sample` is its offset from the start of
    this reply's audio, so packets tile the reply with no gap or overlap.
    """

    turn: int
    samples: np.ndarray
    start_sample: int
    frames: int  # codec frames (80 ms each) this packet covers


@dataclass(frozen=True)
class StageTimings:
    """Per-stage timings of one reply. None: not measured (a reply without audio has no
    `first_frame`; `generate()` has only `first_packet`, `total` and `reply_tokens`).

    Marks, in ms of wall clock from the end of the user's turn, each taken once the host has
    what it marks: `encode_tail`, `prefill`, `first_token`, `first_frame`, `first_packet` (the
    first packet ready), `total`. Costs: `thinker_ms_per_token`, `talker_ms_per_frame`,
    `vocoder_ms_per_frame` (each stage's span between CUDA events around its work on the GPU's
    stream; wall clock on the CPU), `listen_ms` (time spent prefilling while listening, wall
    clock after a device sync). Counts: `reply_tokens`, `reply_frames`.
    """

    turn: int
    encode_tail: float | None = None
    prefill: float | None = None
    first_token: float | None = None
    first_frame: float | None = None
    first_packet: float | None = None
    total: float | None = None
    thinker_ms_per_token: float | None = None
    talker_ms_per_frame: float | None = None
    vocoder_ms_per_frame: float | None = None
    listen_ms: float | None = None
    reply_tokens: int | None = None
    reply_frames: int | None = None

    @property
    def stages(self) -> dict[str, float]:
        """What was measured, by field name, in field order (for JSON, logs and views)."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "turn")
        return {name: value for name, value in values if value is not None}


@dataclass(frozen=True)
class TurnFinished:
    """The reply is complete: all its text and audio have been emitted."""

    turn: int
    text: str
    token_ids: tuple[int, ...]
    audio_samples: int
    reason: str  # "eos" or "max_tokens"


@dataclass(frozen=True)
class Interrupted:
    """The reply was cancelled; history keeps only `heard_text` (what was played)."""

    turn: int
    heard_samples: int
    heard_text: str


@dataclass(frozen=True)
class HistoryTrimmed:
    """The oldest turns were dropped so the next turn fits the context."""

    dropped_turns: int
    kept_tokens: int


Event = TurnStarted | TextDelta | AudioPacket | StageTimings | TurnFinished | Interrupted | HistoryTrimmed
