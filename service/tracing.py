"""OpenTelemetry tracing, configured by the standard ``OTEL_*`` variables, off unless an OTLP endpoint is set.

On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and
``OTEL_SDK_DISABLED`` is not ``true``. The OpenTelemetry SDK then reads everything else itself:
the service name and resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), the sampler
(``OTEL_TRACES_SAMPLER``), the exporter's headers, timeout and compression
(``OTEL_EXPORTER_OTLP_*``) and the batch processor's queue (``OTEL_BSP_*``). Spans leave over
OTLP/HTTP (protobuf), in the background, from a ``BatchSpanProcessor``.

A traced request is one trace:

- the request span: ``opentelemetry-instrumentation-asgi``'s server span around the whole HTTP
  stack (named by route template, so a span name never holds a session ID), or
  ``opentelemetry-instrumentation-grpc``'s around a gRPC call;
- ``store.<operation>``: each session store call (``SessionEngine._store_call``);
- ``batcher.queue_wait``: from the job's arrival at the micro-batcher to its first model call;
- ``model.call``: each model call the job took part in, with ``ntm.batch_size`` (the rows of
  that call, other sessions' included) and ``ntm.model``.

The batcher's spans are made when the job's request resumes, from timestamps the model thread
took (a model call serves many requests, so it has no single parent of its own; each request
sees it as a child with the batch size it shared). With tracing off nothing here runs: the app
adds no middleware, the engine and batcher hold no tracer, and log lines carry no trace ID.

FastAPI's own ``opentelemetry-instrumentation-fastapi`` is not used for the request span: its
``instrument_app`` needs Starlette's error middleware outermost, and the step route's short stack
(``service.api.fastpath``) sits in front of it. The same ASGI middleware that package wraps is
put in front of both stacks instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

DEFAULT_SERVICE_NAME = "ntm-fewshot"
INSTRUMENTATION_NAME = "ntm-fewshot"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces: an OTLP endpoint set, the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def tracer_provider_from_env(environ: Mapping[str, str] = os.environ) -> TracerProvider | None:
    """A tracer provider exporting over OTLP/HTTP as the ``OTEL_*`` variables say, or None when tracing is off."""
    if not tracing_requested(environ):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the default name only fills a gap
    named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def tracer_of(provider: TracerProvider | None) -> trace.Tracer | None:
    """The service's tracer from ``provider``; None (tracing off) without one."""
    return None if provider is None else provider.get_tracer(INSTRUMENTATION_NAME)


def traced_asgi(app: ASGIApp, provider: TracerProvider) -> ASGIApp:
    """``app`` inside OpenTelemetry's ASGI server span, named ``METHOD /route/{template}`` once routed.

    Health, readiness and metrics are left untraced (probes and scrapes would flood the traces),
    as are the per-message ``http receive``/``http send`` spans.
    """
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(
        RouteNamedSpan(app),
        excluded_urls="/healthz,/readyz,/metrics",
        default_span_details=lambda scope: (scope.get("method") or "HTTP", {}),
        tracer_provider=provider,
        exclude_spans=["receive", "send"],
    )


class RouteNamedSpan:
    """Renames the current server span after the route that served the request (``scope["route"]``, set by
    routing and by the step route's own stack), so that a span name never holds a session ID."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_naming_span(message: Message) -> None:
            if message["type"] == "http.response.start":  # routed by now; the span ends with the body
                template = getattr(scope.get("route"), "path", None)
                span = trace.get_current_span()
                if template and span.is_recording():
                    span.update_name(f"{scope.get('method', 'HTTP')} {template}")
                    span.set_attribute("http.route", template)
            await send(message)

        await self.app(scope, receive, send_naming_span)


def log_context() -> dict[str, str]:
    """The current trace and span IDs (W3C hex) for a log line; empty outside a recorded span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": trace.format_trace_id(context.trace_id), "span_id": trace.format_span_id(context.span_id)}
