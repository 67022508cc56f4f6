"""Training benchmark: 5-way, 50-step episodes per second, our NTM next to the seed-style loop.

``python -m bench.training [--batches 16 64] [--repeats 3] [--threads 2] [--json FILE]``

One iteration is what ``models.train`` does per batch: sample a batch of episodes
(``EpisodeSampler`` on synthetic random [C, 20, 28, 28] drawings, so no Omniglot files are
needed; the sampling cost is included), forward, cross-entropy on the logits, backward,
gradient clipping and an Adam step (``models.train.train_step``). The seed style is the same
loop around ``bench.seed_reference.SeedNTM``: per-step module calls and its per-batch-element
shift loop. All contenders are interleaved in the same run; the figure is the median.

Data-parallel training (``--processes 1 2``, on by default): the conv NTM's iteration as
``torchrun`` runs it (``models.distributed``), in N processes of ``threads / N`` torch threads
each, gloo averaging the gradients, each rank sampling ``batch / N`` episodes of the global
batch, with the trainer's per-iteration collectives (the loss's mean, rank 0's clock). Each
process count runs once per repeat, alternating; only the iterations after a warm-up are timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from bench.common import Runner, fmt, interleaved_rates, machine_load, markdown_table, median, write_json
from bench.seed_reference import SeedNTM
from models import NTM, NTMConfig
from models.data.episodes import EpisodeSampler
from models.distributed import ProcessGroup, data_parallel, leave
from models.train import make_optimizer, train_step
from tests.servers import free_port

BATCHES = (16, 64)
TARGET_SPEEDUP = 10.0
MODELS = {"ntm_conv": "NTM conv", "ntm_flatten": "NTM flatten", "lrua_flatten": "LRUA flatten", "seed": "seed style"}
COMPILED = {
    "ntm_conv_compiled": "NTM conv, compiled",
    "ntm_flatten_compiled": "NTM flatten, compiled",
    "lrua_flatten_compiled": "LRUA flatten, compiled",
}
CONFIGS = {  # our contenders by name (a compiled one is its name + "_compiled")
    "ntm_conv": NTMConfig(encoder="conv"),
    "ntm_flatten": NTMConfig(encoder="flatten"),
    "lrua_flatten": NTMConfig(encoder="flatten", addressing="lrua", read_heads=4),
}
CHARACTERS, DRAWINGS = 30, 20


def synthetic_drawings(seed: int = 0) -> torch.Tensor:
    """[C, 20, 28, 28] uniform noise in the layout of preprocessed Omniglot."""
    return torch.rand(CHARACTERS, DRAWINGS, 28, 28, generator=torch.Generator().manual_seed(seed))


def make_model(name: str, ways: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "seed":
        return SeedNTM(ways)
    return NTM(replace(CONFIGS[name.removesuffix("_compiled")], num_ways=ways))


def training_runner(model: nn.Module, data: torch.Tensor, batch: int, ways: int, shots: int, compiled: bool) -> Runner:
    """n training iterations (sample, forward, backward, clip, Adam) on batches of ``batch`` episodes.

    ``compiled``: the forward is ``torch.compile(model)``, as ``ntm-train --compile`` runs it; its
    compilation happens in the warm-up call, outside the measurement.
    """
    sampler = EpisodeSampler(data, ways, shots, unlabeled_prob=0.1, seed=0)
    optimizer = make_optimizer(model, 1e-3)
    forward = torch.compile(model, dynamic=False) if compiled else None

    def run(iterations: int) -> None:
        for _ in range(iterations):
            train_step(model, optimizer, sampler.sample(batch), clip_norm=10.0, forward=forward)  # type: ignore[arg-type]

    return run


def measure(
    batches: list[int], repeats: int, min_time: float, iterations: int | None, ways: int, shots: int, models: dict
) -> dict[str, dict[str, float]]:
    """Episodes/s per model and batch size: medians of interleaved measurements."""
    data = synthetic_drawings()
    rates: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch in batches:
        runners = {
            name: training_runner(make_model(name, ways), data, batch, ways, shots, name in COMPILED) for name in models
        }
        measured = interleaved_rates(runners, dict.fromkeys(models, float(batch)), repeats, min_time, iterations)
        for name in models:
            rates[name][str(batch)] = median(measured[name])
    return rates


def _data_parallel_worker(
    rank: int, world: int, port: int, threads: int, batch: int, ways: int, shots: int, seconds: float, out: str
) -> None:
    """One rank of a data-parallel run (``torch.multiprocessing.spawn``): global episodes/s, written by rank 0."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    group = ProcessGroup(rank, world)
    if group.distributed:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = make_model("ntm_conv", ways)
    forward = data_parallel(model, group, torch.device("cpu"))
    sampler = EpisodeSampler(synthetic_drawings(), ways, shots, unlabeled_prob=0.1, seed=group.seed(0))
    optimizer = make_optimizer(model, 1e-3)
    local = group.local_batch(batch)

    def iteration() -> None:
        loss, accuracy = train_step(model, optimizer, sampler.sample(local), 10.0, forward)  # type: ignore[arg-type]
        group.mean([loss, accuracy])
        group.broadcast([time.monotonic(), 0.0])

    for _ in range(3):
        iteration()
    started, done = time.perf_counter(), 0
    while True:  # rank 0 decides when the time is up, so every rank runs the same iterations
        iteration()
        done += 1
        (stop,) = group.broadcast([float(time.perf_counter() - started > seconds)])
        if stop:
            break
    rate = done * batch / (time.perf_counter() - started)
    if group.is_main:
        Path(out).write_text(str(rate))
    leave(group)  # at a barrier: no rank tears the group down while another still receives the last broadcast
    # The interpreter's finalization could still abort in gloo's threads (SIGABRT, "terminate called without an
    # active exception", 1 run in 8 here): the rank's work is done and its figure written, so it ends without it.
    os._exit(0)


def data_parallel_rates(
    processes: list[int], threads: int, batch: int, ways: int, shots: int, repeats: int, seconds: float
) -> dict[str, list[float]]:
    """Global episodes/s of the conv NTM trained by N processes (threads / N each), alternating N per repeat."""
    import torch.multiprocessing as mp

    rates: dict[str, list[float]] = {str(n): [] for n in processes}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(repeats):
            for n in processes:
                out = os.path.join(scratch, f"rate-{n}")
                args = (n, free_port(), max(1, threads // n), batch, ways, shots, seconds, out)
                mp.spawn(_data_parallel_worker, args=args, nprocs=n, join=True)
                rates[str(n)].append(float(Path(out).read_text()))
    return rates


def report(results: dict) -> str:
    rates = results["episodes_per_s"]
    models = {**MODELS, **{k: v for k, v in COMPILED.items() if k in rates}}
    ours = [name for name in models if name != "seed"]
    rows = []
    for batch in rates["seed"]:
        seed = rates["seed"][batch]
        cells = [fmt(rates[name][batch], 1) for name in models]
        rows.append([batch, *cells, *(f"{rates[name][batch] / seed:.1f}x" for name in ours)])
    lines = [
        f"## Training: {results['ways']}-way {results['ways'] * results['shots']}-step episodes/s "
        f"({results['threads']} threads, median of {results['repeats']}, load average {results['load_average']:.2f})",
        "",
        markdown_table(["batch", *models.values(), *(f"{models[name]} / seed" for name in ours)], rows),
        "",
    ]
    for batch, target in results["targets"].items():
        verdict = "met" if target["met"] else "missed"
        lines.append(
            f"Target at batch {batch}: our NTM >= {TARGET_SPEEDUP:.0f}x the seed style: best "
            f"{target['speedup']:.1f}x ({target['model']}, {verdict})."
        )
    parallel = results.get("data_parallel")
    if parallel:
        single = parallel["episodes_per_s"][str(min(int(n) for n in parallel["episodes_per_s"]))]
        rows = [
            [n, str(max(1, results["threads"] // int(n))), fmt(rate, 1), f"{rate / single:.2f}x"]
            for n, rate in parallel["episodes_per_s"].items()
        ]
        lines += [
            "",
            f"## Data-parallel training: NTM conv, global batch {parallel['batch']} (gloo, median of "
            f"{results['repeats']})",
            "",
            markdown_table(["processes", "threads each", "episodes/s", "vs fewest processes"], rows),
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="episodes per batch")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved measurements per model and batch")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per measurement (else --min-time)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=10, help="episodes are ways * shots steps long")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--compile", action="store_true", help="also measure the torch.compile'd forward (ntm-train --compile)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        nargs="*",
        default=[1, 2],
        help="data-parallel process counts to measure side by side (none: skip)",
    )
    parser.add_argument("--parallel-batch", type=int, default=16, help="global batch of the data-parallel runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {
        "threads": args.threads,
        "repeats": args.repeats,
        "ways": args.ways,
        "shots": args.shots,
        "load_average": machine_load(),
    }
    models = {**MODELS, **(COMPILED if args.compile else {})}
    rates = measure(args.batches, args.repeats, args.min_time, args.iterations, args.ways, args.shots, models)
    results["episodes_per_s"] = rates
    speedups = {
        name: {b: rates[name][b] / rates["seed"][b] for b in rates["seed"]} for name in models if name != "seed"
    }
    results["speedup_vs_seed"] = speedups
    results["targets"] = {}
    for batch in rates["seed"]:
        best = max(speedups, key=lambda name: speedups[name][batch])
        speedup = speedups[best][batch]
        results["targets"][batch] = {"model": models[best], "speedup": speedup, "met": speedup >= TARGET_SPEEDUP}
    if args.processes:
        measured = data_parallel_rates(
            args.processes, args.threads, args.parallel_batch, args.ways, args.shots, args.repeats, args.min_time
        )
        results["data_parallel"] = {
            "batch": args.parallel_batch,
            "episodes_per_s": {n: median(values) for n, values in measured.items()},
            "runs": measured,
        }
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
