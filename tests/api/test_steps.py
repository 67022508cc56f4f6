"""Steps over HTTP: the model's own answer, labels and slots, exactly-once under concurrency, retries."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from models import load_checkpoint
from service.settings import PRETRAINED_DIR, Settings
from tests.api.support import (
    NUM_WAYS,
    TOLERANCE,
    api_settings,
    app_client,
    assert_error,
    label_key,
    new_session,
    png_base64,
    random_pixels,
    reference_probabilities,
    session_info,
    step_body,
)

pytestmark = pytest.mark.anyio

EPISODE_LABELS: list[Any] = ["a", "b", "a", "c", None, "b", 1, "1", None, "c", 1, None]


def episode(seed: int) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """12 gray images (random 0-255 levels, mostly 28x28, some other sizes; one sent as a PNG, one as gray8) and their step bodies."""
    rng = np.random.default_rng(seed)
    shapes = [(28, 28)] * 9 + [(40, 31), (17, 17), (105, 105)]
    order = rng.permutation(len(shapes))
    grays, bodies = [], []
    for t, label in enumerate(EPISODE_LABELS):
        height, width = shapes[order[t]]
        gray = rng.integers(0, 256, size=(height, width))
        if t == 5:
            image: dict[str, Any] = {"png": png_base64(gray)}
        elif t == 7:
            image = {"gray8": base64.b64encode(gray.astype(np.uint8).tobytes()).decode(), "shape": [height, width]}
        else:
            image = {"pixels": gray.tolist()}
        body: dict[str, Any] = {"image": image}
        if label is not None:
            body["label"] = label
        grays.append(gray.astype(np.float32))
        bodies.append(body)
    return grays, bodies


async def run_episode(client: httpx.AsyncClient, session_id: str, bodies: list[dict[str, Any]]) -> list[dict]:
    results = []
    for t, body in enumerate(bodies):
        response = await client.post(f"/v1/sessions/{session_id}/steps", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["step"] == t
        results.append(result)
    return results


def assert_matches_model(results: list[dict], expected: np.ndarray) -> None:
    got = np.array([r["probabilities"] for r in results])
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE


async def model_calls(client: httpx.AsyncClient, model: str = "tiny") -> tuple[float, float]:
    """From /metrics: (model calls, session steps in them) of ``model`` so far."""
    values = {"ntm_batch_size_count": 0.0, "ntm_batch_size_sum": 0.0}
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for sample in family.samples:
            if sample.name in values and sample.labels.get("model") == model:
                values[sample.name] = sample.value
    return values["ntm_batch_size_count"], values["ntm_batch_size_sum"]


# ----------------------------------------------------------------------------------- the model's own answer


async def test_episode_equals_forward_sequence(client: httpx.AsyncClient, tiny_checkpoint: Path) -> None:
    grays, bodies = episode(seed=11)
    results = await run_episode(client, await new_session(client), bodies)
    assert_matches_model(results, reference_probabilities(load_checkpoint(tiny_checkpoint), grays, EPISODE_LABELS))


async def test_episode_equals_forward_sequence_as_one_batch(client: httpx.AsyncClient, tiny_checkpoint: Path) -> None:
    grays, bodies = episode(seed=12)
    session_id = await new_session(client)
    first = await client.post(f"/v1/sessions/{session_id}/steps", json={"steps": bodies[:5]})
    second = await client.post(f"/v1/sessions/{session_id}/steps", json={"steps": bodies[5:]})
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    results = first.json()["results"] + second.json()["results"]
    assert [r["step"] for r in results] == list(range(len(bodies)))
    assert_matches_model(results, reference_probabilities(load_checkpoint(tiny_checkpoint), grays, EPISODE_LABELS))


async def test_interleaved_sessions_do_not_change_results(client: httpx.AsyncClient, tiny_checkpoint: Path) -> None:
    """Sessions stepped concurrently share micro-batches; each still gets exactly its own episode's answer."""
    model = load_checkpoint(tiny_checkpoint)
    episodes = [episode(seed=100 + i) for i in range(6)]
    session_ids = [await new_session(client) for _ in episodes]
    calls_before, steps_before = await model_calls(client)
    all_results = await asyncio.gather(
        *(run_episode(client, sid, bodies) for sid, (_, bodies) in zip(session_ids, episodes, strict=True))
    )
    calls, steps = await model_calls(client)
    assert steps - steps_before == 6 * len(EPISODE_LABELS)
    assert calls - calls_before < steps - steps_before, "no model call held steps of two sessions"
    for (grays, _), results in zip(episodes, all_results, strict=True):
        assert_matches_model(results, reference_probabilities(model, grays, EPISODE_LABELS))


async def test_interleaved_batches_share_model_calls_and_keep_their_results(
    client: httpx.AsyncClient, tiny_checkpoint: Path
) -> None:
    """Whole episodes in the batch form, six sessions at once: their steps run in shared model
    calls (one step of each session per call), and each session gets exactly its own answer."""
    model = load_checkpoint(tiny_checkpoint)
    episodes = [episode(seed=200 + i) for i in range(6)]
    session_ids = [await new_session(client) for _ in episodes]
    calls_before, steps_before = await model_calls(client)

    async def run_batch(session_id: str, bodies: list[dict[str, Any]]) -> list[dict]:
        response = await client.post(f"/v1/sessions/{session_id}/steps", json={"steps": bodies})
        assert response.status_code == 200, response.text
        return response.json()["results"]

    all_results = await asyncio.gather(
        *(run_batch(sid, bodies) for sid, (_, bodies) in zip(session_ids, episodes, strict=True))
    )
    calls, steps = await model_calls(client)
    assert steps - steps_before == 6 * len(EPISODE_LABELS)
    assert calls - calls_before >= len(EPISODE_LABELS), "a model call never holds two steps of one session"
    assert calls - calls_before < steps - steps_before, "some model call held steps of several sessions"
    for (grays, _), results in zip(episodes, all_results, strict=True):
        assert [r["step"] for r in results] == list(range(len(EPISODE_LABELS)))
        assert_matches_model(results, reference_probabilities(model, grays, EPISODE_LABELS))


async def test_shipped_model_episode_equals_forward_sequence() -> None:
    grays, bodies = episode(seed=13)
    async with app_client(Settings(store="memory://", access_log=False)) as client:
        session_id = await new_session(client)
        assert (await session_info(client, session_id))["model"] == "default"
        results = await run_episode(client, session_id, bodies)
    assert_matches_model(results, reference_probabilities(load_checkpoint(PRETRAINED_DIR), grays, EPISODE_LABELS))


async def test_lrua_model_episode_equals_forward_sequence(lrua_checkpoint: Path) -> None:
    """A model with least recently used access (more read vectors, usage in the state) serves like any other,
    one step at a time and as one batch."""
    grays, bodies = episode(seed=15)
    async with app_client(Settings(store="memory://", models=[lrua_checkpoint], access_log=False)) as client:
        described = (await client.get("/v1/models")).json()["models"][0]
        assert (described["name"], described["addressing"], described["read_heads"]) == ("lrua", "lrua", 3)
        stepped = await run_episode(client, await new_session(client), bodies)
        batch = await client.post(f"/v1/sessions/{await new_session(client)}/steps", json={"steps": bodies})
    expected = reference_probabilities(load_checkpoint(lrua_checkpoint), grays, EPISODE_LABELS)
    assert_matches_model(stepped, expected)
    assert_matches_model(batch.json()["results"], expected)


async def test_session_on_a_named_model(client: httpx.AsyncClient) -> None:
    grays, bodies = episode(seed=14)
    session_id = await new_session(client, model="default")
    results = await run_episode(client, session_id, bodies[:6])
    expected = reference_probabilities(load_checkpoint(PRETRAINED_DIR), grays[:6], EPISODE_LABELS[:6])
    assert_matches_model(results, expected)


# ----------------------------------------------------------------------------------- labels and slots


async def test_labels_slots_prediction_novelty_accuracy(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    labels: list[Any] = ["1", 1, "1", "x", None, 1, "y", "x", 0, None, "x", "1", 0, "y"]
    slots: dict[tuple[type, Any], int] = {}
    before: list[Any] = [None] * NUM_WAYS
    labeled = correct = 0
    for t, label in enumerate(labels):
        response = await client.post(f"/v1/sessions/{session_id}/steps", json=step_body(random_pixels(t), label))
        assert response.status_code == 200, response.text
        result = response.json()
        assert set(result) == {"step", "probabilities", "labels", "prediction", "predicted_slot", "novelty"}
        probabilities = result["probabilities"]
        assert len(probabilities) == NUM_WAYS and sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert result["predicted_slot"] == int(np.argmax(probabilities))
        top = result["predicted_slot"]
        assert result["prediction"] == before[top]  # the label of the top slot, null when that slot is free
        if before[top] is not None:
            assert type(result["prediction"]) is type(before[top])
        free_mass = sum(p for slot, p in enumerate(probabilities) if before[slot] is None)
        assert result["novelty"] == pytest.approx(free_mass, abs=1e-6)
        if label is not None:
            slot = slots.setdefault(label_key(label), len(slots))  # the i-th distinct label takes slot i
            labeled += 1
            correct += int(top == slot)
        after = [None] * NUM_WAYS
        for (_, value), slot in slots.items():
            after[slot] = value
        assert result["labels"] == after
        assert [type(v) for v in result["labels"]] == [type(v) for v in after]
        before = after
    assert before == ["1", 1, "x", "y", 0]
    info = await session_info(client, session_id)
    assert info["labels"] == before and info["steps"] == len(labels)
    assert info["accuracy"] == pytest.approx(correct / labeled)


async def test_base64_in_either_alphabet_with_or_without_padding_is_the_same_image(client: httpx.AsyncClient) -> None:
    """png and gray8 take standard or URL-safe base64, padding optional; a line break is an image error."""
    gray = np.random.default_rng(11).integers(0, 256, size=(28, 27), dtype=np.uint8)  # 756 bytes: "=" padding
    raw = gray.tobytes()
    standard = base64.b64encode(raw).decode()
    url_safe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert standard != url_safe and ("+" in standard or "/" in standard)
    png = base64.b64decode(png_base64(gray))
    images = [
        {"gray8": standard, "shape": [28, 27]},
        {"gray8": url_safe, "shape": [28, 27]},
        {"png": base64.urlsafe_b64encode(png).decode().rstrip("=")},
        {"pixels": gray.tolist()},
    ]
    answers = []
    for image in images:
        session_id = await new_session(client)
        response = await client.post(f"/v1/sessions/{session_id}/steps", json={"image": image})
        assert response.status_code == 200, response.text
        answers.append(response.json()["probabilities"])
    assert all(answer == answers[0] for answer in answers)
    session_id = await new_session(client)
    broken = standard[:40] + "\n" + standard[40:]
    response = await client.post(
        f"/v1/sessions/{session_id}/steps", json={"image": {"gray8": broken, "shape": [28, 27]}}
    )
    assert_error(response, 422, "invalid_image")
    assert "gray8 is not valid base64 (image.gray8)" in response.json()["error"]["message"]


async def test_too_many_labels(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    labels = ["a", 1, "b", "1", "c"]
    for seed, label in enumerate(labels):
        response = await client.post(f"/v1/sessions/{session_id}/steps", json=step_body(random_pixels(seed), label))
        assert response.status_code == 200
    for label in labels:  # labels in use still fit
        assert (await client.post(f"/v1/sessions/{session_id}/steps", json=step_body([[0]], label))).status_code == 200
    error = assert_error(
        await client.post(f"/v1/sessions/{session_id}/steps", json=step_body([[0]], "z")), 422, "too_many_labels"
    )
    for label in labels:
        assert repr(label) in error["message"]
    assert "'z'" in error["message"]
    assert error["labels_in_use"] == labels
    info = await session_info(client, session_id)
    assert info["steps"] == 10 and info["labels"] == labels
    response = await client.post(f"/v1/sessions/{session_id}/steps", json=step_body([[0]]))  # a query still works
    assert response.status_code == 200 and response.json()["step"] == 10


async def test_batch_that_overflows_the_labels_applies_nothing(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    assert (await client.post(f"/v1/sessions/{session_id}/steps", json=step_body([[0]], "a"))).status_code == 200
    batch = {"steps": [step_body(random_pixels(i), label) for i, label in enumerate(["b", "c", "a", "d", "e", "f"])]}
    error = assert_error(await client.post(f"/v1/sessions/{session_id}/steps", json=batch), 422, "too_many_labels")
    assert "'f'" in error["message"] and error["labels_in_use"] == ["a", "b", "c", "d", "e"]
    info = await session_info(client, session_id)
    assert info["steps"] == 1 and info["labels"] == ["a", None, None, None, None]
    response = await client.post(f"/v1/sessions/{session_id}/steps", json={"steps": batch["steps"][:5]})
    assert response.status_code == 200
    assert [r["step"] for r in response.json()["results"]] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------------- exactly once


async def test_concurrent_steps_on_one_session_lose_and_double_nothing(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    bodies = [step_body(random_pixels(i, 8, 8)) for i in range(50)]
    responses = await asyncio.gather(*(client.post(f"/v1/sessions/{session_id}/steps", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * 50
    assert sorted(r.json()["step"] for r in responses) == list(range(50))
    assert (await session_info(client, session_id))["steps"] == 50


async def test_concurrent_batches_on_one_session(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    batch = {"steps": [step_body([[0, 255]]), step_body([[255, 0]])]}
    responses = await asyncio.gather(*(client.post(f"/v1/sessions/{session_id}/steps", json=batch) for _ in range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    steps = sorted(step for r in responses for step in (x["step"] for x in r.json()["results"]))
    assert steps == list(range(40))
    for response in responses:  # a batch's steps are consecutive: nothing came between them
        first, second = (x["step"] for x in response.json()["results"])
        assert second == first + 1 and first % 2 == 0
    assert (await session_info(client, session_id))["steps"] == 40


async def test_concurrent_retries_of_one_step_apply_it_once(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    body = step_body(random_pixels(3), "a", step=0)
    responses = await asyncio.gather(*(client.post(f"/v1/sessions/{session_id}/steps", json=body) for _ in range(50)))
    applied = [r.json() for r in responses if r.status_code == 200]
    assert applied, [r.text for r in responses]
    assert all(result == applied[0] for result in applied)  # all the stored result of the one applied step
    assert applied[0]["step"] == 0
    for response in responses:
        if response.status_code != 200:
            assert assert_error(response, 409, "step_conflict")["steps"] == 1
    info = await session_info(client, session_id)
    assert info["steps"] == 1 and info["labels"] == ["a", None, None, None, None]


async def test_concurrent_different_steps_at_one_index(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    bodies = [step_body(random_pixels(i, 4, 4), step=0) for i in range(20)]
    responses = await asyncio.gather(*(client.post(f"/v1/sessions/{session_id}/steps", json=b) for b in bodies))
    assert sorted(r.status_code for r in responses) == [200] + [409] * 19
    for response in responses:
        if response.status_code == 409:
            error = assert_error(response, 409, "step_conflict")
            assert error["steps"] == 1
    assert (await session_info(client, session_id))["steps"] == 1


# ----------------------------------------------------------------------------------- retries


async def test_retry_of_the_last_step_returns_the_stored_result(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    url = f"/v1/sessions/{session_id}/steps"
    body0 = step_body(random_pixels(1), "a", step=0)
    first = await client.post(url, json=body0)
    assert first.status_code == 200 and first.json()["step"] == 0
    again = await client.post(url, json=body0)
    assert again.status_code == 200 and again.json() == first.json()
    assert (await session_info(client, session_id))["steps"] == 1

    body1 = step_body(random_pixels(2), "b", step=1)
    second = await client.post(url, json=body1)
    assert second.status_code == 200 and second.json()["step"] == 1
    assert (await client.post(url, json=body1)).json() == second.json()
    # Only the last request is kept: a retry of an older one is a conflict.
    assert assert_error(await client.post(url, json=body0), 409, "step_conflict")["steps"] == 2
    # The same step index with other content is no retry.
    for other in (step_body(random_pixels(2), "c", step=1), step_body(random_pixels(9), "b", step=1)):
        error = assert_error(await client.post(url, json=other), 409, "step_conflict")
        assert error["steps"] == 2 and "2" in error["message"]
    # A step from the future is a conflict too.
    assert assert_error(await client.post(url, json=step_body([[0]], step=5)), 409, "step_conflict")["steps"] == 2
    info = await session_info(client, session_id)
    assert info["steps"] == 2 and info["labels"] == ["a", "b", None, None, None]
    # Without "step", the same content is a new step.
    third = await client.post(url, json=step_body(random_pixels(2), "b"))
    assert third.status_code == 200 and third.json()["step"] == 2


async def test_retry_of_a_batch(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    url = f"/v1/sessions/{session_id}/steps"
    batch = {"steps": [step_body(random_pixels(i), label, step=i) for i, label in enumerate(["a", None, "b"])]}
    first = await client.post(url, json=batch)
    assert first.status_code == 200
    assert [r["step"] for r in first.json()["results"]] == [0, 1, 2]
    again = await client.post(url, json=batch)
    assert again.status_code == 200 and again.json() == first.json()
    assert (await session_info(client, session_id))["steps"] == 3
    only_first_index = {"steps": [batch["steps"][0], {k: v for k, v in batch["steps"][1].items() if k != "step"}]}
    only_first_index["steps"].append({k: v for k, v in batch["steps"][2].items() if k != "step"})
    assert (await client.post(url, json=only_first_index)).json() == first.json()
    shorter = {"steps": batch["steps"][:2]}
    assert assert_error(await client.post(url, json=shorter), 409, "step_conflict")["steps"] == 3
    gap = {"steps": [step_body([[0]], step=3), step_body([[0]], step=5)]}
    assert_error(await client.post(url, json=gap), 422, "invalid_request")
    assert (await session_info(client, session_id))["steps"] == 3


async def test_retry_after_reset_is_a_new_step(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    url = f"/v1/sessions/{session_id}/steps"
    body = step_body(random_pixels(4), "a", step=0)
    first = (await client.post(url, json=body)).json()
    assert (await client.post(f"/v1/sessions/{session_id}/reset")).status_code == 200
    response = await client.post(url, json=body)  # the same content at step 0 of the fresh episode: applied again
    assert response.status_code == 200
    again = response.json()
    assert again["probabilities"] == pytest.approx(first["probabilities"], abs=1e-6)
    assert {k: v for k, v in again.items() if k != "probabilities"} == {
        k: v for k, v in first.items() if k != "probabilities"
    }
    assert (await session_info(client, session_id))["steps"] == 1


async def test_models_of_different_image_sizes_each_get_their_own_preprocessing(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """With models of different input sizes the route reads the session first to learn its size."""
    from models import NTM, NTMConfig, save_checkpoint

    small_dir = tmp_path / "small"
    torch.manual_seed(9)
    save_checkpoint(NTM(NTMConfig(image_size=20, memory_slots=8, memory_width=4, hidden_size=8)), small_dir)
    grays, bodies = episode(seed=21)
    settings = Settings(models=[tiny_checkpoint, small_dir], access_log=False)
    async with app_client(settings) as client:
        for name in ("tiny", "small"):
            created = await client.post("/v1/sessions", json={"model": name})
            results = await run_episode(client, created.json()["session_id"], bodies)
            model = load_checkpoint(tiny_checkpoint if name == "tiny" else small_dir)
            assert_matches_model(results, reference_probabilities(model, grays, EPISODE_LABELS))


async def test_a_label_of_the_longest_length_is_kept_and_echoed(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    label = "é" * 256  # characters, not bytes
    response = await client.post(f"/v1/sessions/{session_id}/steps", json=step_body(random_pixels(0), label))
    assert response.status_code == 200 and response.json()["labels"][0] == label
    assert (await session_info(client, session_id))["labels"][0] == label


async def test_the_longest_ttl_is_a_setting(tiny_checkpoint: Path) -> None:
    ten_days = 10 * 24 * 3600.0
    async with app_client(api_settings(tiny_checkpoint, max_session_ttl_seconds=30 * 24 * 3600.0)) as client:
        response = await client.post("/v1/sessions", json={"ttl_seconds": ten_days})
        assert response.status_code == 201, response.text
    async with app_client(
        api_settings(tiny_checkpoint, session_ttl_seconds=30.0, max_session_ttl_seconds=60.0)
    ) as client:
        error = assert_error(await client.post("/v1/sessions", json={"ttl_seconds": 61}), 422, "invalid_request")
        assert "60" in error["message"]
