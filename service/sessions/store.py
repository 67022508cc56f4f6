"""The session store interface and the record it keeps.

A store keeps one ``SessionRecord`` per session ID. Writes are compare-and-set on the
record's ``version`` (it grows by one with every committed change), so two writers that
raced on one version never both land: that is what makes a step apply exactly once, across
threads, processes and replicas.
"""

from __future__ import annotations

import abc
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from models import PackedState
from service.sessions.labels import Label


class StoreFull(Exception):
    """The store holds as many live sessions as it may; retry later."""


class OwnerLimit(Exception):
    """The owner (API key) holds as many live sessions as it may."""


class SessionExists(Exception):
    """``create`` with the ID of a live session (only caller-chosen IDs can collide: /v2 sequences)."""


class StoreUnavailable(Exception):
    """The store cannot be reached or did not answer in time. A read or a refused write changed
    nothing; a commit that timed out may or may not have landed, which is why clients that retry
    send the step index they expect (a retry of a landed step then returns its stored result)."""


def new_session_id() -> str:
    """128 random bits, URL-safe base64 (22 characters)."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class SessionRecord:
    """Everything a replica needs to run a session's next step.

    ``pending_slot`` is the slot of the previous step's label (-1 when it had none): the
    model sees it as the label input of the next step (Santoro et al.'s label offset).
    ``last_request``/``last_response`` answer a retry of the last request without reapplying it.
    """

    session_id: str
    model: str
    fingerprint: str
    state: PackedState
    ttl_seconds: float
    expires_at: float
    owner: str = ""
    steps: int = 0
    version: int = 0
    labels: list[Label] = field(default_factory=list)
    pending_slot: int = -1
    labeled_steps: int = 0
    correct_steps: int = 0
    last_request: str = ""
    last_request_start: int = -1
    last_response: Any = None

    def touched(self, now: float | None = None) -> SessionRecord:
        return replace(self, expires_at=(now or time.time()) + self.ttl_seconds)

    def is_expired(self, now: float | None = None) -> bool:
        return (now or time.time()) >= self.expires_at


class SessionStore(abc.ABC):
    """Where session records live. Implementations: memory:// (in process) and redis://."""

    @abc.abstractmethod
    async def create(
        self, record: SessionRecord, max_sessions: int | None = None, max_per_owner: int | None = None
    ) -> None:
        """Insert a new record; StoreFull when ``max_sessions`` live sessions exist, OwnerLimit when
        its owner holds ``max_per_owner``."""

    @abc.abstractmethod
    async def get(self, session_id: str) -> SessionRecord | None:
        """The live record, or None when unknown or expired."""

    @abc.abstractmethod
    async def commit(self, record: SessionRecord, expected_version: int) -> bool:
        """Replace the record if its stored version is still ``expected_version``; False if not."""

    @abc.abstractmethod
    async def delete(self, session_id: str, owner: str = "") -> bool:
        """Remove a record (of ``owner``); False when there was none."""

    @abc.abstractmethod
    async def count(self) -> int:
        """Live sessions."""

    @abc.abstractmethod
    async def sweep(self) -> int:
        """Drop expired sessions; returns how many."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the store answers."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
