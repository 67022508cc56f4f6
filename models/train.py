"""``ntm-train``: meta-train an NTM (or the LSTM-only baseline) on Omniglot episodes.

Optimiser: Adam (Kingma and Ba 2015), learning rate 1e-3 with a short linear warm-up and a
cosine decay to 5%, gradient norm clipped at 10. Adam copes with the very different scales
of the controller, head and output gradients of a memory-augmented net without tuning, and
the decay settles the slot read-out late in training; clipping guards against the rare
exploding step through 50 recurrent steps.

Everything random comes from seeded generators whose states are checkpointed, so a run that
is stopped and resumed gives the same losses as one that was not stopped.

Under ``torchrun`` the same command trains data-parallel over processes (``models.distributed``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.calibration import CALIBRATION_EPISODES, CALIBRATION_SEED, calibrate_novelty
from models.checkpoint import WEIGHTS_FILE, load_checkpoint, load_config, resolve_device, save_checkpoint
from models.config import ADDRESSINGS, NTMConfig
from models.data.episodes import EpisodeSampler, evaluation_sampler
from models.data.omniglot import VALIDATION_ALPHABETS, load_omniglot
from models.distributed import data_parallel, join_from_env, leave
from models.evaluate import evaluate
from models.ntm import NTM
from models.protonet import ProtoNet

TRAIN_STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
SUMMARY_FILE = "metrics.json"


@dataclass
class TrainOptions:
    data: Path
    out: Path
    config: NTMConfig = field(default_factory=NTMConfig)
    shots: int = 10
    batch_size: int = 16
    iterations: int = 10000
    max_minutes: float | None = None
    lr: float = 1e-3
    encoder_lr_scale: float = 1.0
    warmup: int = 200
    clip_norm: float = 10.0
    unlabeled_prob: float = 0.1
    max_shift: float = 2.0
    max_rotation_deg: float = 10.0
    validation_alphabets: tuple[str, ...] = VALIDATION_ALPHABETS
    calibration_alphabets: tuple[str, ...] = ()
    calibration_episodes: int = CALIBRATION_EPISODES
    val_every: int = 500
    val_episodes: int = 500
    checkpoint_minutes: float = 3.0
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    init_from: Path | None = None
    encoder_from: Path | None = None
    stop_at: int | None = None
    stop_after_minutes: float | None = None
    log_every: int = 20
    compile: bool = False
    cuda_graph: bool = False
    progress: bool = True


def learning_rate(options: TrainOptions, iteration: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` iterations, then cosine from lr down to 5% of lr."""
    if iteration < options.warmup:
        return options.lr * (iteration + 1) / options.warmup
    return options.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(
    model: torch.nn.Module, lr: float, capturable: bool = False, encoder_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """Adam, fused (one kernel over all parameters; CPU and CUDA): ~4% of a CPU training step saved.

    ``capturable`` (CUDA only) keeps the step count and the learning rate in device tensors, so
    the step can live in a CUDA graph (``CUDAGraphStep``) and the schedule still reach it.
    ``encoder_lr_scale`` gives the encoder's parameters a learning rate of their own (a
    pretrained encoder fine-tunes more slowly than the fresh memory side learns); each group
    keeps its ``lr_scale`` and ``set_learning_rate`` applies it. A scale of 0 freezes the encoder:
    its parameters stop needing gradients and no group holds them.
    """
    encoder = getattr(model, "encoder", None)
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None and encoder_lr_scale != 1.0 else set()
    if encoder is not None and encoder_lr_scale == 0:
        encoder.requires_grad_(False)
    groups = [{"params": [p for p in model.parameters() if id(p) not in encoder_ids], "lr_scale": 1.0}]
    if encoder_ids and encoder_lr_scale > 0:
        groups.append({"params": [p for p in model.parameters() if id(p) in encoder_ids], "lr_scale": encoder_lr_scale})
    if capturable:
        device = next(model.parameters()).device
        for group in groups:
            group["lr"] = torch.tensor(lr * group["lr_scale"], device=device)
        return torch.optim.Adam(groups, lr=torch.tensor(lr, device=device), fused=True, capturable=True)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.Adam(groups, lr=lr, fused=True)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (times its ``lr_scale``), in place when it is a tensor a CUDA graph reads."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def train_step(
    model: NTM, optimizer: torch.optim.Optimizer, batch, clip_norm: float, forward: Callable | None = None
) -> tuple[float, float]:
    """One gradient step on a batch of episodes; returns (loss, accuracy).

    ``forward`` is the model's forward to use (``torch.compile(model)`` with ``--compile``).
    """
    optimizer.zero_grad(set_to_none=True)
    loss, accuracy = _update(model, optimizer, batch.images, batch.label_inputs, batch.targets, clip_norm, forward)
    return loss.item(), accuracy.item()


def _update(
    model: NTM,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    label_inputs: torch.Tensor,
    targets: torch.Tensor,
    clip_norm: float,
    forward: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, clipping and the optimiser step; (loss, accuracy) as device tensors."""
    model.train()
    encoder = getattr(model, "encoder", None)
    if encoder is not None and not any(p.requires_grad for p in encoder.parameters()):
        encoder.eval()  # a frozen encoder keeps the BatchNorm statistics it was trained with
    logits = (model if forward is None else forward)(images, label_inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    accuracy = (logits.detach().argmax(-1) == targets).float().mean()
    return loss.detach(), accuracy


class CUDAGraphStep:
    """The whole training step (forward, loss, backward, clipping, Adam) as one CUDA graph.

    A 50-step episode is thousands of small kernels, so on a GPU the eager step is bound by
    their launches; replaying a captured graph launches them all at once ("whole network
    capture", torch.cuda.graphs). The batch is copied into fixed input tensors before each
    replay, so every batch must have the first one's shape. Needs an optimiser from
    ``make_optimizer(..., capturable=True)``. Capture is preceded by ``WARMUP`` eager steps on
    the first batch (on a side stream, as capture requires), which are real training steps.
    """

    WARMUP = 3

    def __init__(self, model: NTM, optimizer: torch.optim.Optimizer, batch, clip_norm: float) -> None:
        self.images, self.label_inputs = batch.images.clone(), batch.label_inputs.clone()
        self.targets = batch.targets.clone()
        args = (model, optimizer, self.images, self.label_inputs, self.targets, clip_norm)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                optimizer.zero_grad(set_to_none=True)
                _update(*args)
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)  # backward inside the capture allocates the grads
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.accuracy = _update(*args)

    def __call__(self, batch) -> tuple[float, float]:
        self.images.copy_(batch.images)
        self.label_inputs.copy_(batch.label_inputs)
        self.targets.copy_(batch.targets)
        self.graph.replay()
        return self.loss.item(), self.accuracy.item()


@torch.no_grad()
def init_from_protonet(model: NTM, protonet: ProtoNet) -> None:
    """Start a conv4 keyed NTM from a trained prototypical network (``ntm-protonet``).

    The encoder's weights are copied, and the "none" score's bias is set to minus the
    protonet's novelty threshold: with beta = 1 and the identity key projection that
    ``NTM`` starts with, the first read then says "new" exactly where the protonet's online
    rule does (a drawing farther than the threshold from every stored one).
    """
    cfg = model.config
    if cfg.encoder != "conv4" or tuple(cfg.conv_channels) != protonet.channels:
        raise ValueError(
            f"--encoder-from needs --encoder conv4 --conv-channels {' '.join(map(str, protonet.channels))}"
        )
    model.encoder.load_state_dict(protonet.encoder.state_dict())
    if cfg.keyed:
        model.head_proj.bias[1] = -float(protonet.novelty_threshold)


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Learning curves (training loss and accuracy, validation accuracy by instance) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["episodes"] for r in train], [r["loss"] for r in train], label="train loss")
    ax_loss.plot([r["episodes"] for r in val], [r["loss"] for r in val], label="validation loss")
    ax_loss.set_xlabel("episodes")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_acc.plot([r["episodes"] for r in train], [r["accuracy"] for r in train], label="train (all steps)", alpha=0.6)
    reported = list(val[-1]["by_instance"]) if val else []
    for k in dict.fromkeys(reported[:2] + reported[-1:]):  # 1st, 2nd and the last reported instance
        ax_acc.plot(
            [r["episodes"] for r in val],
            [r["by_instance"][k]["accuracy"] for r in val],
            label=f"validation, instance {k}",
        )
    ax_acc.set_xlabel("episodes")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


class Trainer:
    """Owns the model, optimiser, samplers and logs of one training run."""

    def __init__(self, options: TrainOptions) -> None:
        self.options = options
        self.group = join_from_env(resolve_device(options.device))
        self.device = self.group.device(resolve_device(options.device))
        self.local_batch = self.group.local_batch(options.batch_size)
        torch.manual_seed(options.seed)
        if options.resume:
            config = load_config(options.out)
        elif options.init_from is not None:
            config = load_config(options.init_from)
        else:
            config = options.config
        self.config = config
        omniglot = load_omniglot(options.data, config.image_size)
        train_set, val_set = omniglot.split(options.validation_alphabets)
        self.calibration_data = None
        if options.calibration_alphabets:  # held out from this stage, for fitting the novelty offset after it
            self.calibration_data = train_set.select(options.calibration_alphabets).as_array()
            train_set = train_set.select(options.calibration_alphabets, exclude=True)
        ways = config.num_ways
        self.sampler = EpisodeSampler(
            train_set.as_array(),
            ways,
            options.shots,
            options.unlabeled_prob,
            max_shift=options.max_shift,
            max_rotation_deg=options.max_rotation_deg,
            seed=self.group.seed(options.seed),
            device=self.device,
        )
        self.val_data = val_set.as_array()
        self.model = NTM(config).to(self.device)
        if config.encoder == "conv4":  # the layout its convolutions train fastest in (see Conv4Encoder)
            self.model = self.model.to(memory_format=torch.channels_last)
        if options.init_from is not None and not options.resume:
            self.model.load_state_dict(load_checkpoint(options.init_from).state_dict())
        elif options.encoder_from is not None and not options.resume:
            init_from_protonet(self.model, ProtoNet.load(options.encoder_from))
        self.cuda_graph = options.cuda_graph and self.device.type == "cuda" and not self.group.distributed
        self.optimizer = make_optimizer(
            self.model, options.lr, capturable=self.cuda_graph, encoder_lr_scale=options.encoder_lr_scale
        )
        self.graph_step: CUDAGraphStep | None = None
        # The whole 50-step episode as one compiled graph: about 2x the episodes/s on CPU after a
        # compile of a few minutes, worth it for long runs. Parameters stay those of self.model.
        # Distributed, the forward is DDP's, whose backward averages the gradients over the ranks.
        parallel = data_parallel(self.model, self.group, self.device)
        self.forward = torch.compile(parallel, dynamic=False) if options.compile else None
        if self.forward is None and parallel is not self.model:
            self.forward = parallel
        self.iteration, self.episodes, self.elapsed = 0, 0, 0.0
        options.out.mkdir(parents=True, exist_ok=True)
        if options.resume:
            self._load()
        elif self.group.is_main:
            (options.out / METRICS_FILE).write_text("")

    def validate(self) -> dict:
        sampler = evaluation_sampler(self.val_data, self.config.num_ways, self.options.shots, device=self.device)
        return evaluate(self.model, sampler, self.options.val_episodes)

    def progress(self) -> float:
        fraction = self.iteration / self.options.iterations
        if self.options.max_minutes:
            fraction = max(fraction, self.elapsed / (60 * self.options.max_minutes))
        return fraction

    def run(self) -> dict:
        """Train until the schedule ends; returns the summary written to metrics.json (on rank 0)."""
        try:
            if not self.group.is_main:
                summary = self._run()
            else:
                with (self.options.out / METRICS_FILE).open("a") as self.log:
                    summary = self._run()
        except BaseException:
            self._leave(together=False)
            raise
        self._leave()
        return summary

    def _leave(self, together: bool = True) -> None:
        """Distributed: drop the DDP wrapper, then leave the process group. The group's gloo threads are
        then joined as it is destroyed, not at interpreter exit, where a rank could abort ("terminate
        called without an active exception") after its work was done."""
        if not self.group.distributed:
            return
        self.forward = None
        gc.collect()
        leave(self.group, together)

    def _run(self) -> dict:
        opts = self.options
        main = self.group.is_main
        bar = tqdm(
            total=opts.iterations,
            initial=self.iteration,
            disable=not (opts.progress and main),
            unit="it",
            dynamic_ncols=True,
        )
        last_save = time.monotonic()
        window: list[tuple[float, float]] = []
        start, start_episodes = time.monotonic(), self.episodes
        elapsed_at_start = self.elapsed
        while self.progress() < 1.0:
            out_of_time = (
                opts.stop_after_minutes is not None and self.elapsed - elapsed_at_start > 60 * opts.stop_after_minutes
            )
            if out_of_time or (opts.stop_at is not None and self.iteration >= opts.stop_at):
                bar.close()
                self.save()
                return {"stopped_at": self.iteration}
            lr = learning_rate(opts, self.iteration, self.progress())
            set_learning_rate(self.optimizer, lr)
            batch = self.sampler.sample(self.local_batch)
            if self.cuda_graph and self.graph_step is None:
                self.graph_step = CUDAGraphStep(self.model, self.optimizer, batch, opts.clip_norm)
            if self.graph_step is not None:
                loss, accuracy = self.graph_step(batch)
            else:
                loss, accuracy = train_step(self.model, self.optimizer, batch, opts.clip_norm, self.forward)
            loss, accuracy = self.group.mean([loss, accuracy])
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at iteration {self.iteration}")
            self.iteration += 1
            self.episodes += opts.batch_size
            self.elapsed = elapsed_at_start + time.monotonic() - start
            save_due = time.monotonic() - last_save > 60 * opts.checkpoint_minutes
            self.elapsed, save_due = self.group.broadcast([self.elapsed, float(save_due)])  # rank 0's clock rules
            window.append((loss, accuracy))
            episodes_per_s = (self.episodes - start_episodes) / max(time.monotonic() - start, 1e-9)
            bar.update(1)
            if self.iteration % opts.log_every == 0 and main:
                mean_loss = sum(x for x, _ in window) / len(window)
                mean_acc = sum(y for _, y in window) / len(window)
                window.clear()
                bar.set_postfix(
                    loss=f"{mean_loss:.3f}", acc=f"{mean_acc:.3f}", eps=f"{episodes_per_s:.0f}/s", lr=f"{lr:.1e}"
                )
                self._write(
                    {
                        "kind": "train",
                        "loss": mean_loss,
                        "accuracy": mean_acc,
                        "lr": lr,
                        "episodes_per_s": episodes_per_s,
                    }
                )
            if self.iteration % opts.val_every == 0 and main:
                result = self.validate()
                self._write({"kind": "val", **result})
                bar.write(
                    f"iteration {self.iteration}: validation "
                    + ", ".join(f"{k}: {v['accuracy']:.3f}" for k, v in result["by_instance"].items())
                )
            if save_due:
                self.save()
                last_save = time.monotonic()
        bar.close()
        if self.group.distributed:  # the last collective: every rank's state, before rank 0 calibrates alone
            self.save()
            if not main:
                return {"rank": self.group.rank, "iterations": self.iteration}
        calibration = None
        if self.calibration_data is not None and self.config.keyed:
            sampler = evaluation_sampler(self.calibration_data, self.config.num_ways, opts.shots, CALIBRATION_SEED)
            calibration = calibrate_novelty(self.model, sampler, opts.calibration_episodes)
            calibration["alphabets"] = list(opts.calibration_alphabets)
        final = self.validate()
        self._write({"kind": "val", **final})
        self.save(gather=not self.group.distributed)
        summary = {
            "config": self.config.to_dict(),
            "iterations": self.iteration,
            "episodes": self.episodes,
            "train_seconds": self.elapsed,
            "validation_alphabets": list(opts.validation_alphabets),
            "calibration": calibration,
            "validation": final,
        }
        (opts.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(opts.out / METRICS_FILE, opts.out / CURVES_FILE)
        return summary

    def _write(self, row: dict) -> None:
        """One JSONL line; ``episodes`` is always the training episodes so far (an evaluation's own
        episode count goes in ``eval_episodes``)."""
        extra = {("eval_episodes" if key == "episodes" else key): value for key, value in row.items()}
        row = {"iteration": self.iteration, "episodes": self.episodes, "seconds": round(self.elapsed, 2), **extra}
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()

    def save(self, gather: bool = True) -> None:
        """Model checkpoint plus everything needed to resume exactly (optimiser and RNG states).

        Distributed, every rank calls it at the same iteration: the ranks' sampler and RNG states
        are gathered, and rank 0 writes them all with its model and optimiser, which every rank
        shares. ``gather=False`` (rank 0 alone, after the other ranks are done) writes the states
        gathered last.
        """
        if gather:
            self._rank_states = (self.group.gather(self.sampler.get_state()), self.group.gather(torch.get_rng_state()))
        samplers, generators = self._rank_states
        if not self.group.is_main:
            return
        save_checkpoint(self.model, self.options.out)
        state = {
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "episodes": self.episodes,
            "optimizer": self.optimizer.state_dict(),
            "sampler_rng": samplers[0],
            "torch_rng": generators[0],
        }
        if self.group.distributed:
            state["ranks"] = {"sampler_rng": samplers, "torch_rng": generators}
        tmp = self.options.out / (TRAIN_STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.options.out / TRAIN_STATE_FILE)

    def _load(self) -> None:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(self.options.out / WEIGHTS_FILE), device=str(self.device)))
        state = torch.load(self.options.out / TRAIN_STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        ranks = state.get("ranks", {"sampler_rng": [state["sampler_rng"]], "torch_rng": [state["torch_rng"]]})
        if len(ranks["sampler_rng"]) != self.group.world_size:
            raise ValueError(
                f"{self.options.out} was saved by {len(ranks['sampler_rng'])} processes; resume it with as many"
            )
        self.sampler.set_state(ranks["sampler_rng"][self.group.rank].cpu())
        torch.set_rng_state(ranks["torch_rng"][self.group.rank].cpu())
        self.iteration, self.elapsed = state["iteration"], state["elapsed"]
        self.episodes = state.get("episodes", self.iteration * self.options.batch_size)


def parse_args(argv: list[str] | None = None) -> TrainOptions:
    parser = argparse.ArgumentParser(prog="ntm-train", description="Meta-train an NTM on Omniglot episodes.")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data/omniglot/images_background.zip"),
        help="Omniglot folder or zip",
    )
    parser.add_argument(
        "--download",
        type=Path,
        default=None,
        metavar="DIR",
        help="fetch the official background zip into DIR first and train on it",
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--encoder", choices=["conv", "conv4", "flatten"], default="conv")
    parser.add_argument(
        "--conv-channels", type=int, nargs="+", default=None, help="channels per conv layer (default: the config's)"
    )
    parser.add_argument("--no-memory", action="store_true", help="train the LSTM-only baseline")
    parser.add_argument(
        "--addressing",
        choices=list(ADDRESSINGS),
        default="ntm",
        help="memory access: the seed's NTM heads, Santoro et al.'s least recently used access, or LRUA over feature keys",
    )
    parser.add_argument("--read-heads", type=int, default=1, help="read heads (lrua only)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--memory-slots", type=int, default=128)
    parser.add_argument("--memory-width", type=int, default=40)
    parser.add_argument("--hidden-size", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="stop (and finish the schedule) after this long"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--encoder-lr-scale",
        type=float,
        default=1.0,
        help="the encoder's learning rate as a fraction of --lr (0: frozen, its BatchNorm statistics kept)",
    )
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--clip-norm", type=float, default=10.0)
    parser.add_argument("--unlabeled-prob", type=float, default=0.1)
    parser.add_argument(
        "--max-shift", type=float, default=2.0, help="largest random shift of a drawing, in pixels (0: none)"
    )
    parser.add_argument(
        "--max-rotation", type=float, default=10.0, help="largest random rotation of a drawing, in degrees (0: none)"
    )
    parser.add_argument(
        "--validation-alphabets",
        nargs="+",
        default=list(VALIDATION_ALPHABETS),
        help="background alphabets held out for validation",
    )
    parser.add_argument(
        "--calibration-alphabets",
        nargs="*",
        default=[],
        help="training alphabets left out of this stage, to fit the keyed memory's novelty offset on after it",
    )
    parser.add_argument(
        "--calibration-episodes",
        type=int,
        default=CALIBRATION_EPISODES,
        help="episodes of the calibration alphabets the novelty offset is fit on",
    )
    parser.add_argument("--val-every", type=int, default=500)
    parser.add_argument("--val-episodes", type=int, default=500)
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out: weights, optimiser, RNG, iteration (give the run's options again)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="start from this checkpoint's config and weights (fine-tuning) with a fresh optimiser and schedule",
    )
    parser.add_argument(
        "--encoder-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="start the conv4 encoder (and the keyed memory's novelty score) from this ntm-protonet model",
    )
    parser.add_argument(
        "--stop-at", type=int, default=None, help="checkpoint and stop at this iteration, as if interrupted"
    )
    parser.add_argument(
        "--stop-after-minutes", type=float, default=None, help="checkpoint and stop after this long, as if interrupted"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the episode forward (minutes to compile)")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="on a GPU, capture the whole training step as one CUDA graph (several times the iterations/s)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data
    if args.download is not None:
        from models.data.omniglot import download_omniglot

        data = download_omniglot(args.download)[0]
    channels = {} if args.conv_channels is None else {"conv_channels": tuple(args.conv_channels)}
    if args.encoder == "conv4" and args.conv_channels is None:
        channels = {"conv_channels": (64, 64, 64, 64)}
    config = NTMConfig(
        num_ways=args.ways,
        encoder=args.encoder,
        **channels,
        use_memory=not args.no_memory,
        memory_slots=args.memory_slots,
        memory_width=args.memory_width,
        hidden_size=args.hidden_size,
        addressing=args.addressing,
        read_heads=args.read_heads,
    )
    return TrainOptions(
        data=data,
        out=args.out,
        config=config,
        shots=args.shots,
        batch_size=args.batch_size,
        iterations=args.iterations,
        max_minutes=args.max_minutes,
        lr=args.lr,
        encoder_lr_scale=args.encoder_lr_scale,
        warmup=args.warmup,
        clip_norm=args.clip_norm,
        unlabeled_prob=args.unlabeled_prob,
        max_shift=args.max_shift,
        max_rotation_deg=args.max_rotation,
        validation_alphabets=tuple(args.validation_alphabets),
        calibration_alphabets=tuple(args.calibration_alphabets),
        calibration_episodes=args.calibration_episodes,
        val_every=args.val_every,
        val_episodes=args.val_episodes,
        checkpoint_minutes=args.checkpoint_minutes,
        seed=args.seed,
        device=args.device,
        resume=args.resume,
        init_from=args.init_from,
        encoder_from=args.encoder_from,
        stop_at=args.stop_at,
        stop_after_minutes=args.stop_after_minutes,
        progress=not args.no_progress,
        compile=args.compile,
        cuda_graph=args.cuda_graph,
    )


def main(argv: list[str] | None = None) -> int:
    torch.set_flush_denormal(True)  # sharp addressing weights underflow; denormal math is ~4x slower
    summary = Trainer(parse_args(argv)).run()
    if "rank" not in summary:  # rank 0, or a single process
        print(json.dumps(summary.get("validation", summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
