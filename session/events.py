"""Typed events from the session to whoever shows, records or sends them.

Every event carries `sample`: the session's clock when it happened, in 16 kHz microphone samples
since the session started (for `replay`, the file's position). Reply audio counts are 24 kHz
samples, as in `duplex_chat.model.events`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from duplex_chat.audio.constants import SAMPLE_RATE
from duplex_chat.model.events import Event, StageTimings


@dataclass(frozen=True)
class UserSpeechStarted:
    """The policy confirmed speech whose onset is `onset_sample`. `audio_start` is where that
    speech's audio begins: the onset minus the pre-roll ([vad] pre_roll_ms, so the first
    syllable's lead-in is kept), never before the previous turn's end nor sample 0. `turn_start`
    is where the user's turn begins: usually `audio_start`, earlier when the turn keeps speech
    that barged in before the policy confirmed it; None when the speech is not a turn (a reply
    is playing and did not give way). All are session samples (16 kHz)."""

    sample: int
    onset_sample: int  # first VAD window of the speech
    audio_start: int  # onset minus pre-roll, clipped as above
    turn_start: int | None


@dataclass(frozen=True)
class UserSpeechEnded:
    """The user's speech ended at `end_sample` (where the final silence began)."""

    sample: int
    end_sample: int


@dataclass(frozen=True)
class TurnCommitted:
    """The user's turn [start_sample, end_sample) is over and the reply `turn` is asked for.
    `speculated_from`: the reply was started speculatively at that session sample, the turn's
    audio heard up to there (see SpeculationStarted), and is now played; None: it starts now.
    `speculation_ms`: that reply's compute time to its first packet, when known by now."""

    sample: int
    turn: int
    start_sample: int
    end_sample: int
    speculated_from: int | None = None
    speculation_ms: float | None = None

    @property
    def duration_s(self) -> float:
        """Seconds of the turn's audio, pre-roll included, up to where the final silence began
        (the end-of-turn silence itself is not counted)."""
        return (self.end_sample - self.start_sample) / SAMPLE_RATE


@dataclass(frozen=True)
class SpeculationStarted:
    """At a pause of `turn.speculate_ms` in the user's turn (its silence from `pause_sample`),
    reply `turn` was started ahead of the decision, unplayed, up to its first audio packet: if
    the turn ends at this pause it plays at once (TurnCommitted.speculated_from), and if the
    user goes on it is taken back (SpeculationTakenBack)."""

    sample: int
    turn: int
    pause_sample: int


@dataclass(frozen=True)
class SpeculationTakenBack:
    """The user went on speaking: the speculative reply `turn` was dropped and the conversation
    rolled back to exactly where it was before it. `compute_ms`: the engine time it wasted."""

    sample: int
    turn: int
    compute_ms: float


@dataclass(frozen=True)
class ReplyStarted:
    """The engine started reply `turn`."""

    sample: int
    turn: int


@dataclass(frozen=True)
class EngineEvent:
    """An engine event, passed on as it arrived. `audio_at`: reply samples produced before it (a
    view reveals text once that much has played). `current`: it belongs to the reply in flight,
    not to one that was interrupted."""

    sample: int
    event: Event
    audio_at: int
    current: bool


@dataclass(frozen=True)
class ReplyAudible:
    """The first reply sample became audible (at `audible_sample`, which may be before `sample`,
    when the session learnt it). `latency_ms`: from the end of the user's speech to then, plus the
    microphone's input latency (Full-Duplex-Bench's response latency); `stages`: the engine's
    marks so far (None: none yet; the engine sends them as the reply ends, so usually none)."""

    sample: int
    turn: int
    latency_ms: float
    stages: StageTimings | None = None
    audible_sample: int = 0  # session sample where the reply's first sample became audible


@dataclass(frozen=True)
class Interrupted:
    """Reply `turn` was stopped before it played out: playback stopped and the engine was
    cancelled. `heard_samples` (24 kHz) is what had been heard, or None when the player reports
    it later. `cause`: "barge_in", the user spoke over it (`onset_sample` is where that speech
    began; a HistoryCut follows once what was heard is known); or "close", `Session.close()` cut
    it (`onset_sample` is the close; no HistoryCut follows: the conversation ends there); or
    "client", the client stopped it (`Session.interrupt`: a Realtime client's response.cancel or
    truncate; `onset_sample` is then; a HistoryCut follows, as after a barge-in)."""

    sample: int
    turn: int
    heard_samples: int | None
    onset_sample: int
    cause: Literal["barge_in", "close", "client"] = "barge_in"


@dataclass(frozen=True)
class TurnDiscarded:
    """`Session.close()` found the user's turn `turn` still open, [start_sample, end_sample)
    with end_sample the close: it is dropped, never committed (no reply is asked for it)."""

    sample: int
    turn: int
    start_sample: int
    end_sample: int


@dataclass(frozen=True)
class HistoryCut:
    """After a barge-in, the conversation's history keeps reply `turn` up to `heard_samples`
    (24 kHz): `text` is what it keeps. `estimated`: the player never reported what was heard in
    time (HEARD_TIMEOUT_S, or the next turn ended first), so the session estimated it from the
    last report and the time since."""

    sample: int
    turn: int
    heard_samples: int
    text: str
    estimated: bool = False


@dataclass(frozen=True)
class ReplyFinished:
    """Reply `turn` played to its end (`heard_samples` of it)."""

    sample: int
    turn: int
    heard_samples: int


@dataclass(frozen=True)
class BargeInLapsed:
    """A barge-in was followed by no turn (a cough, a door): the session listens again."""

    sample: int


@dataclass(frozen=True)
class DeviceTrouble:
    """The loop around the session reports trouble with its audio devices (`kind`: e.g.
    "streams_reopened", "error"), so every observer sees it in the same stream of events.
    `details`: what the loop knows about it (counters), by name."""

    sample: int
    kind: str
    message: str = ""
    details: dict[str, int] = field(default_factory=dict)


SessionEvent = (UserSpeechStarted | UserSpeechEnded | TurnCommitted | SpeculationStarted
                | SpeculationTakenBack | ReplyStarted | EngineEvent | ReplyAudible | Interrupted
                | HistoryCut | ReplyFinished | BargeInLapsed | TurnDiscarded | DeviceTrouble)
