"""What `/ws/pcm16` and `/v1/realtime` connections share: one `Session` served on an accepted
WebSocket, with an outbox drained in order by a send loop, a tick that drains the session's
outputs when no audio comes in, a receive loop with the idle timeout and the frame-size and
message-rate checks, and the shutdown that stops the model's work before the next client.

A protocol subclasses `SessionConnection` and implements `on_message` (one received frame, after
the checks), `error` (how an error event is shaped), `start_failed` and `started` (what the
client hears when the conversation could not start or did), and names its session-event sink.

Threads: every `Session` method runs on the event loop's thread (receive loop and a tick); the
session's worker thread writes reply audio into the player. Everything sent goes through
`loop.call_soon_threadsafe`, from both threads, so frames leave in the order they were made.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, Callable

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from duplex_chat.config import Settings
from duplex_chat.model.protocol import Conversation, pick_voice
from duplex_chat.session import Session

from .limits import TokenBucket

TICK_S = 0.05  # the session's outputs are drained this often even when no audio comes in


class ClientError(Exception):
    """Bad input from the client: becomes an error event; the connection stays open."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class SessionConnection:
    """Serves one client on an accepted WebSocket until it leaves, idles or breaks the rules."""

    rate_unit = "frames"  # in the rate_limited message: "Too many <unit> per second; ..."
    failed = False

    def __init__(self, websocket: WebSocket, settings: Settings, conversation: Conversation,
                 session_factory: Callable[..., Session] = Session):
        self.ws, self.settings, self.conversation = websocket, settings, conversation
        serve = settings.serve
        self.message_bucket = TokenBucket(serve.max_messages_per_s, serve.max_messages_per_s)
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.session_factory = session_factory
        self.session: Session | None = None
        self.voice, self.instructions = settings.qwen.voice, settings.qwen.system_prompt

    # ---- what each protocol says -----------------------------------------------------------
    player: Any  # the session's Player
    session_events: Callable  # the session's event sink

    def error(self, code: str, message: str) -> None:
        raise NotImplementedError

    def server_error(self, code: str, message: str) -> None:
        """An error that is the server's fault (the model failed)."""
        self.error(code, message)

    def client_error(self, exc: ClientError) -> None:
        """A ClientError raised while handling a frame: an error event."""
        self.error(exc.code, exc.message)

    def on_message(self, message: dict) -> None:
        """One received frame (its size and rate already checked)."""
        raise NotImplementedError

    async def start_failed(self, exc: Exception) -> None:
        """Tell the client the conversation could not start (the socket closes after)."""
        raise NotImplementedError

    def started(self) -> None:
        """The session runs: greet the client."""

    # ---- sending ---------------------------------------------------------------------------
    def send(self, item: Any) -> None:
        """Queue a frame (bytes: audio; dict: event) from any thread, in order."""
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)

    def close(self, code: int, reason: str) -> None:
        """Close the socket after what was queued before."""
        self.send({"type": "close", "code": code, "reason": reason})

    # ---- the connection's life -------------------------------------------------------------
    async def run(self) -> None:
        """Reset the conversation, run the session, and stop the model's work on the way out."""
        try:
            # The server's voice and instructions: the last client may have changed them.
            await asyncio.to_thread(functools.partial(
                self.conversation.reset, voice=self.voice, system_prompt=self.instructions))
            self.voice = pick_voice(self.voice, self.conversation.voices())
            self.session = self.session_factory(self.settings, self.conversation, self.player,
                                                self.session_events)
        except Exception as exc:  # a broken model or VAD: tell the client, keep serving others
            await self.start_failed(exc)
            await self.ws.close(1011, "model failed")
            return
        self.session.start()
        self.started()
        sender = asyncio.create_task(self._send_loop())
        ticker = asyncio.create_task(self._tick_loop())
        try:
            await self._receive_loop()
        finally:
            ticker.cancel()
            await asyncio.to_thread(self._close_session)
            await self._flush_and_stop(sender)

    def _close_session(self) -> None:
        """Stop the reply and the worker, and wait until the model is really idle (the next
        client's reset must not race this one's last step)."""
        session = self.session
        session.close()
        session.worker.join()

    async def _flush_and_stop(self, sender: asyncio.Task) -> None:
        await asyncio.sleep(0)  # let call_soon_threadsafe callbacks land in the outbox
        self.outbox.put_nowait(None)
        try:
            await asyncio.wait_for(sender, 2.0)
        except (asyncio.TimeoutError, Exception):
            sender.cancel()

    async def _send_loop(self) -> None:
        while (item := await self.outbox.get()) is not None:
            try:
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                elif item.get("type") == "close":
                    await self.ws.close(item["code"], item.get("reason", ""))
                    return
                else:
                    await self.ws.send_text(json.dumps(item))
            except (WebSocketDisconnect, RuntimeError, OSError):
                return  # the client is gone; the receive loop sees it too

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if not self._hear(np.zeros(0, np.float32)):
                return

    def _hear(self, samples: np.ndarray) -> bool:
        """Give the session audio (or nothing, to drain it); False once the model failed."""
        try:
            self.session.hear(samples)
            return True
        except Exception as exc:  # the worker died: say so in words and end the connection
            self.server_error("model_failed",
                              f"The model failed and this conversation ended: {exc}")
            self.close(1011, "model failed")
            self.failed = True
            return False

    async def _receive_loop(self) -> None:
        idle = self.settings.serve.idle_timeout_s
        while not self.failed:
            try:
                message = await asyncio.wait_for(self.ws.receive(), idle)
            except asyncio.TimeoutError:
                self.error("idle", f"Nothing was received for {idle:g} s, so the server closed "
                                   "this connection.")
                self.close(1000, "idle")
                return
            if message["type"] == "websocket.disconnect":
                return
            try:
                self._check_frame(message)
                self.on_message(message)
            except ClientError as exc:
                self.client_error(exc)

    def _check_frame(self, message: dict) -> None:
        """The frame-size limit and the message rate (ClientError for a frame over either)."""
        data, text = message.get("bytes"), message.get("text")
        size = len(data) if data is not None else len((text or "").encode())
        limit = self.settings.serve.max_frame_bytes
        if size > limit:
            raise ClientError("frame_too_large", f"A frame of {size} bytes is over the "
                                                 f"{limit}-byte limit; it was dropped.")
        if not self.message_bucket.take(1):
            raise ClientError("rate_limited", f"Too many {self.rate_unit} per second; this one "
                                              "was dropped.")
