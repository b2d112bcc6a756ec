"""Helpers for the `serve` tests: the server on a free port in a thread, and a virtual browser
(a plain WebSocket client with a microphone that streams at real time and a virtual speaker that
reports playback late, as the page does)."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from typing import Iterator

import numpy as np
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from duplex_chat.config import load_settings
from duplex_chat.server import ServerState, create_app
from duplex_chat.server.run import uvicorn_config

MIC_CHUNK = 320  # 20 ms at 16 kHz, like the page
OUT_RATE = 24_000


def serve_settings(base=None, **serve):
    """Default settings (or `base`) with some [serve] keys changed."""
    settings = base if base is not None else load_settings(environ={})
    return settings.replace("serve", **serve) if serve else settings


def lan_address() -> str | None:
    """This machine's address on its default route (not loopback), or None if it has none.
    (A UDP socket's connect only picks the route: nothing is sent.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@contextlib.contextmanager
def running_server(state: ServerState, host: str = "127.0.0.1", **extra) -> Iterator[str]:
    """Serve `state` on `host` at a free port; yields "HOST:PORT"."""
    sock = socket.socket()
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(state.settings, create_app(state), **extra))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class VirtualBrowser:
    """A `/ws/pcm16` client: the mic thread sends queued speech, else silence, at real time;
    reply audio "plays" at real time from its first packet (`playback="realtime"`) or counts as
    played when it arrives (`"instant"`); playback is reported late, as the page does."""

    def __init__(self, url: str, playback: str = "instant", **connect_kw):
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(url, max_size=None, **connect_kw))
        self.playback = playback
        self.events: list[dict] = []
        self.audio: dict[int, bytearray] = {}
        self.reply = 0
        self.first_audio: dict[int, float] = {}
        self.audible_at: dict[int, int] = {}
        self.mic_sent = 0
        self.closed: ConnectionClosed | None = None
        self.flushed: dict[int, int] = {}  # reply -> what it said was played when interrupted
        self._speech: queue.Queue[np.ndarray] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True)
                         for f in (self._read, self._mic, self._report)]
        for t in self._threads:
            t.start()

    # ---- what tests call -------------------------------------------------------------------
    def say(self, samples: np.ndarray) -> None:
        """Queue 16 kHz float speech for the microphone."""
        self._speech.put(np.asarray(samples, np.float32))

    def send(self, frame) -> None:
        """Send one frame (bytes, str or a dict as JSON)."""
        with self._lock:
            self.ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)

    def wait_for(self, kind: str, timeout: float = 20.0, count: int = 1, **fields) -> dict:
        """The `count`-th event of type `kind` whose fields match; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in list(self.events) if e["type"] == kind
                     and all(e.get(k) == v for k, v in fields.items())]
            if len(found) >= count:
                return found[count - 1]
            if self.closed is not None and kind != "closed":
                break
            time.sleep(0.02)
        raise AssertionError(f"no {kind} event {fields or ''} in {timeout} s; got "
                             f"{[e['type'] for e in self.events]} (closed: {self.closed})")

    def wait_closed(self, timeout: float = 10.0) -> ConnectionClosed:
        deadline = time.monotonic() + timeout
        while self.closed is None:
            assert time.monotonic() < deadline, "the server did not close the connection"
            time.sleep(0.02)
        return self.closed

    def played(self, reply: int) -> int:
        """What the virtual speaker has played of `reply` by now (24 kHz samples)."""
        have = len(self.audio.get(reply, b"")) // 2
        if self.playback == "instant" or reply not in self.first_audio:
            return have
        return min(have, int((time.monotonic() - self.first_audio[reply]) * OUT_RATE))

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._stack.close()
        for t in self._threads:
            t.join(5)

    # ---- threads -----------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            for message in self.ws:
                if isinstance(message, bytes):
                    self._audio(message)
                else:
                    self._event(json.loads(message))
        except ConnectionClosed as exc:
            self.closed = exc
        else:
            self.closed = self.ws.protocol.close_exc

    def _audio(self, data: bytes) -> None:
        if self.reply in self.flushed:
            return  # audio of an interrupted reply, still in flight: dropped like the page does
        if self.reply not in self.first_audio:
            self.first_audio[self.reply] = time.monotonic()
            self.audible_at[self.reply] = self.mic_sent
        self.audio.setdefault(self.reply, bytearray()).extend(data)

    def _event(self, event: dict) -> None:
        if event["type"] == "reply.start":
            self.reply = event["reply"]
        elif event["type"] == "interrupted":
            played = self.played(event["reply"])
            self.flushed[event["reply"]] = played
            self._playback(event["reply"], played, True)
        self.events.append(event)

    def _playback(self, reply: int, played: int, done: bool) -> None:
        with contextlib.suppress(ConnectionClosed):
            self.send({"type": "playback", "reply": reply, "played": played, "done": done,
                       "audible_at": self.audible_at.get(reply)})

    def _mic(self) -> None:
        pending = np.zeros(0, np.float32)
        start = time.monotonic()
        while not self._stop.is_set() and self.closed is None:
            if not len(pending):
                try:
                    pending = self._speech.get_nowait()
                except queue.Empty:
                    pending = np.zeros(MIC_CHUNK, np.float32)
            chunk, pending = pending[:MIC_CHUNK], pending[MIC_CHUNK:]
            pcm = (np.clip(chunk, -1, 0.99997) * 32768).astype("<i2").tobytes()
            with contextlib.suppress(ConnectionClosed):
                self.send(pcm)
            self.mic_sent += len(chunk)
            time.sleep(max(0.0, start + self.mic_sent / 16_000 - time.monotonic()))

    def _report(self) -> None:
        reported: dict[int, int] = {}
        while not self._stop.wait(0.1) and self.closed is None:
            reply = self.reply
            if reply == 0 or reply in self.flushed or reported.get(reply) == -1:
                continue
            played = self.played(reply)
            ended = any(e["type"] == "reply.end" and e["reply"] == reply for e in self.events)
            done = ended and played >= len(self.audio.get(reply, b"")) // 2
            if played != reported.get(reply) or done:
                self._playback(reply, played, done)
                reported[reply] = -1 if done else played
