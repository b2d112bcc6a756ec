"""Turn policies: when a user turn starts and when it is over.

A policy hears the (echo-cancelled) microphone and answers with the voice-activity events that
decide turns: `SpeechStarted` (a turn may begin; its audio starts pre-roll before the onset) and
`SpeechEnded` (the turn is over). It also exposes how many consecutive 32 ms windows up to now
were speech, which the barge-in fast path reads. Two policies: `SilencePolicy` (VAD silence of
`vad.end_of_turn_ms`) and `SmartTurnPolicy` (smart_turn.py: a semantic end-of-turn model asked
at each pause, with a fallback silence). `make_policy` builds the one `turn.policy` names; the
session calls it, so talk, replay and serve never know which policy runs. A speculative start (ask for
the reply before the end of turn is certain, take it back if the user goes on) does not fit this
interface's events: a policy confirms an end of turn but never withdraws one. Instead the
session reads `pause_start` (where the current silence began) and speculates at a pause that
has lasted `turn.speculate_ms`; the policy's SpeechEnded at that pause confirms it, and a change
of `pause_start` (the user went on) takes it back.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from duplex_chat.audio.constants import VAD_WINDOW_SAMPLES
from duplex_chat.audio.vad import SileroVad, SpeechProbability, VadEvent, VoiceActivity
from duplex_chat.config import Settings, VadSettings

VAD_WARMUP_WINDOWS = 4  # silent windows run through each VAD model before use


class TurnPolicy(Protocol):
    """What the session needs from a turn policy. Sample indices are the session's clock."""

    @property
    def speech_run(self) -> int:
        """Consecutive VAD windows at or above the speech threshold, up to the last one fed."""

    @property
    def pause_start(self) -> int | None:
        """In an open turn, the sample where the current silence began (where the turn would end
        if it ended now); None while speech goes on or outside a turn. The session starts a
        speculative reply at such a pause and takes it back when this changes."""

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """Hear more microphone audio (n,) float32 at 16 kHz; return the turn events it completed."""

    def finish(self) -> list[VadEvent]:
        """End of input: close an open turn."""

    def close(self) -> None:
        """The session is over: release threads or models (nothing is fed afterwards)."""


class OnsetTap:
    """Wraps a VAD model to see every window's probability: counts consecutive speech windows."""

    def __init__(self, vad: SpeechProbability, threshold: float):
        self.vad, self.threshold = vad, threshold
        self.run = 0  # consecutive windows at or above threshold, up to now
        # A model's first calls are slow (onnxruntime sets up its kernels and buffers; the
        # TorchScript model used before took 25-140 ms each, holding the GIL, so a running
        # PortAudio callback missed its deadline). Pay that now, when the session is built
        # before the streams start, not during a reply (it garbled playback and shifted the
        # echo path mid-reply).
        silence = np.zeros(VAD_WINDOW_SAMPLES, np.float32)
        for _ in range(VAD_WARMUP_WINDOWS):
            vad.prob(silence)
        vad.reset()

    def prob(self, window: np.ndarray) -> float:
        """The model's speech probability of one 512-sample window; updates `run`."""
        p = self.vad.prob(window)
        self.run = self.run + 1 if p >= self.threshold else 0
        return p

    def reset(self) -> None:
        """Forget the model's state and the run."""
        self.vad.reset()
        self.run = 0


class SilencePolicy:
    """A turn ends after `vad.end_of_turn_ms` of silence (audio/vad.py's `VoiceActivity` rules)."""

    def __init__(self, settings: VadSettings, vad_model: SpeechProbability | None = None):
        self.tap = OnsetTap(vad_model if vad_model is not None else SileroVad(), settings.threshold)
        self.activity = VoiceActivity(settings, self.tap)

    @property
    def speech_run(self) -> int:
        """See `TurnPolicy.speech_run`."""
        return self.tap.run

    @property
    def pause_start(self) -> int | None:
        """See `TurnPolicy.pause_start`."""
        return self.activity.silence_start

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """See `TurnPolicy.feed`: VoiceActivity's start and end events."""
        return self.activity.feed(samples)

    def finish(self) -> list[VadEvent]:
        """See `TurnPolicy.finish`: an open turn ends at its silence start or the last sample."""
        return self.activity.finish()

    def close(self) -> None:
        """See `TurnPolicy.close`: nothing to release."""


def make_policy(settings: Settings, vad_model: SpeechProbability | None = None, *,
                virtual_clock: bool = False) -> TurnPolicy:
    """The turn policy `turn.policy` names. `virtual_clock`: the session runs on its input's
    clock (replay), so a model's answers are timed on that clock, not the machine's
    (smart_turn.py, "Off the audio thread")."""
    if settings.turn.policy == "smart":
        from .smart_turn import SmartTurnPolicy

        return SmartTurnPolicy(settings.vad, settings.turn, vad_model, virtual_clock=virtual_clock)
    return SilencePolicy(settings.vad, vad_model)
