"""Schemathesis against the OpenAPI schema of a real server: no 5xx, responses match the schema.

Examples are bounded (Hypothesis ``max_examples``) so the module stays a small part of the
suite. Most generated session IDs are swapped for live sessions' IDs, so the fuzzer reaches
the step handler with real sessions instead of only exercising 404s.
"""

from __future__ import annotations

import zlib

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.servers import server

LIVE_SESSIONS: list[str] = []
# What the issue asks of every response: never a 5xx, and status, content type and body as documented.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_target(tiny_checkpoint):
    with server({"NTM_MODELS": str(tiny_checkpoint), "NTM_MAX_BODY_BYTES": "262144"}) as proc:
        LIVE_SESSIONS[:] = [httpx.post(f"{proc.url}/v1/sessions").json()["session_id"] for _ in range(8)]
        yield proc


@pytest.fixture(scope="module")
def api_schema(fuzz_target):
    return schemathesis.openapi.from_url(f"{fuzz_target.url}/openapi.json")


def with_live_session(case) -> None:
    """Four in five generated session IDs become a live session's, so steps reach the model
    (DELETE keeps its generated IDs, or it would end the live sessions for the rest of the run)."""
    if case.method.upper() != "DELETE" and case.path_parameters and "session_id" in case.path_parameters:
        pick = zlib.crc32(str(case.path_parameters["session_id"]).encode())
        if pick % 5:
            case.path_parameters["session_id"] = LIVE_SESSIONS[pick % len(LIVE_SESSIONS)]


def test_api_never_fails_and_matches_its_schema(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9, "every /v1 and health route is in the schema"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            with_live_session(case)
            case.call_and_validate(checks=CHECKS, timeout=30)

        fuzz()


def test_the_fuzzer_reached_the_model(fuzz_target, api_schema):
    """The run above was not vacuous: generated steps were accepted by live sessions."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics = httpx.get(f"{fuzz_target.url}/metrics").text
    served = {
        (s.labels["route"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "ntm_request_duration_seconds_count"
    }
    assert served.get(("/v1/sessions/{session_id}/steps", "200"), 0) > 0
    assert served.get(("/v1/sessions/{session_id}/steps", "422"), 0) > 0
    assert not [key for key in served if key[1].startswith("5")]
