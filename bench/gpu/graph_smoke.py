"""Smoke test and timing of ``CUDAGraphStep`` before a GPU sweep relies on it.

Captures the training step of an LRUA and an NTM model on random episodes, checks a replay
gives a finite loss that moves, and prints eager and graphed iterations/s side by side.
Exits non-zero when capture fails, so ``sweep.sh`` trains eagerly instead.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from models import NTM, NTMConfig
from models.train import CUDAGraphStep, make_optimizer, set_learning_rate, train_step


def random_batch(batch: int, steps: int = 50, ways: int = 5) -> SimpleNamespace:
    labels = torch.randint(0, ways, (steps, batch), device="cuda")
    return SimpleNamespace(
        images=torch.rand(steps, batch, 28, 28, device="cuda"),
        label_inputs=torch.nn.functional.one_hot(labels, ways).float(),
        targets=labels,
    )


def rate(step, batch, n: int = 10) -> float:
    step(batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step(batch)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    for config in (NTMConfig(encoder="conv", addressing="lrua", read_heads=4),):
        for batch_size in (256, 1024):
            batch = random_batch(batch_size)
            eager_model = NTM(config).cuda()
            eager_opt = make_optimizer(eager_model, 1e-3)
            eager = rate(lambda b, m=eager_model, o=eager_opt: train_step(m, o, b, 10.0), batch, 2)
            model = NTM(config).cuda()
            optimizer = make_optimizer(model, 1e-3, capturable=True)
            graphed = CUDAGraphStep(model, optimizer, batch, 10.0)
            first = graphed(batch)[0]
            set_learning_rate(optimizer, 1e-2)
            losses = [graphed(random_batch(batch_size))[0] for _ in range(3)]
            assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] != first, (first, losses)
            print(
                f"{config.addressing} {config.encoder} batch {batch_size}: eager {eager:.1f} it/s, "
                f"graph {rate(graphed, batch):.1f} it/s, losses {first:.3f} -> {losses[-1]:.3f}"
            )


if __name__ == "__main__":
    main()
