"""The compiled recurrent step (``models.inference``) against the eager one, and in the micro-batcher."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
import torch

from models import NTM, NTMConfig
from models.inference import CompiledRunner, EagerRunner, batch_ladder, pad_rows, rung
from models.state import NTMState
from service.batching import MicroBatcher

pytestmark = pytest.mark.inductor

TOLERANCE = 1e-5
CONFIGS = {  # the shipped models' kinds of step, small
    "ntm": NTMConfig(memory_slots=16, memory_width=8, hidden_size=12, conv_channels=(4, 8), feature_size=16),
    "prototype": NTMConfig(
        encoder="conv4", conv_channels=(4, 4, 4, 4), addressing="prototype", memory_width=9, memory_slots=12,
        hidden_size=12,
    ),
}  # fmt: skip


def model_of(kind: str, seed: int = 0) -> NTM:
    torch.manual_seed(seed)
    return NTM(CONFIGS[kind]).eval()


def test_the_cuda_ladder_doubles_up_to_the_largest_batch_and_a_call_takes_the_next_rung():
    assert batch_ladder(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert batch_ladder(6) == (1, 2, 4, 6) and batch_ladder(1) == (1,)
    ladder = batch_ladder(6)
    assert [rung(ladder, rows) for rows in (1, 2, 3, 5, 6, 7)] == [1, 2, 4, 6, 6, None]
    with torch.inference_mode():
        rows = torch.arange(6.0).reshape(3, 2)
        assert pad_rows(rows, 5).tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
        assert pad_rows(rows, 3) is rows
    ordinary = torch.zeros(2, 2)
    with torch.inference_mode():
        assert pad_rows(ordinary, 2).is_inference() and pad_rows(ordinary[:1], 1).is_inference()
        strided = torch.zeros(4, 6)[:, :3]  # a session's memory inside its packed state is such a view
        assert pad_rows(strided, 4).is_contiguous() and pad_rows(strided, 4).is_inference()


def steps(runner: EagerRunner, model: NTM, rows: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` steps of ``rows`` sessions through ``runner``: every step's logits, then the final state's tensors."""
    gen = torch.Generator().manual_seed(seed)
    state, outputs = model.initial_state(rows), []
    with torch.inference_mode():
        for _ in range(count):
            images = torch.rand(rows, 28, 28, generator=gen)
            labels = model.label_input(torch.randint(-1, model.config.num_ways, (rows,), generator=gen))
            logits, state = runner.recurrent_step(model.precompute_inputs(images, labels), state)
            outputs.append(logits.clone())
    return outputs + [t.clone() for t in state.tensors()]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_the_compiled_step_gives_the_eager_step_at_every_size_with_graphs_compiled_only_in_the_warm_up(kind):
    model = model_of(kind)
    compiled = CompiledRunner(model, 6)
    assert compiled.warm_sizes() == (2, 6)
    assert compiled.warm_up() > 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager = EagerRunner(model)
    for rows in (1, 2, 3, 5, 6, 7):  # 1: eager without packages; 2-5: the symbolic graph; 6: the largest's; 7: eager
        expected, got = steps(eager, model, rows, 8, seed=rows), steps(compiled, model, rows, 8, seed=rows)
        for want, have in zip(expected, got, strict=True):
            assert have.shape == want.shape
            torch.testing.assert_close(have, want, rtol=0, atol=TOLERANCE)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_small_largest_batches_warm_only_the_graphs_they_call():
    assert CompiledRunner(model_of("ntm"), 1).warm_sizes() == ()
    assert CompiledRunner(model_of("ntm"), 2).warm_sizes() == (2,)


def test_a_row_gives_what_it_gives_alone_whatever_shares_its_call():
    model = model_of("ntm")
    runner = CompiledRunner(model, 4)
    state = NTMState.stack([model.initial_state(1)] * 3)
    with torch.inference_mode():
        pre = model.precompute_inputs(torch.rand(3, 28, 28), model.label_input(torch.tensor([0, 1, -1])))
        logits, new = runner.recurrent_step(pre, state)
        alone, _ = runner.recurrent_step(pre[:1], state.select([0]))
    assert logits.shape[0] == new.batch_size == 3
    torch.testing.assert_close(logits[:1], alone, rtol=0, atol=TOLERANCE)


@pytest.mark.anyio
async def test_a_compiling_batcher_is_ready_after_its_warm_up_and_answers_as_an_eager_one():
    model = model_of("ntm")
    compiled, eager = MicroBatcher(model, 4, compile=True), MicroBatcher(model, 4)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(6)]
    slots = [-1, 0, 1, 0, -1, 2]
    initial = model.initial_state(1).sessions()[0]
    try:
        assert await asyncio.to_thread(compiled.ready.wait, 120)
        assert eager.ready.is_set() and eager.runner.kind == "eager" and eager.warm_up_seconds is not None
        assert compiled.runner.kind == "compiled" and compiled.warm_up_seconds > 0
        (want, want_state), (got, got_state) = await asyncio.gather(
            eager.run(initial, images, slots), compiled.run(initial, images, slots)
        )
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(got_state.data, want_state.data, rtol=0, atol=TOLERANCE)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        joined = [compiled.run(initial, images[:n], slots[:n]) for n in (1, 2, 3)]  # states from packed views
        await asyncio.gather(*joined)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # served by the warm graphs
        predicted = await compiled.predict(initial, images[:3], -1)
        np.testing.assert_allclose(np.array(predicted), np.array(await eager.predict(initial, images[:3], -1)),
                                   rtol=0, atol=TOLERANCE)  # fmt: skip
    finally:
        compiled.close()
        eager.close()


class FailingCompile(CompiledRunner):
    """A compiler that is not there: the warm-up raises, as inductor does without a C++ toolchain."""

    def warm_up(self) -> float:
        raise RuntimeError("no C++ compiler found")


@pytest.mark.anyio
async def test_when_compiling_fails_the_batcher_logs_one_line_and_runs_eagerly(monkeypatch, caplog):
    monkeypatch.setattr("service.batching.CompiledRunner", FailingCompile)
    model = model_of("ntm")
    with caplog.at_level(logging.WARNING, logger="ntm"):
        batcher = MicroBatcher(model, 4, compile=True)
        try:
            assert await asyncio.to_thread(batcher.ready.wait, 30)
            assert batcher.runner.kind == "eager"
            probabilities, _ = await batcher.run(model.initial_state(1).sessions()[0], [np.zeros((28, 28))], [-1])
            assert len(probabilities) == 1
        finally:
            batcher.close()
    failures = [r for r in caplog.records if "compiling the model failed" in r.getMessage()]
    assert len(failures) == 1 and "no C++ compiler found" in failures[0].fields["error"]


def test_encoder_calls_are_chunked_so_that_their_first_activation_stays_in_cache():
    from service.batching import precompute_chunk

    shipped = {"conv4": NTMConfig(encoder="conv4", conv_channels=(64,) * 4, addressing="prototype", memory_width=69),
               "conv": NTMConfig(encoder="conv"), "flatten": NTMConfig(encoder="flatten")}  # fmt: skip
    assert {name: precompute_chunk(NTM(config)) for name, config in shipped.items()} == {
        "conv4": 64,
        "conv": 256,
        "flatten": 256,
    }


def test_runners_of_two_sizes_of_model_keep_every_dimension_but_the_batch_static():
    """Both runners' graphs share one code object: dynamo must not make the feature sizes symbolic (slower code)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch._dynamo.pgo")  # where dynamo says it made a size symbolic
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    other_sizes = NTMConfig(memory_slots=12, memory_width=10, hidden_size=14, conv_channels=(4, 8), feature_size=16)
    try:
        for config in (CONFIGS["ntm"], other_sizes):
            torch.manual_seed(7)
            CompiledRunner(NTM(config).eval(), 3).warm_up()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    marked = [r.getMessage() for r in records if "symbolic" in r.getMessage() or "as dynamic" in r.getMessage()]
    assert marked == []
