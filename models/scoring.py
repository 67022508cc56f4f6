"""Santoro et al.'s accuracy-by-instance table, shared by every model and baseline that is scored.

For each episode, the accuracy at the k-th instance is the fraction of classes whose k-th
appearance was predicted right. The table reports the mean over episodes and a
normal-approximation 95% interval, 1.96 * std / sqrt(episodes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

REPORTED_INSTANCES = (1, 2, 3, 4, 5, 10)


def per_episode_accuracy(correct: torch.Tensor, instance: torch.Tensor, shots: int) -> torch.Tensor:
    """correct [T, B] (0/1), instance [T, B] (1-based) -> [B, shots]: each episode's accuracy per instance number."""
    correct = correct.float()
    hits = torch.zeros(shots, correct.shape[1], device=correct.device)
    counts = torch.zeros_like(hits)
    index = (instance - 1).clamp_max(shots - 1)
    hits.scatter_add_(0, index, correct)
    counts.scatter_add_(0, index, torch.ones_like(correct))
    return (hits / counts.clamp_min(1)).T.cpu()


def by_instance(table: torch.Tensor, instances: Iterable[int] = REPORTED_INSTANCES) -> dict[str, dict[str, float]]:
    """[E, shots] per-episode accuracies -> {"k": {"accuracy", "ci95"}} for ``instances`` (the reported ones)."""
    result = {}
    for k in instances:
        if k <= table.shape[1]:
            column = table[:, k - 1]
            half_width = (
                1.96 * column.std(unbiased=True).item() / math.sqrt(len(column)) if len(column) > 1 else float("nan")
            )
            result[str(k)] = {"accuracy": column.mean().item(), "ci95": half_width}
    return result
