"""memory://: sessions in this process's memory, with an idle TTL and a capacity limit.

All methods run on the event loop without awaiting in between their reads and writes, so
each is atomic with respect to the others.
"""

from __future__ import annotations

import time

from service.sessions.store import SessionRecord, SessionStore, StoreFull


class MemoryStore(SessionStore):
    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}

    async def create(self, record: SessionRecord, max_sessions: int | None = None) -> None:
        if max_sessions is not None and len(self._records) >= max_sessions:
            await self.sweep()
            if len(self._records) >= max_sessions:
                raise StoreFull
        self._records[record.session_id] = record

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        if record is not None and record.is_expired():
            del self._records[session_id]
            return None
        return record

    async def commit(self, record: SessionRecord, expected_version: int) -> bool:
        current = self._records.get(record.session_id)
        if current is None or current.version != expected_version:
            return False
        self._records[record.session_id] = record
        return True

    async def delete(self, session_id: str) -> bool:
        return self._records.pop(session_id, None) is not None

    async def count(self) -> int:
        return len(self._records)

    async def sweep(self) -> int:
        now = time.time()
        expired = [sid for sid, record in self._records.items() if record.is_expired(now)]
        for sid in expired:
            del self._records[sid]
        return len(expired)

    async def ping(self) -> bool:
        return True
