"""A direct ASGI path for the hot route, ``POST /v1/sessions/{session_id}/steps``.

Every step of every session goes through this one route, and with 784 pixels per image the
service is bound by the Python it runs per request. FastAPI's per-request machinery (route
matching over every route, dependency solving, an exit stack, response model plumbing) costs
about as much as the step's own work, so this middleware answers the route itself: it reads
the body and calls ``v1.run_steps``, the very function behind the documented FastAPI route,
and answers errors through the app's own exception handlers (the API's one error shape). The FastAPI route stays for the OpenAPI document
and for any request this path declines (a session ID that is not 1-64 characters).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.v1 import SESSION_ID_MAX_LENGTH, router, run_steps

PREFIX, SUFFIX = "/v1/sessions/", "/steps"
STEPS_ROUTE_PATH = PREFIX + "{session_id}" + SUFFIX


def session_of_steps_path(path: str) -> str | None:
    """The session ID of a step route path, or None for any other path."""
    if not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
        return None
    session_id = path[len(PREFIX) : -len(SUFFIX)]
    if not 1 <= len(session_id) <= SESSION_ID_MAX_LENGTH or "/" in session_id:
        return None
    return session_id


def route_path(scope: Scope) -> str:
    """The path below the app's root path (set by a proxy's --root-path), as routing sees it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class StepFastPath:
    """Answers the step route directly; everything else passes on to ``app``."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app, self.api = app, api
        self.route = next(r for r in router.routes if getattr(r, "path", None) == STEPS_ROUTE_PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session_id = (
            session_of_steps_path(route_path(scope)) if scope["type"] == "http" and scope["method"] == "POST" else None
        )
        engine = getattr(self.api.state, "engine", None)
        if session_id is None or engine is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # the metrics label the route's template, as for FastAPI's routes
        raw = await read_body(receive)
        if raw is None:
            return
        owner = scope.get("state", {}).get("owner", "")
        try:
            result = await run_steps(engine, owner, session_id, raw)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise  # to ServerErrorMiddleware, as from any route: a logged 500 in the API's error shape
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)
            return
        body = json.dumps(result, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _handler_for(self, exc: Exception) -> Callable | None:
        """The app's exception handler for ``exc`` (as ExceptionMiddleware finds it), but not the catch-all."""
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            handler = self.api.exception_handlers.get(cls)
            if handler is not None:
                return handler
        return None
