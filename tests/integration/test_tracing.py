"""OpenTelemetry tracing (``service.tracing``): which spans a request makes, and how they nest.

In process, the app exports to the SDK's in-memory exporter. Against a real uvicorn server,
configured by nothing but ``OTEL_*`` variables, spans travel over OTLP/HTTP to a receiver this
test runs, for HTTP and gRPC requests alike, and the server's JSON log lines carry their trace IDs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.tracing import tracing_requested
from tests.api.support import api_settings, random_pixels, running_app, step_body
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.anyio
STEP_ROUTE = "POST /v1/sessions/{session_id}/steps"
MODEL_SPANS = {"batcher.queue_wait", "model.call"}


def children_of(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


@pytest.fixture
def exported() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced_client(tiny_checkpoint: Path, exported: InMemorySpanExporter):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    async with running_app(api_settings(tiny_checkpoint, models=[tiny_checkpoint]), provider) as (_, client):
        yield client


def test_tracing_is_on_only_with_an_otlp_endpoint() -> None:
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})


async def test_a_step_is_a_request_span_over_store_queue_and_model_spans(traced_client, exported) -> None:
    session = (await traced_client.post("/v1/sessions", json={})).json()["session_id"]
    exported.clear()
    bodies = [step_body(random_pixels(seed), label=seed % 3) for seed in range(3)]
    response = await traced_client.post(f"/v1/sessions/{session}/steps", json={"steps": bodies})
    assert response.status_code == 200
    spans = list(exported.get_finished_spans())
    roots = [s for s in spans if s.parent is None]
    assert [s.name for s in roots] == [STEP_ROUTE]
    root = roots[0]
    assert root.attributes["http.route"] == "/v1/sessions/{session_id}/steps"
    assert root.attributes["http.status_code"] == 200
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    names = [s.name for s in sorted(children_of(spans, root), key=lambda s: s.start_time)]
    assert names == ["store.get", "batcher.queue_wait", "model.call", "model.call", "model.call", "store.commit"]
    calls = [s for s in spans if s.name == "model.call"]
    assert all(s.attributes["ntm.batch_size"] == 1 and s.attributes["ntm.model"] == "tiny" for s in calls)
    wait = next(s for s in spans if s.name == "batcher.queue_wait")
    assert wait.end_time <= min(s.start_time for s in calls)
    assert all(root.start_time <= s.start_time <= s.end_time <= root.end_time for s in spans)
    commit = next(s for s in spans if s.name == "store.commit")
    assert commit.attributes["db.system.name"] == "memory" and commit.attributes["db.operation.name"] == "commit"


async def test_a_prediction_is_one_model_call_with_a_row_per_image(traced_client, exported) -> None:
    session = (await traced_client.post("/v1/sessions", json={})).json()["session_id"]
    exported.clear()
    images = [{"pixels": random_pixels(seed)} for seed in range(4)]
    assert (await traced_client.post(f"/v1/sessions/{session}/predict", json={"images": images})).status_code == 200
    spans = list(exported.get_finished_spans())
    root = next(s for s in spans if s.parent is None)
    assert root.name == "POST /v1/sessions/{session_id}/predict"
    (call,) = [s for s in children_of(spans, root) if s.name == "model.call"]
    assert call.attributes["ntm.batch_size"] == 4 and call.attributes["ntm.job_rows"] == 4
    assert "store.commit" not in {s.name for s in spans}


async def test_health_probes_and_metrics_are_not_traced(traced_client, exported) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await traced_client.get(path)).status_code == 200
    assert list(exported.get_finished_spans()) == []


# ------------------------------------------------------------- a real server, configured by OTEL_* alone


class OTLPReceiver:
    """An OTLP/HTTP trace endpoint: decodes each export request's protobuf and keeps its spans."""

    def __init__(self) -> None:
        self.spans: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        receiver.spans.extend((service, span) for span in scope_spans.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def trace(self, root_name: str) -> tuple[object, list]:
        """The newest root span named ``root_name`` and every span of its trace."""
        root = [span for _, span in self.spans if span.name == root_name and not span.parent_span_id][-1]
        return root, [span for _, span in self.spans if span.trace_id == root.trace_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    otlp = OTLPReceiver()
    yield otlp
    otlp.close()


@pytest.fixture(scope="module")
def traced_server(tiny_checkpoint: Path, receiver: OTLPReceiver) -> Iterator[ServerProcess]:
    env = {
        "NTM_MODELS": str(tiny_checkpoint),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "ntm-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    proc = ServerProcess(env, log_level="info").wait_ready()
    yield proc
    proc.stop()
    proc.log_path.unlink(missing_ok=True)


def test_a_real_server_exports_nested_spans_over_otlp_and_logs_their_trace_id(traced_server, receiver) -> None:
    with httpx.Client(base_url=traced_server.url, timeout=30) as http:
        session = http.post("/v1/sessions", json={}).json()["session_id"]
        assert http.post(f"/v1/sessions/{session}/steps", json=step_body(random_pixels(1), label=0)).status_code == 200
    wait_until(lambda: any(span.name == STEP_ROUTE for _, span in receiver.spans), timeout=10)
    root, spans = receiver.trace(STEP_ROUTE)
    children = {span.name for span in spans if span.parent_span_id == root.span_id}
    assert {"store.get", "store.commit"} | MODEL_SPANS <= children
    assert {service["service.name"] for service, _ in receiver.spans} == {"ntm-under-test"}
    access = [json.loads(line) for line in traced_server.log().splitlines() if '"message": "request"' in line]
    step_lines = [entry for entry in access if entry["path"].endswith("/steps")]
    assert step_lines and step_lines[-1]["trace_id"] == root.trace_id.hex()


def test_a_grpc_call_is_a_server_span_over_the_same_model_spans(traced_server, receiver) -> None:
    client = triton_grpc.InferenceServerClient(traced_server.grpc_target)
    try:
        image = triton_grpc.InferInput("IMAGE", [28, 28], "UINT8")
        image.set_data_from_numpy(np.zeros((28, 28), dtype=np.uint8))
        client.infer("tiny", [image], sequence_id=7001, sequence_start=True)
    finally:
        client.close()
    name = "/inference.GRPCInferenceService/ModelInfer"
    wait_until(lambda: any(span.name == name for _, span in receiver.spans), timeout=10)
    root, spans = receiver.trace(name)
    assert {span.name for span in spans if span.parent_span_id == root.span_id} >= MODEL_SPANS
    assert not any(span.name.startswith("/grpc.health") for _, span in receiver.spans)
