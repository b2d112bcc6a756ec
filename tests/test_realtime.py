"""`/v1/realtime`: the OpenAI Realtime protocol, with the openai SDK's own realtime client as the
client: server VAD and manual turns, audio and transcript deltas, truncate (mid-reply and after
response.done), cancel, unsupported events, busy."""

from __future__ import annotations

import base64
import contextlib
import threading
import time

import numpy as np
import pytest
import soxr
from openai import OpenAI
from websockets.exceptions import InvalidStatus

from duplex_chat.model.engine import StreamingConversation
from duplex_chat.server import ServerState

from .audio_helpers import espeak_speech
from .conftest import tiny_settings
from .fake_engine import Reply, ScriptedConversation, chirp
from .serve_helpers import running_server, serve_settings

RATE = 24_000
CHUNK = 480  # 20 ms at 24 kHz


def speech24(text: str = "Hello, how are you today?", silence_s: float = 0.0) -> np.ndarray:
    """espeak speech at the API's 24 kHz, with `silence_s` after it."""
    voice = soxr.resample(espeak_speech(text), 16_000, RATE).astype(np.float32)
    return np.concatenate([voice, np.zeros(int(silence_s * RATE), np.float32)])


def b64(samples: np.ndarray) -> str:
    return base64.b64encode((np.clip(samples, -1, 0.99997) * 32768).astype("<i2").tobytes()).decode()


class Client:
    """The openai SDK's realtime connection, with a reader thread keeping every event, and a
    microphone thread that streams queued audio (then silence, if `mic`) at real time."""

    def __init__(self, address: str, mic: bool = True, token: str = "unused"):
        self._stack = contextlib.ExitStack()
        client = OpenAI(api_key=token, base_url=f"http://{address}/v1")
        self.conn = self._stack.enter_context(client.realtime.connect(model="qwen3-omni"))
        self.events: list = []
        self.closed = False
        self._pending = np.zeros(0, np.float32)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, daemon=True)]
        if mic:
            self._threads.append(threading.Thread(target=self._mic, daemon=True))
        for t in self._threads:
            t.start()

    def say(self, samples: np.ndarray) -> None:
        with self._lock:
            self._pending = np.concatenate([self._pending, samples])

    def send(self, event: dict) -> None:
        self.conn.send(event)

    def wait_for(self, kind: str, timeout: float = 20.0, count: int = 1, **fields):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in list(self.events) if e.type == kind
                     and all(getattr(e, k, None) == v for k, v in fields.items())]
            if len(found) >= count:
                return found[count - 1]
            if self.closed:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {kind} {fields or ''} in {timeout} s; got "
                             f"{[e.type for e in self.events]}")

    def of(self, kind: str) -> list:
        return [e for e in list(self.events) if e.type == kind]

    def audio(self, response_id: str) -> np.ndarray:
        data = b"".join(base64.b64decode(e.delta) for e in self.of("response.output_audio.delta")
                        if e.response_id == response_id)
        return np.frombuffer(data, "<i2")

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._stack.close()
        for t in self._threads:
            t.join(5)

    def _read(self) -> None:
        try:
            for event in self.conn:
                self.events.append(event)
        except Exception:
            pass
        self.closed = True

    def _mic(self) -> None:
        sent, start = 0, time.monotonic()
        while not self._stop.is_set() and not self.closed:
            with self._lock:
                chunk, self._pending = self._pending[:CHUNK], self._pending[CHUNK:]
            if len(chunk) < CHUNK:
                chunk = np.concatenate([chunk, np.zeros(CHUNK - len(chunk), np.float32)])
            with contextlib.suppress(Exception):
                self.conn.input_audio_buffer.append(audio=b64(chunk))
            sent += CHUNK
            time.sleep(max(0.0, start + sent / RATE - time.monotonic()))


@contextlib.contextmanager
def scripted_server(seconds: float = 1.0, realtime_factor: float = 0.2, **serve):
    conversation = ScriptedConversation(
        [Reply(chirp(seconds), ("one", "two", "three", "four", "five"))],
        realtime_factor=realtime_factor)
    state = ServerState(serve_settings(**serve), conversation)
    with running_server(state) as address:
        yield conversation, address


def talk(client: Client):
    """Say something (server VAD) and return the response.created event."""
    client.wait_for("session.created")
    client.say(speech24(silence_s=1.0))
    return client.wait_for("response.created", timeout=30)


# ---- the tiny model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_server_vad_round_trip_with_the_tiny_model(tiny_models):
    checkpoint, bundle = tiny_models("small")
    settings = tiny_settings(checkpoint, max_reply_seconds=1.0)
    state = ServerState(serve_settings(settings), StreamingConversation(bundle, settings))
    with running_server(state) as address:
        client = Client(address)
        try:
            created = client.wait_for("session.created")
            assert created.session.audio.input.format.rate == RATE
            client.send({"type": "session.update", "session": {
                "type": "realtime", "audio": {"input": {"turn_detection": {
                    "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                    "silence_duration_ms": 500}}}}})
            updated = client.wait_for("session.updated")
            assert updated.session.audio.input.turn_detection.silence_duration_ms == 500
            client.say(speech24(silence_s=1.0))
            started = client.wait_for("input_audio_buffer.speech_started", timeout=30)
            stopped = client.wait_for("input_audio_buffer.speech_stopped", timeout=30)
            committed = client.wait_for("input_audio_buffer.committed", timeout=30)
            response = client.wait_for("response.created", timeout=30).response
            done = client.wait_for("response.done", timeout=90)
        finally:
            client.close()
    assert started.item_id == stopped.item_id == committed.item_id
    assert 500 < stopped.audio_end_ms - started.audio_start_ms < 3500
    assert done.response.id == response.id and done.response.status == "completed"
    audio = client.audio(response.id)
    assert 0.5 * RATE <= len(audio) <= 1.1 * RATE  # max_reply_seconds = 1
    assert np.abs(audio).max() > 1000
    deltas = "".join(e.delta for e in client.of("response.output_audio_transcript.delta"))
    assert deltas
    assert client.wait_for("response.output_audio_transcript.done").transcript == deltas
    assert done.response.output[0].content[0].transcript == deltas


# ---- truncate and cancel (scripted conversation) ---------------------------------------------
@pytest.mark.slow
def test_truncate_mid_reply_cancels_and_cuts_history_to_audio_end_ms():
    with scripted_server(seconds=5.0, realtime_factor=0.5) as (conversation, address):
        client = Client(address)
        try:
            response = talk(client).response
            deadline = time.monotonic() + 20
            while len(client.audio(response.id)) < RATE // 2:  # half a second has arrived
                assert time.monotonic() < deadline
                time.sleep(0.02)
            item = client.wait_for("conversation.item.added", count=2).item
            assert item.role == "assistant"
            client.send({"type": "conversation.item.truncate", "item_id": item.id,
                         "content_index": 0, "audio_end_ms": 400})
            truncated = client.wait_for("conversation.item.truncated", timeout=10)
            done = client.wait_for("response.done", timeout=10)
        finally:
            client.close()
    assert truncated.item_id == item.id and truncated.audio_end_ms == 400
    assert done.response.id == response.id and done.response.status == "cancelled"
    assert done.response.status_details.reason == "client_cancelled"
    assert conversation.called("cancel")[0][1] == 400 * 24
    assert conversation.called("truncate")[-1][1] == 400 * 24  # history keeps what was heard
    assert len(client.audio(response.id)) < 5 * RATE


@pytest.mark.slow
def test_truncate_after_response_done_cuts_history():
    with scripted_server(seconds=1.0, realtime_factor=0.2) as (conversation, address):
        client = Client(address)
        try:
            response = talk(client).response
            done = client.wait_for("response.done", timeout=20)
            item = done.response.output[0]
            assert done.response.status == "completed"
            assert len(client.audio(response.id)) == RATE
            time.sleep(1.5)  # past the reply's modelled playback: the session has moved on
            client.send({"type": "conversation.item.truncate", "item_id": item.id,
                         "content_index": 0, "audio_end_ms": 300})
            truncated = client.wait_for("conversation.item.truncated", timeout=10)
            client.send({"type": "conversation.item.truncate", "item_id": "item_nope",
                         "content_index": 0, "audio_end_ms": 300})
            error = client.wait_for("error")
        finally:
            client.close()
    assert truncated.item_id == item.id and truncated.audio_end_ms == 300
    assert conversation.called("truncate")[-1][1] == 300 * 24
    # No reply was in flight to cancel: only the hang-up's harmless cancel, after the cut.
    assert all(t > conversation.called("truncate")[-1][0] for t, _ in conversation.called("cancel"))
    assert error.error.code == "item_not_found"


@pytest.mark.slow
def test_response_cancel_stops_the_reply():
    with scripted_server(seconds=6.0, realtime_factor=1.0) as (conversation, address):
        client = Client(address)
        try:
            response = talk(client).response
            client.wait_for("response.output_audio.delta", timeout=20)
            client.send({"type": "response.cancel"})
            done = client.wait_for("response.done", timeout=10)
            time.sleep(0.5)
            client.send({"type": "response.cancel"})
            error = client.wait_for("error", timeout=10)
        finally:
            client.close()
    assert done.response.id == response.id and done.response.status == "cancelled"
    assert conversation.called("cancel")
    assert error.error.code == "response_cancel_not_active"
    assert len(client.audio(response.id)) < 3 * RATE


# ---- manual turns ------------------------------------------------------------------------------
@pytest.mark.slow
def test_manual_turn_detection_commit_and_response_create():
    with scripted_server(seconds=1.0) as (conversation, address):
        client = Client(address, mic=False)
        try:
            client.wait_for("session.created")
            client.send({"type": "session.update",
                         "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}})
            assert client.wait_for("session.updated").session.audio.input.turn_detection is None
            audio = speech24()
            for start in range(0, len(audio), 4800):
                client.conn.input_audio_buffer.append(audio=b64(audio[start:start + 4800]))
            time.sleep(0.5)
            assert client.of("input_audio_buffer.speech_started") == []
            assert conversation.called("feed") == []  # nothing reaches the model before create
            client.conn.input_audio_buffer.commit()
            committed = client.wait_for("input_audio_buffer.committed")
            client.conn.response.create()
            created = client.wait_for("response.created", timeout=10)
            done = client.wait_for("response.done", timeout=20)
            client.conn.response.create()  # nothing new committed
            error = client.wait_for("error")
        finally:
            client.close()
    assert client.wait_for("conversation.item.added").item.id == committed.item_id
    assert done.response.id == created.response.id and done.response.status == "completed"
    fed = sum(n for _, n in conversation.called("feed"))
    assert abs(fed - len(audio) * 2 // 3) < 1600  # the committed audio, resampled to 16 kHz
    assert len(conversation.called("end_turn")) == 1
    assert len(client.audio(created.response.id)) == RATE
    assert error.error.code == "nothing_to_respond"


# ---- errors ------------------------------------------------------------------------------------
def test_unsupported_event_gets_an_error_and_the_connection_stays_open():
    with scripted_server() as (_, address):
        client = Client(address, mic=False)
        try:
            client.wait_for("session.created")
            client.send({"type": "conversation.item.retrieve", "item_id": "x", "event_id": "ev1"})
            error = client.wait_for("error")
            client.send({"type": "session.update", "session": {
                "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}})
            bad_format = client.wait_for("error", count=2)
            assert not client.closed
        finally:
            client.close()
    assert error.error.code == "unsupported_event" and error.error.event_id == "ev1"
    assert "conversation.item.retrieve" in error.error.message
    assert bad_format.error.code == "unsupported_format"
    assert not client.of("session.updated")


# ---- voice and instructions --------------------------------------------------------------------
@pytest.mark.slow
def test_session_update_sets_voice_and_instructions_at_the_start_and_between_replies():
    """Applied at once before the first reply (the engine takes them with no rebuild); an
    unknown voice is one clear error and changes nothing (turn detection included); mid-reply
    the response keeps its voice and a notice says the new one applies from the next."""
    with scripted_server(seconds=3.0, realtime_factor=1.0) as (conversation, address):
        client = Client(address)
        try:
            created = client.wait_for("session.created")
            client.send({"type": "session.update", "event_id": "ev_bad", "session": {
                "type": "realtime", "audio": {"input": {"turn_detection": None},
                                              "output": {"voice": "alloy"}}}})
            bad = client.wait_for("error")
            client.send({"type": "session.update", "session": {
                "type": "realtime", "instructions": "Be a pirate.",
                "audio": {"output": {"voice": "chelsie"}}}})
            first = client.wait_for("session.updated")
            response = talk(client).response
            client.send({"type": "session.update", "event_id": "ev_mid", "session": {
                "type": "realtime", "audio": {"output": {"voice": "Aiden"}}}})
            mid = client.wait_for("session.updated", count=2)
            notice = client.wait_for("error", count=2)
            done = client.wait_for("response.done", timeout=20)
        finally:
            client.close()
    assert created.session.audio.output.voice == "Ethan"
    default = ("Ethan", created.session.instructions)  # the server's: the conversation reset to it
    assert bad.error.code == "unknown_voice" and bad.error.event_id == "ev_bad"
    assert bad.error.param == "session.audio.output.voice"
    assert bad.error.message.startswith("Unknown voice 'alloy'; this model speaks Aiden, "
                                        "Chelsie, Ethan.")
    assert first.session.audio.output.voice == "Chelsie"
    assert first.session.instructions == "Be a pirate."
    assert first.session.audio.input.turn_detection.type == "server_vad"  # the bad one: unchanged
    assert done.response.id == response.id
    assert done.response.audio.output.voice == "Aiden"  # the session's voice by then
    assert mid.session.audio.output.voice == "Aiden"
    assert notice.error.code == "applies_from_next_response" and notice.error.event_id == "ev_mid"
    calls = [(name, arg) for _, name, arg in conversation.calls if name in ("configure", "end_turn")]
    assert [arg for name, arg in calls if name == "configure"][-3:] == [
        default, ("Chelsie", "Be a pirate."), ("Aiden", "Be a pirate.")]
    assert [name for name, _ in calls][-3:] == ["configure", "end_turn", "configure"]


def test_a_second_realtime_client_is_told_the_server_is_busy():
    with scripted_server() as (_, address):
        first = Client(address, mic=False)
        try:
            first.wait_for("session.created")
            second = Client(address, mic=False)
            error = second.wait_for("error")
            second.close()
        finally:
            first.close()
    assert error.error.code == "busy"


def test_the_token_is_taken_as_the_sdk_sends_it():
    with scripted_server(token="s3cret") as (_, address):
        client = Client(address, mic=False, token="s3cret")
        try:
            client.wait_for("session.created")
        finally:
            client.close()
        with pytest.raises(InvalidStatus):
            Client(address, mic=False, token="wrong").conn.recv()
