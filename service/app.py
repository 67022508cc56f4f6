"""The FastAPI application factory: a lifespan that loads models, opens the store, sweeps it, and serves the
Open Inference Protocol over gRPC beside HTTP (``service.api.grpc.server``, on the same engine and loop)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.allocator import keep_freed_memory
from service.api import v1, v2
from service.api.demo import install_demo
from service.api.docs import install_docs
from service.api.fastpath import ServiceAPI
from service.auth import APIKeyMiddleware, configured_keys
from service.engine import SessionEngine
from service.errors import error_response, install_error_handlers
from service.logs import configure_logging, log
from service.metrics import Metrics
from service.middleware import RequestMiddleware
from service.registry import ModelRegistry
from service.sessions.memory import MemoryStore
from service.sessions.store import SessionStore
from service.settings import Settings
from service.tracing import tracer_of, tracer_provider_from_env

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

DRAIN_SECONDS = 30.0
GC_THRESHOLDS = (20_000, 50, 100)  # collections per allocation count: young, middle, old generation


@contextlib.contextmanager
def frozen_startup_heap() -> Iterator[None]:
    """While serving: the heap built at start-up frozen out of the garbage collector, and fewer collections.

    Every step request allocates lists (JSON arrays, results) that count towards a collection,
    and a collection that reaches the old generation walks every object the models, the app
    and their libraries made. ``gc.freeze`` moves those to a permanent generation that is never
    walked, and the thresholds space collections out (Python's defaults are 700, 10, 10): 10%
    more batch-form steps/s on the pinned server. Both are undone at shutdown, by the app that
    did them (a second app serving in the same process, as in tests, leaves them be).
    """
    thresholds = gc.get_threshold()
    owner = thresholds != GC_THRESHOLDS
    if owner:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        if owner:
            gc.set_threshold(*thresholds)
            gc.unfreeze()


def open_store(settings: Settings) -> SessionStore:
    """The store a URL names: memory://, redis://host:port/db (rediss:// too) or redis+cluster://host:port,..."""
    if settings.store.startswith("memory://"):
        return MemoryStore()
    from service.sessions.redis import SCHEMES, RedisStore

    if settings.store.startswith(SCHEMES):
        return RedisStore(settings.store, settings.redis_prefix, settings.redis_timeout_seconds)
    raise ValueError(
        f"unknown store {settings.store!r}: use memory://, redis://host:port/db or redis+cluster://host:port[,...]"
    )


async def _sweep(engine: SessionEngine, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        with contextlib.suppress(Exception):
            removed = await engine.store.sweep()
            if removed:
                log.info("swept expired sessions", extra={"fields": {"removed": removed}})


def create_app(settings: Settings | None = None, tracer_provider: TracerProvider | None = None) -> FastAPI:
    """The service's app. ``tracer_provider``: where its spans go; by default the ``OTEL_*`` variables say
    (``service.tracing``), and with no OTLP endpoint set nothing is traced."""
    settings = settings or Settings()
    metrics = Metrics()
    owns_provider = tracer_provider is None
    provider = tracer_provider_from_env() if owns_provider else tracer_provider
    tracer = tracer_of(provider)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if settings.malloc_keep_mb and not keep_freed_memory(settings.malloc_keep_mb):
            log.info("malloc thresholds left as they are: this C library has no mallopt")
        registry = ModelRegistry.load(
            settings.models,
            settings.device,
            settings.max_batch,
            settings.max_wait_ms / 1000,
            metrics.batch_observer,
            settings.model_thread_nice,
            tracer,
            settings.compile,
            settings.compile_package,
        )
        store = open_store(settings)
        engine = SessionEngine(settings, registry, store, metrics, tracer)
        app.state.engine = engine
        grpc_server = None
        if settings.grpc_port:
            # imported only here: its stubs and tritonclient.grpc's cannot share a process (service.api.grpc)
            from service.api.grpc.server import start_grpc_server

            grpc_server = await start_grpc_server(settings, engine, metrics, app.version, provider)
        sweeper = asyncio.create_task(_sweep(engine, settings.sweep_interval_seconds))
        log.info("ready", extra={"fields": {"models": list(registry.models), "store": settings.store.split("@")[-1]}})
        try:
            with frozen_startup_heap():
                yield
        finally:
            if grpc_server is not None:  # uvicorn has drained HTTP by now; gRPC's calls in flight finish first
                await grpc_server.drain(DRAIN_SECONDS)
            engine.draining = True
            for _ in range(int(DRAIN_SECONDS * 100)):
                if engine.inflight == 0:
                    break
                await asyncio.sleep(0.01)
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await asyncio.to_thread(registry.close)  # waits for the model threads: off the event loop
            await engine.rate_limits.close()
            await store.close()
            if provider is not None:  # the spans still queued leave before the process does
                await asyncio.to_thread(provider.shutdown if owns_provider else provider.force_flush)
            log.info("stopped")

    app = ServiceAPI(
        title="NTM few-shot service",
        version="0.1.0",
        description="Few-shot character recognition: a Neural Turing Machine whose per-session memory learns from labeled steps at inference time.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from service.api.docs, with their assets served here
        redoc_url=None,
        # FastAPI's native OpenTelemetry checks for a configured provider on every request
        # (about 9% of the event loop's time per step); it stays off unless asked for.
        telemetry=None if settings.otel_telemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.tracer_provider = provider  # ServiceAPI puts the request span in front of both stacks
    install_error_handlers(app)
    app.openapi = lambda: _openapi_with_step_schemas(app)
    v2.install_error_handlers(app)
    app.include_router(v1.router)
    app.include_router(v2.router)
    install_docs(app)
    install_demo(app)

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: models loaded and the store reachable")
    async def readyz() -> JSONResponse:
        engine: SessionEngine | None = getattr(app.state, "engine", None)
        reason = "the service is starting" if engine is None else await engine.not_ready_reason()
        if reason is not None:
            return error_response(503, "not_ready", reason)
        return JSONResponse({"status": "ready", "models": list(engine.registry.models)})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        engine: SessionEngine | None = getattr(app.state, "engine", None)
        if engine is not None:
            with contextlib.suppress(Exception):
                metrics.active_sessions.set(await engine.store.count())
            for name, served in engine.registry.models.items():
                metrics.package_loaded.labels(name).set(served.batcher.package_ready.is_set())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    keys = configured_keys(settings)
    if keys:
        app.add_middleware(APIKeyMiddleware, keys=keys, protect_metrics=settings.metrics_require_key)
    app.add_middleware(
        RequestMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes, access_log=settings.access_log
    )
    return app


def _openapi_with_step_schemas(app: FastAPI) -> dict:
    """FastAPI's schema plus the create, step, predict and preprocess bodies, which their routes validate themselves
    from the raw JSON, with the limits this server is configured with."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from service.api.schemas import CreateSessionIn, PredictIn, PreprocessIn, StepIn, StepsIn, document_limits

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (CreateSessionIn, StepIn, StepsIn, PredictIn, PreprocessIn):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        settings: Settings = app.state.settings
        document_limits(
            components,
            max_side=settings.max_image_side,
            max_steps=settings.max_steps_per_request,
            max_images=settings.max_predict_images,
            min_ttl=settings.min_session_ttl_seconds,
            max_ttl=settings.max_session_ttl_seconds,
        )
        app.openapi_schema = schema
    return app.openapi_schema


def app_from_env() -> FastAPI:
    """uvicorn factory for ``--workers > 1``: settings come from NTM_* variables."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
