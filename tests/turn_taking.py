"""Turn-taking measured like Full-Duplex-Bench v1: when does a policy end the user's turn?

A test set made on the spot with espeak-ng: complete utterances, and utterances with a
hesitation of 400-800 ms before their end ("I would like to ... book a table for two"). Each is
heard alone, as a file would be: a second of quiet, the speech, four seconds of quiet, with a
faint noise floor throughout (a room, not digital silence). A policy (session/policy.py) hears
it in 32 ms windows on the file's clock, its smart model answering a modelled
MODELED_INFERENCE_S after each question (as in replay), and its first end of turn is judged:

- a **false cut-off** when the turn it ends stops before the utterance's true end (the end
  falls in the hesitation, or mid-word);
- otherwise its **latency**: from the true end of speech to the window where the end of turn
  was decided (the wait the user sits through before a reply can start);
- **speculations**: the pauses of `speculate_ms` it would have started a reply at before the
  decision (a speculative start at each; all but the one the turn ends at are taken back).

Used by tests/test_turn_taking.py (a small set, in CI) and benchmarks/turn_taking.py (the whole
set, both policies and several settings each: docs/turn-taking.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
from dataclasses import dataclass

import numpy as np

from duplex_chat.audio.constants import SAMPLE_RATE, VAD_WINDOW_SAMPLES, ms_to_samples
from duplex_chat.audio.vad import SpeechEnded
from duplex_chat.config import Settings

from .audio_helpers import espeak_speech, speech_edges

LEAD_S = 1.0  # quiet before the speech
TAIL_S = 4.0  # quiet after it: longer than any fallback tried
NOISE_RMS = 0.001  # the room's noise floor (-60 dBFS)
CUT_SLACK = VAD_WINDOW_SAMPLES  # an end this close before the true end is the VAD's own rounding

COMPLETE = [
    "What time does the museum open on Sunday?",
    "Can you tell me a joke about cats?",
    "I think we should leave before the rain starts.",
    "Please set a timer for ten minutes.",
    "How far is the moon from the earth?",
    "My favourite colour has always been green.",
    "Could you recommend a good book for the holidays?",
    "Turn off the lights in the kitchen, please.",
    "Why is the sky blue during the day?",
    "We had pasta for dinner last night.",
]
HESITANT = [  # (start, end): spoken with a pause between them
    ("I would like to", "book a table for two."),
    ("Can you tell me", "how the weather will be tomorrow?"),
    ("The thing is", "I forgot my keys at home."),
    ("What I really want to know is", "whether the shop is open."),
    ("Could you maybe", "play some quiet music?"),
    ("So my question is", "how long does it take to get there?"),
    ("I was thinking about", "going for a walk later."),
    ("Remind me to", "call my sister tonight."),
    ("Let me see,", "I need three apples and some bread."),
    ("Do you know", "who wrote this song?"),
]
VOICES = [("en-us", 160), ("en-gb", 175), ("en-us", 145), ("en-gb-x-rp", 165)]  # (voice, wpm)


@dataclass(frozen=True)
class Utterance:
    """One user turn: its audio (n,) float32 at 16 kHz and where its speech truly ends."""

    name: str
    audio: np.ndarray
    speech_start: int
    speech_end: int
    hesitation_s: float = 0.0  # 0 for a complete utterance


def _spoken(text: str, voice: str, wpm: int) -> np.ndarray:
    speech = espeak_speech(text, SAMPLE_RATE, voice=voice, wpm=wpm)
    start, end = speech_edges(speech, SAMPLE_RATE)
    return speech[start:end]


def make_utterance(name: str, parts: list[np.ndarray], pauses_s: list[float], seed: int
                   ) -> Utterance:
    """`parts` of speech with `pauses_s` of quiet between them, in LEAD_S and TAIL_S of quiet."""
    lead, tail = np.zeros(int(LEAD_S * SAMPLE_RATE)), np.zeros(int(TAIL_S * SAMPLE_RATE))
    pieces = [lead]
    for i, part in enumerate(parts):
        pieces.append(part)
        if i < len(pauses_s):
            pieces.append(np.zeros(int(pauses_s[i] * SAMPLE_RATE)))
    speech_end = sum(len(p) for p in pieces)
    audio = np.concatenate([*pieces, tail])
    audio = audio + NOISE_RMS * np.random.default_rng(seed).standard_normal(len(audio))
    return Utterance(name, audio.astype(np.float32), len(lead), speech_end,
                     pauses_s[0] if pauses_s else 0.0)


def make_test_set(complete: int = len(COMPLETE), hesitant: int = len(HESITANT)
                  ) -> list[Utterance]:
    """The first `complete` complete utterances and `hesitant` hesitant ones, voices and
    speaking rates taken in turn; the hesitations spread over 400-800 ms."""
    out = []
    for i, text in enumerate(COMPLETE[:complete]):
        voice, wpm = VOICES[i % len(VOICES)]
        out.append(make_utterance(f"complete {i}", [_spoken(text, voice, wpm)], [], seed=i))
    for i, (first, second) in enumerate(HESITANT[:hesitant]):
        voice, wpm = VOICES[(i + 1) % len(VOICES)]
        pause = 0.4 + 0.4 * i / max(1, len(HESITANT) - 1)
        parts = [_spoken(first, voice, wpm), _spoken(second, voice, wpm)]
        out.append(make_utterance(f"hesitant {i}", parts, [round(pause, 3)], seed=100 + i))
    return out


@dataclass(frozen=True)
class Outcome:
    """How a policy ended one utterance's turn."""

    name: str
    cut_off: bool  # the turn ended before the true end of speech
    latency_ms: float | None  # true end of speech -> decided (None: cut off, or never ended)
    speculations: int  # speculative starts before the decision (speculate_ms)


def judge(policy, utterance: Utterance, speculate_ms: int = 0) -> Outcome:
    """Run `policy` (a fresh TurnPolicy) over `utterance` window by window; judge its first end
    of turn."""
    speculate = ms_to_samples(speculate_ms) if speculate_ms else None
    started_at: set[int] = set()
    audio, fed = utterance.audio, 0
    try:
        while fed < len(audio):
            window = audio[fed:fed + VAD_WINDOW_SAMPLES]
            fed += len(window)
            ended = [e for e in policy.feed(window) if isinstance(e, SpeechEnded)]
            if ended:
                return _outcome(utterance, ended[0].sample_index, fed, len(started_at))
            pause = policy.pause_start
            if speculate is not None and pause is not None and fed - pause >= speculate:
                started_at.add(pause)
        ended = [e for e in policy.finish() if isinstance(e, SpeechEnded)]
        if ended:
            return _outcome(utterance, ended[0].sample_index, fed, len(started_at))
        return Outcome(utterance.name, False, None, len(started_at))
    finally:
        policy.close()


def _outcome(u: Utterance, end: int, decided: int, speculations: int) -> Outcome:
    if end < u.speech_end - CUT_SLACK:
        return Outcome(u.name, True, None, speculations)
    return Outcome(u.name, False, 1000 * (decided - u.speech_end) / SAMPLE_RATE, speculations)


@dataclass(frozen=True)
class Point:
    """One policy setting over the test set: a point of the latency / cut-off curve."""

    policy: str
    setting: str
    median_latency_ms: float | None  # over the turns not cut off
    cut_off_rate: float  # of all utterances
    hesitant_cut_off_rate: float  # of those with a hesitation
    speculations_per_turn: float
    outcomes: tuple[Outcome, ...] = dataclasses.field(repr=False, default=())


def measure(name: str, setting: str, make_policy, utterances: list[Utterance],
            speculate_ms: int = 0) -> Point:
    """`make_policy()` gives a fresh policy per utterance."""
    outcomes = tuple(judge(make_policy(), u, speculate_ms) for u in utterances)
    latencies = [o.latency_ms for o in outcomes if o.latency_ms is not None]
    hesitant = [o for o, u in zip(outcomes, utterances) if u.hesitation_s]
    return Point(
        name, setting,
        statistics.median(latencies) if latencies else None,
        sum(o.cut_off for o in outcomes) / len(outcomes),
        sum(o.cut_off for o in hesitant) / len(hesitant) if hesitant else 0.0,
        sum(o.speculations for o in outcomes) / len(outcomes),
        outcomes,
    )


class CachedModel:
    """A turn model whose answers are kept by the audio asked about: the same pause asked about
    under several thresholds costs one inference."""

    def __init__(self, model):
        self.model = model
        self.answers: dict[bytes, float] = {}

    def prob(self, audio: np.ndarray) -> float:
        key = hashlib.sha1(np.ascontiguousarray(audio).tobytes()).digest()
        if key not in self.answers:
            self.answers[key] = self.model.prob(audio)
        return self.answers[key]


def silence_policy(settings: Settings, end_of_turn_ms: int, vad_model):
    from duplex_chat.session.policy import SilencePolicy

    return SilencePolicy(dataclasses.replace(settings.vad, end_of_turn_ms=end_of_turn_ms),
                         vad_model)


def smart_policy(settings: Settings, model, vad_model, **turn):
    from duplex_chat.session.smart_turn import SmartTurnPolicy

    return SmartTurnPolicy(settings.vad, dataclasses.replace(settings.turn, **turn), vad_model,
                           model, virtual_clock=True)
