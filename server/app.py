"""The ASGI app: `GET /` (the page), `/ws/pcm16` (the socket), the token and Origin checks, and
the one-client-at-a-time rule.

Starlette gives routing and a WebSocket object; uvicorn (run.py) serves it. Every HTTP and
WebSocket request passes `Guard` first: a wrong or missing token gets 401 (HTTP) or a refused
handshake (WebSocket, HTTP 403), and so does a socket opened by a page of another origin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from duplex_chat.config import Settings
from duplex_chat.model.protocol import Conversation, pick_voice
from duplex_chat.session import Session

from .pcm16 import Pcm16Connection
from .realtime import RealtimeConnection
from .security import origin_ok, token_ok

BUSY_CLOSE_CODE = 1013  # "try again later"
POLICY_CLOSE_CODE = 1008


@dataclass
class ServerState:
    """What every connection shares: the settings, the one conversation, and who holds it.
    `session_factory` builds each client's Session (tests may wrap it)."""

    settings: Settings
    conversation: Conversation
    session_factory: Callable[..., Session] = Session
    busy: bool = False
    clients_served: int = 0
    page: str = field(default="", repr=False)


class Guard:
    """ASGI middleware: the token on every request, the Origin on every socket."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        serve = state.settings.serve
        self.allowed = tuple(o.strip().rstrip("/") for o in serve.allowed_origins.split(",")
                             if o.strip())

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if not token_ok(scope, self.state.settings.serve.token):
            return await self._refuse(kind, scope, receive, send, 401,
                                      "This server needs its token: open the page as "
                                      "/?token=YOUR_TOKEN, or send 'Authorization: Bearer "
                                      "YOUR_TOKEN'.")
        if kind == "websocket" and not origin_ok(scope, self.allowed):
            return await self._refuse(kind, scope, receive, send, 403,
                                      "This socket only takes pages served by this server "
                                      "(the Origin did not match).")
        return await self.app(scope, receive, send)

    async def _refuse(self, kind, scope, receive, send, status: int, text: str) -> None:
        if kind == "http":
            return await PlainTextResponse(text + "\n", status)(scope, receive, send)
        await receive()  # the websocket.connect message
        await send({"type": "websocket.close", "code": POLICY_CLOSE_CODE, "reason": text[:120]})


def page_text() -> str:
    """The page, read once from the package."""
    return (resources.files("duplex_chat.server") / "page.html").read_text(encoding="utf-8")


CONFIG_SLOT = '<script id="server-config" type="application/json">null</script>'


def page_with_config(page: str, settings: Settings, conversation: Conversation) -> str:
    """The page with the voices and the server's voice and instructions written in, for its
    voice selector and instructions box (JSON that cannot close the script element)."""
    voices = list(conversation.voices())
    config = {"voices": voices, "voice": pick_voice(settings.qwen.voice, voices),
              "instructions": settings.qwen.system_prompt}
    text = json.dumps(config).replace("<", "\\u003c").replace(">", "\\u003e")
    return page.replace(CONFIG_SLOT, CONFIG_SLOT.replace("null", text))


def create_app(state: ServerState) -> Guard:
    """The whole app for `state`, wrapped in its guard."""
    state.page = state.page or page_with_config(page_text(), state.settings, state.conversation)

    async def index(request) -> Response:
        # no-referrer: the page's URL may hold the token, and must not leak to other sites.
        return Response(state.page, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    busy_message = ("Another client is talking with the model. This server runs one "
                    "conversation at a time (one GPU); try again when it hangs up.")

    async def serve_one(websocket: WebSocket, connection, busy_event: dict) -> None:
        await websocket.accept()
        if state.busy:  # checked and set with no await between: one client wins
            await websocket.send_json(busy_event)
            await websocket.close(BUSY_CLOSE_CODE, "busy")
            return
        state.busy = True
        try:
            await connection(websocket, state.settings, state.conversation,
                             state.session_factory).run()
        finally:
            state.busy = False
            state.clients_served += 1

    async def pcm16(websocket: WebSocket) -> None:
        await serve_one(websocket, Pcm16Connection,
                        {"type": "error", "code": "busy", "message": busy_message})

    async def realtime(websocket: WebSocket) -> None:
        await serve_one(websocket, RealtimeConnection,
                        {"type": "error", "event_id": "event_busy",
                         "error": {"type": "server_error", "code": "busy", "param": None,
                                   "event_id": None, "message": busy_message}})

    app = Starlette(routes=[Route("/", index), WebSocketRoute("/ws/pcm16", pcm16),
                            WebSocketRoute("/v1/realtime", realtime)])
    return Guard(app, state)
