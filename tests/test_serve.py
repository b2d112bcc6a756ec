"""`duplex-chat serve`: the /ws/pcm16 protocol around the session, one client at a time, and
its guards (token, Origin, frame size, rate, idle time, bad input)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from duplex_chat.cli.app import main
from duplex_chat.config import DuplexError
from duplex_chat.model.engine import StreamingConversation
from duplex_chat.server import ServerState, check_serve_settings

from .audio_helpers import espeak_speech
from .conftest import tiny_settings
from .fake_engine import Reply, ScriptedConversation, chirp
from .serve_helpers import VirtualBrowser, running_server, serve_settings

SILENCE_S = 1.0


def speech(text: str = "Hello, how are you today?") -> np.ndarray:
    """espeak speech followed by a second of silence (enough to end the turn)."""
    return np.concatenate([espeak_speech(text), np.zeros(int(SILENCE_S * 16_000), np.float32)])


def scripted(seconds: float = 1.0, realtime_factor: float = 0.2) -> ScriptedConversation:
    return ScriptedConversation([Reply(chirp(seconds))], realtime_factor=realtime_factor)


@pytest.fixture
def server():
    """A server around a scripted conversation: yields (state, "127.0.0.1:PORT")."""
    state = ServerState(serve_settings(), scripted())
    with running_server(state) as address:
        yield state, address


def ws_url(address: str, query: str = "") -> str:
    return f"ws://{address}/ws/pcm16{query}"


# ---- round trips -------------------------------------------------------------------------------
@pytest.mark.slow
def test_round_trip_with_the_tiny_model(tiny_models):
    checkpoint, bundle = tiny_models("small")
    settings = tiny_settings(checkpoint, max_reply_seconds=1.0)
    state = ServerState(serve_settings(settings), StreamingConversation(bundle, settings))
    with running_server(state) as address:
        client = VirtualBrowser(ws_url(address))
        try:
            assert client.wait_for("ready")["output_rate"] == 24_000
            client.send({"type": "session", "voice": "Chelsie", "instructions": "Be brief."})
            client.wait_for("session.updated")
            client.say(speech())
            turn = client.wait_for("turn", timeout=30)
            assert 0.5 < turn["end_s"] - turn["start_s"] < 3.0
            start = client.wait_for("reply.start", timeout=30)
            end = client.wait_for("reply.end", timeout=60)
            done = client.wait_for("reply.done", timeout=30)
            latency = client.wait_for("latency")
        finally:
            client.close()
    audio = np.frombuffer(bytes(client.audio[start["reply"]]), "<i2")
    assert len(audio) == end["samples"] == done["heard_samples"]
    assert 0.5 * 24_000 <= len(audio) <= 1.1 * 24_000  # max_reply_seconds = 1
    assert np.abs(audio).max() > 1000  # the tiny vocoder speaks at speech level
    assert "".join(e["delta"] for e in client.events if e["type"] == "transcript")
    assert 0 < latency["latency_ms"] < 30_000
    states = [e["state"] for e in client.events if e["type"] == "state"]
    assert states[:4] == ["listening", "user_speaking", "thinking", "assistant_speaking"]
    assert states[-1] == "listening"
    # the engine took the client's voice and instructions (tests/test_engine_fidelity.py: the
    # reply is then generate()'s with them)
    assert (state.conversation.voice, state.conversation.system_prompt) == ("Chelsie", "Be brief.")


@pytest.mark.slow
def test_barge_in_over_the_socket_cuts_history_to_the_late_report():
    conversation = ScriptedConversation([Reply(chirp(5.0), ("one", "two", "three", "four", "five"))],
                                        realtime_factor=0.1)
    state = ServerState(serve_settings(), conversation)
    with running_server(state) as address:
        client = VirtualBrowser(ws_url(address), playback="realtime")
        try:
            client.wait_for("ready")
            client.say(speech())
            start = client.wait_for("reply.start", timeout=20)
            while client.played(start["reply"]) < 24_000:  # a second of the reply has sounded
                time.sleep(0.05)
            client.say(speech("Wait, stop please."))
            interrupted = client.wait_for("interrupted", timeout=10)
            cut = client.wait_for("history_cut", timeout=10)
            nxt = client.wait_for("turn", count=2, timeout=20)
            client.wait_for("reply.start", count=2, timeout=20)
        finally:
            client.close()
    heard = client.flushed[interrupted["reply"]]
    assert interrupted["reply"] == start["reply"]
    assert 24_000 <= heard < 5 * 24_000
    # The session waited for the client's late report: history keeps exactly what it played.
    assert cut["heard_samples"] == heard and cut["estimated"] is False
    assert conversation.called("truncate")[0][1] == heard
    assert nxt["turn"] == 1


# ---- one client at a time ----------------------------------------------------------------------
def test_a_second_client_is_told_the_server_is_busy_and_the_next_one_starts_clean(server):
    state, address = server
    first = VirtualBrowser(ws_url(address))
    try:
        first.wait_for("ready")
        second = VirtualBrowser(ws_url(address))
        error = second.wait_for("error")
        assert error["code"] == "busy" and "one conversation at a time" in error["message"]
        assert second.wait_closed().rcvd.code == 1013
        second.close()
    finally:
        first.close()
    deadline = time.monotonic() + 10
    while state.busy or state.clients_served < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    third = VirtualBrowser(ws_url(address))
    try:
        third.wait_for("ready")
    finally:
        third.close()
    assert len(state.conversation.called("reset")) == 2  # once per client served


@pytest.mark.slow
def test_a_disconnect_mid_reply_stops_the_model_and_the_next_client_is_served():
    conversation = scripted(seconds=6.0, realtime_factor=1.0)  # generating takes 6 s
    state = ServerState(serve_settings(), conversation)
    with running_server(state) as address:
        client = VirtualBrowser(ws_url(address))
        client.wait_for("ready")
        client.say(speech())
        client.wait_for("reply.start", timeout=20)
        time.sleep(0.3)
        client.close()
        left = time.monotonic()
        deadline = left + 10
        while not conversation.called("stopped"):
            assert time.monotonic() < deadline, "the reply went on after the client left"
            time.sleep(0.02)
        assert conversation.called("stopped")[0][0] - left < 2.0
        nxt = VirtualBrowser(ws_url(address))
        try:
            nxt.wait_for("ready")
            nxt.wait_for("state", state="listening")
        finally:
            nxt.close()
    assert len(conversation.called("reset")) == 2


# ---- voice and instructions per client ---------------------------------------------------------
def configured(conversation) -> list:
    """(voice, system prompt) of every configure call, in order (reset's too)."""
    return [arg for _, arg in conversation.called("configure")]


@pytest.mark.slow
def test_voice_and_instructions_per_client_without_rebuilding():
    """A `session` event sets the voice and the instructions before the first reply (the page
    sends it on connect); a bad voice is one clear error and changes nothing; mid-reply the
    reply keeps its voice and the server says so; the next client starts with the server's."""
    conversation = scripted(seconds=3.0, realtime_factor=1.0)  # generating takes 3 s
    state = ServerState(serve_settings(), conversation)
    default = (state.settings.qwen.voice, state.settings.qwen.system_prompt)
    with running_server(state) as address:
        client = VirtualBrowser(ws_url(address))
        try:
            ready = client.wait_for("ready")
            client.send({"type": "session", "voice": "alloy"})
            error = client.wait_for("error")
            client.send({"type": "session", "voice": "chelsie", "instructions": "Be a pirate."})
            updated = client.wait_for("session.updated")
            client.say(speech())
            client.wait_for("reply.start", timeout=20)
            client.send({"type": "session", "voice": "Aiden"})
            mid = client.wait_for("session.updated", count=2)
            client.wait_for("reply.end", timeout=20)
        finally:
            client.close()
        calls = [name for _, name, _ in conversation.calls
                 if name in ("configure", "end_turn")]
        assert calls[-3:] == ["configure", "end_turn", "configure"]  # Aiden: after the reply
        deadline = time.monotonic() + 10
        while state.busy or state.clients_served < 1:  # the first client's goodbye
            assert time.monotonic() < deadline
            time.sleep(0.02)
        nxt = VirtualBrowser(ws_url(address))
        try:
            again = nxt.wait_for("ready")
        finally:
            nxt.close()
    assert ready["voice"] == "Ethan" and ready["voices"] == ["Aiden", "Chelsie", "Ethan"]
    assert ready["instructions"] == default[1]
    assert error["code"] == "unknown_voice"
    assert error["message"] == ("Unknown voice 'alloy'; this model speaks Aiden, Chelsie, Ethan. "
                                "The session was not changed.")
    assert updated == {"type": "session.updated", "voice": "Chelsie",
                       "instructions": "Be a pirate.", "mid_reply": False}
    assert mid["voice"] == "Aiden" and mid["mid_reply"] is True
    assert configured(conversation) == [default, ("Chelsie", "Be a pirate."),
                                        ("Aiden", "Be a pirate."), default]
    assert again["voice"] == "Ethan" and again["instructions"] == default[1]


def test_the_page_offers_the_model_s_voices_and_the_server_s_instructions():
    """The page's voice selector and instructions box are filled from the server: its voices,
    its [qwen] voice and system prompt (written so no prompt can end the script element)."""
    import json
    import re

    settings = serve_settings().replace("qwen", voice="chelsie",
                                        system_prompt="Say </script><b>hi</b> & bye.")
    state = ServerState(settings, scripted())
    with running_server(state) as address:
        page = urllib.request.urlopen(f"http://{address}/").read().decode()
    assert "</script><b>" not in page
    found = re.search(r'<script id="server-config" type="application/json">(.*?)</script>', page)
    assert json.loads(found.group(1)) == {"voices": ["Aiden", "Chelsie", "Ethan"],
                                          "voice": "Chelsie",
                                          "instructions": "Say </script><b>hi</b> & bye."}
    assert '<select id="voice">' in page and '<textarea id="instructions"' in page


# ---- guards ------------------------------------------------------------------------------------
def test_a_host_other_than_this_machine_needs_a_token():
    with pytest.raises(DuplexError, match="needs a token"):
        check_serve_settings(serve_settings(host="0.0.0.0"))
    check_serve_settings(serve_settings(host="0.0.0.0", token="s3cret"))
    check_serve_settings(serve_settings(host="::1"))
    with pytest.raises(DuplexError, match="both --cert and --key"):
        check_serve_settings(serve_settings(cert="/etc/hostname"))


def test_the_serve_command_refuses_a_public_host_without_a_token(capsys, monkeypatch):
    monkeypatch.delenv("SCA_SERVE_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--host", "0.0.0.0", "--port", "8123"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "needs a token" in err and "Traceback" not in err


def test_the_token_is_checked_on_every_http_and_websocket_request():
    state = ServerState(serve_settings(host="0.0.0.0", token="s3cret"), scripted())
    with running_server(state) as address:
        for query in ("", "?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://{address}/{query}")
            assert refused.value.code == 401
            assert b"needs its token" in refused.value.read()
            with pytest.raises(InvalidStatus), connect(ws_url(address, query)):
                pass
        page = urllib.request.urlopen(f"http://{address}/?token=s3cret")
        assert page.status == 200 and b"AudioWorkletProcessor" in page.read()
        bearer = urllib.request.Request(f"http://{address}/",
                                        headers={"Authorization": "Bearer s3cret"})
        assert urllib.request.urlopen(bearer).status == 200
        client = VirtualBrowser(ws_url(address, "?token=s3cret"))
        try:
            client.wait_for("ready")
        finally:
            client.close()


def test_a_page_of_another_origin_cannot_open_the_socket(server):
    _, address = server
    with pytest.raises(InvalidStatus), connect(ws_url(address), origin="http://evil.example"):
        pass
    client = VirtualBrowser(ws_url(address), origin=f"http://{address}")
    try:
        client.wait_for("ready")
    finally:
        client.close()


def test_bad_frames_get_error_events_and_the_connection_stays_open(server):
    _, address = server
    client = VirtualBrowser(ws_url(address))
    try:
        client.wait_for("ready")
        bad = [(b"\x01\x02\x03", "bad_audio"), ("{not json", "bad_json"),
               ('["a list"]', "bad_event"), ({"type": "response.create"}, "unknown_event"),
               ({"type": "playback", "reply": "x", "played": 1}, "bad_event"),
               ({"type": "playback", "reply": 1, "played": -5}, "bad_event"),
               (b"\x00" * 70_000, "frame_too_large")]
        for i, (frame, code) in enumerate(bad, start=1):
            client.send(frame)
            error = client.wait_for("error", count=i)
            assert error["code"] == code and error["message"].endswith(".")
        # still served: speech in, a reply out
        client.say(speech())
        client.wait_for("reply.done", timeout=20)
        assert client.closed is None
    finally:
        client.close()


def test_audio_faster_than_the_rate_limit_is_dropped_with_an_error(server):
    _, address = server
    client = VirtualBrowser(ws_url(address))
    try:
        client.wait_for("ready")
        for _ in range(4):  # 8 s of audio at once; the burst allows 3 s
            client.send(b"\x00" * 64_000)
        assert client.wait_for("error")["code"] == "rate_limited"
    finally:
        client.close()


def test_an_idle_connection_is_closed():
    state = ServerState(serve_settings(idle_timeout_s=0.5), scripted())
    with running_server(state) as address:
        messages = []
        with connect(ws_url(address)) as ws:
            with pytest.raises(ConnectionClosed):
                while True:
                    messages.append(ws.recv(timeout=5))
            assert ws.protocol.close_rcvd.code == 1000
        assert any('"idle"' in m for m in messages if isinstance(m, str))
