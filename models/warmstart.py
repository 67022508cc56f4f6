"""``ntm-warmstart``: a conv-encoder NTM that starts out already using its memory.

Meta-trained from scratch, the conv NTM learns to spot a new class (the 1st instance) from its
controller alone and stays there: after 390k episodes it was no better than the memory-less
baseline from the 2nd instance on, while the flatten NTM, whose memory access works, is held
back by its features (raw pixels: 86.6% at the 10th instance). A warm start joins the two:

1. **Encoder**: the conv encoder is pretrained as a prototypical network (Snell et al. 2017):
   each query is classified by the softmax of minus its squared Euclidean distance to the mean
   features ("prototype") of each class's support drawings (their eq. 1-2), on episodes of the
   training alphabets drawn by the same sampler as meta-training. The loss trains the features
   to do what the memory's content addressing does: find a class from one drawing.
2. **Controller, heads, memory and read-out** are copied from a trained NTM (the shipped flatten
   model by default); they do not depend on the encoder.
3. **Input projection**: the copied LSTM expects the pre-activations W x + b that the source
   computed from pixels x. The new projection A f + c over the conv features f is the ridge
   regression of those pre-activations on f over a sample of training drawings (closed form,
   A = argmin ||F A^T + c - X W^T||^2 + lambda ||A||^2), and the label columns are copied. So
   the new model behaves like the source from its first step, and ``ntm-train --init-from``
   then meta-trains everything together.

``--no-memory`` builds the LSTM-only baseline the same way: the pretrained encoder and a fresh
controller, so the two differ by the memory alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import NTMConfig
from models.data.episodes import EpisodeSampler, evaluation_sampler
from models.data.omniglot import VALIDATION_ALPHABETS, load_omniglot
from models.evaluate import evaluate
from models.ntm import NTM
from models.protonet import pretrain_encoder, prototype_accuracy

RECORD_FILE = "warmstart.json"


def check_compatible(source: NTMConfig, target: NTMConfig) -> None:
    """The source's controller, heads and read-out must fit the target unchanged."""
    fields = ("num_ways", "image_size", "memory_slots", "memory_width", "hidden_size", "shift_range")
    fields += ("use_memory", "addressing", "read_heads")
    different = [
        f"{name}: {getattr(source, name)} != {getattr(target, name)}"
        for name in fields
        if getattr(source, name) != getattr(target, name)
    ]
    if different:
        raise ValueError("the source model does not fit the new one: " + "; ".join(different))


@torch.no_grad()
def fit_input_projection(source: NTM, target: NTM, images: torch.Tensor, ridge: float = 1e-2) -> float:
    """Set ``target``'s feature columns of the input projection so that they reproduce the
    pre-activations ``source`` computes from ``images`` [N, S, S]; copy the label columns.

    Returns R^2, the fraction of the source pre-activations' variance the fit explains.
    """
    source_width = source.input_proj.in_features - source.config.num_ways
    target_width = target.input_proj.in_features - target.config.num_ways
    wanted = source.encoder(images) @ source.input_proj.weight[:, :source_width].T
    features = torch.cat([target.encoder(images), torch.ones(len(images), 1)], dim=1)  # [N, F + 1]
    gram = features.T @ features + ridge * torch.eye(features.shape[1])
    solution = torch.linalg.solve(gram, features.T @ wanted)  # [F + 1, 4 * hidden]
    residual = (features @ solution - wanted).square().sum()
    total = (wanted - wanted.mean(0)).square().sum()
    target.input_proj.weight[:, :target_width] = solution[:-1].T
    target.input_proj.weight[:, target_width:] = source.input_proj.weight[:, source_width:]
    target.input_proj.bias.copy_(source.input_proj.bias + solution[-1])
    return (1 - residual / total).item()


def transplant(source: NTM, target: NTM) -> None:
    """Copy every parameter of ``source`` except its encoder and input projection into ``target``."""
    check_compatible(source.config, target.config)
    kept = {
        name: tensor for name, tensor in source.state_dict().items() if not name.startswith(("encoder.", "input_proj."))
    }
    result = target.load_state_dict(kept, strict=False)
    if result.unexpected_keys:  # compatible configs make the same tensors; anything else is a bug to stop on
        raise ValueError(f"the source has tensors the new model lacks: {', '.join(result.unexpected_keys)}")


@dataclass
class WarmStartOptions:
    data: Path
    source: Path
    out: Path
    conv_channels: tuple[int, ...] = (16, 32, 64)
    feature_size: int = 64
    encoder_iterations: int = 7000
    encoder_ways: int = 20
    encoder_shots: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    fit_drawings: int = 10000
    ridge: float = 1e-2
    validation_alphabets: tuple[str, ...] = VALIDATION_ALPHABETS
    use_memory: bool = True
    seed: int = 0
    progress: bool = True


def warm_start(options: WarmStartOptions) -> dict:
    """Build, record and save the warm-started conv NTM; returns the record."""
    torch.manual_seed(options.seed)
    started = time.monotonic()
    source = load_checkpoint(options.source)
    config = NTMConfig.from_dict(
        {
            **source.config.to_dict(),
            "encoder": "conv",
            "conv_channels": list(options.conv_channels),
            "feature_size": options.feature_size,
            "use_memory": options.use_memory,
        }
    )
    omniglot = load_omniglot(options.data, config.image_size)
    train, val = (part.as_array() for part in omniglot.split(options.validation_alphabets))
    target = NTM(config)
    sampler = EpisodeSampler(train, options.encoder_ways, options.encoder_shots, 0.0, seed=options.seed)
    losses = pretrain_encoder(
        target.encoder, sampler, options.encoder_iterations, options.batch_size, options.lr, options.progress
    )
    target.encoder.eval()
    val_ways = min(config.num_ways, len(val))
    one_shot = prototype_accuracy(target.encoder, evaluation_sampler(val, val_ways, 10), 200)
    r2 = None
    if config.use_memory:
        transplant(source, target)
        fit_sampler = EpisodeSampler(train, config.num_ways, 10, 0.0, seed=options.seed + 1)
        episodes_needed = -(-options.fit_drawings // fit_sampler.steps)
        drawings = fit_sampler.sample(episodes_needed).images.flatten(0, 1)[: options.fit_drawings]
        r2 = fit_input_projection(source, target, drawings, options.ridge)
    record = {
        "source": str(options.source),
        "config": config.to_dict(),
        "encoder_iterations": options.encoder_iterations,
        "encoder_final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
        "validation_alphabets": list(options.validation_alphabets),
        "encoder_1shot_accuracy": one_shot,
        "input_projection_r2": r2,
        "validation": evaluate(target, evaluation_sampler(val, val_ways, 10), 300),
        "seconds": round(time.monotonic() - started, 1),
    }
    save_checkpoint(target, options.out)
    (options.out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ntm-warmstart", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Omniglot folder or zip")
    parser.add_argument(
        "--source",
        type=Path,
        default=Path(__file__).parent / "flatten",
        help="trained NTM to copy (default: the shipped flatten NTM)",
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--conv-channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--feature-size", type=int, default=64)
    parser.add_argument("--encoder-iterations", type=int, default=7000)
    parser.add_argument("--encoder-ways", type=int, default=20, help="classes per pretraining episode")
    parser.add_argument("--encoder-shots", type=int, default=5, help="drawings per class per pretraining episode")
    parser.add_argument("--batch-size", type=int, default=8, help="pretraining episodes per iteration")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--validation-alphabets", nargs="*", default=list(VALIDATION_ALPHABETS))
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="the LSTM-only baseline: the pretrained encoder and a fresh controller (no memory to copy)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = warm_start(
        WarmStartOptions(
            data=args.data,
            source=args.source,
            out=args.out,
            conv_channels=tuple(args.conv_channels),
            feature_size=args.feature_size,
            encoder_iterations=args.encoder_iterations,
            encoder_ways=args.encoder_ways,
            encoder_shots=args.encoder_shots,
            batch_size=args.batch_size,
            lr=args.lr,
            validation_alphabets=tuple(args.validation_alphabets),
            use_memory=not args.no_memory,
            seed=args.seed,
            progress=not args.no_progress,
        )
    )
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
