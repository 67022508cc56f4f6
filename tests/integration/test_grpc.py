"""The Open Inference Protocol over gRPC, against real servers: tritonclient.grpc runs episodes unary and
streaming and gets /v2 REST's probabilities; errors, health, keys and draining through grpcio directly.

The messages come from tritonclient's own generated modules (``tritonclient.grpc.service_pb2``): the
service's stubs and tritonclient's cannot share a process, and a client's are what the wire must fit.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import queue
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from service.auth import key_id
from tests.servers import RedisServer, ServerProcess, server, wait_until

MODEL, NUM_WAYS, STEPS = "tiny", 5, 50
START_MESSAGE = "must specify the START flag on the first request of the sequence"
TOLERANCE = 1e-5
sequence_ids = itertools.count(5000)


@pytest.fixture(scope="module")
def live(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    with server({"NTM_MODELS": str(tiny_checkpoint)}) as proc:
        yield proc


@pytest.fixture
def client(live: ServerProcess) -> Iterator[triton_grpc.InferenceServerClient]:
    grpc_client = triton_grpc.InferenceServerClient(live.grpc_target)
    yield grpc_client
    grpc_client.close()


@pytest.fixture
def stub(live: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(live.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def episode(seed: int, steps: int = STEPS) -> tuple[list[np.ndarray], list[int | None]]:
    """Random 28x28 images, and labels 0..4 with some queries (None)."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(28, 28), dtype=np.uint8) for _ in range(steps)]
    labels = [None if rng.random() < 0.2 else int(rng.integers(NUM_WAYS)) for _ in range(steps)]
    return images, labels


def grpc_inputs(image: np.ndarray, label: int | None) -> list[triton_grpc.InferInput]:
    inputs = [triton_grpc.InferInput("IMAGE", list(image.shape), "UINT8")]
    inputs[0].set_data_from_numpy(image)
    if label is not None:
        inputs.append(triton_grpc.InferInput("LABEL", [1], "INT32"))
        inputs[1].set_data_from_numpy(np.array([label], dtype=np.int32))
    return inputs


def probabilities(result: Any) -> np.ndarray:
    array = result.as_numpy("PROBABILITIES")
    assert array.dtype == np.float32 and array.shape == (1, NUM_WAYS)
    return array[0]


def rest_episode(live: ServerProcess, images: list[np.ndarray], labels: list[int | None]) -> np.ndarray:
    """The same episode over /v2 REST (tritonclient.http, binary tensors), as a fresh sequence."""
    sequence = next(sequence_ids)
    rest = triton_http.InferenceServerClient(live.url.removeprefix("http://"))
    out = []
    for t, (image, label) in enumerate(zip(images, labels, strict=True)):
        inputs = [triton_http.InferInput("IMAGE", list(image.shape), "UINT8")]
        inputs[0].set_data_from_numpy(image)
        if label is not None:
            inputs.append(triton_http.InferInput("LABEL", [1], "INT32"))
            inputs[1].set_data_from_numpy(np.array([label], dtype=np.int32))
        result = rest.infer(
            MODEL, inputs, sequence_id=sequence, sequence_start=t == 0, sequence_end=t == len(images) - 1
        )
        out.append(probabilities(result))
    rest.close()
    return np.array(out)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, "L").save(buffer, "PNG")
    return buffer.getvalue()


def raw_request(sequence: Any, image: np.ndarray, label: int | None = None, start: bool = True) -> pb.ModelInferRequest:
    """A ModelInferRequest as tritonclient.grpc builds one: raw_input_contents, sequence parameters."""
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="IMAGE", datatype="UINT8", shape=list(image.shape))
    request.raw_input_contents.append(image.tobytes())
    if label is not None:
        request.inputs.add(name="LABEL", datatype="INT32", shape=[1])
        request.raw_input_contents.append(np.array([label], dtype="<i4").tobytes())
    set_sequence(request, sequence, start)
    return request


def set_sequence(request: pb.ModelInferRequest, sequence: Any, start: bool = True, end: bool = False) -> None:
    if isinstance(sequence, str):
        request.parameters["sequence_id"].string_param = sequence
    else:
        request.parameters["sequence_id"].int64_param = sequence
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end


def raw_probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("PROBABILITIES", "FP32", [1, NUM_WAYS])]
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4")


def rpc_error(call, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


# ----------------------------------------------------------------------------------- episodes


def test_unary_episode_equals_rest(live: ServerProcess, client: triton_grpc.InferenceServerClient) -> None:
    images, labels = episode(seed=11)
    reference = rest_episode(live, images, labels)
    sequence = next(sequence_ids)
    got = []
    for t, (image, label) in enumerate(zip(images, labels, strict=True)):
        result = client.infer(
            MODEL,
            grpc_inputs(image, label if label is not None or t % 2 else -1),
            request_id=f"step-{t}",
            sequence_id=sequence,
            sequence_start=t == 0,
            sequence_end=t == STEPS - 1,
        )
        response = result.get_response()
        assert response.id == f"step-{t}" and response.model_name == MODEL and response.model_version == "1"
        got.append(probabilities(result))
    assert np.abs(np.array(got) - reference).max() <= TOLERANCE
    assert np.allclose(np.array(got).sum(axis=1), 1, atol=1e-5)

    with pytest.raises(InferenceServerException) as ended:  # sequence_end dropped the state
        client.infer(MODEL, grpc_inputs(images[0], None), sequence_id=sequence)
    assert ended.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"inference request for sequence {sequence} to model '{MODEL}' {START_MESSAGE}" in ended.value.message()


def test_stream_episodes_equal_rest_in_order(live: ServerProcess, client: triton_grpc.InferenceServerClient) -> None:
    """Two sequences interleaved on one stream: each one's responses come in its requests' order, as REST's."""
    episodes = {name: episode(seed) for name, seed in (("a", 12), ("b", 13))}
    references = {name: rest_episode(live, *pair) for name, pair in episodes.items()}
    sequences = {name: next(sequence_ids) for name in episodes}
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    try:
        for t in range(STEPS):
            for name, (images, labels) in episodes.items():
                client.async_stream_infer(
                    MODEL,
                    grpc_inputs(images[t], labels[t]),
                    request_id=f"{name}-{t}",
                    sequence_id=sequences[name],
                    sequence_start=t == 0,
                    sequence_end=t == STEPS - 1,
                )
        arrived: dict[str, list[tuple[int, np.ndarray]]] = {name: [] for name in episodes}
        for _ in range(2 * STEPS):
            result, error = answers.get(timeout=60)
            assert error is None, error
            name, t = result.get_response().id.split("-")
            arrived[name].append((int(t), probabilities(result)))
    finally:
        client.stop_stream()
    for name, steps in arrived.items():
        assert [t for t, _ in steps] == list(range(STEPS)), f"sequence {name} answered out of order"
        got = np.array([p for _, p in steps])
        assert np.abs(got - references[name]).max() <= TOLERANCE


def test_stream_errors_answer_in_band_and_the_stream_goes_on(client: triton_grpc.InferenceServerClient) -> None:
    image = episode(seed=14, steps=1)[0][0]
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(MODEL, grpc_inputs(image, None), request_id="lost", sequence_id=987654321)
        client.async_stream_infer("nope", grpc_inputs(image, None), request_id="nope", sequence_id=1)
        client.async_stream_infer(MODEL, grpc_inputs(image, 1), request_id="ok", sequence_id="s", sequence_start=True)
        outcomes = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    errors = sorted(str(error) for result, error in outcomes if error is not None)
    assert len(errors) == 2 and "unknown model: 'nope'" in errors[0] and START_MESSAGE in errors[1], errors
    (ok,) = [result for result, error in outcomes if error is None]
    assert ok.get_response().id == "ok"


def test_a_sequence_moves_between_rest_and_grpc(live: ServerProcess, client: triton_grpc.InferenceServerClient) -> None:
    """One protocol core, one store: a sequence started over REST goes on over gRPC, and back."""
    images, labels = episode(seed=15, steps=12)
    reference = rest_episode(live, images, labels)
    sequence = next(sequence_ids)
    rest = triton_http.InferenceServerClient(live.url.removeprefix("http://"))
    got = []
    for t, (image, label) in enumerate(zip(images, labels, strict=True)):
        if t % 3 == 1:
            inputs = [triton_http.InferInput("IMAGE", [28, 28], "UINT8")]
            inputs[0].set_data_from_numpy(image)
            if label is not None:
                inputs.append(triton_http.InferInput("LABEL", [1], "INT32"))
                inputs[1].set_data_from_numpy(np.array([label], dtype=np.int32))
            got.append(probabilities(rest.infer(MODEL, inputs, sequence_id=sequence, sequence_start=t == 0)))
        else:
            got.append(
                probabilities(
                    client.infer(MODEL, grpc_inputs(image, label), sequence_id=sequence, sequence_start=t == 0)
                )
            )
    rest.close()
    assert np.abs(np.array(got) - reference).max() <= TOLERANCE


def test_sequences_hop_replicas_over_redis(
    live: ServerProcess, tiny_checkpoint: Path, redis_url: str, redis_prefix: str
) -> None:
    """Steps alternating between two replicas on one Redis, over gRPC, give one process's probabilities."""
    images, labels = episode(seed=16, steps=20)
    reference = rest_episode(live, images, labels)
    env = {"NTM_MODELS": str(tiny_checkpoint), "NTM_STORE": redis_url, "NTM_REDIS_PREFIX": redis_prefix}
    with server(env) as a, server(env) as b:
        clients = [triton_grpc.InferenceServerClient(replica.grpc_target) for replica in (a, b)]
        got = [
            probabilities(clients[t % 2].infer(MODEL, grpc_inputs(image, label), sequence_id=77, sequence_start=t == 0))
            for t, (image, label) in enumerate(zip(images, labels, strict=True))
        ]
        for replica_client in clients:
            replica_client.close()
    assert np.abs(np.array(got) - reference).max() <= TOLERANCE


# ----------------------------------------------------------------------------------- tensors, through grpcio


def test_raw_and_typed_contents_agree(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """raw_input_contents, typed contents (UINT8, FP32, BYTES) and a raw PNG: one prediction; LABEL typed too."""
    image = np.random.default_rng(17).integers(0, 256, size=(20, 30), dtype=np.uint8)
    png = png_bytes(image)
    variants: dict[str, pb.ModelInferRequest] = {"raw": raw_request(next(sequence_ids), image, 2)}
    for name, datatype, field, values, shape in (
        ("uint8", "UINT8", "uint_contents", image.ravel().tolist(), [20, 30]),
        ("uint8-1hw", "UINT8", "uint_contents", image.ravel().tolist(), [1, 20, 30]),
        ("fp32", "FP32", "fp32_contents", image.astype(np.float32).ravel().tolist(), [20, 30]),
        ("png", "BYTES", "bytes_contents", [png], [1]),
    ):
        request = pb.ModelInferRequest(model_name=MODEL)
        tensor = request.inputs.add(name="IMAGE", datatype=datatype, shape=shape)
        getattr(tensor.contents, field).extend(values)
        request.inputs.add(name="LABEL", datatype="INT32", shape=[1]).contents.int_contents.append(2)
        set_sequence(request, next(sequence_ids))
        variants[name] = request
    png_raw = pb.ModelInferRequest(model_name=MODEL)  # BYTES raw: a 4-byte length, then the file (BIN's layout)
    png_raw.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    png_raw.raw_input_contents.append(struct.pack("<I", len(png)) + png)
    png_raw.inputs.add(name="LABEL", datatype="INT32", shape=[1])
    png_raw.raw_input_contents.append(np.array([2], dtype="<i4").tobytes())
    set_sequence(png_raw, f"png-raw-{next(sequence_ids)}")
    variants["png-raw"] = png_raw
    got = {name: raw_probabilities(stub.ModelInfer(request)) for name, request in variants.items()}
    for name, value in got.items():
        assert np.abs(value - got["raw"]).max() <= 1e-6, name


def test_sequence_id_kinds(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """int64_param, uint64_param and string_param sequence IDs; 5 and "5" are different sequences."""
    image = episode(seed=18, steps=1)[0][0]
    number = next(sequence_ids)
    stub.ModelInfer(raw_request(number, image, 0))
    follow = raw_request(number, image, start=False)
    follow.parameters["sequence_id"].uint64_param = number  # the same sequence, as an unsigned parameter
    stub.ModelInfer(follow)
    error = rpc_error(stub.ModelInfer, raw_request(str(number), image, start=False))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and START_MESSAGE in error.details()
    for bad in (-1, 0, ""):
        error = rpc_error(stub.ModelInfer, raw_request(bad, image))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "sequence_id" in error.details()
    unflagged = raw_request(next(sequence_ids), image)
    unflagged.parameters["sequence_start"].int64_param = 1
    assert "sequence_start must be true or false" in rpc_error(stub.ModelInfer, unflagged).details()


def bad_requests() -> dict[str, pb.ModelInferRequest]:
    image = np.zeros((2, 2), dtype=np.uint8)
    cases: dict[str, pb.ModelInferRequest] = {}

    def case(name: str) -> pb.ModelInferRequest:
        cases[name] = raw_request(0, image)  # the sequence is set by the test
        return cases[name]

    request = case("raw count")
    request.raw_input_contents.append(b"\0\0\0\0")
    request = case("raw size")
    request.raw_input_contents[0] = b"\0\0\0"
    request = case("raw and contents")
    request.inputs[0].contents.uint_contents.extend([0, 0, 0, 0])
    request = case("contents count")
    del request.raw_input_contents[:]
    request.inputs[0].contents.uint_contents.extend([0, 0, 0])
    request = case("contents in the wrong field")
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.extend([0, 0, 0, 0])
    request = case("contents over 255")
    del request.raw_input_contents[:]
    request.inputs[0].contents.uint_contents.extend([0, 0, 0, 256])
    request = case("no data")
    del request.raw_input_contents[:]
    request = case("negative shape")
    request.inputs[0].shape[0] = -2
    request = case("unknown input")
    request.inputs[0].name = "MASK"
    request = case("IMAGE datatype")
    request.inputs[0].datatype = "INT64"
    request = case("LABEL out of range")
    request.inputs.add(name="LABEL", datatype="INT32", shape=[1])
    request.raw_input_contents.append(np.array([NUM_WAYS], dtype="<i4").tobytes())
    request = case("unknown output")
    request.outputs.add(name="LOGITS")
    request = case("classification")
    request.outputs.add(name="PROBABILITIES").parameters["classification"].int64_param = 2
    return cases


@pytest.mark.parametrize("name", list(bad_requests()))
def test_bad_requests_are_invalid_arguments(stub: pb_grpc.GRPCInferenceServiceStub, name: str) -> None:
    request = bad_requests()[name]
    sequence = next(sequence_ids)
    set_sequence(request, sequence)
    error = rpc_error(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details(), error
    # nothing was started: the sequence is still unknown
    error = rpc_error(stub.ModelInfer, raw_request(sequence, np.zeros((2, 2), np.uint8), start=False))
    assert START_MESSAGE in error.details()


def test_unknown_model_and_version_are_not_found(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    image = np.zeros((2, 2), dtype=np.uint8)
    for model, version in (("nope", ""), (MODEL, "2")):
        request = raw_request(next(sequence_ids), image)
        request.model_name, request.model_version = model, version
        error = rpc_error(stub.ModelInfer, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "Request for unknown model" in error.details()
    error = rpc_error(stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready is False
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="2")).ready is False
    error = rpc_error(stub.ModelConfig, pb.ModelConfigRequest(name=MODEL))  # Triton's, not the protocol's
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# ----------------------------------------------------------------------------------- health, metadata, metrics


def test_health_metadata_and_reflection(live: ServerProcess, client: triton_grpc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1") and not client.is_model_ready("nope")
    metadata = client.get_server_metadata()
    assert metadata.name == "ntm-fewshot" and {"sequence", "binary_tensor_data"} <= set(metadata.extensions)
    rest = httpx.get(f"{live.url}/v2/models/{MODEL}", timeout=10).json()
    model = client.get_model_metadata(MODEL, as_json=True)
    assert model["name"] == MODEL and model["versions"] == ["1"] and model["platform"] == rest["platform"]
    for key in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(s) for s in t["shape"]]) for t in model[key]] == [
            (t["name"], t["datatype"], t["shape"]) for t in rest[key]
        ]
    with grpc.insecure_channel(live.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        unknown = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="nope"))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    exposition = httpx.get(f"{live.url}/metrics", timeout=10).text
    assert 'route="/inference.GRPCInferenceService/ModelInfer",status="OK"' in exposition
    assert 'route="/inference.GRPCInferenceService/ModelInfer",status="INVALID_ARGUMENT"' in exposition


def test_store_down_is_unavailable_and_not_serving(tiny_checkpoint: Path) -> None:
    """Redis stopped: steps are UNAVAILABLE, health NOT_SERVING, ServerReady false, as /readyz; back: SERVING."""
    redis_server = RedisServer()
    env = {"NTM_MODELS": str(tiny_checkpoint), "NTM_STORE": redis_server.url, "NTM_REDIS_TIMEOUT_SECONDS": "0.5"}
    image = np.zeros((2, 2), dtype=np.uint8)
    try:
        with server(env) as proc, grpc.insecure_channel(proc.grpc_target) as channel:
            stub, health = pb_grpc.GRPCInferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel)
            stub.ModelInfer(raw_request(1, image, 0))
            redis_server.stop()
            error = rpc_error(stub.ModelInfer, raw_request(1, image, start=False))
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert stub.ServerReady(pb.ServerReadyRequest()).ready is False
            assert httpx.get(f"{proc.url}/readyz", timeout=10).status_code == 503
            redis_server.start()
            wait_until(
                lambda: health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            )
            stub.ModelInfer(raw_request(1, image, start=False))  # the sequence goes on from its last step
    finally:
        redis_server.close()


def test_keys_and_ownership_as_http(tiny_checkpoint: Path) -> None:
    """``authorization: Bearer <key>`` metadata with HTTP's keys; a sequence belongs to its key on both."""
    env = {"NTM_MODELS": str(tiny_checkpoint), "NTM_API_KEYS": "key-a,key-b"}
    image = np.zeros((2, 2), dtype=np.uint8)
    with server(env) as proc, grpc.insecure_channel(proc.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "key-a"),)):
            error = rpc_error(stub.ServerLive, pb.ServerLiveRequest(), metadata=metadata)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in error.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())  # open, as /readyz
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        a, b = {"authorization": "Bearer key-a"}, {"authorization": "Bearer key-b"}
        client = triton_grpc.InferenceServerClient(proc.grpc_target)
        client.infer(MODEL, grpc_inputs(image, 0), sequence_id=9, sequence_start=True, headers=a)
        client.infer(MODEL, grpc_inputs(image, 1), sequence_id=9, headers=a)
        with pytest.raises(InferenceServerException, match=START_MESSAGE):
            client.infer(MODEL, grpc_inputs(image, 1), sequence_id=9, headers=b)  # key-b has no sequence 9
        answers: queue.Queue = queue.Queue()
        client.start_stream(lambda result, error: answers.put((result, error)))  # no key: the stream is refused
        with contextlib.suppress(InferenceServerException):  # refused at once, or at its first request
            client.async_stream_infer(MODEL, grpc_inputs(image, None), sequence_id=9)
        result, error = answers.get(timeout=30)
        assert result is None and "UNAUTHENTICATED" in str(error.status())
        client.stop_stream()
        client.close()

        session = quote("v2:" + json.dumps([key_id("key-a"), MODEL, 9], separators=(",", ":")), safe="")
        info = httpx.get(f"{proc.url}/v1/sessions/{session}", headers={"Authorization": "Bearer key-a"}, timeout=10)
        assert info.status_code == 200 and info.json()["steps"] == 2
        assert (
            httpx.get(f"{proc.url}/v1/sessions/{session}", headers={"Authorization": "Bearer key-b"}).status_code == 404
        )


def test_sigterm_drains_streams_then_stops(tiny_checkpoint: Path) -> None:
    """On SIGTERM an open stream's answered requests stay answered, the stream ends UNAVAILABLE soon (not
    after the 30 s grace), no new call gets in, and the server stops cleanly."""
    proc = ServerProcess({"NTM_MODELS": str(tiny_checkpoint)}, log_level="info").wait_ready()
    image = np.zeros((2, 2), dtype=np.uint8)
    outgoing: queue.Queue = queue.Queue()
    try:
        with grpc.insecure_channel(proc.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            responses = stub.ModelStreamInfer(iter(outgoing.get, None))
            outgoing.put(raw_request(3, image, 0))
            first = next(responses)
            assert first.error_message == "" and first.infer_response.model_name == MODEL
            started = time.monotonic()
            proc.process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as ended:
                next(responses)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 15
            code = proc.process.wait(30)
            outgoing.put(None)
        assert code in (0, -signal.SIGTERM), proc.log()
        assert '"message": "stopped"' in proc.log()
        with grpc.insecure_channel(proc.grpc_target) as channel:
            refused = rpc_error(pb_grpc.GRPCInferenceServiceStub(channel).ServerLive, pb.ServerLiveRequest(), timeout=5)
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.stop()
        proc.log_path.unlink(missing_ok=True)
