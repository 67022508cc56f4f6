"""The micro-batcher on a real (small) NTM: jobs of several steps, shared model calls, shutdown, failures."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import numpy as np
import pytest
import torch

from models import NTM, NTMConfig, PackedState
from models.data.preprocess import preprocess
from service.batching import BatcherClosed, MicroBatcher

pytestmark = pytest.mark.anyio
CONFIG = NTMConfig(memory_slots=16, memory_width=8, hidden_size=12)


@pytest.fixture
def model() -> NTM:
    torch.manual_seed(3)
    return NTM(CONFIG).eval()


def reference(model: NTM, images: list[np.ndarray], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of T plain ``model.step`` calls on the preprocessed images, and the final packed state."""
    with torch.inference_mode():
        state, probabilities = model.initial_state(1), []
        for image, slot in zip(images, slots, strict=True):
            pixels = torch.from_numpy(preprocess(image, CONFIG.image_size))[None]
            logits, state = model.step(state, pixels, model.label_input(torch.tensor([slot])))
            probabilities.append(torch.softmax(logits[0], -1))
    return torch.stack(probabilities), state.sessions()[0].data


def job(seed: int, steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Gray levels at the model's size, as the service hands them over: 8-bit (gray8, PNG) and float (pixels) mixed."""
    rng = np.random.default_rng(seed)
    images = [
        rng.integers(0, 256, (28, 28), dtype=np.uint8) if t % 2 else rng.uniform(0, 255, (28, 28)).astype(np.float32)
        for t in range(steps)
    ]
    slots = [-1] + [int(s) for s in rng.integers(-1, 5, steps - 1)]
    return images, slots


async def run_jobs(model: NTM, max_batch: int, lengths: list[int]) -> list[int]:
    """Jobs of ``lengths`` steps, all at once, through a batcher of ``max_batch``: each matches its plain
    steps; returns the size of every model call."""
    calls: list[int] = []
    batcher = MicroBatcher(model, max_batch, max_wait=0.002, observe=lambda size, wait, seconds: calls.append(size))
    initial = model.initial_state(1).sessions()[0]
    jobs = [job(seed, steps) for seed, steps in enumerate(lengths)]
    try:
        results = await asyncio.gather(*(batcher.run(initial, images, slots) for images, slots in jobs))
    finally:
        batcher.close()
    for (images, slots), (rows, state) in zip(jobs, results, strict=True):
        expected_probabilities, expected_state = reference(model, images, slots)
        probabilities = torch.tensor(rows)
        assert probabilities.shape == (len(images), CONFIG.num_ways)
        assert torch.allclose(probabilities, expected_probabilities, atol=1e-6)
        assert torch.allclose(state.data, expected_state, atol=1e-6)
    assert sum(calls) == sum(lengths), "every step went through the model once"
    return calls


async def test_jobs_of_different_lengths_share_model_calls_and_match_plain_steps(model: NTM) -> None:
    calls = await run_jobs(model, 8, [1, 7, 3, 12, 5, 9])
    assert len(calls) >= 12, "one step of a session per model call: the longest job needs 12 calls"
    assert len(calls) < sum(calls), "jobs shared model calls"


async def test_no_model_call_holds_more_than_max_batch_sessions(model: NTM) -> None:
    """Jobs past ``max_batch`` wait their turn, then join as others finish: every answer is still exact."""
    assert max(await run_jobs(model, 3, [4, 2, 6, 1, 3, 5, 2])) == 3


async def test_step_is_a_job_of_one(model: NTM) -> None:
    batcher = MicroBatcher(model)
    images, slots = job(7, 1)
    try:
        probabilities, state = await batcher.step(model.initial_state(1).sessions()[0], images[0], slots[0])
    finally:
        batcher.close()
    expected_probabilities, expected_state = reference(model, images, slots)
    assert torch.allclose(torch.tensor(probabilities), expected_probabilities[0], atol=1e-6)
    assert torch.allclose(state.data, expected_state, atol=1e-6)


async def test_predictions_are_rows_of_the_steps_model_calls_and_leave_the_state_alone(model: NTM) -> None:
    """Two predictions against one taught state run beside another session's steps: each image gets what a
    label-less step from that state gives, the steps are exact, and the state handed in is unchanged."""
    taught_images, taught_slots = job(11, 4)
    _, taught = reference(model, taught_images, taught_slots)
    taught_state = PackedState(taught.clone(), model.initial_state(1).layout)
    calls: list[int] = []
    batcher = MicroBatcher(model, 64, max_wait=0.01, observe=lambda size, wait, seconds: calls.append(size))
    steps_images, steps_slots = job(12, 6)
    queries = [job(13, 5)[0], job(14, 3)[0]]
    try:
        step_result, *predicted = await asyncio.gather(
            batcher.run(model.initial_state(1).sessions()[0], steps_images, steps_slots),
            *(batcher.predict(taught_state, images, 2) for images in queries),
        )
    finally:
        batcher.close()
    expected, expected_state = reference(model, steps_images, steps_slots)
    assert torch.allclose(torch.tensor(step_result[0]), expected, atol=1e-6)
    assert torch.allclose(step_result[1].data, expected_state, atol=1e-6)
    with torch.inference_mode():
        for images, rows in zip(queries, predicted, strict=True):
            for image, row in zip(images, rows, strict=True):
                pixels = torch.from_numpy(preprocess(image, CONFIG.image_size))[None]
                logits, _ = model.step(taught_state.unpack(), pixels, model.label_input(torch.tensor([2])))
                assert torch.allclose(torch.tensor(row), torch.softmax(logits[0], -1), atol=1e-6)
    assert torch.equal(taught_state.data, taught)
    assert sum(calls) == 6 + 5 + 3, "each image of a prediction is one row of one call"
    assert max(calls) >= 1 + 5, "a prediction's rows ran beside the other session's step"


async def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on(model: NTM) -> None:
    batcher = MicroBatcher(model, max_wait=0.0)
    initial = model.initial_state(1).sessions()[0]
    try:
        with pytest.raises(RuntimeError):
            await batcher.run(initial, [np.zeros((5, 5), np.float32)], [-1])  # not the model's image size
        images, slots = job(1, 3)
        probabilities, _ = await batcher.run(initial, images, slots)
        assert torch.allclose(torch.tensor(probabilities), reference(model, images, slots)[0], atol=1e-6)
    finally:
        batcher.close()


async def test_closed_batcher_refuses_jobs(model: NTM) -> None:
    batcher = MicroBatcher(model)
    batcher.close()
    images, slots = job(2, 2)
    with pytest.raises(BatcherClosed):
        await batcher.run(model.initial_state(1).sessions()[0], images, slots)
    with pytest.raises(ValueError, match="one label input per image"):
        await batcher.run(model.initial_state(1).sessions()[0], images, slots[:1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
async def test_the_model_thread_runs_at_the_niceness_asked_for(model: NTM) -> None:
    """The worker yields a shared core to the event loop (``nice``); the loop's own thread keeps its priority."""
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for nice in (0, 7):
        batcher = MicroBatcher(model, nice=nice)
        try:
            images, slots = job(3, 2)
            await batcher.run(model.initial_state(1).sessions()[0], images, slots)  # the worker is up
            thread = batcher._thread.native_id
            assert os.getpriority(os.PRIO_PROCESS, thread) == min(19, own + nice)
        finally:
            batcher.close()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
