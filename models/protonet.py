"""``ntm-protonet``: the Conv-4 prototypical network (Snell et al. 2017) that every NTM result is measured against.

Training (their sec. 2.2): each episode draws ``ways`` classes of the training alphabets
(quarter-turn rotations are classes of their own), ``support`` drawings of each make the
class prototypes c_k = mean f(x) (eq. 1), and the ``queries`` other drawings are classified by
softmax(-||f(x) - c_k||^2) (eq. 2) with a cross-entropy loss; Adam, the learning rate halved
every ``halve_every`` iterations.

Online use (the service's protocol): an episode arrives one drawing at a time. A drawing is
predicted against the prototypes of the labeled drawings before it; it is "new" (the next
free slot) when no prototype is within the novelty threshold, else its nearest prototype's
slot. The threshold is fit on episodes of the training alphabets, never on the alphabets
being scored, to maximise the online accuracy (``fit_novelty_threshold``).

The same rule over another model's encoder features is ``ntm-eval --baseline prototype``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from models.data.episodes import EpisodeBatch, EpisodeSampler, evaluation_sampler
from models.data.omniglot import VALIDATION_ALPHABETS, load_omniglot
from models.encoders import Conv4Encoder
from models.scoring import by_instance, per_episode_accuracy

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SUMMARY_FILE = "metrics.json"
TRAIN_STATE_FILE = "train_state.pt"
SCORED_WAYS, SCORED_SHOTS = 5, 10  # the online protocol the threshold is fit for and scored in

Encode = Callable[[torch.Tensor], torch.Tensor]  # images [N, S, S] -> features [N, F]


def prototype_logits(features: torch.Tensor, classes: torch.Tensor, support: torch.Tensor, ways: int) -> torch.Tensor:
    """Minus the squared distance of every step to every class prototype (Snell et al. 2017, eq. 1-2).

    features [B, T, F], classes [B, T] (0..ways-1), support [B, T] bool -> logits [B, T, ways].
    A prototype is the mean of its class's support features.
    """
    members = F.one_hot(classes, ways).to(features.dtype) * support.unsqueeze(-1).to(features.dtype)
    prototypes = members.transpose(1, 2) @ features / members.sum(1).clamp_min(1).unsqueeze(-1)
    return -torch.cdist(features, prototypes).square()


def prototype_loss(encoder: Encode, batch: EpisodeBatch, ways: int, support_shots: int) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the queries (instances after the first ``support_shots``) and their accuracy.

    The batch must have every step labeled, so its targets are the classes' slots.
    """
    steps, size = batch.images.shape[0], batch.images.shape[-1]
    features = encoder(batch.images.reshape(-1, size, size)).reshape(steps, batch.images.shape[1], -1).transpose(0, 1)
    classes, instance = batch.targets.t(), batch.instance.t()
    logits = prototype_logits(features, classes, instance <= support_shots, ways)
    query = instance > support_shots
    loss = F.cross_entropy(logits[query], classes[query])
    accuracy = (logits[query].argmax(-1) == classes[query]).float().mean().item()
    return loss, accuracy


@torch.no_grad()
def prototype_accuracy(encoder: nn.Module, sampler: EpisodeSampler, episodes: int, support_shots: int = 1) -> float:
    """Query accuracy of nearest-prototype classification with ``support_shots`` drawings per class."""
    encoder.eval()
    _, accuracy = prototype_loss(encoder, sampler.sample(episodes), sampler.ways, support_shots)
    return accuracy


def pretrain_encoder(
    encoder: nn.Module,
    sampler: EpisodeSampler,
    iterations: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    progress: bool = True,
    support_shots: int = 1,
    halve_every: int | None = None,
) -> list[float]:
    """Adam on the prototypical loss, the learning rate halved every ``halve_every`` iterations; the losses."""
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    losses = []
    encoder.train()
    for iteration in tqdm(range(iterations), disable=not progress, desc="encoder", unit="it", dynamic_ncols=True):
        if halve_every:
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 ** (iteration // halve_every)
        loss, _ = prototype_loss(encoder, sampler.sample(batch_size), sampler.ways, support_shots)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- online rule


def online_distances(
    features: torch.Tensor, targets: torch.Tensor, labeled: torch.Tensor, ways: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance of each step to each slot's prototype of the labeled steps before it.

    features [T, B, F], targets [T, B] (slots), labeled [T, B] -> (distances [T, B, ways], inf
    where a slot has no drawing yet; used [T, B], the number of slots holding a class).
    """
    members = F.one_hot(targets, ways).to(features.dtype) * labeled.unsqueeze(-1).to(features.dtype)  # [T, B, K]
    sums = torch.cumsum(members.unsqueeze(-1) * features.unsqueeze(2), dim=0)  # [T, B, K, F], inclusive
    counts = torch.cumsum(members, dim=0)
    sums = torch.cat([torch.zeros_like(sums[:1]), sums[:-1]])  # exclusive: the steps before t
    counts = torch.cat([torch.zeros_like(counts[:1]), counts[:-1]])
    prototypes = sums / counts.clamp_min(1).unsqueeze(-1)
    distances = (features.unsqueeze(2) - prototypes).square().sum(-1)
    distances = distances.masked_fill(counts == 0, float("inf"))
    return distances, (counts > 0).sum(-1)


def online_predictions(distances: torch.Tensor, used: torch.Tensor, threshold: float) -> torch.Tensor:
    """Predicted slot per step: the free slot ``used`` when it exists and no prototype is within
    ``threshold``, else the nearest prototype's slot. [T, B, K], [T, B] -> [T, B]."""
    nearest, index = distances.min(-1)
    new = (used < distances.shape[-1]) & ~(nearest <= threshold)
    return torch.where(new, used, index)


def fit_novelty_threshold(distances: torch.Tensor, used: torch.Tensor, targets: torch.Tensor) -> float:
    """The threshold that maximises the online accuracy of ``online_predictions`` on these steps.

    Only steps with a prototype and a free slot depend on it: a step whose class is new is right
    when its nearest distance exceeds the threshold, a step of a known class when it does not
    and its nearest prototype is its own. One sort over the nearest distances tries every cut.
    """
    nearest, index = distances.min(-1)
    open_steps = (used > 0) & (used < distances.shape[-1])
    d = nearest[open_steps]
    is_new = (targets == used)[open_steps]
    known_right = (~is_new & (index == targets)[open_steps]).float()
    order = torch.argsort(d)
    d, new_sorted, known_sorted = d[order], is_new[order].float(), known_right[order]
    # Cut after the i-th smallest distance (i = 0..n): steps 0..i-1 say "known", the rest "new".
    right_known = torch.cat([torch.zeros(1), torch.cumsum(known_sorted, 0)])
    right_new = new_sorted.sum() - torch.cat([torch.zeros(1), torch.cumsum(new_sorted, 0)])
    best = int(torch.argmax(right_known + right_new))
    if best == 0:
        return float(d[0]) - 1.0 if len(d) else 0.0
    if best == len(d):
        return float(d[-1]) + 1.0
    return float(d[best - 1] + d[best]) / 2


@torch.no_grad()
def episode_distances(encode: Encode, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``online_distances`` of a batch of episodes, features from ``encode``."""
    steps, episodes, size = batch.images.shape[0], batch.images.shape[1], batch.images.shape[-1]
    features = encode(batch.images.reshape(-1, size, size)).reshape(steps, episodes, -1)
    return online_distances(features, batch.targets, batch.labeled, batch.label_inputs.shape[-1])


@torch.no_grad()
def fit_threshold_on(encode: Encode, sampler: EpisodeSampler, episodes: int, batch_size: int = 250) -> float:
    """``fit_novelty_threshold`` over ``episodes`` episodes of ``sampler`` (the training alphabets)."""
    parts = [episode_distances(encode, batch) + (batch.targets,) for batch in _batches(sampler, episodes, batch_size)]
    distances, used, targets = (torch.cat(p, dim=1) for p in zip(*parts, strict=True))
    return fit_novelty_threshold(distances, used, targets)


@torch.no_grad()
def evaluate_prototype_rule(
    encode: Encode, threshold: float, sampler: EpisodeSampler, episodes: int, batch_size: int = 250
) -> dict:
    """``models.evaluate.evaluate``'s table for the online prototype rule."""
    tables, correct_total, steps_total = [], 0, 0
    for batch in _batches(sampler, episodes, batch_size):
        distances, used = episode_distances(encode, batch)
        correct = online_predictions(distances, used, threshold) == batch.targets
        correct_total += int(correct.sum())
        steps_total += correct.numel()
        tables.append(per_episode_accuracy(correct, batch.instance, sampler.shots))
    return {
        "episodes": episodes,
        "ways": sampler.ways,
        "shots": sampler.shots,
        "accuracy": correct_total / steps_total,
        "novelty_threshold": threshold,
        "by_instance": by_instance(torch.cat(tables)),
        "by_every_instance": by_instance(torch.cat(tables), range(1, sampler.shots + 1)),
    }


def _batches(sampler: EpisodeSampler, episodes: int, batch_size: int):
    remaining = episodes
    while remaining > 0:
        batch = sampler.sample(min(batch_size, remaining))
        remaining -= batch.images.shape[1]
        yield batch


# ----------------------------------------------------------------------------- the model on disk


class ProtoNet(nn.Module):
    """A Conv-4 encoder and the novelty threshold it is used online with."""

    def __init__(self, channels: tuple[int, ...] = (64, 64, 64, 64), image_size: int = 28) -> None:
        super().__init__()
        self.channels, self.image_size = tuple(channels), image_size
        self.encoder = Conv4Encoder(self.channels, image_size)
        self.register_buffer("novelty_threshold", torch.tensor(float("inf")))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model": "protonet", "conv_channels": list(self.channels), "image_size": self.image_size}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(directory / (WEIGHTS_FILE + ".tmp")))
        (directory / (WEIGHTS_FILE + ".tmp")).replace(directory / WEIGHTS_FILE)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> ProtoNet:
        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        if config.get("model") != "protonet":
            raise ValueError(f"{directory / CONFIG_FILE}: not a prototypical network")
        net = cls(tuple(config["conv_channels"]), int(config["image_size"]))
        net.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return net.to(device).eval()


# ----------------------------------------------------------------------------- training


@dataclass
class ProtoNetOptions:
    data: Path
    out: Path
    channels: tuple[int, ...] = (64, 64, 64, 64)
    ways: int = 60
    support: int = 1
    queries: int = 5
    iterations: int = 6000
    max_minutes: float | None = None
    lr: float = 1e-3
    halve_every: int = 2000
    validation_alphabets: tuple[str, ...] = VALIDATION_ALPHABETS
    held_out_alphabets: tuple[str, ...] = ()
    fit_episodes: int = 1000
    eval_episodes: int = 1000
    checkpoint_minutes: float = 3.0
    resume: bool = False
    seed: int = 0
    progress: bool = True


def train_protonet(options: ProtoNetOptions) -> dict:
    """Train, fit the novelty threshold on the training alphabets, score the validation ones; the summary."""
    torch.manual_seed(options.seed)
    omniglot = load_omniglot(options.data, 28)
    train_part, val_part = omniglot.split(options.validation_alphabets)
    train_set = train_part.select(options.held_out_alphabets, exclude=True).as_array()
    val_set = val_part.as_array()
    net = ProtoNet(options.channels, 28)
    optimizer = torch.optim.Adam(net.parameters(), lr=options.lr)
    sampler = EpisodeSampler(train_set, options.ways, options.support + options.queries, seed=options.seed)
    iteration, elapsed, losses = 0, 0.0, []
    state_path = options.out / TRAIN_STATE_FILE
    if options.resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        iteration, elapsed = state["iteration"], state["elapsed"]

    def save_state() -> None:
        options.out.mkdir(parents=True, exist_ok=True)
        state = {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler_rng": sampler.get_state(),
            "torch_rng": torch.get_rng_state(),
            "iteration": iteration,
            "elapsed": elapsed,
        }
        torch.save(state, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)

    bar = tqdm(total=options.iterations, initial=iteration, disable=not options.progress, unit="it")
    started, last_save, at_start = time.monotonic(), time.monotonic(), elapsed
    net.train()
    while iteration < options.iterations and not (options.max_minutes and elapsed > 60 * options.max_minutes):
        for group in optimizer.param_groups:
            group["lr"] = options.lr * 0.5 ** (iteration // options.halve_every)
        loss, accuracy = prototype_loss(net, sampler.sample(1), options.ways, options.support)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        iteration += 1
        elapsed = at_start + time.monotonic() - started
        bar.update(1)
        if iteration % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}", acc=f"{accuracy:.3f}")
        if time.monotonic() - last_save > 60 * options.checkpoint_minutes:
            save_state()
            last_save = time.monotonic()
    bar.close()
    save_state()
    net.eval()
    ways = min(SCORED_WAYS, len(train_set), len(val_set))  # 5, unless a small data set has fewer characters
    fit = evaluation_sampler(train_set, ways, SCORED_SHOTS, seed=options.seed + 1)
    threshold = fit_threshold_on(net, fit, options.fit_episodes)
    net.novelty_threshold.fill_(threshold)
    net.save(options.out)
    scored = evaluation_sampler(val_set, ways, SCORED_SHOTS)
    validation = evaluate_prototype_rule(net, threshold, scored, options.eval_episodes)
    summary = {
        "model": "Conv-4 prototypical network (Snell et al. 2017), used online with a novelty threshold",
        "iterations": iteration,
        "train_seconds": round(elapsed, 1),
        "final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1) if losses else None,
        "episode": {"ways": options.ways, "support": options.support, "queries": options.queries},
        "novelty_threshold": threshold,
        "threshold_fit": f"{options.fit_episodes} {ways}-way {SCORED_SHOTS}-shot episodes of the training alphabets",
        "validation_alphabets": list(options.validation_alphabets),
        "held_out_alphabets": list(options.held_out_alphabets),
        "validation": validation,
    }
    (options.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ntm-protonet", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/omniglot/images_background.zip"))
    parser.add_argument("--out", type=Path, required=True, help="directory to write the protonet into")
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 64, 64, 64])
    parser.add_argument("--ways", type=int, default=60, help="classes per training episode")
    parser.add_argument("--support", type=int, default=1, help="drawings per class that make its prototype")
    parser.add_argument("--queries", type=int, default=5, help="drawings per class that are classified")
    parser.add_argument("--iterations", type=int, default=6000, help="episodes (one per iteration)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--halve-every", type=int, default=2000, help="halve the learning rate every N iterations")
    parser.add_argument("--validation-alphabets", nargs="*", default=list(VALIDATION_ALPHABETS))
    parser.add_argument(
        "--held-out-alphabets",
        nargs="*",
        default=[],
        help="alphabets left out of training and not scored either (kept unseen for a later stage to fit on)",
    )
    parser.add_argument(
        "--fit-episodes", type=int, default=1000, help="training-alphabet episodes the threshold is fit on"
    )
    parser.add_argument("--eval-episodes", type=int, default=1000)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = train_protonet(
        ProtoNetOptions(
            data=args.data,
            out=args.out,
            channels=tuple(args.channels),
            ways=args.ways,
            support=args.support,
            queries=args.queries,
            iterations=args.iterations,
            max_minutes=args.max_minutes,
            lr=args.lr,
            halve_every=args.halve_every,
            validation_alphabets=tuple(args.validation_alphabets),
            held_out_alphabets=tuple(args.held_out_alphabets),
            fit_episodes=args.fit_episodes,
            eval_episodes=args.eval_episodes,
            resume=args.resume,
            seed=args.seed,
            progress=not args.no_progress,
        )
    )
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k != "validation"}
            | {"validation": summary["validation"]["by_instance"]},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
