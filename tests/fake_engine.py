"""A scripted `Conversation` (model/protocol.py) for testing `talk` without a model.

Each `end_turn()` streams the next scripted reply: TurnStarted, StageTimings, then TextDelta and
AudioPacket events paced like a real engine (first packet after `first_packet_s`, later ones a
little faster than real time), then TurnFinished — or Interrupted as soon as `cancel` is called.
Every call is logged with its time so tests can check what the app did and when.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from duplex_chat.model.events import (
    AudioPacket,
    Event,
    Interrupted,
    StageTimings,
    TextDelta,
    TurnFinished,
    TurnStarted,
)
from duplex_chat.model.protocol import check_instructions, pick_voice

OUT_RATE = 24_000
VOICES = ("Aiden", "Chelsie", "Ethan")  # the release checkpoint's
PACKET_SAMPLES = 1920 * 4  # 4 codec frames (320 ms) per packet, like the engine's default
FIRST_PACKET_SAMPLES = 1920  # 1 frame first


def chirp(seconds: float, f0: float = 300.0, f1: float = 1200.0, gain: float = 0.3,
          rate: int = OUT_RATE) -> np.ndarray:
    """A linear chirp (n,) float32: easy to find again by cross-correlation."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds))
    return (gain * np.sin(phase)).astype(np.float32)


@dataclass
class Reply:
    """One scripted reply: its waveform (24 kHz) and its words (spread over the packets)."""

    audio: np.ndarray
    words: tuple[str, ...] = ("Hello", "there.")


@dataclass
class ScriptedConversation:
    """Conversation fake. `replies` are used in order (the last one repeats)."""

    replies: list[Reply]
    first_packet_s: float = 0.05
    realtime_factor: float = 0.2  # seconds of compute per second of reply audio
    calls: list[tuple[float, str, object]] = field(default_factory=list)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _turn: int = 0
    _fed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _log(self, name: str, arg: object = None) -> None:
        with self._lock:
            self.calls.append((time.monotonic(), name, arg))

    def called(self, name: str) -> list[tuple[float, object]]:
        """(time, argument) of every call to `name` so far."""
        with self._lock:
            return [(t, a) for t, n, a in self.calls if n == name]

    def feed(self, samples: np.ndarray) -> None:
        assert samples.dtype == np.float32 and samples.ndim == 1
        self._fed += len(samples)
        self._turn_open = True
        self._log("feed", len(samples))

    def end_turn(self) -> Iterator[Event]:
        turn, fed = self._turn, self._fed
        self._turn += 1
        self._fed = 0
        self._turn_open = False
        self._cancel.clear()
        self._log("end_turn", fed)
        reply = self.replies[min(turn, len(self.replies) - 1)]
        self._last = reply
        yield TurnStarted(turn, fed / 16_000)
        time.sleep(self.first_packet_s)
        yield StageTimings(turn, first_packet=self.first_packet_s * 1000.0, prefill=5.0)
        yield from self._stream(turn, reply)

    def _stream(self, turn: int, reply: Reply) -> Iterator[Event]:
        audio, words = reply.audio, list(reply.words)
        start, sent_words, text = 0, 0, ""
        while start < len(audio):
            if self._cancel.is_set():
                self._log("stopped", start)
                yield Interrupted(turn, self._heard, text)
                return
            size = FIRST_PACKET_SAMPLES if start == 0 else PACKET_SAMPLES
            chunk = audio[start:start + size]
            due = int(round(len(words) * (start + len(chunk)) / len(audio)))
            for word in words[sent_words:due]:
                piece = word if not text else " " + word
                text += piece
                yield TextDelta(turn, piece, (len(text),))
            sent_words = max(sent_words, due)
            yield AudioPacket(turn, chunk, start, max(1, len(chunk) // 1920))
            start += len(chunk)
            time.sleep(self.realtime_factor * len(chunk) / OUT_RATE)
        yield TurnFinished(turn, text, (len(text),), len(audio), "eos")

    def cancel(self, heard_samples: int) -> None:
        self._heard = heard_samples
        self._log("cancel", heard_samples)
        self._cancel.set()

    def truncate(self, heard_samples: int) -> str:
        """The words of the last reply in the part heard (its words spread evenly over its audio).
        Like the engine, raises once the next user turn has started (its first feed)."""
        if self._turn_open:
            raise RuntimeError("truncate() after the next user turn started")
        self._log("truncate", heard_samples)
        if self._last is None:
            return ""
        words = self._last.words
        kept = -(-len(words) * min(heard_samples, len(self._last.audio)) // len(self._last.audio))
        return " ".join(words[:kept])

    def discard_turn(self) -> None:
        self._fed = 0
        self._log("discard_turn")

    def checkpoint(self) -> tuple:
        self._log("checkpoint", self._fed)
        return self._turn, self._fed, self._turn_open, self._last

    def rollback(self, checkpoint: tuple) -> None:
        self._turn, self._fed, self._turn_open, self._last = checkpoint
        self._log("rollback", self._fed)

    def voices(self) -> tuple[str, ...]:
        return VOICES

    def configure(self, voice: str | None = None, system_prompt: str | None = None) -> None:
        """Validated like the engine's; logged as ("configure", (voice, system_prompt)) with
        both as they then are."""
        name = pick_voice(voice, VOICES) if voice is not None else self.voice
        prompt = check_instructions(system_prompt) if system_prompt is not None \
            else self.system_prompt
        self.voice, self.system_prompt = name, prompt
        self._log("configure", (name, prompt))

    def reset(self, voice: str | None = None, system_prompt: str | None = None) -> None:
        self.configure(voice, system_prompt)
        self._log("reset")

    voice: str = "Ethan"
    system_prompt: str = ""
    _heard: int = 0
    _last: Reply | None = None
    _turn_open: bool = False


def factory_for(conversation: ScriptedConversation):
    """A conversation factory (settings -> context manager) yielding `conversation`."""

    @contextlib.contextmanager
    def factory(settings) -> Iterator[ScriptedConversation]:
        yield conversation

    return factory
