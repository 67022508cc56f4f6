"""API keys: ``Authorization: Bearer <key>`` on /v1 and /v2 (and /metrics when asked), and as gRPC metadata.

Keys come from NTM_API_KEYS (comma-separated) and/or NTM_API_KEYS_FILE (one per line). A
request's key is compared with every configured key in constant time (``hmac.compare_digest``),
and only a short SHA-256 digest of it, the key's ID, is kept: it owns the sessions the key
creates (any other key gets 404 for them). Keys are never logged. /healthz and /readyz stay
open for probes, as gRPC's health service does (``service.api.grpc.server`` checks the same keys with
``owner_of``).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_response_for
from service.settings import Settings


def key_id(key: str) -> str:
    """The owner ID of a key: a digest that identifies it without revealing it."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def configured_keys(settings: Settings) -> list[str]:
    keys = [k.strip() for k in settings.api_keys if k.strip()]
    if settings.api_keys_file is not None:
        keys += [
            line.strip()
            for line in Path(settings.api_keys_file).read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
    return keys


def key_bytes(keys: list[str]) -> list[bytes]:
    return [k.encode() for k in keys]


def owner_of(authorization: bytes, keys: list[bytes]) -> str | None:
    """The owner ID of an ``Authorization`` value (HTTP header or gRPC metadata): ``Bearer <key>`` with one
    of ``keys``; None for anything else."""
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    presented, found = token.strip(), None
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        if hmac.compare_digest(presented, key):
            found = key
    return key_id(found.decode()) if found is not None else None


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str], protect_metrics: bool) -> None:
        self.app = app
        self.keys = key_bytes(keys)
        prefixes = ["/v1", "/v2"] + (["/metrics"] if protect_metrics else [])
        self.prefixes = tuple(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        owner = owner_of(dict(scope.get("headers") or []).get(b"authorization", b""), self.keys)
        if owner is None:
            message = "a valid API key is required: send 'Authorization: Bearer <key>'"
            response = error_response_for(scope["path"], 401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)
