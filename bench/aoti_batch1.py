"""One session's step at batch 1: the served path against eager, the compiled graph and AOTInductor parts.

``python -m bench.aoti_batch1 [--model DIR ...] [--threads 2] [--repeats 7] [--json FILE]``

A lone client's step is the encoder and input projection over one image
(``NTM.precompute_inputs``), then the recurrent step over one row. A compiling server runs it
as one call of an AOTInductor package of the whole step (``models.aot``), which skips the
Python and dynamo per-call costs that a ``torch.compile`` graph for one row pays. For each
model this times, interleaved, us a step:

- eager: ``precompute_inputs`` then ``recurrent_step``, both eager;
- compiled graph: ``precompute_inputs`` eager, then a ``CompiledRunner`` graph for one row (what
  a server ran before its packages);
- served: ``CompiledRunner.step`` with its packages loaded (one package of the whole step);
- ATen convolutions (the conv encoder only): the whole step's package as served, but with the
  encoder's convolutions traced as ATen's (``nn.Conv2d``) instead of as matrix products over
  their patches (``models.encoders.convolve_as_matmul``);
- bmm products (the NTM heads only): the whole step's package as served, but traced with the
  memory's products (the keys against every slot, the read) as ``bmm`` calls instead of
  multiply-and-sums (``models.addressing.fused_products``);
- inductor's defaults: the whole step's package compiled with inductor's default options
  (freezing only), where a served package is autotuned (``aot.INDUCTOR_CONFIGS``);
- AOTI parts: a package of ``precompute_inputs`` for one image, then the runner's package of the
  recurrent step (what a session's batch form runs a row at a time);

and the seconds each package took to compile, with the largest difference from eager in any
output of the served package.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.common import bmm_products, interleaved_rates, machine_load, markdown_table, median, write_json
from models import aot
from models.allocator import keep_freed_memory
from models.checkpoint import load_checkpoint
from models.encoders import ConvEncoder
from models.inference import CompiledRunner, pad_rows
from models.ntm import NTM
from models.state import NTMState

MODELS = ("models/pretrained", "models/fast")
WAYS = ("eager", "compiled graph", "served", "ATen convolutions", "bmm products", "inductor's defaults", "AOTI parts")
DEFAULT_CONFIGS = {"freezing": True}  # the served recipe without autotuning


class Precompute(nn.Module):
    """``NTM.precompute_inputs`` as a module's forward, for ``torch.export``."""

    def __init__(self, model: NTM) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.precompute_inputs(images, labels),)


class AtenConvEncoder(ConvEncoder):
    """The conv encoder with its convolutions traced as ATen's (its ``nn.Conv2d`` layers) when compiled too."""

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


def package(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, **recipe: object) -> tuple[Callable, float]:
    """An AOTInductor package of ``module`` for ``args``' shapes, built at ``path`` and loaded; and the seconds it took.

    ``recipe``: ``aot.build``'s ``configs``, when not the served ones.
    """
    started = time.perf_counter()
    with torch.inference_mode(False):  # exported as ``aot.export_part`` does: outside inference mode
        exported = torch.export.export(module.eval(), args)
    aot.build(exported, path, **recipe)  # type: ignore[arg-type]
    return aot.entry_point(path), time.perf_counter() - started


def measure(path: str, repeats: int, min_time: float) -> dict:
    """us a step per way, compile seconds per package, and the largest difference from eager, for one model."""
    model = load_checkpoint(path).eval().requires_grad_(False)
    size = model.config.image_size
    images, labels = torch.rand(1, size, size), model.label_input(torch.full((1,), -1))
    state = tuple(pad_rows(t, 1) for t in model.initial_state(1).tensors())
    runner = CompiledRunner(model, 1)  # no graph at one row: its packages serve it
    graph = runner._step  # what a runner compiled for one row before it had packages
    with tempfile.TemporaryDirectory(prefix="ntm-aoti-") as folder:
        precompute, pre_seconds = package(Precompute(model), (images, labels), Path(folder, "precompute.pt2"))
        defaults, defaults_seconds = package(
            aot.WholeStep(model), (images, labels, *state), Path(folder, "defaults.pt2"), configs=DEFAULT_CONFIGS
        )
        aten = None
        if isinstance(model.encoder, ConvEncoder):
            aten_model = copy.deepcopy(model)
            aten_model.encoder.__class__ = AtenConvEncoder
            aten, _ = package(aot.WholeStep(aten_model), (images, labels, *state), Path(folder, "aten.pt2"))
        bmm = None
        if model.config.addressing == "ntm":
            with bmm_products():
                bmm, _ = package(aot.WholeStep(model), (images, labels, *state), Path(folder, "bmm.pt2"))
        started = time.perf_counter()
        runner.load_packages(Path(folder))
        packages_seconds = time.perf_counter() - started
        eager = aot.WholeStep(model)  # made once: a module's construction is not part of a step
        with torch.inference_mode():
            state = tuple(t.clone() for t in state)  # inference tensors, as a server's states are
            graph(model.precompute_inputs(images, labels), *state)  # compiled here, outside the timing
            steps: dict[str, Callable[[], tuple]] = {
                "eager": lambda: eager(images, labels, *state),
                "compiled graph": lambda: graph(model.precompute_inputs(images, labels), *state),
                "served": lambda: runner.step(NTMState(*state), images, labels),
                "inductor's defaults": lambda: defaults(images, labels, *state),
                **({"ATen convolutions": lambda: aten(images, labels, *state)} if aten is not None else {}),
                **({"bmm products": lambda: bmm(images, labels, *state)} if bmm is not None else {}),
                "AOTI parts": lambda: runner.recurrent_step(precompute(images, labels)[0], NTMState(*state)),
            }
            expected = steps["eager"]()
            logits, new_state = steps["served"]()
            difference = max(
                (have - want).abs().max().item()
                for have, want in zip((logits, *new_state.tensors()), expected, strict=True)
            )

            def runs(step: Callable[[], tuple]) -> Callable[[int], None]:
                def run(n: int) -> None:
                    for _ in range(n):
                        step()

                return run

            rates = interleaved_rates({name: runs(step) for name, step in steps.items()}, dict.fromkeys(steps, 1.0),
                                      repeats, min_time)  # fmt: skip
    return {
        "us_per_step": {name: 1e6 / median(values) for name, values in rates.items()},
        "compile_seconds": {
            "precompute": pre_seconds,
            "whole step and recurrent step": packages_seconds,
            "whole step, inductor's defaults": defaults_seconds,
        },
        "max_difference_served": difference,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aoti_batch1", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(MODELS), help="checkpoint directories")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    keep_freed_memory()
    load, threads = machine_load(), torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = {path: measure(path, args.repeats, args.min_time) for path in args.model}
    finally:  # the caller's count back (the tests call main in their own process)
        torch.set_num_threads(threads)
    print(f"## us a step at batch 1, encoder included ({args.threads} threads, load average {load:.2f})\n")
    rows = [
        [path, *(f"{r['us_per_step'][way]:,.0f}" if way in r["us_per_step"] else "-" for way in WAYS)]
        for path, r in results.items()
    ]
    print(markdown_table(["model", *WAYS], rows))
    for path, r in results.items():
        seconds = ", ".join(f"{part} {value:.1f} s" for part, value in r["compile_seconds"].items())
        print(f"\n{path}: packages compiled in {seconds}; served against eager: {r['max_difference_served']:.1e}")
    write_json(args.json, {"threads": args.threads, "load_average": load, "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
