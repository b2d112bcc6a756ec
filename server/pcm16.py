"""One `/ws/pcm16` connection: PCM16 audio in and out, JSON events, around a `Session`.

Protocol (README, "Serve"): binary frames from the client are PCM16LE mono 16 kHz microphone
audio, sent continuously (silence too: the session's clock is the audio it hears). Binary frames
to the client are PCM16LE mono 24 kHz reply audio, between a `reply.start` and a `reply.end`
event. Text frames are JSON objects with a "type". The client reports playback with
`{"type": "playback", "reply": R, "played": N, "done": B, "audible_at": M}`: it learns what
was heard after the fact, which is the late "heard" report the session's Player contract
allows (`stop()` returns None and the session waits for the report before it cuts history).
`{"type": "session", "voice": V, "instructions": I}` (either may be left out) sets the voice
and the system prompt from the next reply on; every connection starts with the server's.

Threads: every `Session` method runs on the event loop's thread (receive loop and a tick); the
session's worker thread writes reply audio into the `SocketPlayer`. Everything sent goes through
`loop.call_soon_threadsafe`, from both threads, so frames leave in the order they were made (a
reply's last packet never arrives after the next reply's `reply.start`).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

import numpy as np
from starlette.websockets import WebSocket

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE
from duplex_chat.config import DuplexError, Settings
from duplex_chat.model.events import AudioPacket, StageTimings, TextDelta
from duplex_chat.model.protocol import Conversation, check_instructions, pick_voice
from duplex_chat.session import (
    BargeInLapsed,
    EngineEvent,
    HistoryCut,
    Interrupted,
    Progress,
    ReplyAudible,
    ReplyFinished,
    Session,
    SessionEvent,
    TurnCommitted,
    UserSpeechStarted,
)

from .connection import ClientError, SessionConnection
from .limits import TokenBucket

AHEAD_S = 10.0  # reply audio sent ahead of what the client reports played (then the worker waits)
AUDIO_BURST_S = 3.0  # audio a client may send at once beyond the average rate


def pcm16_to_float(data: bytes) -> np.ndarray:
    """PCM16LE bytes → (n,) float32 in [-1, 1)."""
    if len(data) % 2:
        raise ClientError("bad_audio", f"An audio frame of {len(data)} bytes does not hold whole "
                                       "16-bit samples (its length must be even).")
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """(n,) float → PCM16LE bytes, clipped."""
    return (np.clip(samples, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()


class SocketPlayer:
    """The session's `Player` for a client that plays the audio itself and reports it late.

    `begin_reply`, `stop`, `progress` and `report` run on the loop's thread; `room_s`, `write`
    and `end_reply` on the worker's; a lock keeps the counters consistent between them.
    """

    def __init__(self, send: Callable[[Any], None]):
        self.send = send
        self.lock = threading.Lock()
        self.reply = 0
        self.written = 0  # samples (24 kHz) of the current reply sent
        self.played = 0  # samples the client reports played
        self.done = False  # the client says nothing more of it will sound
        self.audible_at: int | None = None  # session sample where it became audible
        self.ended = False

    def begin_reply(self, reply: int) -> None:
        """A new reply: counts start again; the client learns its id first."""
        with self.lock:
            self.reply, self.written, self.played = reply, 0, 0
            self.done = self.ended = False
            self.audible_at = None
        self.send({"type": "reply.start", "reply": reply})

    def room_s(self) -> float:
        """Seconds the worker may send: at most AHEAD_S beyond what was reported played."""
        with self.lock:
            return AHEAD_S - (self.written - self.played) / OUTPUT_SAMPLE_RATE

    def write(self, samples: np.ndarray) -> None:
        """Send reply audio (a binary frame of PCM16LE at 24 kHz)."""
        with self.lock:
            self.written += len(samples)
        self.send(float_to_pcm16(samples))

    def end_reply(self) -> None:
        """The reply is complete: the client plays what it has, then reports done."""
        with self.lock:
            self.ended = True
            written = self.written
        self.send({"type": "reply.end", "reply": self.reply, "samples": written})

    def stop(self) -> None:
        """Barge-in: tell the client to flush; what it played comes later (`report`)."""
        self.send({"type": "interrupted", "reply": self.reply})
        return None

    def progress(self) -> Progress:
        """The last report for the current reply."""
        with self.lock:
            return Progress(self.reply, self.played, self.done, self.audible_at)

    def report(self, reply: int, played: int, done: bool, audible_at: int | None) -> None:
        """A playback report; one for an older reply is ignored (it crossed a reply.start)."""
        with self.lock:
            if reply != self.reply:
                return
            self.played = max(self.played, min(played, self.written))
            self.done = self.done or done
            if self.audible_at is None and audible_at is not None and self.played > 0:
                self.audible_at = audible_at


def parse_playback(message: dict) -> tuple[int, int, bool, int | None]:
    """The fields of a playback report, checked (ClientError for a bad one)."""
    def count(name: str, optional: bool = False) -> int | None:
        value = message.get(name)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ClientError("bad_event", f'"playback" needs "{name}" as a whole number of '
                                           "samples, 0 or more.")
        return value

    done = message.get("done", False)
    if not isinstance(done, bool):
        raise ClientError("bad_event", '"playback" needs "done" as true or false.')
    return count("reply"), count("played"), done, count("audible_at", optional=True)


def checked_voice_and_instructions(conversation: Conversation, voice, instructions,
                                   voice_param: str = "voice",
                                   instructions_param: str = "instructions"):
    """(voice as the model names it, instructions), each None when not given; a ClientError
    (`unknown_voice` / `bad_instructions`, in one sentence) for a bad one."""
    try:
        if voice is not None:
            voice = pick_voice(voice, conversation.voices())
    except DuplexError as exc:
        raise ClientError("unknown_voice", f"{exc} The session was not changed.",
                          voice_param) from None
    try:
        if instructions is not None:
            instructions = check_instructions(instructions)
    except DuplexError as exc:
        raise ClientError("bad_instructions", f"{exc} The session was not changed.",
                          instructions_param) from None
    return voice, instructions


def stage_marks(stages) -> dict[str, float]:
    """The engine's stage marks as a plain dict (a StageTimings, a dict, or None)."""
    if stages is None:
        return {}
    marks = stages.stages if hasattr(stages, "stages") else stages
    return {k: round(float(v), 2) for k, v in dict(marks).items() if v is not None}


class EventTranslator:
    """Session events → the JSON events of `/ws/pcm16` (state, transcript, latency, …)."""

    def __init__(self, send: Callable[[Any], None]):
        self.send = send
        self.state = ""
        self.turn = -1
        self.speaking_turn = -1  # the turn whose audio made the state assistant_speaking

    def set_state(self, state: str) -> None:
        """Send the state when it changes."""
        if state != self.state:
            self.state = state
            self.send({"type": "state", "state": state})

    def __call__(self, event: SessionEvent) -> None:
        if isinstance(event, UserSpeechStarted) and event.turn_start is not None:
            self.set_state("user_speaking")
        elif isinstance(event, TurnCommitted):
            self.turn = event.turn
            self.send({"type": "turn", "turn": event.turn,
                       "start_s": event.start_sample / SAMPLE_RATE,
                       "end_s": event.end_sample / SAMPLE_RATE})
            self.set_state("thinking")
        elif isinstance(event, EngineEvent) and event.current:
            self._engine(event)
        elif isinstance(event, ReplyAudible):
            self.send({"type": "latency", "turn": event.turn, "latency_ms": round(event.latency_ms, 1),
                       "stages": stage_marks(event.stages)})
        elif isinstance(event, Interrupted) and event.cause == "barge_in":
            # (a "close" cut is the connection ending: no state to show)
            self.set_state("user_speaking")
        elif isinstance(event, HistoryCut):
            self.send({"type": "history_cut", "turn": event.turn, "heard_samples": event.heard_samples,
                       "text": event.text, "estimated": event.estimated})
        elif isinstance(event, ReplyFinished):
            self.send({"type": "reply.done", "turn": event.turn, "heard_samples": event.heard_samples})
            self.set_state("listening")
        elif isinstance(event, BargeInLapsed):
            self.set_state("listening")

    def _engine(self, event: EngineEvent) -> None:
        inner = event.event
        if isinstance(inner, TextDelta) and inner.text:
            self.send({"type": "transcript", "turn": self.turn, "delta": inner.text})
        elif isinstance(inner, StageTimings):
            self.send({"type": "timings", "turn": self.turn, "stages": stage_marks(inner)})
        elif isinstance(inner, AudioPacket) and self.speaking_turn != self.turn:
            self.speaking_turn = self.turn
            self.set_state("assistant_speaking")


class Pcm16Connection(SessionConnection):
    """Serves one client on an accepted WebSocket until it leaves, idles or breaks the rules."""

    def __init__(self, websocket: WebSocket, settings: Settings, conversation: Conversation,
                 session_factory: Callable[..., Session] = Session):
        super().__init__(websocket, settings, conversation, session_factory)
        serve = settings.serve
        self.audio_bucket = TokenBucket(serve.max_audio_rate * SAMPLE_RATE,
                                        max(AUDIO_BURST_S, serve.max_frame_bytes / 2 / SAMPLE_RATE)
                                        * SAMPLE_RATE)
        self.player = SocketPlayer(self.send)
        self.events = self.session_events = EventTranslator(self.send)

    def error(self, code: str, message: str) -> None:
        """An error event in plain words."""
        self.send({"type": "error", "code": code, "message": message})

    async def start_failed(self, exc: Exception) -> None:
        await self.ws.send_json({"type": "error", "code": "model_failed",
                                 "message": f"The conversation could not start: {exc}"})

    def started(self) -> None:
        self.send({"type": "ready", "input_rate": SAMPLE_RATE, "output_rate": OUTPUT_SAMPLE_RATE,
                   "format": "pcm16le mono", "voice": self.voice,
                   "voices": list(self.conversation.voices()), "instructions": self.instructions})
        self.events.set_state("listening")

    def on_message(self, message: dict) -> None:
        data, text = message.get("bytes"), message.get("text")
        if data is not None:
            self._audio(data)
        else:
            self._text(text or "")

    def _audio(self, data: bytes) -> None:
        samples = pcm16_to_float(data)
        if not self.audio_bucket.take(len(samples)):
            raise ClientError("rate_limited", "Audio is arriving faster than "
                              f"{self.settings.serve.max_audio_rate:g}× real time; a frame was "
                              "dropped. Send the microphone as it records.")
        self._hear(samples)

    def _text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            raise ClientError("bad_json", "A text frame was not valid JSON; it was ignored.") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ClientError("bad_event", 'A text frame must be a JSON object with a "type".')
        if message["type"] == "session":
            return self._configure(message)
        if message["type"] != "playback":
            raise ClientError("unknown_event", f'Unknown event type {message["type"][:60]!r}; '
                                               'this endpoint takes "playback", "session" (and '
                                               'binary audio).')
        self.player.report(*parse_playback(message))
        self._hear(np.zeros(0, np.float32))

    def _configure(self, message: dict) -> None:
        """Voice and instructions from the next reply on; answered by `session.updated`
        (`mid_reply`: a reply was in flight, and keeps what it started with)."""
        voice, instructions = checked_voice_and_instructions(
            self.conversation, message.get("voice"), message.get("instructions"))
        self.session.configure(voice, instructions)
        self.voice = voice or self.voice
        self.instructions = instructions if instructions is not None else self.instructions
        self.send({"type": "session.updated", "voice": self.voice,
                   "instructions": self.instructions, "mid_reply": self.session.replying})
