"""A direct ASGI path for the hot route, ``POST /v1/sessions/{session_id}/steps``.

Every step of every session goes through this one route, and with one core for the whole
server the service is bound by the Python it runs per request. So the route is answered by a
short stack of its own, in front of FastAPI's: ``ServiceAPI`` builds the app's middleware
stack as usual, and puts ``StepDispatch`` outermost, which sends step requests to the app's
own middlewares (request IDs, metrics, body limit, API keys: the same classes and settings)
wrapped around ``StepRoute`` instead, skipping the framework layers the route does not need
(Starlette's error middleware, FastAPI's telemetry and body-limit layers, route matching over
every route, dependency solving). ``StepRoute`` calls ``v1.run_steps``, the very function behind
the documented FastAPI route, and answers every error through the app's own exception
handlers (the API's one error shape, a 500 included). The FastAPI route stays for the OpenAPI
document and for any request the dispatch declines (a session ID that is not 1-64 characters,
or a request before the lifespan has started the engine).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from pydantic_core import to_json
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.v1 import SESSION_ID_MAX_LENGTH, router, run_steps
from service.ratelimit import client_address
from service.tracing import traced_asgi

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


class StepRoute:
    """Answers a step request: body -> ``run_steps`` -> JSON, errors through the app's handlers."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api
        self.route = next(r for r in router.routes if getattr(r, "path", None) == STEPS_ROUTE_PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # the metrics label the route's template, as for FastAPI's routes
        raw = await read_body(receive)
        if raw is None:
            return
        session_id = scope["path_params"]["session_id"]  # set by StepDispatch, as routing sets it
        owner = scope.get("state", {}).get("owner", "")
        try:
            result = await run_steps(self.api.state.engine, owner, session_id, raw, client_address(scope))
        except Exception as exc:  # nothing is sent yet: run_steps answers nothing itself
            handler = self._handler_for(exc)
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)
            if handler is self._unexpected:
                raise  # for the server to log, as Starlette's error middleware does after its 500
            return
        body = to_json(result, inf_nan_mode="null")  # pydantic-core's serialiser: a fifth of json.dumps' time
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @property
    def _unexpected(self) -> Callable:
        """The app's handler of any other exception: its 500 in the API's error shape."""
        return self.api.exception_handlers[Exception]

    def _handler_for(self, exc: Exception) -> Callable:
        """The app's exception handler for ``exc``, as Starlette's exception middleware finds it."""
        for cls in type(exc).__mro__:
            handler = self.api.exception_handlers.get(cls)
            if handler is not None:
                return handler
        return self._unexpected


class StepDispatch:
    """The outermost layer: step requests to ``fast``, everything else to the app's usual stack."""

    def __init__(self, app: ASGIApp, fast: ASGIApp, api: FastAPI) -> None:
        self.app, self.fast, self.api = app, fast, api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = getattr(self.api.state, "engine", None)
        if scope["type"] == "http" and scope["method"] == "POST" and engine is not None:
            session_id = session_of_steps_path(route_path(scope))
            if session_id is not None:
                scope["path_params"] = {"session_id": session_id}
                await self.fast(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ServiceAPI(FastAPI):
    """FastAPI, with the step route's own short stack in front (see the module docstring), and with tracing on,
    OpenTelemetry's request span in front of both (``service.tracing``)."""

    def build_middleware_stack(self) -> ASGIApp:
        fast: ASGIApp = StepRoute(self)
        for cls, args, kwargs in reversed(self.user_middleware):
            fast = cls(fast, *args, **kwargs)
        stack = StepDispatch(super().build_middleware_stack(), fast, self)
        provider = getattr(self.state, "tracer_provider", None)
        return stack if provider is None else traced_asgi(stack, provider)
