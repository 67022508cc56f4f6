"""/v2, the Open Inference Protocol with sequences, over a real uvicorn server: tritonclient.http runs episodes."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.servers import ServerProcess, server

MODEL, NUM_WAYS, STEPS = "tiny", 5, 50
START_MESSAGE = "must specify the START flag on the first request of the sequence"
sequence_ids = itertools.count(1000)


@pytest.fixture(scope="module")
def live(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    with server({"NTM_MODELS": str(tiny_checkpoint)}) as proc:
        yield proc


@pytest.fixture
def client(live: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(live.url.removeprefix("http://"))
    yield triton_client
    triton_client.close()


@pytest.fixture
def http(live: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as plain:
        yield plain


def episode(seed: int = 0) -> tuple[list[np.ndarray], list[int | None]]:
    """Random 28x28 images, and labels 0..4 with some queries (None)."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(28, 28), dtype=np.uint8) for _ in range(STEPS)]
    labels = [None if rng.random() < 0.2 else int(rng.integers(NUM_WAYS)) for _ in range(STEPS)]
    return images, labels


def by_label(slot_probabilities: list[float], labels_before: list[Any]) -> list[float]:
    """The issue's rule, written independently: a seen label's slot; else the free slots' mass shared evenly."""
    unseen = [j for j in range(NUM_WAYS) if j not in labels_before]
    free = sum(slot_probabilities[len(labels_before) :])
    return [
        slot_probabilities[labels_before.index(j)] if j in labels_before else free / len(unseen)
        for j in range(NUM_WAYS)
    ]


def v1_episode(url: str, images: list[np.ndarray], labels: list[int | None]) -> np.ndarray:
    """The same episode over /v1, mapped to label order with the labels each prediction saw."""
    out, labels_before = [], []
    with httpx.Client(base_url=url, timeout=30) as plain:
        session = plain.post("/v1/sessions").json()["session_id"]
        for image, label in zip(images, labels, strict=True):
            body: dict[str, Any] = {"image": {"pixels": image.tolist()}}
            if label is not None:
                body["label"] = label
            result = plain.post(f"/v1/sessions/{session}/steps", json=body).json()
            out.append(by_label(result["probabilities"], labels_before))
            labels_before = [lab for lab in result["labels"] if lab is not None]
    return np.array(out)


def tensor(name: str, datatype: str, array: np.ndarray, binary: bool = True) -> triton.InferInput:
    item = triton.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array, binary_data=binary)
    return item


def infer_inputs(image: np.ndarray, label: int | None, binary: bool) -> list[triton.InferInput]:
    inputs = [tensor("IMAGE", "UINT8", image, binary)]
    if label is not None:
        inputs.append(tensor("LABEL", "INT32", np.array([label], dtype=np.int32), binary))
    return inputs


def probabilities(result: triton.InferResult) -> np.ndarray:
    array = result.as_numpy("PROBABILITIES")
    assert array.dtype == np.float32 and array.shape == (1, NUM_WAYS)
    return array[0]


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, "L").save(buffer, "PNG")
    return buffer.getvalue()


def json_request(sequence: dict | None = None, **extra: Any) -> dict[str, Any]:
    """A /v2 infer body in JSON (binary off): one 2x2 UINT8 image, sequence parameters (a new sequence), extras."""
    body: dict[str, Any] = {
        "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [2, 2], "data": [[255, 0], [0, 255]]}],
        "parameters": sequence if sequence is not None else {"sequence_id": next(sequence_ids), "sequence_start": True},
    }
    body.update(extra)
    return body


def assert_v2_error(response: httpx.Response, status: int, contains: str = "") -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert contains in body["error"], body
    return body["error"]


# ----------------------------------------------------------------------------------- episodes


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_episode_equals_v1(
    live: ServerProcess, client: triton.InferenceServerClient, binary: bool
) -> None:
    images, labels = episode(seed=int(binary))
    reference = v1_episode(live.url, images, labels)
    sequence = next(sequence_ids)
    # binary: no outputs named, so tritonclient asks for binary outputs; json: PROBABILITIES in JSON
    outputs = None if binary else [triton.InferRequestedOutput("PROBABILITIES", binary_data=False)]
    got = []
    for t, (image, label) in enumerate(zip(images, labels, strict=True)):
        result = client.infer(
            MODEL,
            infer_inputs(image, label if label is not None or t % 2 else -1, binary),
            request_id=f"step-{t}",
            sequence_id=sequence,
            sequence_start=t == 0,
            sequence_end=t == STEPS - 1,
            outputs=outputs,
        )
        response = result.get_response()
        assert response["id"] == f"step-{t}" and response["model_name"] == MODEL
        assert ("data" in response["outputs"][0]) is not binary
        got.append(probabilities(result))
    assert np.abs(np.array(got) - reference).max() <= 1e-5
    assert np.allclose(np.array(got).sum(axis=1), 1, atol=1e-5)

    with pytest.raises(InferenceServerException) as ended:  # sequence_end dropped the state
        client.infer(MODEL, infer_inputs(images[0], None, binary), sequence_id=sequence)
    assert ended.value.status() == "400"
    assert f"inference request for sequence {sequence} to model '{MODEL}' {START_MESSAGE}" in ended.value.message()


def test_start_replaces_a_sequence_and_string_ids_work(client: triton.InferenceServerClient) -> None:
    images, labels = episode(seed=2)
    fresh = probabilities(
        client.infer(MODEL, infer_inputs(images[3], 1, True), sequence_id="fresh", sequence_start=True)
    )
    for t in range(3):
        client.infer(MODEL, infer_inputs(images[t], t, True), sequence_id="s-1", sequence_start=t == 0)
    again = client.infer(MODEL, infer_inputs(images[3], 1, True), sequence_id="s-1", sequence_start=True)
    assert np.array_equal(probabilities(again), fresh)
    # a string and an integer sequence ID are different sequences
    with pytest.raises(InferenceServerException, match=START_MESSAGE):
        client.infer(MODEL, infer_inputs(images[0], None, True), sequence_id=1)


def test_image_encodings_agree(client: triton.InferenceServerClient, http: httpx.Client) -> None:
    """UINT8 [H, W], UINT8 [1, H, W], FP32, and a PNG as binary BYTES or base64 in JSON: one prediction."""
    image = np.random.default_rng(3).integers(0, 256, size=(20, 30), dtype=np.uint8)
    png = png_bytes(image)
    variants = {
        "uint8": tensor("IMAGE", "UINT8", image),
        "uint8-1hw": tensor("IMAGE", "UINT8", image[None]),
        "fp32": tensor("IMAGE", "FP32", image.astype(np.float32), binary=False),
        "png": tensor("IMAGE", "BYTES", np.array([png], dtype=np.object_)),
    }
    got = {
        name: probabilities(client.infer(MODEL, [given], sequence_id=f"enc-{name}", sequence_start=True))
        for name, given in variants.items()
    }
    body = json_request()
    body["inputs"] = [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}]
    response = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    got["png-json"] = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
    for name, value in got.items():
        assert np.abs(value - got["uint8"]).max() <= 1e-6, name


def test_gzip_request_and_versioned_path(client: triton.InferenceServerClient) -> None:
    image = episode(seed=4)[0][0]
    plain = client.infer(MODEL, infer_inputs(image, 0, True), sequence_id=7, sequence_start=True, sequence_end=True)
    packed = client.infer(
        MODEL,
        infer_inputs(image, 0, True),
        model_version="1",
        sequence_id=8,
        sequence_start=True,
        sequence_end=True,
        request_compression_algorithm="gzip",
    )
    assert np.array_equal(probabilities(plain), probabilities(packed))


def test_concurrent_requests_of_a_sequence_each_apply_once(live: ServerProcess, http: httpx.Client) -> None:
    """Like /v1: one session of the one store, steps applied one at a time, each exactly once."""
    sequence = next(sequence_ids)
    url = f"/v2/models/{MODEL}/infer"
    assert http.post(url, json=json_request(sequence={"sequence_id": sequence, "sequence_start": True})).is_success

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as concurrent:
            bodies = [json_request(sequence={"sequence_id": sequence}, id=str(i)) for i in range(12)]
            for i, body in enumerate(bodies):
                body["inputs"].append({"name": "LABEL", "datatype": "INT32", "shape": [1], "data": [i % NUM_WAYS]})
            return await asyncio.gather(*(concurrent.post(url, json=body) for body in bodies))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert sorted(r.json()["id"] for r in responses) == sorted(str(i) for i in range(12))
    session_id = "v2:" + json.dumps(["", MODEL, sequence], separators=(",", ":"))  # the same store as /v1's
    info = http.get(f"/v1/sessions/{quote(session_id, safe='')}").json()
    assert info["steps"] == 13 and sorted(info["labels"]) == list(range(NUM_WAYS))


def test_sequences_hop_replicas_over_redis(
    live: ServerProcess, tiny_checkpoint: Path, redis_url: str, redis_prefix: str
) -> None:
    """The sequence's ID is derived, not held: two replicas sharing Redis take turns at one sequence."""
    images, labels = episode(seed=7)
    images, labels = images[:12], labels[:12]
    reference = v1_episode(live.url, images, labels)
    env = {"NTM_MODELS": str(tiny_checkpoint), "NTM_STORE": redis_url, "NTM_REDIS_PREFIX": redis_prefix}
    with server(env) as a, server(env) as b:
        clients = [triton.InferenceServerClient(replica.url.removeprefix("http://")) for replica in (a, b)]
        got = [
            probabilities(
                clients[t % 2].infer(MODEL, infer_inputs(image, label, True), sequence_id=77, sequence_start=t == 0)
            )
            for t, (image, label) in enumerate(zip(images, labels, strict=True))
        ]
        for replica_client in clients:
            replica_client.close()
    assert np.abs(np.array(got) - reference).max() <= 1e-5


# ----------------------------------------------------------------------------------- metadata and health


def test_health_and_metadata(client: triton.InferenceServerClient, http: httpx.Client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "2")
    server = client.get_server_metadata()
    assert server["name"] and server["version"] and {"sequence", "binary_tensor_data"} <= set(server["extensions"])
    for version in ("", "1"):
        model = client.get_model_metadata(MODEL, version)
        assert model["name"] == MODEL and model["versions"] == ["1"]
        assert [(t["name"], t["datatype"]) for t in model["inputs"]] == [("IMAGE", "UINT8"), ("LABEL", "INT32")]
        assert model["inputs"][1]["shape"] == [1]
        assert [(t["name"], t["datatype"], t["shape"]) for t in model["outputs"]] == [
            ("PROBABILITIES", "FP32", [1, NUM_WAYS])
        ]
        assert "shared evenly" in model["outputs"][0]["parameters"]["description"]
    for path in ("/v2/models/nope", f"/v2/models/{MODEL}/versions/2", "/v2/models/nope/ready"):
        assert_v2_error(http.get(path), 404, "unknown model")
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "404"


# ----------------------------------------------------------------------------------- outputs


def test_outputs_selection_and_id_echo_over_json(http: httpx.Client) -> None:
    body = json_request(id="req-1", outputs=[{"name": "PROBABILITIES", "parameters": {"binary_data": False}}])
    response = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["id"] == "req-1" and answer["model_name"] == MODEL and answer["model_version"] == "1"
    assert [(o["name"], o["datatype"], o["shape"], len(o["data"])) for o in answer["outputs"]] == [
        ("PROBABILITIES", "FP32", [1, NUM_WAYS], NUM_WAYS)
    ]

    binary = http.post(f"/v2/models/{MODEL}/infer", json={**json_request(), "outputs": None})
    assert binary.status_code == 200 and "id" not in binary.json()
    body = json_request()
    body["parameters"]["binary_data_output"] = True
    response = http.post(f"/v2/models/{MODEL}/infer", json=body)
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 4 * NUM_WAYS}
    values = np.frombuffer(response.content[length:], dtype="<f4")
    assert values.shape == (NUM_WAYS,) and abs(values.sum() - 1) < 1e-5

    assert_v2_error(http.post(f"/v2/models/{MODEL}/infer", json=json_request(outputs=[{"name": "LOGITS"}])), 400)


# ----------------------------------------------------------------------------------- refusals


def test_sequence_id_missing_or_zero_is_refused(client: triton.InferenceServerClient, http: httpx.Client) -> None:
    image = episode(seed=5)[0][0]
    with pytest.raises(InferenceServerException) as missing:
        client.infer(MODEL, infer_inputs(image, 0, True))  # tritonclient sends no sequence_id for 0
    assert missing.value.status() == "400" and "sequence_id" in missing.value.message()
    for parameters in ({}, {"sequence_id": 0, "sequence_start": True}, {"sequence_id": "", "sequence_start": True}):
        assert_v2_error(http.post(f"/v2/models/{MODEL}/infer", json=json_request(sequence=parameters)), 400)
    for bad in (True, -1, 2**64, 1.5, None):
        parameters = {"sequence_id": bad, "sequence_start": True}
        assert_v2_error(http.post(f"/v2/models/{MODEL}/infer", json=json_request(sequence=parameters)), 400)


def test_unknown_sequence_without_start_is_refused(client: triton.InferenceServerClient, http: httpx.Client) -> None:
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL, infer_inputs(episode(seed=6)[0][0], None, False), sequence_id=987654321)
    assert refused.value.status() == "400"
    assert refused.value.message().startswith(
        f"inference request for sequence 987654321 to model '{MODEL}' {START_MESSAGE}"
    )
    body = json_request(sequence={"sequence_id": "never-started"})
    assert_v2_error(http.post(f"/v2/models/{MODEL}/infer", json=body), 400, START_MESSAGE)


def image_input(datatype: str = "UINT8", shape: list[int] | None = None, data: Any = None) -> dict[str, Any]:
    return {"name": "IMAGE", "datatype": datatype, "shape": shape or [2, 2], "data": data or [[255, 0], [0, 255]]}


def label_input(value: Any = 0, datatype: str = "INT32") -> dict[str, Any]:
    return {"name": "LABEL", "datatype": datatype, "shape": [1], "data": [value]}


BAD_INPUTS = {
    "no inputs": [],
    "missing IMAGE": [label_input()],
    "unknown input": [image_input(), {"name": "MASK", "datatype": "UINT8", "shape": [1], "data": [1]}],
    "IMAGE twice": [image_input(), image_input()],
    "IMAGE datatype": [image_input("INT64")],
    "IMAGE shape": [image_input(shape=[2, 2, 1])],
    "IMAGE too large": [image_input(shape=[513, 2], data=[0])],
    "IMAGE empty": [image_input(shape=[0, 2], data=[[]])],
    "IMAGE value count": [image_input(data=[1, 2, 3])],
    "IMAGE over 255": [image_input(data=[[256, 0], [0, 0]])],
    "IMAGE FP32 over 255": [image_input("FP32", data=[[300.5, 0], [0, 0]])],
    "IMAGE strings": [image_input(data=[["a", "b"], ["c", "d"]])],
    "IMAGE no data": [{"name": "IMAGE", "datatype": "UINT8", "shape": [2, 2]}],
    "IMAGE not a PNG": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["bm90IGEgcG5n"]}],
    "IMAGE shared memory": [{**image_input(), "parameters": {"shared_memory_region": "r"}}],
    "LABEL too large": [image_input(), label_input(NUM_WAYS)],
    "LABEL below -1": [image_input(), label_input(-2)],
    "LABEL datatype": [image_input(), label_input(1.0, "FP32")],
    "LABEL shape": [image_input(), {**label_input(), "shape": [2], "data": [0, 1]}],
    "LABEL string": [image_input(), label_input("0")],
}


@pytest.mark.parametrize("inputs", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_are_refused_before_the_model(http: httpx.Client, inputs: list[dict]) -> None:
    sequence = next(sequence_ids)
    body = json_request(sequence={"sequence_id": sequence, "sequence_start": True}, inputs=inputs)
    assert_v2_error(http.post(f"/v2/models/{MODEL}/infer", json=body), 400)
    # nothing was started: the sequence is still unknown
    assert_v2_error(http.post(f"/v2/models/{MODEL}/infer", json=json_request(sequence={"sequence_id": sequence})), 400)


def binary_body(sizes: tuple[int, int], payload: bytes, header_length: int | None = None) -> tuple[bytes, dict]:
    header = {
        "inputs": [
            {"name": "IMAGE", "datatype": "UINT8", "shape": [2, 2], "parameters": {"binary_data_size": sizes[0]}},
            {"name": "LABEL", "datatype": "INT32", "shape": [1], "parameters": {"binary_data_size": sizes[1]}},
        ],
        "parameters": {"sequence_id": next(sequence_ids), "sequence_start": True},
    }
    encoded = json.dumps(header).encode()
    length = len(encoded) if header_length is None else header_length
    return encoded + payload, {"Inference-Header-Content-Length": str(length)}


def test_binary_bodies_are_checked(http: httpx.Client) -> None:
    good = bytes([255, 0, 0, 255]) + np.array([3], dtype="<i4").tobytes()
    url = f"/v2/models/{MODEL}/infer"
    body, headers = binary_body((4, 4), good)
    assert http.post(url, content=body, headers=headers).status_code == 200  # no Content-Type, as tritonclient
    for sizes, payload in (((4, 4), good + b"x"), ((4, 8), good), ((3, 5), good), ((4, 2), good[:6])):
        body, headers = binary_body(sizes, payload)
        assert_v2_error(http.post(url, content=body, headers=headers), 400)
    body, headers = binary_body((4, 4), good, header_length=10**6)
    assert_v2_error(http.post(url, content=body, headers=headers), 400, "Inference-Header-Content-Length")
    body, headers = binary_body((4, 4), good, header_length=5)
    assert_v2_error(http.post(url, content=body, headers=headers), 400, "JSON")
    assert_v2_error(http.post(url, content=b"{not json"), 400)
    assert_v2_error(http.post(url, content=b"[1, 2]"), 400)
    assert_v2_error(http.post(url, content=b"{}", headers={"Content-Encoding": "br"}), 400)
    assert_v2_error(http.post(url, content=b"{}", headers={"Content-Encoding": "gzip"}), 400)


def test_unknown_model_route_and_method(http: httpx.Client) -> None:
    assert_v2_error(http.post("/v2/models/nope/infer", json=json_request()), 404, "unknown model")
    assert_v2_error(http.post(f"/v2/models/{MODEL}/versions/2/infer", json=json_request()), 404)
    assert_v2_error(http.get(f"/v2/models/{MODEL}/nothing"), 404)
    assert_v2_error(http.get(f"/v2/models/{MODEL}/infer"), 405)
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2").json()["extensions"]
