"""A direct ASGI path for the hot routes, ``POST /v1/sessions/{session_id}/steps`` and ``.../predict``.

Every step of every session goes through the step route, and every classification of an
enrolled session through the predict route; with one core for the whole server the service is
bound by the Python it runs per request. So these routes are answered by a short stack of
their own, in front of FastAPI's: ``ServiceAPI`` builds the app's middleware stack as usual,
and puts ``StepDispatch`` outermost, which sends their requests to the app's own middlewares
(request IDs, metrics, body limit, API keys: the same classes and settings) wrapped around
``StepRoute`` instead, skipping the framework layers the routes do not need (Starlette's error
middleware, FastAPI's telemetry and body-limit layers, route matching over every route,
dependency solving). ``StepRoute`` calls ``v1.run_steps`` or ``v1.run_predict``, the very
functions behind the documented FastAPI routes, and answers every error through the app's own
exception handlers (the API's one error shape, a 500 included). The FastAPI routes stay for the
OpenAPI document and for any request the dispatch declines (a session ID that is not 1-64
characters, or a request before the lifespan has started the engine).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from pydantic_core import to_json
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.v1 import SESSION_ID_MAX_LENGTH, router, run_predict, run_steps
from service.ratelimit import client_address
from service.tracing import traced_asgi

PREFIX = "/v1/sessions/"
STEPS_ROUTE_PATH = PREFIX + "{session_id}/steps"
PREDICT_ROUTE_PATH = PREFIX + "{session_id}/predict"
RUNNERS = {STEPS_ROUTE_PATH: run_steps, PREDICT_ROUTE_PATH: run_predict}  # route template -> its work
SUFFIXES = {template.rpartition("}")[2]: template for template in RUNNERS}  # "/steps" -> its template


def fast_route_of(path: str) -> tuple[str, str] | None:
    """(route template, session ID) of a step or predict route path, or None for any other path."""
    if not path.startswith(PREFIX):
        return None
    rest = path[len(PREFIX) :]
    session_id, slash, action = rest.rpartition("/")
    template = SUFFIXES.get(slash + action)
    if template is None or not 1 <= len(session_id) <= SESSION_ID_MAX_LENGTH or "/" in session_id:
        return None
    return template, session_id


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
    """Answers a step or predict request: body -> ``run_steps``/``run_predict`` -> JSON, errors through the app's
    handlers. Which one: the route ``StepDispatch`` put in the scope."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api
        self.routes = {r.path: r for r in router.routes if getattr(r, "path", None) in RUNNERS}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        template = scope.get("route_template", STEPS_ROUTE_PATH)
        scope["route"] = self.routes[template]  # the metrics label the route's template, as for FastAPI's routes
        raw = await read_body(receive)
        if raw is None:
            return
        session_id = scope["path_params"]["session_id"]  # set by StepDispatch, as routing sets it
        owner = scope.get("state", {}).get("owner", "")
        try:
            result = await RUNNERS[template](self.api.state.engine, owner, session_id, raw, client_address(scope))
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
    """The outermost layer: step and predict requests to ``fast``, everything else to the app's usual stack."""

    def __init__(self, app: ASGIApp, fast: ASGIApp, api: FastAPI) -> None:
        self.app, self.fast, self.api = app, fast, api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = getattr(self.api.state, "engine", None)
        if scope["type"] == "http" and scope["method"] == "POST" and engine is not None:
            fast_route = fast_route_of(route_path(scope))
            if fast_route is not None:
                scope["route_template"], session_id = fast_route
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
