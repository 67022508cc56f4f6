"""The client every API test drives: the app in process (ASGI transport) and the real uvicorn server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.api.support import api_settings, app_client


@pytest.fixture(params=["asgi", "uvicorn"])
def server_url(request: pytest.FixtureRequest) -> str | None:
    """None for a fresh in-process app per test; else the URL of the session's uvicorn server."""
    if request.param == "uvicorn":
        return request.getfixturevalue("live_server").url
    return None


@pytest.fixture
async def client(server_url: str | None, tiny_checkpoint: Path) -> AsyncIterator[httpx.AsyncClient]:
    if server_url is None:
        async with app_client(api_settings(tiny_checkpoint)) as in_process:
            yield in_process
    else:
        async with httpx.AsyncClient(base_url=server_url, timeout=30) as over_tcp:
            yield over_tcp


@pytest.fixture
async def asgi_client(tiny_checkpoint: Path) -> AsyncIterator[httpx.AsyncClient]:
    """In process only: for tests that read the app's own counters."""
    async with app_client(api_settings(tiny_checkpoint)) as in_process:
        yield in_process
