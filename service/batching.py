"""The micro-batcher: pending steps of different sessions go through the model together.

Requests put (state, image, label input) on a queue and await a future. One worker thread
takes what is queued (at most ``max_batch``), stacks the states, runs ``NTM.step`` once under
``torch.inference_mode`` and hands each session its probabilities and new state.

A lone client adds no latency: when the previous batch held a single step, the worker runs
what it has at once. Under concurrent load (the previous batch held several), it waits up to
``max_wait`` for the batch to fill. The API holds a per-session lock while a step is pending,
so a batch never holds two steps of one session.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models import NTM, PackedState


@dataclass
class _Pending:
    state: PackedState
    image: torch.Tensor  # [S, S]
    label_slot: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new steps."""


class MicroBatcher:
    """Runs session steps of one model in batches on a dedicated worker thread."""

    def __init__(
        self,
        model: NTM,
        max_batch: int = 256,
        max_wait: float = 0.002,
        observe: Callable[[int, float, float], None] | None = None,
        name: str = "model",
    ) -> None:
        self.model = model
        self.max_batch, self.max_wait = max_batch, max_wait
        self._observe = observe  # (batch size, longest queue wait, compute seconds)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    async def step(self, state: PackedState, image: torch.Tensor, label_slot: int) -> tuple[torch.Tensor, PackedState]:
        """One step of one session: (probabilities [num_ways], new state of batch 1)."""
        if self._closed:
            raise BatcherClosed("the model is shutting down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Pending(state, image, label_slot, future, loop, time.perf_counter()))
        return await future

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=30)

    def _collect(self, first: _Pending, busy: bool) -> tuple[list[_Pending], bool]:
        batch, stop = [first], False
        deadline = time.perf_counter() + (self.max_wait if busy else 0.0)
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        # Sharp addressing weights underflow into denormals, whose arithmetic is ~4x slower. The
        # flag is per thread (x86 MXCSR), so it is set here, for the model's thread only.
        torch.set_flush_denormal(True)
        busy, stop = False, False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first, busy)
            busy = len(batch) > 1
            self._compute(batch)
        self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.loop.call_soon_threadsafe(_resolve, item.future, BatcherClosed("the model is shutting down"))

    def _compute(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        wait = started - min(p.enqueued for p in batch)
        try:
            with torch.inference_mode():
                device = self.model.device
                states = PackedState.stack([p.state for p in batch]).to(device)
                images = torch.stack([p.image for p in batch]).to(device)
                labels = self.model.label_input(torch.tensor([p.label_slot for p in batch], device=device))
                logits, new_states = self.model.step(states, images, labels)
                probabilities = torch.softmax(logits.float(), dim=-1).cpu()
                parts = new_states.sessions()
            results: list[tuple[torch.Tensor, PackedState] | BaseException] = list(
                zip(probabilities, parts, strict=True)
            )
        except Exception as exc:  # a failing batch fails its requests, never the worker
            results = [exc] * len(batch)
        if self._observe is not None:
            self._observe(len(batch), wait, time.perf_counter() - started)
        # One wake-up per event loop for the whole batch, not one per session.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, object]]] = {}
        for pending, result in zip(batch, results, strict=True):
            by_loop.setdefault(pending.loop, []).append((pending.future, result))
        for loop, outcomes in by_loop.items():
            loop.call_soon_threadsafe(_resolve_all, outcomes)


def _resolve_all(outcomes: list[tuple[asyncio.Future, object]]) -> None:
    for future, result in outcomes:
        _resolve(future, result)


def _resolve(future: asyncio.Future, result: object) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
