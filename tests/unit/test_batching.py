"""The micro-batcher on a real (small) NTM: jobs of several steps, shared model calls, shutdown, failures."""

from __future__ import annotations

import asyncio

import pytest
import torch

from models import NTM, NTMConfig
from service.batching import BatcherClosed, MicroBatcher

pytestmark = pytest.mark.anyio
CONFIG = NTMConfig(memory_slots=16, memory_width=8, hidden_size=12)


@pytest.fixture
def model() -> NTM:
    torch.manual_seed(3)
    return NTM(CONFIG).eval()


def reference(model: NTM, images: list[torch.Tensor], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of T plain ``model.step`` calls from the initial state, and the final packed state."""
    with torch.inference_mode():
        state, probabilities = model.initial_state(1), []
        for image, slot in zip(images, slots, strict=True):
            logits, state = model.step(state, image[None], model.label_input(torch.tensor([slot])))
            probabilities.append(torch.softmax(logits[0], -1))
    return torch.stack(probabilities), state.sessions()[0].data


def job(seed: int, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(28, 28, generator=generator) for _ in range(steps)]
    slots = [-1] + [int(s) for s in torch.randint(-1, 5, (steps - 1,), generator=generator)]
    return images, slots


async def test_jobs_of_different_lengths_share_model_calls_and_match_plain_steps(model: NTM) -> None:
    calls: list[int] = []
    batcher = MicroBatcher(model, max_batch=8, max_wait=0.002, observe=lambda size, wait, seconds: calls.append(size))
    initial = model.initial_state(1).sessions()[0]
    jobs = [job(seed, steps) for seed, steps in enumerate([1, 7, 3, 12, 5, 9])]
    try:
        results = await asyncio.gather(*(batcher.run(initial, images, slots) for images, slots in jobs))
    finally:
        batcher.close()
    for (images, slots), (probabilities, state) in zip(jobs, results, strict=True):
        expected_probabilities, expected_state = reference(model, images, slots)
        assert probabilities.shape == (len(images), CONFIG.num_ways)
        assert torch.allclose(probabilities, expected_probabilities, atol=1e-6)
        assert torch.allclose(state.data, expected_state, atol=1e-6)
    assert sum(calls) == sum(len(images) for images, _ in jobs)
    assert len(calls) >= 12, "one step of a session per model call: the longest job needs 12 calls"
    assert len(calls) < sum(calls), "jobs shared model calls"


async def test_step_is_a_job_of_one(model: NTM) -> None:
    batcher = MicroBatcher(model)
    images, slots = job(7, 1)
    try:
        probabilities, state = await batcher.step(model.initial_state(1).sessions()[0], images[0], slots[0])
    finally:
        batcher.close()
    expected_probabilities, expected_state = reference(model, images, slots)
    assert torch.allclose(probabilities, expected_probabilities[0], atol=1e-6)
    assert torch.allclose(state.data, expected_state, atol=1e-6)


async def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on(model: NTM) -> None:
    batcher = MicroBatcher(model, max_wait=0.0)
    initial = model.initial_state(1).sessions()[0]
    try:
        with pytest.raises(RuntimeError):
            await batcher.run(initial, [torch.rand(5, 5)], [-1])  # not the model's image size
        images, slots = job(1, 3)
        probabilities, _ = await batcher.run(initial, images, slots)
        assert torch.allclose(probabilities, reference(model, images, slots)[0], atol=1e-6)
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
