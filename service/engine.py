"""Session semantics shared by every API: create, step (exactly once), predict (read-only),
snapshot and restore, reset, delete.

Predict, then learn: a step's probabilities are the model's prediction for its image made
before its label is seen; the label reaches the model as the next step's label input.

Exactly once: a replica runs one request of a session at a time (a per-session lock) and
commits the new record with compare-and-set on the record's version, so racing requests or
replicas never both apply a step. A request may name the step index it expects: a retry of
the session's last request with the same content gets that request's stored result; any
other mismatch is a 409 with the current step count.

Read-only: a prediction runs each image as the session's next, label-less step in the same
batcher, and throws the new state away. It takes no lock and commits nothing, so predictions
run in parallel with each other and never block, reorder or double a step.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from service.batching import BatcherClosed
from service.errors import APIError
from service.metrics import Metrics
from service.ratelimit import RateLimits
from service.registry import ModelRegistry, ServedModel
from service.sessions import labels as slots
from service.sessions.codec import RecordFormatError
from service.sessions.snapshot import SnapshotContent, SnapshotError, decode_snapshot, encode_snapshot
from service.sessions.store import OwnerLimit, SessionRecord, SessionStore, StoreFull, StoreUnavailable, new_session_id
from service.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

COMMIT_ATTEMPTS = 64  # compare-and-set retries when other replicas keep winning the race
CONFLICT_BACKOFF_SECONDS = 0.002


@dataclass(frozen=True)
class StepInput:
    """One step after validation: its gray levels at the model's size, the client's label, the expected index."""

    image: np.ndarray
    label: slots.Label | None = None
    step: int | None = None


def unavailable(message: str) -> APIError:
    return APIError(503, "unavailable", message, headers={"Retry-After": "1"})


class SessionEngine:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        store: SessionStore,
        metrics: Metrics,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings, self.registry, self.store, self.metrics = settings, registry, store, metrics
        self.tracer = tracer  # service.tracing: a span per store call when set
        self._store_system = type(store).__name__.removesuffix("Store").lower()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.draining = False
        self.inflight = 0
        key = settings.snapshot_key
        self.snapshot_key = key.get_secret_value().encode() if key is not None else secrets.token_bytes(32)
        self.rate_limits = RateLimits(settings, store, metrics)

    # ------------------------------------------------------------------ helpers

    @asynccontextmanager
    async def _session_lock(self, session_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(session_id, (asyncio.Lock(), 0))
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)

    async def _store_call(self, operation: str, awaitable):
        """Await a store call; an unreachable store is the API's 503. Traced: a ``store.<operation>`` span."""
        try:
            if self.tracer is None:
                return await awaitable
            attributes = {"db.system.name": self._store_system, "db.operation.name": operation}
            with self.tracer.start_as_current_span(f"store.{operation}", attributes=attributes):
                return await awaitable
        except StoreUnavailable:
            raise unavailable("the session store is unavailable; retry shortly") from None

    async def not_ready_reason(self) -> str | None:
        """Why this replica should get no traffic now (None: ready): draining, warming up, or the store unreachable."""
        if self.draining:
            return "the service is shutting down"
        if warming := self.registry.warming_up():
            return f"compiling the model step (warm-up) of {', '.join(warming)}"
        try:
            reachable = await asyncio.wait_for(self.store.ping(), self.settings.redis_timeout_seconds)
        except Exception:
            reachable = False
        return None if reachable else "the session store is unreachable"

    def served(self, name: str | None) -> ServedModel:
        served = self.registry.get(name)
        if served is None:
            raise APIError(404, "model_not_found", f"no model named {name!r}; see GET /v1/models")
        return served

    async def load(self, session_id: str, owner: str = "") -> SessionRecord:
        try:
            record = await self._store_call("get", self.store.get(session_id))
        except RecordFormatError:
            raise APIError(
                409,
                "state_incompatible",
                f"session {session_id!r} was stored in a format this replica cannot read; open a new session",
            ) from None
        if record is None or record.owner != owner:
            raise APIError(404, "session_not_found", f"no live session {session_id!r} (unknown or expired)")
        return record

    def served_for(self, record: SessionRecord) -> ServedModel:
        """The model a stored session needs: the same name and the very weights it was made with."""
        served = self.registry.get(record.model)
        if served is None or served.fingerprint != record.fingerprint:
            raise APIError(
                409,
                "state_incompatible",
                f"session {record.session_id!r} was made by other weights of model {record.model!r} than this replica serves; open a new session",
            )
        return served

    # ------------------------------------------------------------------ operations

    async def create(
        self,
        model: str | None = None,
        ttl_seconds: float | None = None,
        owner: str = "",
        session_id: str | None = None,
        snapshot: bytes | None = None,
        client: str = "",
    ) -> SessionRecord:
        """A new session: a fresh episode of ``model``, or what ``snapshot`` holds (its model, a new ID, this owner).
        ``client``: the caller's address, whom the session-create rate limit counts when there are no API keys."""
        if self.draining:
            raise unavailable("the server is shutting down")
        await self.rate_limits.charge("sessions", owner, client)
        restored = self._restorable(snapshot, model) if snapshot is not None else None
        served = self.served(model if restored is None else restored.model)
        ttl = self.settings.session_ttl_seconds if ttl_seconds is None else ttl_seconds
        if ttl > self.settings.max_session_ttl_seconds:
            raise APIError(
                422, "invalid_request", f"ttl_seconds may be at most {self.settings.max_session_ttl_seconds:g}"
            )
        if ttl < self.settings.min_session_ttl_seconds:
            raise APIError(
                422, "invalid_request", f"ttl_seconds must be at least {self.settings.min_session_ttl_seconds:g}"
            )
        record = SessionRecord(
            session_id=session_id or new_session_id(),
            model=served.name,
            fingerprint=served.fingerprint,
            state=served.initial_state,
            ttl_seconds=ttl,
            expires_at=time.time() + ttl,
            owner=owner,
        )
        if restored is not None:
            record = replace(
                record,
                state=restored.state,
                steps=restored.steps,
                labels=restored.labels,
                pending_slot=restored.pending_slot,
                labeled_steps=restored.labeled_steps,
                correct_steps=restored.correct_steps,
            )
        try:
            await self._store_call(
                "create",
                # owner "" means no API keys are configured: then only the store's own limit applies
                self.store.create(
                    record, self.settings.max_sessions, self.settings.max_sessions_per_key if owner else None
                ),
            )
        except OwnerLimit:
            raise APIError(
                429,
                "too_many_sessions",
                f"this API key holds its limit of {self.settings.max_sessions_per_key} live sessions; delete or let some expire",
                headers={"Retry-After": "30"},
            ) from None
        except StoreFull:
            raise APIError(
                503,
                "store_full",
                f"the service holds its limit of {self.settings.max_sessions} live sessions; retry later",
                headers={"Retry-After": "30"},
            ) from None
        return record

    def _restorable(self, snapshot: bytes, model: str | None) -> SnapshotContent:
        """A snapshot's content, checked to be signed here and to fit a model this replica serves as it is."""
        try:
            content = decode_snapshot(snapshot, self.snapshot_key, self.settings.max_snapshot_bytes)
        except SnapshotError as exc:
            raise APIError(422, "invalid_snapshot", str(exc)) from None
        if model is not None and model != content.model:
            raise APIError(422, "invalid_request", f"the snapshot is of model {content.model!r}, not {model!r}")
        served = self.registry.get(content.model)
        if (
            served is None
            or served.fingerprint != content.fingerprint
            or content.state.layout != served.initial_state.layout
        ):
            raise APIError(
                409,
                "state_incompatible",
                f"the snapshot was made by weights of model {content.model!r} that this replica does not serve",
            )
        labels_fit = len(content.labels) <= served.num_ways and -1 <= content.pending_slot < len(content.labels)
        if not labels_fit or min(content.steps, content.labeled_steps, content.correct_steps) < 0:
            raise APIError(422, "invalid_snapshot", "the snapshot's label slots or counters are inconsistent")
        return content

    async def snapshot(self, session_id: str, owner: str = "") -> bytes:
        """The session as a signed snapshot (``service.sessions.snapshot``); the session is not changed."""
        record = await self.load(session_id, owner)
        content = SnapshotContent(
            model=record.model,
            fingerprint=record.fingerprint,
            labels=list(record.labels),
            pending_slot=record.pending_slot,
            steps=record.steps,
            labeled_steps=record.labeled_steps,
            correct_steps=record.correct_steps,
            state=record.state,
        )
        return encode_snapshot(content, self.snapshot_key)

    async def predict(self, session_id: str, images: list[np.ndarray], owner: str = "", client: str = "") -> dict:
        """Each image classified as the session's next step without a label; the session is left as it was.
        Each image counts as a step against the caller's step rate limit."""
        if self.draining:
            raise unavailable("the server is shutting down")
        await self.rate_limits.charge("steps", owner, client, len(images), too_costly="too_many_images")
        record = await self.load(session_id, owner)
        served = self.served_for(record)
        try:
            outcomes = await served.batcher.predict(record.state, images, record.pending_slot)
        except BatcherClosed:
            raise unavailable("the server is shutting down") from None
        self.metrics.predictions.labels(record.model).inc(len(images))
        results = [prediction(probabilities, record.labels) for probabilities in outcomes]
        return {"results": results, "steps": record.steps}

    async def delete(self, session_id: str, owner: str = "") -> None:
        await self.load(session_id, owner)
        await self._store_call("delete", self.store.delete(session_id, owner))

    async def reset(self, session_id: str, owner: str = "") -> SessionRecord:
        async with self._session_lock(session_id):
            for _ in range(COMMIT_ATTEMPTS):
                record = await self.load(session_id, owner)
                served = self.registry.get(record.model)  # a fresh episode takes this replica's weights
                if served is None:
                    raise APIError(
                        409,
                        "state_incompatible",
                        f"this replica does not serve model {record.model!r} of session {session_id!r}",
                    )
                fresh = replace(
                    record,
                    fingerprint=served.fingerprint,
                    state=served.initial_state,
                    steps=0,
                    version=record.version + 1,
                    labels=[],
                    pending_slot=-1,
                    labeled_steps=0,
                    correct_steps=0,
                    last_request="",
                    last_request_start=-1,
                    last_response=None,
                ).touched()
                if await self._store_call("commit", self.store.commit(fresh, record.version)):
                    return fresh
        raise unavailable("the session changed under this request too many times; retry")

    async def step(
        self,
        session_id: str,
        inputs: list[StepInput],
        digest: str,
        owner: str = "",
        client: str = "",
        rate_limited: bool = True,
    ) -> list[dict]:
        """Apply ``inputs`` in order as one atomic change of the session; returns one result per step.

        The steps count against the caller's step rate limit first, unless ``rate_limited`` is false:
        a transport that sends the same step again (/v2, after a race on the sequence) has counted it.
        """
        if self.draining:
            raise unavailable("the server is shutting down")
        if rate_limited:
            await self.rate_limits.charge("steps", owner, client, len(inputs))
        self.inflight += 1
        try:
            async with self._session_lock(session_id):
                for _ in range(COMMIT_ATTEMPTS):
                    record = await self.load(session_id, owner)
                    replay = self._check_expected_step(record, inputs, digest)
                    if replay is not None:
                        return replay
                    if record.steps + len(inputs) > self.settings.max_steps_per_session:
                        raise APIError(
                            422,
                            "session_step_limit",
                            f"a session may take at most {self.settings.max_steps_per_session} steps; it has {record.steps}: reset it or open a new one",
                            steps=record.steps,
                        )
                    new_record, results = await self._apply(record, inputs, digest)
                    if await self._store_call("commit", self.store.commit(new_record, record.version)):
                        self.metrics.steps.labels(record.model).inc(len(inputs))
                        return results
                    await asyncio.sleep(random.uniform(0, CONFLICT_BACKOFF_SECONDS))
                raise unavailable("the session changed under this request too many times; retry")
        finally:
            self.inflight -= 1

    def _check_expected_step(self, record: SessionRecord, inputs: list[StepInput], digest: str) -> list[dict] | None:
        expected = inputs[0].step
        for offset, item in enumerate(inputs):
            if item.step is not None and (expected is None or item.step != expected + offset):
                raise APIError(422, "invalid_request", "step indices within one request must be consecutive")
        if expected is None or expected == record.steps:
            return None
        if expected == record.last_request_start and digest == record.last_request:
            return record.last_response
        raise APIError(
            409,
            "step_conflict",
            f"step {expected} does not follow: the session has {record.steps} steps, so the next step is {record.steps}",
            steps=record.steps,
        )

    async def _apply(
        self, record: SessionRecord, inputs: list[StepInput], digest: str
    ) -> tuple[SessionRecord, list[dict]]:
        served = self.served_for(record)
        # The label inputs and slots of every step are known before the model runs (the i-th
        # distinct label takes slot i), so all the steps go to the batcher as one job, and a
        # label past the model's slots is refused before any step runs.
        labels, pending = record.labels, record.pending_slot
        label_inputs, plan = [], []
        for item in inputs:
            label_inputs.append(pending)
            before, slot = labels, None
            if item.label is not None:
                try:
                    slot, labels = slots.assign(labels, item.label, served.num_ways)
                except slots.TooManyLabels as exc:
                    raise APIError(422, "too_many_labels", str(exc), labels_in_use=exc.in_use) from None
            pending = -1 if slot is None else slot
            plan.append((before, labels, slot))
        try:
            probabilities, state = await served.batcher.run(record.state, [i.image for i in inputs], label_inputs)
        except BatcherClosed:
            raise unavailable("the server is shutting down") from None
        labeled, correct = record.labeled_steps, record.correct_steps
        results = []
        for offset, (probs, (before, after, slot)) in enumerate(zip(probabilities, plan, strict=True)):
            answer = prediction(probs, before)
            if slot is not None:
                labeled += 1
                correct += int(answer["predicted_slot"] == slot)
            results.append(
                {
                    "step": record.steps + offset,
                    "probabilities": probs,
                    "labels": [*after, *[None] * (served.num_ways - len(after))],
                    "prediction": answer["prediction"],
                    "predicted_slot": answer["predicted_slot"],
                    "novelty": answer["novelty"],
                }
            )
        new_record = replace(
            record,
            state=state,
            steps=record.steps + len(inputs),
            version=record.version + 1,
            labels=labels,
            pending_slot=pending,
            labeled_steps=labeled,
            correct_steps=correct,
            last_request=digest,
            last_request_start=record.steps,
            last_response=results,
            expires_at=time.time() + record.ttl_seconds,  # touched, in the same copy
        )
        return new_record, results

    def describe(self, record: SessionRecord) -> dict:
        served = self.registry.get(record.model)
        num_ways = served.num_ways if served else len(record.labels)
        return {
            "session_id": record.session_id,
            "model": record.model,
            "num_ways": num_ways,
            "steps": record.steps,
            "labels": [*record.labels, *[None] * (num_ways - len(record.labels))],
            "expires_at": iso_time(record.expires_at),
            "accuracy": record.correct_steps / record.labeled_steps if record.labeled_steps else None,
        }


def prediction(probabilities: list[float], labels: list[slots.Label]) -> dict:
    """What a step answers about its image, given the slot table before it: the top slot, its label, the novelty."""
    top = max(range(len(probabilities)), key=probabilities.__getitem__)
    return {
        "probabilities": probabilities,
        "prediction": labels[top] if top < len(labels) else None,
        "predicted_slot": top,
        "novelty": min(1.0, sum(p for s, p in enumerate(probabilities) if s >= len(labels))),
    }


def iso_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"
