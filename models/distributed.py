"""Data-parallel training over processes started by ``torchrun`` (``torch.distributed``).

``torchrun --nproc-per-node N -m models.train ...`` (and its multi-node flags, ``--nnodes``,
``--node-rank``, ``--rdzv-endpoint``) starts N copies of ``ntm-train``; each reads its rank
and the world size from the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``). They join one process group, gloo on the CPU and NCCL on CUDA
(one GPU per process, ``cuda:LOCAL_RANK``), and the model is wrapped in
``DistributedDataParallel``, which averages the gradients over the ranks during backward.

The global batch stays ``--batch-size``: each of N ranks samples ``batch_size / N`` episodes
from a generator seeded ``seed + RANK_SEED_STRIDE * rank``, and since every rank's loss is the
mean over an equal share, the averaged gradient is the gradient of the mean over the whole
batch. So N processes take the same steps as one process given the concatenation of the ranks'
episodes (``tests/unit/test_distributed.py`` checks it to 1e-5). Rank 0's sampler is the single
process's, so one process trains exactly as it did before.

Decisions that hang on a clock (the ``--max-minutes`` schedule, when to checkpoint, when to
stop) are rank 0's, broadcast each iteration, so every rank runs the same number of steps with
the same learning rate. Rank 0 alone writes the checkpoint (with every rank's sampler state, so a
resumed run continues each rank's stream), ``metrics.jsonl``, the curves and the progress bar.

BatchNorm (the ``conv4`` encoder, when it is trained rather than frozen) normalises by each
rank's own share of the batch on the CPU, as DDP does by default; on CUDA it is converted to
``SyncBatchNorm``, which normalises over the global batch as one process would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

RANK_SEED_STRIDE = 1_000_003  # a prime: rank r's episodes come from seed + r * stride, far from other runs' seeds


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the training run: rank ``rank`` of ``world_size`` (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and the progress bar (rank 0)."""
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """The episode sampler's seed on this rank (rank 0: ``seed`` itself)."""
        return seed + RANK_SEED_STRIDE * self.rank

    def local_batch(self, batch_size: int) -> int:
        """This rank's share of the global batch."""
        if batch_size % self.world_size:
            raise ValueError(f"--batch-size {batch_size} must be a multiple of the {self.world_size} processes")
        return batch_size // self.world_size

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: its own GPU on CUDA (``LOCAL_RANK``), the CPU as given."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's ``values`` on every rank (float64), for decisions that must agree."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()

    def mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each of ``values`` (every rank gets it)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def gather(self, value: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``value`` (a CPU tensor of the same shape on each), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        parts = [torch.empty_like(value) for _ in range(self.world_size)]
        dist.all_gather(parts, value)
        return parts


def join_from_env(device: torch.device) -> ProcessGroup:
    """Join the process group torchrun describes in the environment; a lone process joins nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    group = ProcessGroup(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(group.local_rank)
        dist.init_process_group(backend=backend, rank=group.rank, world_size=world_size)
    return group


def leave(group: ProcessGroup, together: bool = True) -> None:
    """Leave the process group (after the last collective).

    ``together``: wait at a barrier first, so that no rank tears its gloo connections down while
    another still uses them (rank 0 writes its files after the last step; a rank that left before
    it could abort in gloo's threads, "terminate called without an active exception"). A run that
    failed leaves at once: the other ranks may never reach the barrier.
    """
    if group.distributed and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def data_parallel(model: torch.nn.Module, group: ProcessGroup, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped for data-parallel training on ``group`` (the model itself when not distributed)."""
    if not group.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)
