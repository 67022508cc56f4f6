"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` beside HTTP, in one process.

So that ``tritonclient.grpc`` (and KServe's and Seldon's gRPC clients) run episodes unary (ModelInfer) or
over one bidirectional stream (Triton's ModelStreamInfer), on the same engine, batcher, store and
exactly-once rules as HTTP: this module is a transport only. It turns ``ModelInferRequest`` messages into
the protocol core's ``InferenceRequest`` (``service.api.oip``, which /v2 REST calls too) and its answers
and errors back into messages and gRPC status codes. Sections cited:

- OIP: the Open Inference Protocol, gRPC (https://github.com/kserve/open-inference-protocol,
  specification/protocol/inference_grpc.md; the service is ``grpc_predict_v2.proto`` beside this file);
- STREAM: Triton's ModelStreamInfer (server docs/protocol/extension_sequence.md, "GRPC"; grpc_service.proto);
- HEALTH: gRPC's health checking protocol (grpc/grpc doc/health-checking.md), grpc.health.v1.Health.

Errors are gRPC statuses with Triton's messages: INVALID_ARGUMENT (a bad tensor, a sequence without START),
NOT_FOUND (an unknown model), UNAVAILABLE (the store down, the server draining), UNAUTHENTICATED (no or a
wrong ``authorization: Bearer <key>``), RESOURCE_EXHAUSTED (a key's session limit). Within a stream an error
is a response carrying ``error_message`` (STREAM), and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from service.api import oip
from service.api.grpc import grpc_predict_v2_pb2 as pb
from service.api.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from service.auth import key_bytes, owner_of
from service.engine import SessionEngine
from service.errors import APIError, status_code_name
from service.logs import log
from service.metrics import Metrics
from service.settings import Settings

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
HEALTH_POLL_SECONDS = 2.0  # how often Watch subscribers learn a change of readiness (Check answers live)
UNAUTHENTICATED_MESSAGE = "a valid API key is required: send 'authorization: Bearer <key>' metadata"
DRAINING_MESSAGE = "the service is shutting down: reconnect, and resend the requests that got no response"

# The gRPC status of each HTTP status the protocol core and the engine use (Triton maps its errors so too).
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}
# OIP "Tensor Data" over gRPC: the InferTensorContents field that holds each datatype.
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
CONTENT_FIELDS = tuple(dict.fromkeys(CONTENTS.values()))

Reply = TypeVar("Reply")


class Failure(Exception):
    """An answer that is a gRPC status, with the metrics code it counts under."""

    def __init__(self, code: grpc.StatusCode, message: str, counted_as: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.counted_as, self.retry_after = code, message, counted_as, retry_after


def failure_of(exc: Exception) -> Failure:
    """Any error of a request as its gRPC status: the protocol core's and the engine's keep their meaning."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, oip.ProtocolError):
        retry = exc.headers.get("Retry-After")
        return Failure(CODES.get(exc.status, grpc.StatusCode.UNKNOWN), exc.message, status_code_name(exc.status), retry)
    if isinstance(exc, APIError):
        status = oip.protocol_status(exc)
        return Failure(
            CODES.get(status, grpc.StatusCode.UNKNOWN), exc.message, exc.code, exc.headers.get("Retry-After")
        )
    log.exception("gRPC request failed", exc_info=exc)
    return Failure(grpc.StatusCode.INTERNAL, "internal server error", "internal_error")


# ----------------------------------------------------------------------------------- messages <-> the core


def parameter(value: pb.InferParameter) -> Any:
    """An InferParameter's value (OIP "Parameters"): bool, int (int64 or uint64), str or float; None if unset."""
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def parameters(entries: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    if not entries:  # most tensors carry none: no iterator over an empty map
        return {}
    return {key: parameter(value) for key, value in entries.items()}


def contents(item: pb.ModelInferRequest.InferInputTensor) -> list[Any] | None:
    """A tensor's typed contents, flat, from the field its datatype uses (OIP "Tensor Data"); None if absent."""
    if not item.HasField("contents"):
        return None
    expected = CONTENTS.get(item.datatype)
    for name in CONTENT_FIELDS:
        if name != expected and len(getattr(item.contents, name)):
            where = f"in {expected}" if expected else "as raw_input_contents"
            raise oip.bad(f"input '{item.name}': {item.datatype} contents go {where}, not in {name}")
    return list(getattr(item.contents, expected)) if expected else []


def inference_request(message: pb.ModelInferRequest) -> oip.InferenceRequest:
    """OIP "Inference Request" from its message: inputs with raw_input_contents (one per input, in order) or
    typed contents, never both."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise oip.bad(
            f"raw_input_contents holds {len(raw)} entries for {len(message.inputs)} inputs: give one per input, in order"
        )
    inputs = []
    for k, item in enumerate(message.inputs):
        if raw and item.HasField("contents"):
            raise oip.bad(f"input '{item.name}' has contents while the request uses raw_input_contents")
        shape = list(item.shape)
        if any(side < 0 for side in shape):
            raise oip.bad(f"input '{item.name}': shape {shape} has a negative dimension")
        data = None if raw else contents(item)
        inputs.append(
            oip.Tensor(item.name, item.datatype, shape, parameters(item.parameters), raw[k] if raw else None, data)
        )
    outputs = [oip.RequestedOutput(output.name, parameters(output.parameters)) for output in message.outputs]
    return oip.InferenceRequest(inputs, parameters(message.parameters), message.id or None, outputs or None)


def inference_response(
    answer: oip.InferenceResponse, message: pb.ModelInferResponse | None = None
) -> pb.ModelInferResponse:
    """OIP "Inference Response", each output's data in raw_output_contents (as Triton answers over gRPC);
    written into ``message`` when given (a stream response's ``infer_response``, filled in place, not copied)."""
    if message is None:
        message = pb.ModelInferResponse()
    message.model_name, message.model_version, message.id = answer.model_name, answer.model_version, answer.id or ""
    for name in answer.outputs:
        message.outputs.add(name=name, datatype="FP32", shape=list(answer.probabilities.shape))
        message.raw_output_contents.append(answer.probabilities.tobytes())
    return message


def sequence_key(message: pb.ModelInferRequest) -> tuple[str, str, Any]:
    """Which sequence a stream's request belongs to, as sent, for keeping its responses in order."""
    value = parameter(message.parameters["sequence_id"]) if "sequence_id" in message.parameters else None
    return message.model_name, type(value).__name__, value


# ----------------------------------------------------------------------------------- the service


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """OIP's GRPCInferenceService and STREAM's ModelStreamInfer over the engine, through the protocol core."""

    def __init__(self, engine: SessionEngine, metrics: Metrics, keys: list[str], version: str) -> None:
        self.engine, self.metrics, self.version = engine, metrics, version
        self.keys = key_bytes(keys)
        self.draining = asyncio.Event()
        self.steps: set[asyncio.Task[None]] = set()  # every stream request in flight, held until it is answered
        self._latency: dict[tuple[str, grpc.StatusCode], Any] = {}  # the histogram's child of each method and code

    # ------------------------------------------------------------------ plumbing

    def owner(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's owner ID from ``authorization: Bearer <key>`` metadata ("" when no keys are set)."""
        if not self.keys:
            return ""
        header = next((value for key, value in context.invocation_metadata() or () if key == "authorization"), "")
        owner = owner_of(header.encode() if isinstance(header, str) else header, self.keys)
        if owner is None:
            raise Failure(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, "unauthorized")
        return owner

    def observe(self, method: str, started: float, failure: Failure | None) -> None:
        """Request latency as HTTP's (method "GRPC", the method's path, the status' name), errors by code."""
        code = grpc.StatusCode.OK if failure is None else failure.code
        child = self._latency.get((method, code))
        if child is None:  # looked up once: labels() takes a lock and builds its key at every call
            child = self.metrics.request_latency.labels("GRPC", f"/{SERVICE}/{method}", code.name)
            self._latency[method, code] = child
        child.observe(time.perf_counter() - started)
        if failure is not None:
            self.metrics.errors.labels(failure.counted_as).inc()

    async def unary(
        self, method: str, context: grpc.aio.ServicerContext, answer: Callable[[str], Awaitable[Reply]]
    ) -> Reply:
        """One unary call: the key checked, ``answer(owner)`` run, any error sent as its gRPC status."""
        started, failure = time.perf_counter(), None
        try:
            return await answer(self.owner(context))
        except Exception as exc:
            failure = failure_of(exc)
        finally:
            self.observe(method, started, failure)
        trailers = (("retry-after", failure.retry_after),) if failure.retry_after else ()
        await context.abort(failure.code, failure.message, trailers)  # raises: the call ends with the status

    async def infer_one(
        self, message: pb.ModelInferRequest, owner: str, client: str = "", into: pb.ModelInferResponse | None = None
    ) -> pb.ModelInferResponse:
        served = oip.served_model(self.engine, message.model_name, message.model_version)
        answer = await oip.infer(self.engine, owner, served, inference_request(message), client)
        return inference_response(answer, into)

    # ------------------------------------------------------------------ OIP health and metadata

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """OIP "Server Live": the process answers."""

        async def answer(owner: str) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self.unary("ServerLive", context, answer)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """OIP "Server Ready": models loaded and the session store reachable, as /readyz."""

        async def answer(owner: str) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=await oip.not_ready_reason(self.engine) is None)

        return await self.unary("ServerReady", context, answer)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """OIP "Model Ready": false for a model not served (Triton's answer too) and while draining."""

        async def answer(owner: str) -> pb.ModelReadyResponse:
            try:
                return pb.ModelReadyResponse(ready=oip.model_ready(self.engine, request.name, request.version))
            except oip.ProtocolError:
                return pb.ModelReadyResponse(ready=False)

        return await self.unary("ModelReady", context, answer)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """OIP "Server Metadata"."""

        async def answer(owner: str) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(**oip.server_metadata(self.version))

        return await self.unary("ServerMetadata", context, answer)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """OIP "Model Metadata": the REST answer's fields (the gRPC message has no parameters)."""

        async def answer(owner: str) -> pb.ModelMetadataResponse:
            served = oip.served_model(self.engine, request.name, request.version)
            metadata = oip.model_metadata(served, self.engine)

            def tensors(key: str) -> list[pb.ModelMetadataResponse.TensorMetadata]:
                return [
                    pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                    for t in metadata[key]
                ]

            return pb.ModelMetadataResponse(
                name=metadata["name"],
                versions=metadata["versions"],
                platform=metadata["platform"],
                inputs=tensors("inputs"),
                outputs=tensors("outputs"),
            )

        return await self.unary("ModelMetadata", context, answer)

    # ------------------------------------------------------------------ inference

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """OIP "Inference" of one step of a sequence, as /v2 REST's infer."""

        async def answer(owner: str) -> pb.ModelInferResponse:
            return await self.infer_one(request, owner, peer_address(context))

        return await self.unary("ModelInfer", context, answer)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """STREAM: requests of several sequences on one stream, each answered by one response.

        The requests of one sequence run one after another, in the order they came, so their responses do
        too; those of different sequences run concurrently (and share the model's batches). An error answers
        its request in-band (``error_message``) and the stream goes on. When the server drains it reads no
        more requests, answers those it read, and ends the stream UNAVAILABLE: a request with no response
        was never applied, so the client can resend it elsewhere.
        """
        try:
            owner, client = self.owner(context), peer_address(context)
        except Failure as failure:
            self.observe("ModelStreamInfer", time.perf_counter(), failure)
            await context.abort(failure.code, failure.message)
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(request_iterator, owner, client, responses))
        try:
            while (response := await responses.get()) is not None:
                yield response
            drained = await reader
        finally:
            reader.cancel()
        if drained:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)

    async def _read_stream(
        self,
        requests: AsyncIterator[pb.ModelInferRequest],
        owner: str,
        client: str,
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None],
    ) -> bool:
        """Read until the client half-closes or the server drains (then True); every request read is answered.

        The reading is a task of its own that draining cancels (at its next wait for a message, never
        between reading one and starting its answer), so each message costs one ``anext`` and no futures.
        """
        last: dict[tuple[str, str, Any], asyncio.Task[None]] = {}
        running: set[asyncio.Task[None]] = set()

        async def read_all() -> None:
            async for message in requests:
                key = sequence_key(message)
                task = asyncio.create_task(self._answer_in_turn(message, owner, client, last.get(key), responses))
                last[key] = task
                running.add(task)
                self.steps.add(task)  # a request read is answered even if the client has gone meanwhile
                task.add_done_callback(lambda done, key=key: _forget(done, key, last, running, self.steps))

        reader = asyncio.create_task(read_all())
        drain = asyncio.ensure_future(self.draining.wait())
        drain.add_done_callback(lambda _: reader.cancel())
        drained = False
        try:
            try:
                await reader
            except asyncio.CancelledError:
                if not drain.done() or drain.cancelled():
                    raise  # this handler itself was cancelled, not the reading by a drain
                drained = True
            if running:
                await asyncio.wait(set(running))
        finally:
            drain.cancel()
            reader.cancel()
            await responses.put(None)
        return drained

    async def _answer_in_turn(
        self,
        message: pb.ModelInferRequest,
        owner: str,
        client: str,
        before: asyncio.Task[None] | None,
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None],
    ) -> None:
        """One stream request, after the one of its sequence that came before it has been answered."""
        if before is not None and not before.done():
            await asyncio.wait((before,))
        started, failure = time.perf_counter(), None
        response = pb.ModelStreamInferResponse()
        try:
            await self.infer_one(message, owner, client, response.infer_response)
        except Exception as exc:
            failure = failure_of(exc)
            response = pb.ModelStreamInferResponse(error_message=failure.message)
        self.observe("ModelStreamInfer", started, failure)
        await responses.put(response)


def _forget(
    task: asyncio.Task[None],
    key: tuple[str, str, Any],
    last: dict[tuple[str, str, Any], asyncio.Task[None]],
    running: set[asyncio.Task[None]],
    held: set[asyncio.Task[None]],
) -> None:
    running.discard(task)
    held.discard(task)
    if last.get(key) is task:
        del last[key]


class ReadinessHealth(health_aio.HealthServicer):
    """HEALTH's grpc.health.v1.Health answering as /readyz: SERVING while models are loaded, the store
    answers and the server is not draining, NOT_SERVING otherwise; for "" (the server) and for the inference
    service. Check asks the engine at each call; Watch follows a poll every ``HEALTH_POLL_SECONDS``."""

    def __init__(self, engine: SessionEngine) -> None:
        super().__init__()
        self.engine = engine

    async def refresh(self) -> None:
        ready = await oip.not_ready_reason(self.engine) is None
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.set(service, status)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        await self.refresh()
        return await super().Check(request, context)

    async def poll(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.refresh()
            await asyncio.sleep(HEALTH_POLL_SECONDS)


class GRPCServer:
    """The gRPC server of one app: started by the lifespan beside HTTP, on the same event loop and engine."""

    def __init__(self, server: grpc.aio.Server, service: InferenceService, health: ReadinessHealth) -> None:
        self.server, self.service, self.health = server, service, health
        self.poller: asyncio.Task[None] | None = None

    async def drain(self, grace: float) -> None:
        """Graceful shutdown, as HTTP's: NOT_SERVING first (balancers move on), no new calls, calls in flight
        finish within ``grace`` seconds, streams end once their requests read are answered."""
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        await self.health.enter_graceful_shutdown()
        self.service.draining.set()
        await self.server.stop(grace)


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(
    settings: Settings, engine: SessionEngine, metrics: Metrics, version: str, tracer_provider: object = None
) -> GRPCServer:
    """The gRPC server on ``settings.host``:``settings.grpc_port``, listening; a port it cannot bind stops start-up.

    With a ``tracer_provider`` (``service.tracing``), each call of the inference service is a server span
    (``opentelemetry-instrumentation-grpc``); health checks and reflection are not traced.
    Messages are limited as HTTP bodies are (NTM_MAX_BODY_BYTES). Several uvicorn workers share the port
    (SO_REUSEPORT: the kernel spreads connections over them); one worker binds it alone, so a port in use
    is an error rather than a silent share with another process.
    """
    from service.auth import configured_keys

    interceptors = []
    if tracer_provider is not None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        interceptors.append(aio_server_interceptor(tracer_provider, filter_=filters.service_name(SERVICE)))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ],
    )
    service = InferenceService(engine, metrics, configured_keys(settings), version)
    health = ReadinessHealth(engine)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = listen_address(settings.host, settings.grpc_port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot serve gRPC on {address} (NTM_GRPC_PORT): {exc}") from None
    if bound == 0:
        raise RuntimeError(f"cannot serve gRPC on {address} (NTM_GRPC_PORT): the port is not available")
    await server.start()
    running = GRPCServer(server, service, health)
    await health.refresh()
    running.poller = asyncio.create_task(health.poll())
    log.info("gRPC listening", extra={"fields": {"address": address}})
    return running


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """The caller's host from gRPC's peer string (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``), which the rate
    limits count when there are no API keys, as ``ratelimit.client_address`` is for HTTP."""
    kind, _, rest = (context.peer() or "").partition(":")
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[")
    return rest.rpartition(":")[0] if kind == "ipv4" else rest
