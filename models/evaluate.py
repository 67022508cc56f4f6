"""``ntm-eval``: Santoro et al.'s accuracy-by-instance table, with 95% confidence intervals.

For each episode, the accuracy at the k-th instance is the fraction of classes whose k-th
appearance was predicted right (argmax over slots). The table reports the mean over
episodes and a normal-approximation 95% interval, 1.96 * std / sqrt(episodes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from models.checkpoint import load_checkpoint, resolve_device
from models.data.episodes import EpisodeSampler, evaluation_sampler
from models.data.omniglot import load_omniglot
from models.ntm import NTM

REPORTED_INSTANCES = (1, 2, 3, 4, 5, 10)


@torch.inference_mode()
def evaluate(model: NTM, sampler: EpisodeSampler, episodes: int = 1000, batch_size: int = 250) -> dict:
    """Accuracy by instance over ``episodes`` episodes; also the overall accuracy and loss."""
    model.eval()
    per_episode: list[torch.Tensor] = []  # [E, shots] accuracy per instance number
    losses, correct_total, steps_total = [], 0, 0
    remaining = episodes
    while remaining > 0:
        batch = sampler.sample(min(batch_size, remaining))
        logits, _ = model.forward_sequence(batch.images, batch.label_inputs)
        losses.append(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="sum").item()
        )
        correct = (logits.argmax(-1) == batch.targets).float()  # [T, B]
        correct_total += int(correct.sum().item())
        steps_total += correct.numel()
        hits = torch.zeros(sampler.shots, correct.shape[1], device=correct.device)
        counts = torch.zeros_like(hits)
        index = (batch.instance - 1).clamp_max(sampler.shots - 1)
        hits.scatter_add_(0, index, correct)
        counts.scatter_add_(0, index, torch.ones_like(correct))
        per_episode.append((hits / counts.clamp_min(1)).T.cpu())
        remaining -= correct.shape[1]
    table = torch.cat(per_episode)
    result: dict = {
        "episodes": episodes,
        "ways": sampler.ways,
        "shots": sampler.shots,
        "accuracy": correct_total / steps_total,
        "loss": sum(losses) / steps_total,
        "by_instance": {},
    }
    for k in REPORTED_INSTANCES:
        if k <= sampler.shots:
            column = table[:, k - 1]
            half_width = (
                1.96 * column.std(unbiased=True).item() / math.sqrt(len(column)) if len(column) > 1 else float("nan")
            )
            result["by_instance"][str(k)] = {"accuracy": column.mean().item(), "ci95": half_width}
    return result


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per model, one column per reported instance."""
    instances = [k for k in next(iter(results.values()))["by_instance"]]
    header = "| model | " + " | ".join(f"{_ordinal(int(k))}" for k in instances) + " |"
    lines = [header, "|" + "---|" * (len(instances) + 1)]
    for name, result in results.items():
        cells = [f"{100 * v['accuracy']:.1f}% ± {100 * v['ci95']:.1f}" for v in result["by_instance"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ordinal(k: int) -> str:
    return f"{k}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(k if k < 20 else k % 10, 'th') }"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ntm-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Omniglot folder or zip")
    parser.add_argument("--alphabets", nargs="*", default=None, help="alphabets to draw from (default: all)")
    parser.add_argument("--model", action="append", required=True, help="checkpoint directory (repeatable)")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--ways", type=int, default=None, help="default: the model's num_ways")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--rotate-classes", action="store_true", help="also draw 90/180/270-degree rotated classes")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    models = {path: load_checkpoint(path, device) for path in args.model}
    image_size = next(iter(models.values())).config.image_size
    data = load_omniglot(args.data, image_size, args.alphabets).as_array()
    results = {}
    for path, model in models.items():
        ways = args.ways or model.config.num_ways
        sampler = evaluation_sampler(data, ways, args.shots, args.seed, args.rotate_classes, device)
        results[path] = evaluate(model, sampler, args.episodes, args.batch_size)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
