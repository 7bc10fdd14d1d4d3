"""The access token: a request without it is refused, so opening a port does not expose patient data.

The page's address carries the token (``/?token=…``); the first request that carries it gets it back as a
cookie (HTTP only, same site), which the page's own files and its websocket then send. Anything else is
answered 403.
"""

from __future__ import annotations

import secrets

COOKIE = "xaioverlay_token"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def carries_token(token: str, query: dict, cookies: dict) -> bool:
    """True when the request's ``?token=`` or its cookie equals ``token`` (compared in constant time)."""
    given = query.get("token") or cookies.get(COOKIE) or ""
    return secrets.compare_digest(given.encode(), token.encode())


def token_middleware(token: str):
    """An aiohttp middleware refusing (403) every request that does not carry ``token``."""
    from aiohttp import web

    @web.middleware
    async def require_token(request, handler):
        if not carries_token(token, request.query, request.cookies):
            raise web.HTTPForbidden(text="xaioverlay serve: open the address printed at start, with its ?token=\n")
        response = await handler(request)
        if request.query.get("token") and not request.headers.get("Upgrade"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        return response

    return require_token


def protect(wslink_server, token: str) -> None:
    """Add the token check to trame's aiohttp application (``on_server_bind``, before it starts)."""
    wslink_server.app.middlewares.append(token_middleware(token))
