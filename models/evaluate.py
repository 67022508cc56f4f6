"""``ntm-eval``: Santoro et al.'s accuracy-by-instance table, with 95% confidence intervals,
and beside each model the two no-memory baselines that say what its memory adds.

For each episode, the accuracy at the k-th instance is the fraction of classes whose k-th
appearance was predicted right (argmax over slots; at a class's first appearance the right
answer is the next free slot). ``models.scoring`` makes the table.

Baselines (``--baseline``, repeatable), scored on the same episodes as the models:

- ``prototype``: the online nearest-class-mean rule (``models.protonet``) over each model's own
  encoder features: the model without its memory and controller.
- ``protonet``: a Conv-4 prototypical network (``ntm-protonet``; ``--protonet DIR``, by default
  the shipped one) under the same rule.

Each rule's novelty threshold is fit on episodes of the alphabets *not* being scored
(``--fit-alphabets``; by default every other alphabet in ``--data``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from models.checkpoint import load_checkpoint, resolve_device
from models.data.episodes import EpisodeSampler, evaluation_sampler
from models.data.omniglot import load_omniglot
from models.ntm import NTM
from models.protonet import ProtoNet, evaluate_prototype_rule, fit_threshold_on
from models.scoring import by_instance, per_episode_accuracy

SHIPPED_PROTONET = Path(__file__).parent / "protonet"
BASELINES = ("prototype", "protonet")
FIT_EPISODES = 1000
FIT_SEED = 4321


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
        per_episode.append(per_episode_accuracy(correct, batch.instance, sampler.shots))
        remaining -= correct.shape[1]
    return {
        "episodes": episodes,
        "ways": sampler.ways,
        "shots": sampler.shots,
        "accuracy": correct_total / steps_total,
        "loss": sum(losses) / steps_total,
        "by_instance": by_instance(torch.cat(per_episode)),
        "by_every_instance": by_instance(torch.cat(per_episode), range(1, sampler.shots + 1)),
    }


def prototype_baseline(
    encode, fit_data, score_sampler: EpisodeSampler, episodes: int, threshold: float | None = None
) -> dict:
    """The online prototype rule over ``encode``'s features: the threshold fit on ``fit_data``
    (unless given), the table on ``score_sampler``'s episodes."""
    if threshold is None:
        fit = evaluation_sampler(
            fit_data, score_sampler.ways, score_sampler.shots, FIT_SEED, device=score_sampler.device
        )
        threshold = fit_threshold_on(encode, fit, FIT_EPISODES)
    return evaluate_prototype_rule(encode, threshold, score_sampler, episodes)


def format_table(results: dict[str, dict], key: str = "by_instance") -> str:
    """A Markdown table: one row per model, one column per reported instance (``by_every_instance``: every one)."""
    instances = [k for k in next(iter(results.values()))[key]]
    header = "| model | " + " | ".join(f"{_ordinal(int(k))}" for k in instances) + " |"
    lines = [header, "|" + "---|" * (len(instances) + 1)]
    for name, result in results.items():
        cells = [f"{100 * v['accuracy']:.1f}% ± {100 * v['ci95']:.1f}" for v in result[key].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_by_instance(results: dict[str, dict], out_path: Path) -> None:
    """The table as a PNG: accuracy (%) by instance for every row, with its 95% interval as error bars.

    The x axis is the instance number itself (1 to 5, then 10), so the gap before the 10th shows;
    rows are offset a little along it so that their error bars do not hide each other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    spread = 0.06 * (len(results) - 1)
    for row, (name, result) in enumerate(results.items()):
        instances = [int(k) for k in result["by_instance"]]
        offset = (row / max(len(results) - 1, 1) - 0.5) * spread
        ax.errorbar(
            [k + offset for k in instances],
            [100 * v["accuracy"] for v in result["by_instance"].values()],
            yerr=[100 * v["ci95"] for v in result["by_instance"].values()],
            marker="o",
            markersize=4,
            capsize=3,
            label=name,
        )
    reported = sorted({int(k) for result in results.values() for k in result["by_instance"]})
    ax.set_xticks(reported, [_ordinal(k) for k in reported])
    ax.set_xlabel("instance of a class in the episode")
    ax.set_ylabel("accuracy (%)")
    first = next(iter(results.values()))
    ax.set_title(
        f"{first['ways']}-way episodes of {first['shots']} drawings per class, {first['episodes']} episodes; 95% intervals",
        fontsize="medium",
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def _ordinal(k: int) -> str:
    return f"{k}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(k if k < 20 else k % 10, 'th') }"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ntm-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Omniglot folder or zip")
    parser.add_argument("--alphabets", nargs="*", default=None, help="alphabets to draw from (default: all)")
    parser.add_argument(
        "--fit-alphabets",
        nargs="*",
        default=None,
        help="alphabets the baselines' novelty thresholds are fit on (default: those of --data not scored)",
    )
    parser.add_argument("--model", action="append", required=True, help="checkpoint directory (repeatable)")
    parser.add_argument(
        "--baseline", action="append", choices=BASELINES, default=[], help="no-memory baseline to add (repeatable)"
    )
    parser.add_argument(
        "--protonet", type=Path, default=SHIPPED_PROTONET, help="ntm-protonet model for --baseline protonet"
    )
    parser.add_argument(
        "--refit-protonet",
        action="store_true",
        help="fit the protonet's threshold on --fit-alphabets instead of using the one it was trained with",
    )
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--ways", type=int, default=None, help="default: the model's num_ways")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--rotate-classes", action="store_true", help="also draw 90/180/270-degree rotated classes")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="also draw the table here as a PNG (accuracy by instance, 95%% intervals)",
    )
    args = parser.parse_args(argv)
    results = run_evaluation(args)
    print(format_table(results))
    print("\nEvery instance:\n" + format_table(results, "by_every_instance"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot_by_instance(results, args.plot)
    return 0


def run_evaluation(args: argparse.Namespace) -> dict[str, dict]:
    """Every model, then its prototype baseline, then the protonet, on the same episodes."""
    device = resolve_device(args.device)
    models = {path: load_checkpoint(path, device) for path in args.model}
    image_size = next(iter(models.values())).config.image_size
    everything = load_omniglot(args.data, image_size)
    scored = everything.select(args.alphabets) if args.alphabets else everything
    data = scored.as_array()
    fit_data = None
    if args.baseline:
        fit = (
            everything.select(args.fit_alphabets)
            if args.fit_alphabets
            else everything.select(scored.alphabets, exclude=True)
        )
        if not fit.characters:
            raise SystemExit("ntm-eval: the baselines need alphabets to fit on: give --alphabets or --fit-alphabets")
        fit_data = fit.as_array()

    def sampler(ways: int) -> EpisodeSampler:
        return evaluation_sampler(data, ways, args.shots, args.seed, args.rotate_classes, device)

    results: dict[str, dict] = {}
    for path, model in models.items():
        ways = args.ways or model.config.num_ways
        results[path] = evaluate(model, sampler(ways), args.episodes, args.batch_size)
        if "prototype" in args.baseline:
            results[f"{path}: prototype rule on its encoder"] = prototype_baseline(
                model.encoder, fit_data, sampler(ways), args.episodes
            )
    if "protonet" in args.baseline:
        net = ProtoNet.load(args.protonet, device)
        threshold = None if args.refit_protonet else float(net.novelty_threshold)
        ways = args.ways or next(iter(models.values())).config.num_ways
        results[f"protonet ({args.protonet})"] = prototype_baseline(
            net, fit_data, sampler(ways), args.episodes, threshold
        )
    return results


if __name__ == "__main__":
    sys.exit(main())
