"""Shared helpers of the benchmarks: interleaved timing, medians, Markdown tables, JSON output."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

Runner = Callable[[int], None]  # runs its workload n times


def calibrate(run: Runner, min_time: float) -> int:
    """How many calls of ``run`` take about ``min_time`` seconds (at least 1); warms ``run`` up too."""
    run(1)
    calls = 1
    while True:
        start = time.perf_counter()
        run(calls)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / 10 or calls >= 1 << 16:
            return max(1, math.ceil(min_time * calls / max(elapsed, 1e-9)))
        calls *= 4


def interleaved_rates(
    runners: dict[str, Runner],
    units_per_call: dict[str, float],
    repeats: int,
    min_time: float,
    calls_per_measurement: int | None = None,
) -> dict[str, list[float]]:
    """Units per second of each runner, measured ``repeats`` times in rotating order.

    Each measurement makes ``calls_per_measurement`` calls (after one warm-up call), or as many
    as take about ``min_time`` seconds. Interleaving the contenders (and rotating who goes
    first) spreads a noisy machine's slow spells over all of them instead of over whichever
    happened to run then.
    """
    if calls_per_measurement is None:
        calls = {name: calibrate(run, min_time) for name, run in runners.items()}
    else:
        for run in runners.values():
            run(1)
        calls = dict.fromkeys(runners, calls_per_measurement)
    names = list(runners)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            start = time.perf_counter()
            runners[name](calls[name])
            rates[name].append(calls[name] * units_per_call[name] / (time.perf_counter() - start))
    return rates


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank; NaN when empty."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt(value: float, digits: int = 0) -> str:
    """A number with thousands separators: 12,345 or 1.5 (``digits`` decimals)."""
    return f"{value:,.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_load() -> float:
    """The one-minute load average (other processes make timings noisy), or -1 where unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (threads made later inherit it from their creator).

    ``os.sched_setaffinity(pid, ...)`` alone pins only the main thread: a server's model thread,
    started before, would go on running on the load generator's core.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), {cpu})


def thread_stats(pid: int) -> dict[int, tuple[float, int]]:
    """Each thread of ``pid``: (CPU seconds so far; context switches so far). Linux (/proc).

    The CPU time is the scheduler's, in nanoseconds (``schedstat``'s first field), where the
    kernel keeps it: ``stat``'s user and system times count clock ticks (10 ms), so a thread
    that ran a few milliseconds in a short phase could read as 0.
    """
    stats = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            task = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{task}/schedstat") as schedstat:
                    seconds = int(schedstat.read().split()[0]) / 1e9
            except (FileNotFoundError, IndexError, ValueError):  # a kernel without schedstat
                with open(f"{task}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            with open(f"{task}/status") as status:
                switches = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
            stats[int(tid)] = (seconds, switches)
    return stats


def cpu_split(
    pid: int, before: dict[int, tuple[float, int]], after: dict[int, tuple[float, int]]
) -> tuple[float, float]:
    """CPU seconds between two ``thread_stats``: (the main thread's, which runs the event loop; all others')."""
    spent = {tid: seconds - before.get(tid, (0.0, 0))[0] for tid, (seconds, _) in after.items()}
    main = spent.pop(pid, 0.0)
    return main, sum(spent.values())


@contextlib.contextmanager
def replaced(module: object, name: str, value: object) -> Iterator[None]:
    """``module.name`` is ``value`` meanwhile: graphs traced then take that formulation."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def bmm_products() -> contextlib.AbstractContextManager[None]:
    """Graphs traced meanwhile take the memory's products as ``bmm`` calls, as eager does.

    ``models.addressing.fused_products`` answers False, so a benchmark can set the served
    multiply-and-sums against the batched matrix products they replaced, side by side.
    """
    from models import addressing

    return replaced(addressing, "fused_products", lambda memory, other: False)
