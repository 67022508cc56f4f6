"""The one settings object refuses combinations that would serve wrongly, and ``ntm-serve`` says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import FLAGS, settings_from_flags
from service.settings import Settings, describe_settings_error

NTM_SERVE = str(Path(sys.executable).with_name("ntm-serve"))


def test_several_workers_need_a_shared_store() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(workers=2)
    assert "needs a shared store" in describe_settings_error(caught.value)
    assert Settings(workers=2, store="redis://127.0.0.1:6379/0").workers == 2


def test_a_redis_cluster_store_needs_a_prefix_without_hash_tag_and_room_in_every_shard() -> None:
    cluster = "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"
    assert Settings(workers=2, store=cluster).store == cluster
    for values, said in (
        ({"redis_prefix": "{ntm}:"}, "holds a hash tag"),
        ({"max_sessions": 8}, "is under 16"),
    ):
        with pytest.raises(ValidationError) as caught:
            Settings(store=cluster, **values)
        assert said in describe_settings_error(caught.value)
    assert Settings(store="redis://127.0.0.1:6379/0", redis_prefix="{ntm}:", max_sessions=8).max_sessions == 8


def test_the_default_ttl_may_not_pass_the_longest() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(session_ttl_seconds=120, max_session_ttl_seconds=60)
    assert describe_settings_error(caught.value) == "session_ttl_seconds (120) is over max_session_ttl_seconds (60)"


def test_the_shortest_ttl_may_not_pass_the_default() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(session_ttl_seconds=30, min_session_ttl_seconds=60)
    assert describe_settings_error(caught.value) == "min_session_ttl_seconds (60) is over session_ttl_seconds (30)"
    assert Settings().min_session_ttl_seconds == 1.0


def test_errors_name_the_environment_variable() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(port=70000)
    assert describe_settings_error(caught.value).startswith("NTM_PORT: ")


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--workers", "2"], "needs a shared store"), (["--port", "70000"], "NTM_PORT")],
    ids=["workers-memory", "port"],
)
def test_ntm_serve_refuses_bad_settings_before_serving(args: list[str], words: str) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("NTM_")}
    done = subprocess.run([NTM_SERVE, *args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("ntm-serve: invalid settings: ") and words in done.stderr
    assert "Traceback" not in done.stderr


def test_flags_override_the_environment_and_the_rest_comes_from_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FLAGS.values():  # each variable is put back as it was afterwards
        monkeypatch.setenv(f"NTM_{name.upper()}", "")
        monkeypatch.delenv(f"NTM_{name.upper()}")
    monkeypatch.setenv("NTM_WORKERS", "2")  # valid only with the --store below: the flags count first
    monkeypatch.setenv("NTM_PORT", "1234")
    monkeypatch.setenv("NTM_DEVICE", "auto")
    settings = settings_from_flags(
        ["--store", "redis://127.0.0.1:6379/0", "--port", "9000", "--model", "a", "--model", "b"]
    )
    assert (settings.workers, settings.store, settings.port, settings.device) == (
        2,
        "redis://127.0.0.1:6379/0",
        9000,
        "auto",
    )
    assert [str(path) for path in settings.models] == ["a", "b"]
    assert os.environ["NTM_MODELS"] == "a,b" and os.environ["NTM_PORT"] == "9000"  # for uvicorn's workers


def test_grpc_needs_a_port_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(port=9000, grpc_port=9000)
    assert describe_settings_error(caught.value).startswith("grpc_port (9000) is the HTTP port too")
    assert Settings(port=0, grpc_port=0).grpc_port == 0  # 0 turns gRPC off
    monkeypatch.setenv("NTM_GRPC_PORT", "1234")
    assert Settings().grpc_port == 1234
    monkeypatch.setenv("NTM_GRPC_PORT", "")
    monkeypatch.delenv("NTM_GRPC_PORT")
    assert Settings().grpc_port == 8001  # Triton's
    assert settings_from_flags(["--grpc-port", "9001"]).grpc_port == 9001
