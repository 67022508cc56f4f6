"""A small HTTP/1.1 keep-alive load generator on raw asyncio streams, run in its own process.

It sends pre-encoded requests over N connections for a fixed time and records each
response's latency. Pinned to a core the server does not use, it measures the server rather
than itself (a full client library would cost more CPU per request than the server does).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.common import percentile

RequestFactory = Callable[[int, int], bytes]  # (connection index, request index) -> request bytes


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return percentile(sorted(self.latencies), q)


def http_request(method: str, path: str, body: bytes = b"", host: str = "127.0.0.1") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _connection(
    host: str, port: int, index: int, factory: RequestFactory, stop: float, out: list, counts: list
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    n = 0
    try:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            writer.write(factory(index, n))
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            out.append(time.perf_counter() - started)
            if head[9:12] != b"200":
                counts[0] += 1
            n += 1
    finally:
        writer.close()


async def _run(host: str, port: int, connections: int, factory: RequestFactory, seconds: float) -> LoadResult:
    latencies: list[float] = []
    errors = [0]
    started = time.perf_counter()
    stop = started + seconds
    await asyncio.gather(*[_connection(host, port, i, factory, stop, latencies, errors) for i in range(connections)])
    return LoadResult(len(latencies), errors[0], time.perf_counter() - started, latencies)


def prepare_load_process(cpu: int | None) -> None:
    """In a load generator process: pin it to ``cpu`` (away from the server's core) and use uvloop if present."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def _child(queue: multiprocessing.Queue, cpu: int | None, args: tuple) -> None:
    prepare_load_process(cpu)
    queue.put(asyncio.run(_run(*args)))


def generate_load(
    host: str, port: int, connections: int, factory: RequestFactory, seconds: float, cpu: int | None = None
) -> LoadResult:
    """Run the load in a separate process (pinned to ``cpu`` when given) and return its result."""
    return run_in_child(_child, (host, port, connections, factory, seconds), cpu, seconds)


def run_in_child(target: Callable, args: tuple, cpu: int | None, seconds: float, start: str = "fork") -> LoadResult:
    """``target(queue, cpu, args)`` in a process of its own (``start``: the multiprocessing start method),
    which puts its ``LoadResult`` on the queue; waits for it at most 2 minutes past the load's ``seconds``."""
    context = multiprocessing.get_context(start)
    queue = context.Queue()
    process = context.Process(target=target, args=(queue, cpu, args))
    process.start()
    result = queue.get(timeout=seconds + 120)
    process.join()
    return result
