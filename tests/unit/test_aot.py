"""The one-row AOTInductor packages (``models.aot``): the eager step's answers, their cache, key and check."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._inductor import config as inductor_config

from models import aot
from models.inference import CompiledRunner, EagerRunner
from service.batching import MicroBatcher
from tests.unit.test_inference import CONFIGS, TOLERANCE, model_of, steps

pytestmark = pytest.mark.inductor


def lone_steps(runner: EagerRunner, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` one-image steps of one session through ``runner.step``: every step's logits, then the state's tensors."""
    model, gen = runner.model, torch.Generator().manual_seed(seed)
    state, outputs = model.initial_state(1), []
    with torch.inference_mode():
        for _ in range(count):
            images = torch.rand(1, 28, 28, generator=gen)
            labels = model.label_input(torch.randint(-1, model.config.num_ways, (1,), generator=gen))
            logits, state = runner.step(state, images, labels)
            outputs.append(logits.clone())
    return outputs + [t.clone() for t in state.tensors()]


@pytest.fixture(scope="module")
def package_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for this module's packages: a test after the first loads them instead of building them."""
    return tmp_path_factory.mktemp("ntm-aot")


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_packages_give_the_eager_step_and_a_second_start_loads_them_instead_of_building_them(
    kind, package_folder: Path
):
    model = model_of(kind)
    runner = CompiledRunner(model, 4)
    tmp_path = package_folder / kind
    assert runner.load_packages(tmp_path) is True and sorted(runner.packages) == sorted(aot.PARTS)
    packages = sorted(tmp_path.glob("*.pt2"))
    assert len(packages) == len(aot.PARTS)  # and no partial file left behind
    eager = EagerRunner(model)
    for want, have in zip(lone_steps(eager, 8, seed=1), lone_steps(runner, 8, seed=1), strict=True):
        assert have.shape == want.shape
        torch.testing.assert_close(have, want, rtol=0, atol=TOLERANCE)
    # One row of the recurrence alone (a session's batch form) goes through the other package.
    for want, have in zip(steps(eager, model, 1, 8, seed=2), steps(runner, model, 1, 8, seed=2), strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=TOLERANCE)
    again = CompiledRunner(model, 4)
    assert again.load_packages(tmp_path) is False
    assert sorted(tmp_path.glob("*.pt2")) == packages
    # A package for other weights is refused by the check that guards every load.
    for part, package in again.packages.items():
        with pytest.raises(ValueError, match=f"the {part} package differs from eager"):
            aot.check(part, package, model_of(kind, seed=1))


class RaisingPackage:
    """A loaded package that raises from its next call on: a fault after ``aot.check`` passed."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        raise RuntimeError("the package's library failed")


@pytest.mark.parametrize("part", sorted(aot.PARTS))
def test_a_package_that_raises_in_service_costs_no_call_the_runner_drops_them_and_says_so_once(
    part, package_folder: Path
):
    model = model_of("ntm")
    runner = CompiledRunner(model, 4)
    runner.load_packages(package_folder / "ntm")
    failures: list[Exception] = []
    runner.on_package_failure = failures.append
    raising = runner.packages[part] = RaisingPackage()
    eager = EagerRunner(model)
    if part == "step":
        want, have = lone_steps(eager, 3, seed=3), lone_steps(runner, 3, seed=3)
    else:
        want, have = steps(eager, model, 1, 3, seed=3), steps(runner, model, 1, 3, seed=3)
    for expected, got in zip(want, have, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE)
    assert raising.calls == 1 and runner.packages == {}
    assert [str(exc) for exc in failures] == ["the package's library failed"]


def test_the_key_changes_with_the_weights_the_architecture_and_the_part_and_only_with_them():
    def key(model, part: str = "step") -> str:
        return aot.package_key(aot.export_part(model, part), model)

    first = key(model_of("ntm"))
    assert key(model_of("ntm")) == first
    assert key(model_of("ntm", seed=1)) != first
    assert key(model_of("prototype")) != first
    assert key(model_of("ntm"), "recurrent") != first


@pytest.mark.anyio
async def test_when_the_packages_cannot_be_built_the_batcher_logs_one_line_and_serves_one_row_eagerly(
    monkeypatch, caplog, tmp_path: Path
):
    model = model_of("ntm")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))  # the child's inductor reads it, and fails
    assert inductor_config.cpp.cxx[1] != str(tmp_path / "no-such-compiler")  # read on import: ours stays
    with caplog.at_level(logging.WARNING, logger="ntm"):
        compiled, eager = MicroBatcher(model, 4, compile=True, package=True), MicroBatcher(model, 4)
        try:
            assert await asyncio.to_thread(compiled.ready.wait, 300)
            initial, image = model.initial_state(1).sessions()[0], np.full((28, 28), 200, dtype=np.uint8)
            (got, _), (want, _) = await asyncio.gather(compiled.step(initial, image, 0), eager.step(initial, image, 0))
            np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
            for _ in range(1200):  # the child's failure is logged by the thread that waits for it
                if any("packages are not used" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
            warnings = [r for r in caplog.records if "package" in r.getMessage()]
            assert [r.getMessage() for r in warnings] == ["the one-row packages are not used; one row runs eagerly"]
            assert "exited with 1" in warnings[0].fields["error"]
            assert not compiled.package_ready.is_set() and compiled.runner.kind == "compiled"
            assert not any((tmp_path / aot.FOLDER_NAME).glob("partial-*"))
            (got, _), (want, _) = await asyncio.gather(compiled.step(initial, image, 1), eager.step(initial, image, 1))
            np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
        finally:
            compiled.close()
            eager.close()
