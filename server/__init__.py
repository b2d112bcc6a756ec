"""`duplex-chat serve`: the browser page and the `/ws/pcm16` socket around the session.

The server is another loop around `duplex_chat.session`, like `talk` and `replay`: it moves a
client's microphone audio into a `Session` and the session's reply audio and events back out.
One conversation is built at start-up and reset for each client; one client at a time talks
with it (the GPU runs one conversation).

Modules: `app.py` (the Starlette app: routes, one-client rule), `security.py` (token, Origin,
local addresses), `pcm16.py` (one `/ws/pcm16` connection: the socket player, the event
protocol, limits), `limits.py` (rate limits), `run.py` (start-up: settings, model, uvicorn),
`page.html` (the page).
"""

from .app import ServerState, create_app
from .run import check_serve_settings, run_serve

__all__ = ["ServerState", "check_serve_settings", "create_app", "run_serve"]
