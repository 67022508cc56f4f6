"""Data-parallel training under torchrun (``models.distributed``): two gloo processes on the CPU take the
same steps as one process given the same global batch, and a resumed distributed run equals a straight one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.data.episodes import EpisodeBatch
from models.distributed import RANK_SEED_STRIDE, ProcessGroup
from models.train import Trainer, parse_args
from tests.servers import free_port

ITERATIONS, BATCH, SEED = 6, 8, 5
TOLERANCE = 1e-5
# The ranks' gradients are summed in another order than one process sums them (about 1e-7 apart after a
# step); Adam turns that into parameter differences of the order of the learning rate on parameters whose
# gradients are near zero, so the runs compared here learn at 1e-4.


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--validation-alphabets", "Beta", "Gamma",
        "--conv-channels", "4", "8", "--memory-slots", "16", "--memory-width", "8", "--hidden-size", "32",
        "--batch-size", str(BATCH), "--iterations", str(ITERATIONS), "--warmup", "2", "--lr", "1e-4",
        "--val-every", "1000", "--val-episodes", "8", "--seed", str(SEED), "--device", "cpu", "--threads", "1",
        "--no-progress", *extra,
    ]  # fmt: skip


def torchrun(processes: int, argv: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "models.train", *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


class GlobalBatch:
    """What two ranks sample, as one process's batch: rank 0's share then rank 1's, side by side."""

    def __init__(self, rank0, rank1) -> None:
        self.samplers = [rank0, rank1]

    def sample(self, batch: int) -> EpisodeBatch:
        parts = [sampler.sample(batch // 2) for sampler in self.samplers]
        fields = EpisodeBatch.__dataclass_fields__
        return EpisodeBatch(**{name: torch.cat([getattr(p, name) for p in parts], dim=1) for name in fields})

    def get_state(self) -> torch.Tensor:  # what the trainer checkpoints
        return self.samplers[0].get_state()


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(directory).state_dict()


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= TOLERANCE, worst


@pytest.fixture(scope="module")
def distributed_run(omniglot_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "straight"
    torchrun(2, train_argv(omniglot_zip, out))
    return out


def test_two_processes_take_the_steps_of_one_given_the_same_global_batch(distributed_run, omniglot_zip, tmp_path):
    trainer = Trainer(parse_args(train_argv(omniglot_zip, tmp_path)))
    rank1 = Trainer(parse_args(train_argv(omniglot_zip, tmp_path / "rank1", "--seed", str(SEED + RANK_SEED_STRIDE))))
    trainer.sampler = GlobalBatch(trainer.sampler, rank1.sampler)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    one, two = weights(tmp_path), weights(distributed_run)
    assert_close(one, two)
    assert max((one[k] - initial[k]).abs().max().item() for k in one) > 10 * TOLERANCE  # training moved them
    rows = [json.loads(line) for line in (distributed_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == ITERATIONS and rows[-1]["episodes"] == ITERATIONS * BATCH  # the global batch


def test_a_resumed_distributed_run_equals_a_straight_one(distributed_run, omniglot_zip, tmp_path):
    torchrun(2, train_argv(omniglot_zip, tmp_path, "--stop-at", str(ITERATIONS // 2)))
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["iteration"] == ITERATIONS // 2 and len(state["ranks"]["sampler_rng"]) == 2
    torchrun(2, train_argv(omniglot_zip, tmp_path, "--resume"))
    straight, resumed = weights(distributed_run), weights(tmp_path)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_run_saved_by_two_processes_resumes_only_with_two(distributed_run, omniglot_zip, tmp_path):
    (tmp_path / "copy").mkdir()
    for path in distributed_run.iterdir():
        (tmp_path / "copy" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="saved by 2 processes"):
        Trainer(parse_args(train_argv(omniglot_zip, tmp_path / "copy", "--resume", "--iterations", "8")))


def test_the_global_batch_is_shared_out_and_rank_0_keeps_the_single_process_seed() -> None:
    group = ProcessGroup(rank=1, world_size=4)
    assert group.local_batch(16) == 4 and group.seed(7) == 7 + RANK_SEED_STRIDE
    assert ProcessGroup().seed(7) == 7 and not ProcessGroup().distributed
    with pytest.raises(ValueError, match="multiple of the 4 processes"):
        group.local_batch(10)
