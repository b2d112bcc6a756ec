"""Who may use the server: the token, the page's Origin, and which addresses count as local.

The token is taken from the `Authorization: Bearer …` header (API clients) or the `token` query
parameter (the page: browsers cannot set headers on a WebSocket, so the page passes the token
it was opened with, `/?token=…`, on to its socket). It is compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import parse_qs, urlsplit

LOCAL_NAMES = ("localhost",)


def is_local_host(host: str) -> bool:
    """True for an address only this machine can reach (loopback)."""
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def headers_of(scope: dict) -> dict[str, str]:
    """The request's headers, lower-case names, latin-1 decoded (as ASGI gives them)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def token_of(scope: dict) -> str | None:
    """The token the request carries (Bearer header first, then `?token=`), or None."""
    auth = headers_of(scope).get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return values[0] if values else None


def token_ok(scope: dict, token: str) -> bool:
    """The request may pass: no token is configured, or it carries the right one."""
    if not token:
        return True
    given = token_of(scope)
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def origin_ok(scope: dict, allowed: tuple[str, ...]) -> bool:
    """A browser's socket must come from this server's own page (or an allowed origin).

    Clients that are not browsers send no Origin header; the token guards them. A page on
    another site cannot open a socket here with the user's browser (cross-site WebSocket).
    """
    headers = headers_of(scope)
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin.rstrip("/") in allowed:
        return True
    return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()
