"""Start-up of `duplex-chat serve`: check the settings, build the conversation once, run uvicorn."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Callable, ContextManager

from duplex_chat.config import DuplexError, Settings
from duplex_chat.model.protocol import Conversation

from .app import ServerState, create_app
from .security import is_local_host

# uvicorn closes the socket on frames this far over max_frame_bytes; smaller ones over it get an
# error event and the connection stays open.
WS_MAX_SIZE_FACTOR = 4


def check_serve_settings(settings: Settings) -> None:
    """Refuse settings that would expose the model unprotected, or a half TLS pair."""
    serve = settings.serve
    if not is_local_host(serve.host) and not serve.token:
        raise DuplexError(
            f"Listening on {serve.host} lets other machines reach the model, so it needs a token.",
            hint="Pass --token SECRET (or set SCA_SERVE_TOKEN), or keep --host 127.0.0.1 and "
                 "use an SSH tunnel (README, \"Serve\").")
    if bool(serve.cert) != bool(serve.key):
        raise DuplexError("TLS needs both --cert and --key (or neither).")
    for name in ("cert", "key"):
        path = getattr(serve, name)
        if path and not Path(path).is_file():
            raise DuplexError(f"The TLS {name} file {path} does not exist.")


def uvicorn_config(settings: Settings, app, **extra):
    """uvicorn's Config for `app` under `settings` (TLS when a cert is set)."""
    import uvicorn

    serve = settings.serve
    tls = {"ssl_certfile": serve.cert, "ssl_keyfile": serve.key} if serve.cert else {}
    return uvicorn.Config(app, host=serve.host, port=serve.port, ws="websockets-sansio",
                          ws_max_size=WS_MAX_SIZE_FACTOR * serve.max_frame_bytes,
                          log_level="warning", lifespan="off", **tls, **extra)


def run_serve(settings: Settings,
              conversation_factory: Callable[[Settings], ContextManager[Conversation]] | None = None
              ) -> int:
    """Entry point of `duplex-chat serve`: loads the model, then serves until Ctrl-C."""
    check_serve_settings(settings)
    import uvicorn

    if conversation_factory is None:
        from duplex_chat.model.engine import open_conversation as conversation_factory
    serve = settings.serve
    scheme = "https" if serve.cert else "http"
    with ExitStack() as stack:
        print(f"Loading {settings.qwen.model_id} …", flush=True)
        conversation = stack.enter_context(conversation_factory(settings))
        app = create_app(ServerState(settings, conversation))
        query = "/?token=…" if serve.token else "/"
        print(f"Serving on {scheme}://{serve.host}:{serve.port}{query} (Ctrl-C stops)", flush=True)
        uvicorn.Server(uvicorn_config(settings, app)).run()
    return 0
