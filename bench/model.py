"""Inference benchmark: session-steps per second of ``NTM.step`` next to the seed's NTM.

``python -m bench.model [--batches 1 16 ...] [--repeats 5] [--threads 2] [--json FILE]``

Times the step the service uses, ``model.step(state, images [B, 28, 28], label_inputs [B, K])``
under ``torch.inference_mode``, for the conv and flatten NTMs, the LRUA flatten model and the seed reference
(``bench.seed_reference``), interleaved within each batch size, median of the repeats. The default
and fast models' architectures are also timed as the service runs them with NTM_COMPILE (the
default): the encoder eager, the recurrent step compiled (``models.inference.CompiledRunner``,
the graph a server runs at that batch size compiled before timing), and at batch 1 the whole
step through the one-row AOTInductor packages a server loads once ready (``models.aot``). A
``torch.mm`` of 256x1024 @ 1024x1024 is timed in the same rotation; its rate divided by the
FLOPs of one session-step (counted from the config) bounds the achievable session-steps/s.

Each model's step's dense matrix products are also timed alone at the batch, in the same
rotation (``bench.products``): the session-steps/s of a step that did nothing else, each
product at the rate the libraries reach for its own shape. Reported beside the step, it says
how much of the step's time goes outside its products; it is a reference, not a bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import Runner, fmt, interleaved_rates, machine_load, markdown_table, median, write_json
from bench.products import matrix_products, products_runner
from bench.seed_reference import SeedNTM
from models import NTM, NTMConfig
from models.allocator import DEFAULT_KEEP_MB, keep_freed_memory
from models.inference import CompiledRunner, EagerRunner
from models.ntm import NUM_HEADS

BATCHES = (1, 16, 64, 256, 1024)
MATMUL = (256, 1024, 1024)  # [M, K] @ [K, N]
TARGET_US_BATCH_1 = 120.0  # the fast model's compiled step, encoder included
TARGET_BOUND_FRACTION_256 = 0.8  # of the FLOP bound, the fast model's compiled step at batch 256
MODELS = {
    "prototype_conv4": "prototype-read Conv-4 (default)",
    "prototype_conv4_compiled": "default, compiled",
    "ntm_conv": "NTM conv (fast)",
    "ntm_conv_compiled": "fast, compiled",
    "ntm_flatten": "NTM flatten",
    "lrua_flatten": "LRUA flatten",
    "seed": "seed",
}
CONFIGS = {  # ours by name; prototype_conv4 and ntm_conv are the shipped default and fast models' architectures
    "prototype_conv4": NTMConfig(
        encoder="conv4", conv_channels=(64, 64, 64, 64), addressing="prototype", memory_width=69, hidden_size=128
    ),
    "ntm_conv": NTMConfig(encoder="conv"),
    "ntm_flatten": NTMConfig(encoder="flatten"),
    "lrua_flatten": NTMConfig(encoder="flatten", addressing="lrua", read_heads=4),
}


def flops_per_session_step(config: NTMConfig) -> dict[str, int]:
    """FLOPs of one step of one session (a multiply-add is 2, an activation or exp/log is 1).

    Parts: encoder, input / recurrent / head projections, LSTM cell, addressing (cosine
    against every slot, softmax, interpolation, shift, sharpening, for both heads), read and
    write, output layer.
    """
    hidden, ways, slots, width = config.hidden_size, config.num_ways, config.memory_slots, config.memory_width
    if config.encoder == "conv":
        encoder, channels, side = 0, 1, config.image_size
        for out in config.conv_channels:
            side = (side + 1) // 2
            encoder += 2 * channels * 9 * out * side * side + 2 * out * side * side  # conv, bias, ReLU
            channels = out
        encoder += 2 * channels * side * side * config.feature_size + 9 * config.feature_size  # linear, LayerNorm
        features = config.feature_size
    elif config.encoder == "conv4":  # BatchNorm folded into the convolutions; ReLU, then a 2x2 max-pool
        encoder, channels, side = 0, 1, config.image_size
        for out in config.conv_channels:
            encoder += 2 * channels * 9 * out * side * side + 2 * out * side * side + 3 * out * (side // 2) ** 2
            channels, side = out, side // 2
        features = channels * side * side
    else:
        encoder, features = 0, config.image_size**2
    parts = {
        "encoder": encoder,
        "input_projection": 2 * (features + ways) * 4 * hidden + 4 * hidden,
        "recurrent_projection": 2 * (hidden + config.read_width) * 4 * hidden + 4 * hidden,
        "lstm_cell": 9 * hidden,  # 3 sigmoids, 2 tanh, 3 products, 1 sum
        "head_projection": 0,
        "addressing": 0,
        "read_write": 0,
        "output": 2 * (hidden + config.read_width) * ways + ways,
    }
    if config.keyed:
        key = config.key_size
        parts["head_projection"] = 2 * features * key + key + 2 * hidden * 2 + 2 + 2  # key, beta and none, softplus
        # label completion (one write), squared distances to every key, softmax with "none", free slot
        parts["addressing"] = 5 * slots * width + 3 * slots * key + 4 * slots + slots * ways
        if config.addressing == "prototype":  # class sums and means, distances to K means, spread over rows
            parts["addressing"] = 5 * slots * width + 2 * slots * ways * key + 4 * ways * key + 2 * slots * ways
        # read, least-used sort, zero + write the new row, usage update
        parts["read_write"] = 2 * slots * width + 8 * slots + 2 * slots * width + 3 * slots
        parts["output"] += 2 * ways  # log(p + eps), added to the linear read-out
    elif config.use_memory and config.addressing == "lrua":
        heads = config.read_heads
        head_outputs = heads * (2 * width + 2)
        parts["head_projection"] = 2 * hidden * head_outputs + head_outputs + heads * 8  # + softplus, sigmoid
        # stable sort of the usage (~N log N), cosine + softmax per read head, usage update
        parts["addressing"] = 8 * slots + heads * (2 * slots * width + 2 * width + 10 * slots) + 3 * heads * slots
        # zero least-used rows, write (one outer product per head), read (one per head)
        parts["read_write"] = slots * width + heads * (4 * slots * width + 3 * slots)
    elif config.use_memory:
        head_outputs = NUM_HEADS * (width + 3 + config.num_shifts) + 2 * width
        parts["head_projection"] = 2 * hidden * head_outputs + head_outputs + NUM_HEADS * (4 + config.num_shifts)
        per_slot = 3 + 4 + 3 + 2 * config.num_shifts - 1 + 6  # cosine tail, softmax, lerp, shift, sharpen
        parts["addressing"] = 2 * slots * width + NUM_HEADS * (2 * slots * width + 2 * width + per_slot * slots)
        parts["read_write"] = 2 * slots * width + 5 * slots * width + width
    parts["total"] = sum(parts.values())
    return parts


COMPILED = {"prototype_conv4_compiled": "prototype_conv4", "ntm_conv_compiled": "ntm_conv"}  # -> its architecture


def architecture(name: str) -> str:
    """The ``CONFIGS`` key of a timed model (a compiled one runs its architecture's model)."""
    return COMPILED.get(name, name)


def ntm_runner(model: NTM, batch: int, runner: EagerRunner | None = None) -> Runner:
    """n steps of ``batch`` sessions, the state carried from step to step; the recurrence through ``runner``."""
    gen = torch.Generator().manual_seed(batch)
    size, ways = model.config.image_size, model.config.num_ways
    images = torch.rand(batch, size, size, generator=gen)
    labels = model.label_input(torch.randint(-1, ways, (batch,), generator=gen))
    state = model.initial_state(batch)
    step = (runner or EagerRunner(model)).step

    def run(steps: int) -> None:
        nonlocal state
        for _ in range(steps):
            _, state = step(state, images, labels)

    return run


def compiled_runner(model: NTM, batch: int) -> CompiledRunner:
    """The service's compiled step with ``batch`` its largest batch, compiled now (outside the timing).

    At batch 1 with the one-row packages (``models.aot``) a server loads once it is ready,
    built into a temporary folder: these models' random weights are no server's.
    """
    runner = CompiledRunner(model, batch)
    runner.warm_up()
    if batch == 1:
        with tempfile.TemporaryDirectory(prefix="ntm-aot-") as folder:
            runner.load_packages(Path(folder))  # loaded into memory: the file is not needed afterwards
    return runner


def seed_runner(model: SeedNTM, batch: int) -> Runner:
    """n seed steps of ``batch`` sessions; the seed's memory lives in the model, so one batch at a time."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.cat([torch.rand(batch, 28 * 28, generator=gen), torch.zeros(batch, model.num_ways)], dim=1)
    state = model.initial_state(batch)

    def run(steps: int) -> None:
        nonlocal state
        for _ in range(steps):
            _, state = model.step(x, state)

    return run


def matmul_runner() -> Runner:
    m, k, n = MATMUL
    a, b = torch.randn(m, k), torch.randn(k, n)

    def run(calls: int) -> None:
        for _ in range(calls):
            torch.mm(a, b)

    return run


def measure(batches: list[int], repeats: int, min_time: float) -> dict:
    """Session-steps/s per model and batch (medians), and the matmul rate over all rounds."""
    torch.manual_seed(0)
    models = {name: NTM(config).eval() for name, config in CONFIGS.items()}
    products = {name: matrix_products(model) for name, model in models.items()}
    seed = SeedNTM().eval()
    m, k, n = MATMUL
    rates: dict[str, dict[str, float]] = {name: {} for name in MODELS}
    products_rates: dict[str, dict[str, float]] = {name: {} for name in CONFIGS}
    matmul: list[float] = []
    with torch.inference_mode():
        for batch in batches:
            runners = {name: ntm_runner(model, batch) for name, model in models.items()}
            for name, base in COMPILED.items():
                runners[name] = ntm_runner(models[base], batch, compiled_runner(models[base], batch))
            runners["seed"] = seed_runner(seed, batch)
            runners |= {f"products:{name}": products_runner(p, batch) for name, p in products.items()}
            runners["matmul"] = matmul_runner()
            units = dict.fromkeys(runners, float(batch)) | {"matmul": 2.0 * m * k * n}
            measured = interleaved_rates(runners, units, repeats, min_time)
            for name in MODELS:
                rates[name][str(batch)] = median(measured[name])
            for name in CONFIGS:
                products_rates[name][str(batch)] = median(measured[f"products:{name}"])
            matmul += measured["matmul"]
    return {
        "steps_per_s": rates,
        "products_steps_per_s": products_rates,
        "products_mflop_per_step": {name: p.dense_flops() / 1e6 for name, p in products.items()},  # those timed
        "matmul_gflops": median(matmul) / 1e9,
    }


def report(results: dict) -> str:
    """The Markdown tables and the target and bound lines."""
    rates, bound = results["steps_per_s"], results["bound_steps_per_s"]
    bounded = [name for name in MODELS if name != "seed"]
    header = ["batch", *MODELS.values(), "fast / seed", *(f"{MODELS[name]} % of bound" for name in bounded)]
    rows = []
    for batch in rates["seed"]:
        rows.append(
            [
                batch,
                *(fmt(rates[name][batch]) for name in MODELS),
                f"{rates['ntm_conv'][batch] / rates['seed'][batch]:.1f}x",
                *(f"{100 * rates[name][batch] / bound[architecture(name)]:.1f}%" for name in bounded),
            ]
        )
    lines = [
        f"## Inference: session-steps/s of one step ({results['threads']} threads, "
        f"median of {results['repeats']}, load average {results['load_average']:.2f})",
        "",
        markdown_table(header, rows),
        "",
    ]
    products_rates = results["products_steps_per_s"]
    header = ["batch", *(f"{MODELS[name]}: products alone, session-steps/s (% of its bound)" for name in CONFIGS)]
    rows = [
        [
            batch,
            *(
                f"{fmt(products_rates[name][batch])} ({100 * products_rates[name][batch] / bound[name]:.0f}%)"
                for name in CONFIGS
            ),
        ]
        for batch in rates["seed"]
    ]
    title = "The step's dense matrix products alone, each at its own shape (bench.products: a reference, not a bound):"
    lines += [title, "", markdown_table(header, rows), ""]
    us = results["us_per_step_batch_1"]
    if us:
        row = ["us/step at batch 1", *(fmt(us[name]) for name in MODELS)]
        lines += [markdown_table(["", *MODELS.values()], [row]), ""]
    flops = results["flops_per_step"]
    lines.append(
        f"Bound: torch.mm {'x'.join(map(str, MATMUL[:2]))} @ {'x'.join(map(str, MATMUL[1:]))} runs at "
        f"{results['matmul_gflops']:.1f} GFLOP/s; a session-step costs "
        + ", ".join(f"{flops[name]['total'] / 1e6:.2f} MFLOP ({MODELS[name]})" for name in CONFIGS)
        + ", so at best "
        + " / ".join(fmt(bound[name]) for name in CONFIGS)
        + " session-steps/s."
    )
    for target in results["targets"].values():
        verdict = "met" if target["met"] else "missed"
        lines.append(f"Target {target['what']}: {fmt(target['value'])} ({verdict}).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved measurements per model and batch")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--malloc-keep-mb",
        type=int,
        default=DEFAULT_KEEP_MB,
        help="freed heap glibc keeps mapped, as the service's NTM_MALLOC_KEEP_MB (0: glibc's defaults)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the service's model threads do (``service.batching``), for every model here
    if args.malloc_keep_mb:  # as the service does at start-up (NTM_MALLOC_KEEP_MB), for every model here
        keep_freed_memory(args.malloc_keep_mb)
    load = machine_load()
    results = {
        "threads": args.threads,
        "repeats": args.repeats,
        "malloc_keep_mb": args.malloc_keep_mb,
        "load_average": load,
    }
    results |= measure(args.batches, args.repeats, args.min_time)
    flops = {name: flops_per_session_step(config) for name, config in CONFIGS.items()}
    results["flops_per_step"] = flops
    results["bound_steps_per_s"] = {name: results["matmul_gflops"] * 1e9 / f["total"] for name, f in flops.items()}
    rates = results["steps_per_s"]
    results["us_per_step_batch_1"] = {name: 1e6 / rates[name]["1"] for name in MODELS} if "1" in rates["seed"] else {}
    targets = {}
    if "1" in rates["seed"]:
        us = results["us_per_step_batch_1"]["ntm_conv_compiled"]
        targets["us_batch_1"] = {
            "what": f"<= {TARGET_US_BATCH_1:.0f} us/step at batch 1, encoder included (fast, compiled)",
            "value": us,
            "met": us <= TARGET_US_BATCH_1,
        }
    if "256" in rates["seed"]:
        fraction = rates["ntm_conv_compiled"]["256"] / results["bound_steps_per_s"]["ntm_conv"]
        targets["bound_batch_256"] = {
            "what": f">= {100 * TARGET_BOUND_FRACTION_256:.0f}% of the FLOP bound at batch 256 (fast, compiled), in %",
            "value": 100 * fraction,
            "met": fraction >= TARGET_BOUND_FRACTION_256,
        }
    results["targets"] = targets
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
