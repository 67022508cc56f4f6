"""The micro-batcher: pending steps of different sessions go through the model together.

A request hands the batcher a job: one session's state and the T steps to run from it (the
images and each step's label input, all known before the model runs, since a step's label
input is the previous step's label slot). One worker thread keeps a set of active jobs, at
most ``max_batch``. When jobs join the set, the part of their steps that does not depend on
the recurrence (the images' ``ink``, the last step of the shared preprocessing, then the
encoder and the controller's input projection, ``NTM.precompute_inputs``) runs once over all
their images together; each model call then runs only the recurrent part
(``NTM.recurrent_step``) of the next step of every active job, stacked into one batch under
``torch.inference_mode``. A job leaves the set when its last step is done, and only then is
its request woken, with every step's probabilities and the final state. So a request of T
steps costs the event loop one wake-up, not T, and a batch never holds two steps of one
session.

A prediction (``predict``: images classified against a session's state, which stays as it
was) is a job too, of one row per image, all from that one state. It runs in the first model
call it joins, beside the steps and predictions of other sessions, and the new states of its
rows are dropped: no state is packed or copied back for it, and nothing of it is carried.

A lone client adds no latency: when the previous model call held a single step, the worker
runs what it has at once. Under concurrent load it waits up to ``max_wait`` for new jobs
before a batch of fresh jobs, and never while jobs are under way.

The recurrent step runs through a runner (``models.inference``): eager, or with ``compile``
TorchInductor's graphs of the step (one of them takes any batch size), compiled by the worker
thread before it takes its first job (``ready`` is set then). When compiling fails, the worker
logs one line and runs eagerly. A call that is one job of one image, none under way (a lone
client's step or one-image prediction), runs as one whole step (``EagerRunner.step``). With
``package``, calls of one row run through AOTInductor packages (``models.aot``: the whole step
for that call, the recurrent step for a lone session's batch form), which a child process
finds or builds once the graphs are warm and the worker loads when the child is done, between
two model calls (``package_ready`` is set then); until then one row runs eagerly.

With a tracer (``service.tracing``), each job notes the wall-clock start, end and batch rows of
every model call it takes part in, and its request, once woken, turns them into its
``batcher.queue_wait`` and ``model.call`` spans.

The worker thread can run at a lower priority than the event loop (``nice``, Linux only).
Where the two share a core, the loop then answers, parses and queues what has arrived
before the model takes the core back, so model calls run fuller batches; and when the loop
releases the GIL for a moment (Pillow decoding a PNG), the model thread, woken to take it,
no longer preempts the loop: 2.3 context switches a PNG step became 0.4. Measured side by
side in three runs, 64 sessions, the server on one core (nice 10 against 0): PNG steps
+15-31% a second, PNG batch form +17-29%, ``gray8`` steps +8-25%, ``gray8`` batch form -5%
to +23%, pixel arrays -5% to +6%. A model thread with a core of its own is not slowed:
niceness only matters when threads compete for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from models import NTM, NTMState, PackedState, aot
from models.data.preprocess import ink
from models.inference import CompiledRunner, EagerRunner
from service.logs import log

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

MAX_PRECOMPUTE_CHUNK = 256  # images per encoder call, at most
ACTIVATION_BUDGET = 16 * 2**20  # bytes of an encoder call's largest activation, so that it stays in cache


def precompute_chunk(model: NTM) -> int:
    """Images per encoder call: the largest power of two (up to 256) whose first activation fits the budget.

    Measured per image, one thread pair: the Conv-4 encoder (200 KB of activations an image
    after its first convolution) 106 us in calls of 64 against 185 us in calls of 256 (51 MB);
    the conv encoder (12 KB an image) is fastest in calls of 256 (7.2 against 10.6 us at 64).
    """
    cfg = model.config
    if cfg.encoder == "conv4":
        per_image = cfg.conv_channels[0] * cfg.image_size**2 * 4
    elif cfg.encoder == "conv":
        per_image = cfg.conv_channels[0] * ((cfg.image_size + 1) // 2) ** 2 * 4
    else:
        per_image = cfg.image_size**2 * 4
    chunk = MAX_PRECOMPUTE_CHUNK
    while chunk > 1 and chunk * per_image > ACTIVATION_BUDGET:
        chunk //= 2
    return chunk


@dataclass
class _Job:
    state: PackedState  # the session's state when queued; the batcher carries it on from there
    images: list[np.ndarray]  # T images: gray levels at the model's size [S, S] (``fit_size``)
    label_slots: list[int]  # T label inputs: the slot of the previous step's label, -1 for none
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    inputs: tuple[torch.Tensor, ...] = ()  # T controller pre-activations [4*hidden], made when the job joins
    probabilities: list[list[float]] = field(default_factory=list)
    predict: bool = False  # every image is a next step from ``state``: T rows of one call, no state back
    calls: list[tuple[int, int, int]] | None = None  # traced jobs: (start ns, end ns, batch rows) of each model call

    @property
    def rows(self) -> int:
        """Batch rows the job takes in its next model call."""
        return len(self.images) if self.predict else 1

    @property
    def done(self) -> bool:
        return len(self.probabilities) == len(self.images)


@dataclass
class _Packages:
    """The one-row packages ready to load, handed to the model thread through the job queue."""

    paths: dict[str, Path]  # by ``aot.PARTS`` name
    seconds: float  # from starting the child to its end
    built: bool  # False: all were in the cache


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
        nice: int = 0,
        tracer: Tracer | None = None,
        compile: bool = False,
        package: bool = False,
    ) -> None:
        self.model, self.name, self.tracer = model, name, tracer
        self.runner: EagerRunner = EagerRunner(model)
        self.chunk = precompute_chunk(model)
        self.compile, self.with_package = compile, package
        self.ready = threading.Event()  # set once the runner is warm (at once when eager)
        self.package_ready = threading.Event()  # set once the one-row packages serve (see _adopt)
        self.warm_up_seconds: float | None = None
        self.max_batch, self.max_wait, self.nice = max_batch, max_wait, nice
        self._observe = observe  # (batch rows, longest queue wait, compute seconds)
        self._queue: queue.SimpleQueue[_Job | _Packages | None] = queue.SimpleQueue()
        self._builder: aot.PackageBuild | None = None  # the child finding or building the one-row packages
        self._carry: NTMState | None = None  # the states of the jobs under way (see _compute)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    async def run(
        self, state: PackedState, images: list[np.ndarray], label_slots: list[int]
    ) -> tuple[list[list[float]], PackedState]:
        """T successive steps of one session: (T lists of num_ways probabilities, the state after the last)."""
        if len(images) != len(label_slots) or not images:
            raise ValueError("a job needs one label input per image, and at least one image")
        if self._closed:
            raise BatcherClosed("the model is shutting down")
        loop = asyncio.get_running_loop()
        job = _Job(state, images, label_slots, loop.create_future(), loop, time.perf_counter())
        return await self._submit(job)

    async def predict(self, state: PackedState, images: list[np.ndarray], label_slot: int) -> list[list[float]]:
        """Each image as the next step from ``state`` with label input ``label_slot``: its probabilities.

        The images are rows of one model call, beside whatever steps and predictions of other
        sessions run then; their new states are thrown away, so nothing is packed or copied back.
        """
        if not images:
            raise ValueError("a prediction needs at least one image")
        if self._closed:
            raise BatcherClosed("the model is shutting down")
        loop = asyncio.get_running_loop()
        job = _Job(
            state, images, [label_slot] * len(images), loop.create_future(), loop, time.perf_counter(), predict=True
        )
        return await self._submit(job)

    async def _submit(self, job: _Job):
        """Queue ``job`` and wait for its outcome; with a tracer, its queue wait and model calls become spans."""
        if self.tracer is None:
            self._queue.put(job)
            return await job.future
        job.calls, queued = [], time.time_ns()
        self._queue.put(job)
        try:
            return await job.future
        finally:
            self._trace(job, queued)

    def _trace(self, job: _Job, queued: int) -> None:
        """The job's ``batcher.queue_wait`` and ``model.call`` spans, children of the request's current span."""
        calls = job.calls or []
        wait = self.tracer.start_span("batcher.queue_wait", start_time=queued, attributes={"ntm.model": self.name})
        wait.end(end_time=calls[0][0] if calls else time.time_ns())
        for start, end, rows in calls:
            attributes = {"ntm.model": self.name, "ntm.batch_size": rows, "ntm.job_rows": job.rows}
            self.tracer.start_span("model.call", start_time=start, attributes=attributes).end(end_time=end)

    async def step(self, state: PackedState, image: np.ndarray, label_slot: int) -> tuple[list[float], PackedState]:
        """One step of one session: (num_ways probabilities, new state)."""
        probabilities, state = await self.run(state, [image], [label_slot])
        return probabilities[0], state

    def close(self) -> None:
        """Stop taking jobs, finish every job already queued or under way, then stop the worker.

        Blocks until then (at most 30 s): call it off the event loop."""
        if not self._closed:
            self._closed = True
            if self._builder is not None:
                self._builder.cancel()
            self._queue.put(None)
            self._thread.join(timeout=30)

    def _admit(self, active: list[_Job], wait: bool) -> bool:
        """Move queued jobs into ``active`` (up to ``max_batch``); True once the close sentinel is seen."""
        deadline = time.perf_counter() + (self.max_wait if wait else 0.0)
        rows = sum(job.rows for job in active)
        while rows < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            if isinstance(job, _Packages):
                self._adopt(job)
                continue
            active.append(job)
            rows += job.rows
        return False

    def _run(self) -> None:
        # Sharp addressing weights underflow into denormals, whose arithmetic is ~4x slower. The
        # flag is per thread (x86 MXCSR), so it is set here, for the model's thread only.
        torch.set_flush_denormal(True)
        lower_thread_priority(self.nice)
        self._warm_up()
        active: list[_Job] = []
        busy = closing = False
        while active or not closing:
            if not active:
                first = self._queue.get()
                if first is None:
                    break
                if isinstance(first, _Packages):
                    self._adopt(first)
                    continue
                active.append(first)
                closing = self._admit(active, wait=busy)
            elif not closing:
                closing = self._admit(active, wait=False)
            busy = len(active) > 1
            active = self._compute(active)
        self._fail_leftovers()

    def _warm_up(self) -> None:
        """With ``compile``, compile the step's graphs here, on the thread that will run them."""
        started = time.perf_counter()
        if self.compile:
            try:
                runner = CompiledRunner(self.model, self.max_batch)
                runner.warm_up()
                self.runner = runner
            except Exception as exc:  # no compiler, an unsupported operator: serve eagerly
                log.warning(
                    "compiling the model failed; it runs eagerly",
                    extra={"fields": {"model": self.name, "error": _describe(exc)}},
                )
            else:
                if self.with_package and not runner.cuda:
                    self._prepare_package()
        self.warm_up_seconds = time.perf_counter() - started
        if self.compile:
            log.info(
                "model warm",
                extra={
                    "fields": {
                        "model": self.name,
                        "runner": self.runner.kind,
                        "seconds": round(self.warm_up_seconds, 1),
                    }
                },
            )
        self.ready.set()

    def _prepare_package(self) -> None:
        """Start the child that finds the runner's one-row packages (``models.aot``) in the cache, or builds them.

        The server does not wait for it: a build takes 10-30 s a package, and even cached
        packages take the child a few seconds (torch's import, the exports). Until they come,
        one row runs eagerly.
        """
        if self._closed:
            return
        try:
            self._builder = aot.PackageBuild(self.model)
        except Exception as exc:  # a temporary folder that cannot be written, no interpreter to start
            self._no_package(exc)
            return
        if self._closed:  # ``close`` ran meanwhile, and may have seen no builder to stop
            self._builder.cancel()
        threading.Thread(
            target=self._await_build, args=(self._builder,), name=f"package-{self.name}", daemon=True
        ).start()

    def _await_build(self, build: aot.PackageBuild) -> None:
        """Wait for the child, then hand its packages to the model thread (through the job queue)."""
        started = time.perf_counter()
        try:
            found = build.wait()
        except (RuntimeError, ValueError) as exc:
            if not self._closed:
                self._no_package(exc)
            return
        paths = {part: path for part, (path, _) in found.items()}
        self._queue.put(_Packages(paths, time.perf_counter() - started, any(b for _, b in found.values())))

    def _adopt(self, packages: _Packages) -> None:
        """On the model thread: load and check the packages, and serve one-row calls through them from the next call."""
        assert isinstance(self.runner, CompiledRunner)
        try:
            self.runner.use_packages(packages.paths)
        except Exception as exc:  # a package that does not load, or differs from eager
            self._no_package(exc)
            return
        self.runner.on_package_failure = self._package_failed
        self.package_ready.set()
        fields = {"model": self.name, "built": packages.built, "seconds": round(packages.seconds, 1)}
        log.info("one-row packages loaded", extra={"fields": fields})

    def _package_failed(self, exc: Exception) -> None:
        """On the model thread: a loaded package raised; the runner has dropped them, and the call ran eagerly."""
        self.package_ready.clear()
        self._no_package(exc)

    def _no_package(self, exc: Exception) -> None:
        log.warning(
            "the one-row packages are not used; one row runs eagerly",
            extra={"fields": {"model": self.name, "error": _describe(exc)}},
        )

    def _fail_leftovers(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Job):
                _wake(job.loop, _resolve, job.future, BatcherClosed("the model is shutting down"))

    def _compute(self, active: list[_Job]) -> list[_Job]:
        """One model call over the next step of every active job; returns the jobs still under way.

        The jobs still under way keep their states, in order, as the model's output state
        (``_carry``) between calls: the next call adds only the jobs that joined since, and a
        call that no job joins or leaves copies no state at all. A job's own state is packed
        into a vector of its own once, when it finishes. A prediction job joins with one row
        per image, all from its one state, and finishes in the call it joins: its rows' new
        states are dropped.
        """
        started, started_ns = time.perf_counter(), time.time_ns() if self.tracer is not None else 0
        carried = 0 if self._carry is None else self._carry.batch_size
        joined = active[carried:]
        wait = started - min(job.enqueued for job in joined) if joined else 0.0
        finished: list[tuple[_Job, object]] = []
        try:
            with torch.inference_mode():
                device = self.model.device
                layout = active[0].state.layout
                states = self._carry
                if joined:
                    if any(job.state.layout != layout for job in joined):
                        raise ValueError("cannot batch states of different layouts")
                    # One slab of the joining states, gathered on the host and moved in one copy.
                    rows = torch.cat([job.state.data.expand(job.rows, -1) for job in joined])
                    incoming = NTMState.unpack(rows.to(device, non_blocking=True), layout)
                    states = incoming if states is None else NTMState.stack([states, incoming])
                if len(active) == len(joined) == 1 and len(active[0].images) == 1:
                    # A lone one-image job: the whole step in one runner call (the whole step's package).
                    lone = active[0]
                    logits, new_states = self.runner.step(states, *self._model_inputs(lone.images, lone.label_slots))
                else:
                    if joined:
                        self._precompute(joined)
                    inputs = torch.stack(
                        [
                            row
                            for job in active
                            for row in (job.inputs if job.predict else (job.inputs[len(job.probabilities)],))
                        ]
                    )
                    logits, new_states = self.runner.recurrent_step(inputs, states)
                probabilities = torch.softmax(logits.float(), dim=-1).tolist()
            remaining, keep, done, row = [], [], [], 0
            for job in active:
                job.probabilities.extend(probabilities[row : row + job.rows])
                if job.predict:
                    finished.append((job, job.probabilities))
                elif job.done:
                    done.append((job, row))
                else:
                    remaining.append(job)
                    keep.append(row)
                row += job.rows
            if done:  # each session keeps a copy of its own in host memory, never a view into the batch
                packed = new_states.select([index for _, index in done]).pack().to("cpu")
                for (job, _), data in zip(done, packed.unbind(0), strict=True):
                    finished.append((job, (job.probabilities, PackedState(data.clone(), layout))))
            unchanged = len(keep) == new_states.batch_size
            self._carry = None if not keep else new_states if unchanged else new_states.select(keep)
        except Exception as exc:  # a failing batch fails its requests, never the worker
            finished, remaining, self._carry = [(job, exc) for job in active], [], None
        batch_rows = sum(job.rows for job in active)
        if self.tracer is not None:
            call = (started_ns, time.time_ns(), batch_rows)
            for job in active:
                if job.calls is not None:
                    job.calls.append(call)
        if self._observe is not None:
            try:
                self._observe(batch_rows, wait, time.perf_counter() - started)
            except Exception:  # metrics never stop the model
                log.exception("batch observer failed")
        # One wake-up per event loop for all the jobs finished here, not one per session.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, object]]] = {}
        for job, result in finished:
            by_loop.setdefault(job.loop, []).append((job.future, result))
        for loop, outcomes in by_loop.items():
            _wake(loop, _resolve_all, outcomes)
        return remaining

    def _model_inputs(self, images: list[np.ndarray], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [N, S, S] inked (``ink``) and label inputs [N, K], on the model's device.

        The images are all [S, S] (``fit_size``), so ``np.array`` stacks them in C: ``np.stack``
        makes a view of each first (58 against 213 us for 256 images).
        """
        device = self.model.device
        return (
            torch.from_numpy(ink(np.array(images))).to(device),
            self.model.label_input(torch.from_numpy(np.array(slots)).to(device)),
        )

    def _precompute(self, joined: list[_Job]) -> None:
        """Every step's input part of the jobs that join (``NTM.precompute_inputs``), in few encoder calls."""
        images = [image for job in joined for image in job.images]
        slots = [slot for job in joined for slot in job.label_slots]
        chunks = [
            self.model.precompute_inputs(
                *self._model_inputs(images[start : start + self.chunk], slots[start : start + self.chunk])
            )
            for start in range(0, len(images), self.chunk)
        ]
        rows = (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).unbind(0)
        start = 0
        for job in joined:
            job.inputs = rows[start : start + len(job.images)]
            start += len(job.images)


def lower_thread_priority(nice: int) -> None:
    """Add ``nice`` to the calling thread's niceness (Linux, where a thread ID names one thread); else nothing."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except OSError:
        log.warning("could not lower the model thread's priority", exc_info=True)


def _describe(exc: Exception) -> str:
    """An exception as a log field: its type and message, cut to 500 characters."""
    return f"{type(exc).__name__}: {exc}"[:500]


def _wake(loop: asyncio.AbstractEventLoop, callback: Callable, *args: object) -> None:
    """Run ``callback`` on ``loop``; a loop closed since (its requests gone with it) is skipped."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


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
