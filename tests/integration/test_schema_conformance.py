"""Schemathesis 4, every check, against the OpenAPI document of a real server: no failure, no warning.

``schemathesis run --checks all`` runs its four phases (the schema's examples, coverage of each
keyword's boundaries, fuzzing, stateful sequences along the links it infers) on every /v1
operation, with a bounded number of examples per operation and a fixed seed, so the run is the
same each time and takes well under a minute. Its configuration and hooks are in this folder
(``schemathesis.toml``, ``schemathesis_hooks.py``: why a 422 may answer a schema-valid body, and
the check that it only does for the body's content). The server is a real uvicorn process.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import ROOT, ServerProcess, server

HERE = Path(__file__).resolve().parent
MAX_EXAMPLES = 25
SEED = 20261201  # any fixed seed: the same cases on every run (the CLI prints it; another one explores more)
RUN_TIMEOUT_SECONDS = 240


@pytest.fixture(scope="module")
def target(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    """A server of the tiny model; sessions live at least a minute, so that none a scenario opens expires
    under it (the schema says so: its ``ttl_seconds`` minimum is this setting)."""
    env = {"NTM_MODELS": str(tiny_checkpoint), "NTM_MIN_SESSION_TTL_SECONDS": "60", "NTM_ACCESS_LOG": "false"}
    with server(env) as proc:
        yield proc


def run_schemathesis(url: str, snapshot: str, model: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
        "CONFORMANCE_SNAPSHOT": snapshot,
        "CONFORMANCE_MODEL": model,
    }
    args = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(HERE / "schemathesis.toml"), "--no-color"]
    args += ["run", f"{url}/openapi.json", "--checks", "all", "--include-path-regex", "^/v1/"]
    args += ["--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1"]
    args += ["--generation-database", "none", "--continue-on-failure", "--request-timeout", "30"]
    started = time.monotonic()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    return done, time.monotonic() - started


def served_by_route(metrics: str) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "ntm_request_duration_seconds_count"
    }


def test_every_check_passes_on_every_v1_operation_with_no_warning(target: ServerProcess) -> None:
    with httpx.Client(base_url=target.url, timeout=30) as client:
        session = client.post("/v1/sessions").json()["session_id"]
        snapshot = base64.b64encode(client.get(f"/v1/sessions/{session}/snapshot").content).decode()
        model = client.get("/v1/models").json()["models"][0]["name"]
        operations = [path for path in client.get("/openapi.json").json()["paths"] if path.startswith("/v1/")]

        done, seconds = run_schemathesis(target.url, snapshot, model)
        report = done.stdout + done.stderr
        assert done.returncode == 0, report[-6000:]
        assert "No issues found" in report, report[-6000:]
        assert "Warnings" not in report and "⚠" not in report, report[-6000:]
        assert f"Tested: {len(operations) + 1}" in report, report[-3000:]  # /v1/sessions/{id}: GET and DELETE
        for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
            assert f"✅ {phase}" in report, report[-3000:]
        assert seconds < RUN_TIMEOUT_SECONDS

        # Not vacuous: generated steps and predictions were taken by live sessions and ran the model.
        served = served_by_route(client.get("/metrics").text)
        for route in ("/v1/sessions/{session_id}/steps", "/v1/sessions/{session_id}/predict"):
            assert served.get((route, "200"), 0) >= 10, served
        assert not [key for key in served if key[1].startswith("5")], served


# ----------------------------------------------------------------------------------- the findings, one by one
# What the run above found before they were fixed, each pinned down on its own.

# JSON Schema 2020-12's keywords (core, applicator, unevaluated, validation, meta-data, format,
# content) and the OpenAPI 3.1 Schema Object's own; anything else in a schema is no keyword at all.
SCHEMA_KEYWORDS = {
    *("$schema", "$id", "$ref", "$anchor", "$dynamicRef", "$dynamicAnchor", "$defs", "$comment", "$vocabulary"),
    *("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas", "prefixItems", "items"),
    *("contains", "properties", "patternProperties", "additionalProperties", "propertyNames"),
    *("unevaluatedItems", "unevaluatedProperties", "type", "enum", "const", "multipleOf", "maximum"),
    *("exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems"),
    *("minItems", "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties", "required"),
    *("dependentRequired", "title", "description", "default", "deprecated", "readOnly", "writeOnly"),
    *("examples", "format", "contentEncoding", "contentMediaType", "contentSchema"),
    *("discriminator", "xml", "externalDocs", "example"),
}
SCHEMA_VALUED = {"not", "if", "then", "else", "items", "contains", "additionalProperties", "propertyNames"}
SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "dependentSchemas"}


def unknown_keywords(schema: object, where: str) -> list[str]:
    """Every key of ``schema`` and its subschemas that is not a keyword, with where it is."""
    if not isinstance(schema, dict):
        return []
    found = [f"{where}.{key}" for key in schema if key not in SCHEMA_KEYWORDS and not key.startswith("x-")]
    for key, value in schema.items():
        if key in SCHEMA_VALUED:
            found += unknown_keywords(value, f"{where}.{key}")
        elif key in SCHEMA_LISTS:
            for index, item in enumerate(value):
                found += unknown_keywords(item, f"{where}.{key}[{index}]")
        elif key in SCHEMA_MAPS:
            for name, item in value.items():
                found += unknown_keywords(item, f"{where}.{key}.{name}")
    return found


def test_the_schema_uses_only_json_schema_keywords(target: ServerProcess) -> None:
    document = httpx.get(f"{target.url}/openapi.json").json()
    found = []
    for name, schema in document["components"]["schemas"].items():
        found += unknown_keywords(schema, name)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                found += unknown_keywords(parameter["schema"], f"{method} {path} {parameter['name']}")
            for media in operation.get("requestBody", {}).get("content", {}).values():
                found += unknown_keywords(media.get("schema"), f"{method} {path} body")
    assert not found, found
    ttl = document["components"]["schemas"]["CreateSessionIn"]["properties"]["ttl_seconds"]["anyOf"][0]
    assert (ttl["minimum"], ttl["maximum"]) == (60, 7 * 24 * 3600), "the server's own bounds"


# (schema, body, whether the schema admits it): the server must take exactly the bodies the schema admits.
AGREEMENT_CASES = [
    ("StepIn", {"image": {"gray8": None, "shape": [1, 1]}}, False),
    ("StepIn", {"image": {"gray8": "AA", "shape": [1, 1], "png": None}}, True),
    ("StepIn", {"image": {"pixels": [[0, 255]], "png": None, "gray8": None, "shape": None}}, True),
    ("StepIn", {"image": {"gray8": "AA", "shape": [1.0, 1]}}, True),
    ("StepIn", {"image": {"pixels": [[0]]}, "step": 0.0, "label": 7.0}, True),
    ("StepIn", {"image": {"pixels": [[0]]}, "step": "0"}, False),
    ("StepIn", {"image": {"pixels": [[0]]}, "label": True}, False),
    ("StepIn", {"image": {"pixels": [[0]]}, "label": 2**60}, False),
    ("StepIn", {"image": {"png": ""}}, False),
    ("CreateSessionIn", {"ttl_seconds": 4.9e-235}, False),
    ("CreateSessionIn", {"ttl_seconds": 59.5}, False),
    ("CreateSessionIn", {"ttl_seconds": 60}, True),
    ("CreateSessionIn", {"ttl_seconds": 7 * 24 * 3600 + 1}, False),
    ("CreateSessionIn", {"snapshot": ""}, False),
]


@pytest.mark.parametrize(("component", "body", "admitted"), AGREEMENT_CASES)
def test_schema_and_validator_agree(target: ServerProcess, component: str, body: dict, admitted: bool) -> None:
    import jsonschema_rs  # schemathesis' own JSON Schema validator (a dependency of it)

    document = httpx.get(f"{target.url}/openapi.json").json()
    schema = {"$ref": f"#/components/schemas/{component}", "components": document["components"]}
    assert jsonschema_rs.Draft202012Validator(schema).is_valid(body) is admitted
    with httpx.Client(base_url=target.url, timeout=30) as client:
        if component == "CreateSessionIn":
            response = client.post("/v1/sessions", json=body)
        else:
            session = client.post("/v1/sessions").json()["session_id"]
            response = client.post(f"/v1/sessions/{session}/steps", json=body)
    accepted = 201 if component == "CreateSessionIn" else 200
    assert response.status_code == (accepted if admitted else 422), response.text
    if not admitted:
        assert response.json()["error"]["code"] in ("invalid_request", "invalid_image", "invalid_snapshot")


def test_a_session_lives_at_least_the_minimum_ttl(target: ServerProcess) -> None:
    with httpx.Client(base_url=target.url, timeout=30) as client:
        created = client.post("/v1/sessions", json={"ttl_seconds": 60})
        assert created.status_code == 201
        assert client.get(f"/v1/sessions/{created.json()['session_id']}").status_code == 200
        refused = client.post("/v1/sessions", json={"ttl_seconds": 4.9e-235})
        assert refused.status_code == 422 and "ttl_seconds" in refused.json()["error"]["message"]


def test_405_names_every_method_of_the_resource(target: ServerProcess) -> None:
    with httpx.Client(base_url=target.url, timeout=30) as client:
        for path, allowed in (("/v1/sessions/abc", "GET, DELETE"), ("/v1/sessions", "POST"), ("/v1/models", "GET")):
            response = client.options(path)
            assert response.status_code == 405 and response.headers["allow"] == allowed
            assert response.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    "body", [b"\xff\xfe", b"{not json", b'{"ttl_seconds": 60'], ids=["not-utf8", "not-json", "cut"]
)
def test_a_body_that_is_not_json_is_a_documented_422(target: ServerProcess, body: bytes) -> None:
    document = httpx.get(f"{target.url}/openapi.json").json()
    assert "422" in document["paths"]["/v1/sessions"]["post"]["responses"]
    response = httpx.post(f"{target.url}/v1/sessions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", response.text
