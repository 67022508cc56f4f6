"""memory://: sessions in this process's memory, with an idle TTL and a capacity limit.

All methods run on the event loop without awaiting in between their reads and writes, so
each is atomic with respect to the others.
"""

from __future__ import annotations

import time
from collections import Counter

from service.sessions.store import OwnerLimit, SessionExists, SessionRecord, SessionStore, StoreFull


class MemoryStore(SessionStore):
    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._per_owner: Counter[str] = Counter()

    async def create(
        self, record: SessionRecord, max_sessions: int | None = None, max_per_owner: int | None = None
    ) -> None:
        full = max_sessions is not None and len(self._records) >= max_sessions
        owner_full = max_per_owner is not None and self._per_owner[record.owner] >= max_per_owner
        if full or owner_full:
            await self.sweep()
            if max_sessions is not None and len(self._records) >= max_sessions:
                raise StoreFull
            if max_per_owner is not None and self._per_owner[record.owner] >= max_per_owner:
                raise OwnerLimit
        current = self._records.get(record.session_id)
        if current is not None and not current.is_expired():
            raise SessionExists(record.session_id)
        if current is not None:
            self._remove(record.session_id)
        self._records[record.session_id] = record
        self._per_owner[record.owner] += 1

    def _remove(self, session_id: str) -> bool:
        record = self._records.pop(session_id, None)
        if record is None:
            return False
        self._per_owner[record.owner] -= 1
        if self._per_owner[record.owner] <= 0:
            del self._per_owner[record.owner]
        return True

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        if record is not None and record.is_expired():
            self._remove(session_id)
            return None
        return record

    async def commit(self, record: SessionRecord, expected_version: int) -> bool:
        current = self._records.get(record.session_id)
        if current is None or current.version != expected_version:
            return False
        self._records[record.session_id] = record
        return True

    async def delete(self, session_id: str, owner: str = "") -> bool:
        return self._remove(session_id)

    async def count(self) -> int:
        """Live sessions: not those expired and not yet swept (the sweeper drops them every NTM_SWEEP_INTERVAL_SECONDS)."""
        now = time.time()
        return sum(not record.is_expired(now) for record in self._records.values())

    async def sweep(self) -> int:
        now = time.time()
        expired = [sid for sid, record in self._records.items() if record.is_expired(now)]
        for sid in expired:
            self._remove(sid)
        return len(expired)

    async def ping(self) -> bool:
        return True
