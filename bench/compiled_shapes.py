"""The compiled recurrent step at batch sizes between powers of two: the served graphs against a padded ladder.

``python -m bench.compiled_shapes [--model DIR ...] [--rows 16 65 ...] [--largest 256] [--ways W ...] [--json FILE]``

A server's model calls have whatever number of rows its sessions bring. For each shipped
model (by default) and row count it times, interleaved in one process, microseconds a call of
``recurrent_step`` on contiguous inputs:

- eager: ``EagerRunner``;
- served: ``CompiledRunner`` with a largest batch of 256 (``--largest``), as ``NTM_COMPILE=1``
  runs it (a graph for one row, one whose batch dimension is symbolic, a static one for 256);
- bmm products: the served graphs traced with the memory's products (the keys against every
  slot, the read) as ``bmm`` calls instead of the multiply-and-sums that inductor fuses into its
  loops over the sessions (``models.addressing.fused_products``);
- roll shift: the served graphs traced with the heads' circular shift as one ``torch.roll`` per
  offset instead of slices of the circularly padded weighting (``models.addressing.circular_shift``);
- symbolic: the served runner's symbolic graph alone for every call of two rows or more;
- ladder: static graphs for 1, 2, 4, ... up to the largest batch, a call padded to the next size up by repeating
  its last row (what a server would run with one graph per power of two).

How long compiling takes at start-up is ``bench.startup``'s measure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from bench.common import (
    Runner,
    bmm_products,
    interleaved_rates,
    machine_load,
    markdown_table,
    median,
    replaced,
    write_json,
)
from models import addressing
from models.allocator import keep_freed_memory
from models.checkpoint import load_checkpoint
from models.inference import CPU_OPTIONS, CompiledRunner, EagerRunner, batch_ladder, pad_rows, rung
from models.ntm import NTM
from models.state import NTMState

LARGEST = 256
ROWS = (1, 16, 33, 64, 65, 100, 128, 129, 200, 256)
MODELS = ("models/pretrained", "models/fast")


class SymbolicRunner(CompiledRunner):
    """The served runner without its static graph for the largest batch."""

    def _graph(self, rows: int) -> Callable[..., tuple[torch.Tensor, ...]]:
        return self._step

    def warm_sizes(self) -> tuple[int, ...]:
        return (1, 2)


def roll_circular_shift(w: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The heads' circular shift (eq. 8) as one ``torch.roll`` per offset: the formulation the served slices replaced.

    The same values as ``models.addressing.circular_shift``, bit for bit.
    """
    reach = (shift.shape[-1] - 1) // 2
    weight = shift.split(1, dim=-1)
    out = weight[reach] * w
    for offset in range(1, reach + 1):
        out = torch.addcmul(out, weight[reach + offset], torch.roll(w, offset, -1))
        out = torch.addcmul(out, weight[reach - offset], torch.roll(w, -offset, -1))
    return out


class TracedUnderRunner(CompiledRunner):
    """The served runner with its graphs traced and called under ``formulation()``, a context manager.

    Its steps run under code objects of their own, so that dynamo keeps its graphs apart from
    the served ones (and tells this class's instances apart by the formulation's guards).
    """

    def __init__(self, model: NTM, largest_batch: int, formulation: Callable[[], AbstractContextManager[None]]) -> None:
        super().__init__(model, largest_batch)
        self.formulation = formulation

    def _recurrent_flat(self, pre: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return super()._recurrent_flat(pre, *state)

    def _recurrent_full(self, pre: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._recurrent_flat(pre, *state)

    def recurrent_step(self, pre: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        with self.formulation():
            return super().recurrent_step(pre, state)


def roll_shift() -> AbstractContextManager[None]:
    """Graphs traced meanwhile shift the heads' weightings with ``roll_circular_shift``."""
    return replaced(addressing, "circular_shift", roll_circular_shift)


class LadderRunner(CompiledRunner):
    """Static graphs for every power of two up to the largest batch; a call runs the next one up on padded rows."""

    kind = "ladder"

    def __init__(self, model: NTM, largest_batch: int) -> None:
        super().__init__(model, largest_batch)
        self.ladder = batch_ladder(largest_batch)
        torch._dynamo.config.recompile_limit += len(self.ladder)
        self._padded = torch.compile(self._ladder_flat, dynamic=False, fullgraph=True, options=CPU_OPTIONS)

    def _ladder_flat(self, pre: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The step under a code object of its own, so that dynamo keeps its graphs apart from the served ones."""
        return self._recurrent_flat(pre, *state)

    def recurrent_step(self, pre: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        rows, size = pre.shape[0], rung(self.ladder, pre.shape[0])
        logits, *tensors = self._padded(*(pad_rows(t, size) for t in (pre, *state.tensors())))
        return logits[:rows], NTMState(*(t[:rows] for t in tensors))

    def warm_sizes(self) -> tuple[int, ...]:
        return self.ladder


def inputs(model: NTM, rows: int) -> tuple[torch.Tensor, NTMState]:
    """A step's input for ``rows`` fresh sessions, every tensor contiguous (as the batcher's are)."""
    size = model.config.image_size
    with torch.inference_mode():
        pre = model.precompute_inputs(torch.rand(rows, size, size), model.label_input(torch.full((rows,), -1)))
        return pre, NTMState(*(pad_rows(t, rows) for t in model.initial_state(rows).tensors()))


def timed(runner: EagerRunner, pre: torch.Tensor, state: NTMState) -> Runner:
    """n calls of ``runner``'s step on one input."""

    def run(n: int) -> None:
        with torch.inference_mode():
            for _ in range(n):
                runner.recurrent_step(pre, state)

    return run


RUNNERS: dict[str, Callable[[NTM, int], EagerRunner]] = {  # by way, from the model and the largest batch
    "eager": lambda model, largest: EagerRunner(model),
    "served": CompiledRunner,
    "bmm products": lambda model, largest: TracedUnderRunner(model, largest, bmm_products),
    "roll shift": lambda model, largest: TracedUnderRunner(model, largest, roll_shift),
    "symbolic": SymbolicRunner,
    "ladder": LadderRunner,
}


WAYS = tuple(RUNNERS)


def measure(path: str, rows_list: list[int], largest: int, repeats: int, min_time: float, ways: list[str]) -> dict:
    """us a call per way and row count, for one model."""
    model = load_checkpoint(path).eval()
    runners = {way: RUNNERS[way](model, largest) for way in ways}
    for runner in runners.values():
        runner.warm_up()
    calls: dict[str, dict[str, float]] = {}
    for rows in rows_list:
        pre, state = inputs(model, rows)
        rates = interleaved_rates(
            {name: timed(runner, pre, state) for name, runner in runners.items()},
            dict.fromkeys(runners, 1.0),
            repeats,
            min_time,
        )
        calls[str(rows)] = {name: 1e6 / median(values) for name, values in rates.items()}
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compiled_shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(MODELS), help="checkpoint directories")
    parser.add_argument("--rows", nargs="+", type=int, default=list(ROWS), help="rows a call, at most --largest")
    parser.add_argument("--largest", type=int, default=LARGEST, help="the largest batch (NTM_MAX_BATCH)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--ways", nargs="+", choices=WAYS, default=list(WAYS), help="the ways to time (two for a closer A/B)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if max(args.rows) > args.largest:
        parser.error(f"--rows: at most --largest ({args.largest})")
    keep_freed_memory()
    load, threads = machine_load(), torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = {
            path: measure(path, args.rows, args.largest, args.repeats, args.min_time, args.ways) for path in args.model
        }
    finally:  # the caller's count back (the tests call main in their own process)
        torch.set_num_threads(threads)
    for path, result in results.items():
        print(f"## {path}: us a call of the recurrent step ({args.threads} threads, load average {load:.2f})\n")
        rows = [[rows, *(f"{result[rows][name]:,.0f}" for name in args.ways)] for rows in result]
        print(markdown_table(["rows", *args.ways], rows) + "\n")
    record = {"threads": args.threads, "load_average": load, "largest": args.largest, "us_per_call": results}
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
