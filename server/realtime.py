"""One `/v1/realtime` connection: the OpenAI Realtime API's event protocol (GA, as the openai
SDK's `openai.types.realtime` defines it) around a `Session`, the subset a voice client uses.

Audio is PCM16LE mono at 24 kHz both ways, base64 in JSON events, as the API specifies; the input
is resampled to the model's 16 kHz with soxr (`audio/resample.py`). Turn detection:

- `server_vad` (the default): appended audio goes straight into the session, whose VAD policy
  decides turns (`threshold`, `prefix_padding_ms` and `silence_duration_ms` map onto [vad]
  threshold, pre_roll_ms and end_of_turn_ms); a reply is created at each end of turn, and speech
  over a reply interrupts it (barge-in; the client then says what it played with
  `conversation.item.truncate`, the session's late "heard" report).
- `null` (manual): appended audio waits in the buffer; `input_audio_buffer.commit` makes it the
  user's item and `response.create` feeds it to the model and asks for the reply.

A Realtime client reports no playback, so the player models it: a reply counts as heard in real
time from its first delta (the client plays it as it arrives) until a truncate says otherwise.
`response.done` comes when generation ends; the reply stays "playing" for the session (speech
over it is a barge-in) until its modelled playback ends.

Threads, as in pcm16.py: session methods run on the event loop; the worker thread writes reply
audio into the `RealtimePlayer`; everything sent goes through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from starlette.websockets import WebSocket

from duplex_chat.audio.constants import OUTPUT_SAMPLE_RATE, SAMPLE_RATE
from duplex_chat.audio.resample import StreamResampler
from duplex_chat.audio.vad import SpeechEnded, SpeechStarted, VadEvent
from duplex_chat.config import Settings
from duplex_chat.model.events import TextDelta, TurnFinished
from duplex_chat.model.protocol import Conversation
from duplex_chat.session import (
    EngineEvent,
    HistoryCut,
    Interrupted,
    Progress,
    Session,
    SessionEvent,
    SilencePolicy,
    TurnCommitted,
    UserSpeechEnded,
    UserSpeechStarted,
)

from .connection import ClientError as _BaseClientError
from .connection import SessionConnection
from .limits import TokenBucket
from .pcm16 import AUDIO_BURST_S, checked_voice_and_instructions, float_to_pcm16, pcm16_to_float

API_RATE = 24_000  # the API's PCM rate, in and out
MODEL_NAME = "duplex-chat-qwen3-omni"
SUPPORTED = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
             "input_audio_buffer.clear", "response.create", "response.cancel",
             "conversation.item.truncate")


class ClientError(_BaseClientError):
    """Bad input from the client: an `error` event (`param`: the field at fault, if one is)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(code, message)
        self.param = param


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


class ManualPolicy:
    """The turn policy of `turn_detection: null`: no VAD; `arm(n)` makes the next `n` samples
    heard one user turn (SpeechStarted at their first sample, SpeechEnded after the last)."""

    speech_run = 0  # never a barge-in from the microphone: the client cancels
    pause_start = None  # the client ends turns: no pause to start a reply at speculatively

    def __init__(self, position: int = 0):
        self.position = position  # session samples heard so far
        self.armed: tuple[int, int] | None = None
        self.started = False

    def arm(self, samples: int) -> None:
        self.armed, self.started = (self.position, self.position + samples), False

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        events: list[VadEvent] = []
        if self.armed is not None and not self.started and len(samples):
            events.append(SpeechStarted(self.armed[0], self.armed[0]))
            self.started = True
        self.position += len(samples)
        if self.armed is not None and self.started and self.position >= self.armed[1]:
            events.append(SpeechEnded(self.armed[1]))
            self.armed = None
        return events

    def finish(self) -> list[VadEvent]:
        return []

    def close(self) -> None:
        """Nothing to release."""


class RealtimePlayer:
    """The session's `Player` for a Realtime client: reply audio goes out as
    `response.output_audio.delta` events; what was heard is modelled (real time from the first
    delta) until the client's truncate reports it (`report`)."""

    def __init__(self, send: Callable[[Any], None], clock: Callable[[], float] = time.monotonic):
        self.send, self.clock = send, clock
        self.lock = threading.Lock()
        self.reply = 0
        self.ids: tuple[str, str] = ("", "")  # response_id, item_id of the current reply
        self.written = 0
        self.first_at: float | None = None
        self.ended = False
        self.stopped = False
        self.reported: int | None = None  # heard samples the client reported (truncate)

    def begin_reply(self, reply: int) -> None:
        with self.lock:
            self.reply, self.written, self.first_at = reply, 0, None
            self.ended = self.stopped = False
            self.reported = None

    def room_s(self) -> float:
        return 1e9  # the API streams replies faster than real time; the client buffers

    def write(self, samples: np.ndarray) -> None:
        with self.lock:
            if self.first_at is None:
                self.first_at = self.clock()
            self.written += len(samples)
            response_id, item_id = self.ids
        self.send({"type": "response.output_audio.delta", "response_id": response_id,
                   "item_id": item_id, "output_index": 0, "content_index": 0,
                   "delta": base64.b64encode(float_to_pcm16(samples)).decode("ascii")})

    def end_reply(self) -> None:
        with self.lock:
            self.ended = True

    def stop(self) -> int | None:
        """Stopped (barge-in or the client): what was heard if the client said so already."""
        with self.lock:
            self.stopped = True
            return self.reported

    def _modelled(self) -> int:
        if self.first_at is None:
            return 0
        return min(self.written, int((self.clock() - self.first_at) * OUTPUT_SAMPLE_RATE))

    def progress(self) -> Progress:
        with self.lock:
            if self.reported is not None:
                return Progress(self.reply, self.reported, True)
            heard = self._modelled()
            finished = self.ended and not self.stopped and heard >= self.written
            return Progress(self.reply, heard, finished)

    def report(self, heard: int) -> None:
        """The client played `heard` samples of the current reply (its truncate)."""
        with self.lock:
            self.reported = max(0, min(heard, self.written))


@dataclass
class _Response:
    id: str
    item_id: str
    turn: int
    transcript: str = ""
    done: bool = False
    audio_samples: int = 0
    extra: dict = field(default_factory=dict)


class RealtimeConnection(SessionConnection):
    """Serves one Realtime client on an accepted WebSocket until it leaves, idles or breaks."""

    rate_unit = "events"

    def __init__(self, websocket: WebSocket, settings: Settings, conversation: Conversation,
                 session_factory: Callable[..., Session] = Session):
        super().__init__(websocket, settings, conversation, session_factory)
        serve = settings.serve
        self.audio_bucket = TokenBucket(serve.max_audio_rate * API_RATE,
                                        max(AUDIO_BURST_S, serve.max_frame_bytes * 3 / 8 / API_RATE)
                                        * API_RATE)
        self.player = RealtimePlayer(self.send)
        self.session_events = self.on_event
        self.resampler = StreamResampler(API_RATE, SAMPLE_RATE)
        self.session_id = new_id("sess")
        self.vad = settings.vad
        self.manual = False
        self.buffer: list[np.ndarray] = []  # manual mode: appended audio (16 kHz), not committed
        self.committed: list[np.ndarray] = []  # manual mode: committed, awaiting response.create
        self.last_item: str | None = None
        self.user_item: str | None = None  # the user item of the turn in progress (server VAD)
        self.response: _Response | None = None  # the latest response
        self.items: dict[str, _Response] = {}  # assistant item id -> its response
        self.cuts: dict[int, tuple[str, int]] = {}  # turn -> (item id, audio_end_ms) to confirm

    # ---- sending ---------------------------------------------------------------------------
    def send(self, event: dict) -> None:
        """Queue an event (from any thread, in order); it gets its event_id here."""
        event = {"event_id": new_id("event"), **event}
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, event)

    def error(self, code: str, message: str, kind: str = "invalid_request_error",
              client_event: str | None = None, param: str | None = None) -> None:
        """An `error` event in the API's shape; the connection stays open."""
        self.send({"type": "error", "error": {"type": kind, "code": code, "message": message,
                                              "param": param, "event_id": client_event}})

    def server_error(self, code: str, message: str) -> None:
        self.error(code, message, kind="server_error")

    def client_error(self, exc: _BaseClientError) -> None:  # pcm16_to_float's too
        self.error(exc.code, exc.message, client_event=getattr(exc, "client_event", None),
                   param=getattr(exc, "param", None))

    def session_object(self) -> dict:
        """The session as `session.created` / `session.updated` show it."""
        if self.manual:
            turn_detection = None
        else:
            turn_detection = {"type": "server_vad", "threshold": self.vad.threshold,
                              "prefix_padding_ms": self.vad.pre_roll_ms,
                              "silence_duration_ms": self.vad.end_of_turn_ms,
                              "create_response": True,
                              "interrupt_response": self.settings.audio.barge_in,
                              "idle_timeout_ms": None}
        pcm = {"type": "audio/pcm", "rate": API_RATE}
        return {"type": "realtime", "object": "realtime.session", "id": self.session_id,
                "model": MODEL_NAME, "output_modalities": ["audio"],
                "instructions": self.instructions,
                "audio": {"input": {"format": pcm, "transcription": None, "noise_reduction": None,
                                    "turn_detection": turn_detection},
                          "output": {"format": pcm, "voice": self.voice, "speed": 1.0}},
                "tools": [], "tool_choice": "auto", "max_output_tokens": "inf",
                "tracing": None, "truncation": "auto", "prompt": None, "include": None}

    # ---- the connection's life -------------------------------------------------------------
    async def start_failed(self, exc: Exception) -> None:
        await self.ws.send_text(json.dumps({
            "type": "error", "event_id": new_id("event"),
            "error": {"type": "server_error", "code": "model_failed", "param": None,
                      "event_id": None,
                      "message": f"The conversation could not start: {exc}"}}))

    def started(self) -> None:
        self.send({"type": "session.created", "session": self.session_object()})

    def on_message(self, message: dict) -> None:
        """One frame (size and rate checked): a JSON event, dispatched by its type."""
        text, data = message.get("text"), message.get("bytes")
        if data is not None:
            raise ClientError("bad_event", "This endpoint takes JSON text events; audio "
                                           "goes in input_audio_buffer.append (base64).")
        try:
            event = json.loads(text or "")
        except ValueError:
            raise ClientError("bad_json", "A frame was not valid JSON; it was ignored.") \
                from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ClientError("bad_event", 'An event must be a JSON object with a "type".')
        try:
            self._handle(event)
        except _BaseClientError as exc:  # the error names the event it answers
            exc.client_event = event.get("event_id") if isinstance(event.get("event_id"), str) \
                else None
            raise

    # ---- client events ---------------------------------------------------------------------
    def _handle(self, event: dict) -> None:
        kind = event["type"]
        if kind not in SUPPORTED:
            raise ClientError("unsupported_event", f"The event type {kind[:60]!r} is not supported "
                              "by this server; it was ignored. Supported: "
                              + ", ".join(SUPPORTED) + ".")
        getattr(self, "_on_" + kind.replace(".", "_"))(event)

    def _on_session_update(self, event: dict) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise ClientError("bad_event", 'session.update needs a "session" object.')
        audio = session.get("audio") or {}
        inp, out = audio.get("input") or {}, audio.get("output") or {}
        for where, fmt in (("audio.input.format", inp.get("format")),
                           ("audio.output.format", out.get("format"))):
            if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm"
                                    or fmt.get("rate", API_RATE) != API_RATE):
                raise ClientError("unsupported_format", f"{where}: only audio/pcm at 24000 Hz is "
                                  "supported; the session was not changed.")
        voice = out.get("voice", session.get("voice"))
        if isinstance(voice, dict):
            voice = voice.get("id")
        if voice is not None and not isinstance(voice, str):
            raise ClientError("bad_event", "audio.output.voice must be a string.",
                              param="session.audio.output.voice")
        # Checked before anything is applied: a bad value leaves the session as it was.
        voice, instructions = checked_voice_and_instructions(
            self.conversation, voice, session.get("instructions"),
            "session.audio.output.voice", "session.instructions")
        if "turn_detection" in inp:
            self._turn_detection(inp["turn_detection"])
        changed = (voice not in (None, self.voice)
                   or instructions not in (None, self.instructions))
        self.session.configure(voice, instructions)
        self.voice = voice or self.voice
        self.instructions = instructions if instructions is not None else self.instructions
        self.send({"type": "session.updated", "session": self.session_object()})
        if changed and self.response is not None and not self.response.done:
            self.error("applies_from_next_response", "The response in progress keeps the voice "
                       "and instructions it started with; the new ones apply from the next "
                       "response.", kind="server_notice", client_event=event.get("event_id"))

    def _turn_detection(self, spec) -> None:
        session = self.session
        if spec is None:
            if not self.manual:
                self.manual = True
                session.policy = ManualPolicy(session.now)
            return
        if not isinstance(spec, dict) or spec.get("type") != "server_vad":
            raise ClientError("unsupported_turn_detection", "turn_detection must be "
                              '{"type": "server_vad", ...} or null; semantic_vad is not supported.')
        vad = self.vad
        changes = {}
        for key, name, low, high in (("threshold", "threshold", 0.0, 1.0),
                                     ("prefix_padding_ms", "pre_roll_ms", 0, 5000),
                                     ("silence_duration_ms", "end_of_turn_ms", 32, 10_000)):
            value = spec.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not low <= value <= high:
                raise ClientError("bad_event", f"turn_detection.{key} must be a number from "
                                               f"{low} to {high}.", )
            changes[name] = float(value) if name == "threshold" else int(value)
        if "threshold" in changes:
            changes["neg_threshold"] = min(vad.neg_threshold, max(0.0, changes["threshold"] - 0.15))
        new = type(vad)(**{**vars(vad), **changes}) if changes else vad
        if new != vad or self.manual:
            self.vad, self.manual = new, False
            self.buffer.clear()
            session.policy = SilencePolicy(new)
            session.pre_roll = round(new.pre_roll_ms * SAMPLE_RATE / 1000)

    def _on_input_audio_buffer_append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ClientError("bad_event", 'input_audio_buffer.append needs "audio" (base64).')
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("bad_audio", "The audio was not valid base64; it was ignored.") \
                from None
        samples = pcm16_to_float(data)
        if not self.audio_bucket.take(len(samples)):
            raise ClientError("rate_limited", "Audio is arriving faster than "
                              f"{self.settings.serve.max_audio_rate:g}× real time; it was "
                              "dropped. Send the microphone as it records.")
        audio16 = self.resampler.process(samples)
        if self.manual:
            self.buffer.append(audio16)
        else:
            self._hear(audio16)

    def _on_input_audio_buffer_commit(self, event: dict) -> None:
        if not self.manual:
            raise ClientError("not_supported", "With server_vad the server commits the buffer at "
                              "each end of turn; set turn_detection to null to commit yourself.")
        self.buffer.append(self.resampler.flush())
        audio = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.float32)
        self.buffer.clear()
        if len(audio) < SAMPLE_RATE // 10:
            raise ClientError("input_audio_buffer_commit_empty", "The buffer holds less than "
                              "100 ms of audio; nothing was committed.")
        self.committed.append(audio)
        item = new_id("item")
        self._user_item(item)

    def _user_item(self, item: str) -> None:
        self.send({"type": "input_audio_buffer.committed", "item_id": item,
                   "previous_item_id": self.last_item})
        user = {"id": item, "object": "realtime.item", "type": "message", "role": "user",
                "status": "completed", "content": [{"type": "input_audio", "transcript": None}]}
        self.send({"type": "conversation.item.added", "item": user,
                   "previous_item_id": self.last_item})
        self.send({"type": "conversation.item.done", "item": user,
                   "previous_item_id": self.last_item})
        self.last_item = item

    def _on_input_audio_buffer_clear(self, event: dict) -> None:
        self.buffer.clear()
        self.resampler.reset()
        self.send({"type": "input_audio_buffer.cleared"})

    def _on_response_create(self, event: dict) -> None:
        if self.response is not None and not self.response.done:
            raise ClientError("conversation_already_has_active_response", "A response is in "
                              "progress; cancel it first (response.cancel).")
        if not self.manual:
            raise ClientError("not_supported", "With server_vad a response is created at each end "
                              "of turn; set turn_detection to null to create them yourself.")
        if not self.committed:
            raise ClientError("nothing_to_respond", "Commit some audio first "
                              "(input_audio_buffer.commit): this model replies to speech.")
        if self.session.replying:  # the last reply's modelled playback: count it heard whole
            self.player.report(self.player.written)
            self.session.interrupt()
        audio = np.concatenate(self.committed)
        self.committed.clear()
        self.session.policy.arm(len(audio))
        self._hear(audio)

    def _on_response_cancel(self, event: dict) -> None:
        response = self.response
        if response is None or response.done:
            raise ClientError("response_cancel_not_active", "There is no response in progress "
                              "to cancel.")
        self.session.interrupt()

    def _on_conversation_item_truncate(self, event: dict) -> None:
        item, end_ms = event.get("item_id"), event.get("audio_end_ms")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            raise ClientError("bad_event", "conversation.item.truncate needs audio_end_ms, a "
                                           "whole number of milliseconds, 0 or more.")
        if event.get("content_index", 0) != 0:
            raise ClientError("bad_event", "content_index must be 0 (one audio part per item).",
                              param="content_index")
        response = self.items.get(item)
        if response is None:
            raise ClientError("item_not_found", f"No assistant item {str(item)[:60]!r} to truncate.",
                              param="item_id")
        heard = end_ms * OUTPUT_SAMPLE_RATE // 1000
        if heard > response.audio_samples and response.done:
            raise ClientError("bad_event", f"audio_end_ms {end_ms} is past the item's audio "
                              f"({response.audio_samples * 1000 // OUTPUT_SAMPLE_RATE} ms).",
                              param="audio_end_ms")
        session, current = self.session, response is self.response
        self.cuts[response.turn] = (response.item_id, end_ms)
        if current and session.pending is not None and session.pending.reply.turn == response.turn:
            self.player.report(heard)  # the late report of a barge-in's stop
        elif current and session.replying:
            self.player.report(heard)
            session.interrupt()
        elif not session.truncate_played(response.turn, heard):
            del self.cuts[response.turn]
            raise ClientError("truncate_too_late", "That item can no longer be truncated: the "
                              "conversation has moved on (a newer turn has begun).")

    # ---- session events --------------------------------------------------------------------
    def on_event(self, event: SessionEvent) -> None:
        if isinstance(event, UserSpeechStarted) and event.turn_start is not None and not self.manual:
            self.user_item = new_id("item")
            self.send({"type": "input_audio_buffer.speech_started", "item_id": self.user_item,
                       "audio_start_ms": event.turn_start * 1000 // SAMPLE_RATE})
        elif isinstance(event, UserSpeechEnded) and self.user_item is not None and not self.manual:
            self.send({"type": "input_audio_buffer.speech_stopped", "item_id": self.user_item,
                       "audio_end_ms": event.end_sample * 1000 // SAMPLE_RATE})
        elif isinstance(event, TurnCommitted):
            if not self.manual:
                item, self.user_item = self.user_item or new_id("item"), None
                self._user_item(item)
            self._response_started(event.turn)
        elif isinstance(event, EngineEvent) and event.current and self.response is not None:
            inner = event.event
            if isinstance(inner, TextDelta) and inner.text:
                self.response.transcript += inner.text
                self._send_part("response.output_audio_transcript.delta", delta=inner.text)
            elif isinstance(inner, TurnFinished):
                self._response_done("completed", None)
        elif isinstance(event, Interrupted) and event.cause != "close":
            if self.response is not None and not self.response.done:
                self._response_done("cancelled", "turn_detected" if event.cause == "barge_in"
                                    else "client_cancelled")
        elif isinstance(event, HistoryCut):
            item, end_ms = self.cuts.pop(event.turn, (None, None))
            if item is not None:  # only the cuts the client asked for
                self.send({"type": "conversation.item.truncated", "item_id": item,
                           "content_index": 0, "audio_end_ms": end_ms})

    def _assistant_item(self, response: _Response, status: str) -> dict:
        return {"id": response.item_id, "object": "realtime.item", "type": "message",
                "role": "assistant", "status": status,
                "content": [{"type": "output_audio", "transcript": response.transcript}]}

    def _response_object(self, response: _Response, status: str, reason: str | None,
                         output: list) -> dict:
        details = None if status == "in_progress" else {"type": status, "reason": reason}
        return {"id": response.id, "object": "realtime.response", "status": status,
                "status_details": details, "output": output, "conversation_id": None,
                "output_modalities": ["audio"], "max_output_tokens": "inf",
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": API_RATE},
                                     "voice": self.voice}},
                "usage": None, "metadata": None}

    def _response_started(self, turn: int) -> None:
        response = _Response(new_id("resp"), new_id("item"), turn)
        self.response = response
        self.items[response.item_id] = response
        with self.player.lock:
            self.player.ids = (response.id, response.item_id)
        self.send({"type": "response.created",
                   "response": self._response_object(response, "in_progress", None, [])})
        item = self._assistant_item(response, "in_progress")
        self.send({"type": "response.output_item.added", "response_id": response.id,
                   "output_index": 0, "item": item})
        self.send({"type": "conversation.item.added", "item": item,
                   "previous_item_id": self.last_item})
        self.last_item = response.item_id
        self._send_part("response.content_part.added",
                        part={"type": "audio", "transcript": ""})

    def _send_part(self, kind: str, **fields) -> None:
        response = self.response
        self.send({"type": kind, "response_id": response.id, "item_id": response.item_id,
                   "output_index": 0, "content_index": 0, **fields})

    def _response_done(self, status: str, reason: str | None) -> None:
        response = self.response
        response.done = True
        with self.player.lock:
            response.audio_samples = self.player.written
        self._send_part("response.output_audio.done")
        self._send_part("response.output_audio_transcript.done", transcript=response.transcript)
        self._send_part("response.content_part.done",
                        part={"type": "audio", "transcript": response.transcript})
        item = self._assistant_item(response, "completed" if status == "completed"
                                    else "incomplete")
        self.send({"type": "response.output_item.done", "response_id": response.id,
                   "output_index": 0, "item": item})
        self.send({"type": "conversation.item.done", "item": item})
        self.send({"type": "response.done",
                   "response": self._response_object(response, status, reason, [item])})
