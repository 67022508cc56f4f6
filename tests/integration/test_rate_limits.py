"""Rate limits per API key, or per client address with no keys, through real servers.

Windows are a minute long, so that nothing leaves a window while a test runs. With no keys the
limit is per client address; the servers trust their peer (127.0.0.1, uvicorn's default
``FORWARDED_ALLOW_IPS``) for ``X-Forwarded-For``, so each test speaks from addresses of its own
and counts against budgets of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from service.settings import Settings, describe_settings_error
from tests.api.support import api_settings, app_client
from tests.servers import ServerProcess, server

pytestmark = pytest.mark.anyio

STEPS_PER_MINUTE, SESSIONS_PER_MINUTE = 6, 3
addresses = (f"10.22.{n // 250}.{n % 250 + 1}" for n in itertools.count())


def pixels(seed: int) -> list[list[int]]:
    return [[(seed * 37 + 11 * i + j) % 256 for j in range(8)] for i in range(8)]


def step(seed: int = 0, label: object = None) -> dict:
    body: dict = {"image": {"pixels": pixels(seed)}}
    if label is not None:
        body["label"] = label
    return body


def v2_start(sequence_id: int) -> dict:
    return {
        "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [2, 2], "data": [[255, 0], [0, 255]]}],
        "parameters": {"sequence_id": sequence_id, "sequence_start": True},
    }


def metric(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def assert_rate_limited(response: httpx.Response) -> int:
    """429, the API's error shape, code rate_limited, and a Retry-After within the minute's window."""
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited", response.text
    wait = int(response.headers["retry-after"])
    assert 1 <= wait <= 60
    return wait


@pytest.fixture(scope="module")
def limited(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    env = {
        "NTM_MODELS": str(tiny_checkpoint),
        "NTM_RATE_LIMIT_STEPS": f"{STEPS_PER_MINUTE}/minute",
        "NTM_RATE_LIMIT_SESSIONS": f"{SESSIONS_PER_MINUTE}/minute",
    }
    with server(env) as proc:
        yield proc


def client_at(url: str, address: str, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, headers={"X-Forwarded-For": address, **headers})


def test_steps_count_one_each_batches_and_predictions_n(limited: ServerProcess) -> None:
    with client_at(limited.url, next(addresses)) as client:
        before = client.get("/metrics").text
        session = client.post("/v1/sessions").json()["session_id"]
        steps = f"/v1/sessions/{session}/steps"
        assert client.post(steps, json={"steps": [step(i, "a") for i in range(4)]}).status_code == 200  # 4 of 6
        assert_rate_limited(client.post(steps, json={"steps": [step(i) for i in range(3)]}))  # 7 would pass 6
        assert client.post(steps, json=step(5)).status_code == 200  # 5
        images = {"images": [{"pixels": pixels(1)}, {"pixels": pixels(2)}]}
        assert_rate_limited(client.post(f"/v1/sessions/{session}/predict", json=images))  # 7
        one_image = {"images": [{"pixels": pixels(1)}]}
        assert client.post(f"/v1/sessions/{session}/predict", json=one_image).status_code == 200  # 6
        assert_rate_limited(client.post(steps, json=step(6)))

        refused = client.post("/v2/models/tiny/infer", json=v2_start(22_001))  # /v2 draws on the same budget
        assert refused.status_code == 429 and isinstance(refused.json()["error"], str), refused.text
        assert int(refused.headers["retry-after"]) >= 1

        assert client.get(f"/v1/sessions/{session}").json()["steps"] == 5, "a refused step changed nothing"
        for _ in range(10):  # never limited
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
            assert client.get("/metrics").status_code == 200
        after = client.get("/metrics").text
    assert metric(after, "ntm_rate_limited_total", limit="steps") - metric(before, "ntm_rate_limited_total") == 4
    assert metric(after, "ntm_errors_total", code="rate_limited") - metric(before, "ntm_errors_total") >= 3


def test_a_request_over_the_whole_limit_is_a_422_and_costs_nothing(limited: ServerProcess) -> None:
    with client_at(limited.url, next(addresses)) as client:
        session = client.post("/v1/sessions").json()["session_id"]
        too_many = client.post(f"/v1/sessions/{session}/steps", json={"steps": [step(i) for i in range(7)]})
        assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "too_many_steps"
        images = {"images": [{"pixels": pixels(i)} for i in range(7)]}
        too_many = client.post(f"/v1/sessions/{session}/predict", json=images)
        assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "too_many_images"
        batch = {"steps": [step(i) for i in range(STEPS_PER_MINUTE)]}
        assert client.post(f"/v1/sessions/{session}/steps", json=batch).status_code == 200


def test_session_creates_are_limited_per_client_address(limited: ServerProcess) -> None:
    first, second = next(addresses), next(addresses)
    with client_at(limited.url, first) as client:
        for _ in range(SESSIONS_PER_MINUTE):
            assert client.post("/v1/sessions").status_code == 201
        assert "client address" in client.post("/v1/sessions").json()["error"]["message"]
        assert_rate_limited(client.post("/v1/sessions"))
    with client_at(limited.url, second) as client:
        assert client.post("/v1/sessions").status_code == 201


def test_limits_are_per_api_key_whatever_the_address(tiny_checkpoint: Path) -> None:
    env = {"NTM_MODELS": str(tiny_checkpoint), "NTM_API_KEYS": "key-one,key-two", "NTM_RATE_LIMIT_STEPS": "3/minute"}
    with server(env) as proc:
        one = {"Authorization": "Bearer key-one"}
        with client_at(proc.url, next(addresses), **one) as client:
            session = client.post("/v1/sessions").json()["session_id"]
            for seed in range(3):
                assert client.post(f"/v1/sessions/{session}/steps", json=step(seed)).status_code == 200
        with client_at(proc.url, next(addresses), **one) as elsewhere:  # the same key from another address
            refused = elsewhere.post(f"/v1/sessions/{session}/steps", json=step(4))
            assert_rate_limited(refused)
            assert "API key" in refused.json()["error"]["message"]
        with client_at(proc.url, next(addresses), Authorization="Bearer key-two") as other:
            session = other.post("/v1/sessions").json()["session_id"]
            assert other.post(f"/v1/sessions/{session}/steps", json=step(0)).status_code == 200


def test_replicas_on_one_redis_share_the_limit(tiny_checkpoint: Path, redis_url: str, redis_prefix: str) -> None:
    env = {
        "NTM_MODELS": str(tiny_checkpoint),
        "NTM_STORE": redis_url,
        "NTM_REDIS_PREFIX": redis_prefix,
        "NTM_RATE_LIMIT_STEPS": "4/minute",
    }
    address = next(addresses)
    with server(env) as a, server(env) as b, client_at(a.url, address) as to_a, client_at(b.url, address) as to_b:
        session = to_a.post("/v1/sessions").json()["session_id"]
        for seed, client in enumerate((to_a, to_b, to_a, to_b)):
            assert client.post(f"/v1/sessions/{session}/steps", json=step(seed)).status_code == 200
        assert_rate_limited(to_a.post(f"/v1/sessions/{session}/steps", json=step(9)))
        assert_rate_limited(to_b.post(f"/v1/sessions/{session}/steps", json=step(9)))
    direct = redis.Redis.from_url(redis_url)
    try:
        assert list(direct.scan_iter(match=f"{redis_prefix}ratelimit:*")), "counted in the store's Redis"
    finally:
        direct.close()


async def test_with_the_memory_store_each_replica_counts_for_itself(tiny_checkpoint: Path) -> None:
    settings = api_settings(tiny_checkpoint, rate_limit_steps="2/minute")
    async with app_client(settings) as one, app_client(settings) as two:
        for client in (one, two):
            session = (await client.post("/v1/sessions")).json()["session_id"]
            for seed in range(2):
                assert (await client.post(f"/v1/sessions/{session}/steps", json=step(seed))).status_code == 200
            assert_rate_limited(await client.post(f"/v1/sessions/{session}/steps", json=step(3)))


@pytest.mark.parametrize(
    ("value", "message"),
    [("fifty", "is not a rate limit"), ("0/second", "allows nothing")],
)
def test_a_rate_limit_that_is_not_one_stops_start_up(value: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(rate_limit_steps=value)
    described = describe_settings_error(caught.value)
    assert described.startswith("NTM_RATE_LIMIT_STEPS: ") and message in described
    assert Settings().rate_limit_steps is None and Settings().rate_limit_sessions is None, "off by default"
