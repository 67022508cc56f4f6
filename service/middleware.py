"""One pure-ASGI middleware for every request: request ID, body-size limit, metrics, access log.

Metrics: each request's latency by route and status, and each error answer by its code
(``service.errors.ErrorResponse`` notes the code in the scope as it is sent).

Pure ASGI (not BaseHTTPMiddleware) because it sits on the hot path of every step.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ERROR_CODE_SCOPE_KEY, error_response_for
from service.logs import log, request_id
from service.metrics import Metrics


def _new_process_tag() -> None:
    """A random 64-bit tag per process (made again in a forked worker), so IDs differ across processes."""
    global _process_tag, _sequence
    _process_tag, _sequence = secrets.token_hex(8), itertools.count(1)


_new_process_tag()
os.register_at_fork(after_in_child=_new_process_tag)


def new_request_id() -> str:
    """A request ID unique across processes: the process tag and a counter (no syscall per request)."""
    return f"{_process_tag}-{next(_sequence):x}"


class BodyTooLarge(Exception):
    pass


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int, access_log: bool = True) -> None:
        self.app, self.metrics, self.max_body_bytes, self.access_log = app, metrics, max_body_bytes, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or new_request_id()
        token = request_id.set(rid)
        started = time.perf_counter()
        status = {"code": 500, "sent": False, "over_limit": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                if status["over_limit"]:
                    # The app answered a body it could not read in full (FastAPI turns the
                    # receive error into a 400): that answer is the 413 below instead.
                    raise BodyTooLarge
                status["code"], status["sent"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                raise BodyTooLarge
            await self.app(scope, self._limited(receive, status), send_with_id)
            if not status["sent"]:
                status["code"] = 499  # the client went away before an answer (nginx's code for it)
        except BodyTooLarge:
            status["over_limit"] = False
            if not status["sent"]:
                response = error_response_for(
                    scope["path"], 413, "payload_too_large", f"request body over {self.max_body_bytes} bytes"
                )
                await response(scope, receive, send_with_id)
        except Exception:
            # Starlette's error middleware, outside this one, answers it with the app's 500
            scope.setdefault(ERROR_CODE_SCOPE_KEY, "internal_error")
            raise
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.request_latency.labels(scope["method"], path, str(status["code"])).observe(elapsed)
            error_code = scope.get(ERROR_CODE_SCOPE_KEY)
            if error_code is not None:
                self.metrics.errors.labels(error_code).inc()
            if self.access_log:
                log.info(
                    "request",
                    extra={
                        "fields": {
                            "method": scope["method"],
                            "path": scope["path"],
                            "status": status["code"],
                            "duration_ms": round(1000 * elapsed, 3),
                        }
                    },
                )
            request_id.reset(token)

    def _limited(self, receive: Receive, status: dict) -> Receive:
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    status["over_limit"] = True
                    raise BodyTooLarge
            return message

        return limited_receive
