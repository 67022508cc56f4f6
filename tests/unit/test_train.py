"""Training and evaluation on the fixture: loss goes down, resume is exact, eval reports."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import NTMConfig
from models.evaluate import main as eval_main
from models.ntm import NTM
from models.scoring import REPORTED_INSTANCES
from models.train import Trainer, TrainOptions, learning_rate

TINY = NTMConfig(memory_slots=16, memory_width=8, hidden_size=32, conv_channels=(4, 8), feature_size=16)


def options(data, out, **overrides) -> TrainOptions:
    base = dict(
        data=data,
        out=out,
        config=TINY,
        batch_size=8,
        iterations=20,
        warmup=2,
        lr=3e-3,
        validation_alphabets=("Beta", "Gamma"),
        val_every=10,
        val_episodes=8,
        progress=False,
        device="cpu",
        seed=5,
    )
    return TrainOptions(**{**base, **overrides})


def train_losses(out):
    return [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]


def test_twenty_iterations_lower_the_loss(omniglot_zip, tmp_path):
    trainer = Trainer(options(omniglot_zip, tmp_path, iterations=40))
    first = trainer.validate()["loss"]
    summary = trainer.run()
    assert summary["validation"]["loss"] < first
    for name in ("config.json", "model.safetensors", "train_state.pt", "metrics.jsonl", "metrics.json", "curves.png"):
        assert (tmp_path / name).exists(), name
    assert load_checkpoint(tmp_path).config == TINY


def test_resume_gives_the_same_next_loss(omniglot_zip, tmp_path):
    run = dict(iterations=20, val_every=1000, log_every=1)
    Trainer(options(omniglot_zip, tmp_path / "a", **run)).run()
    assert Trainer(options(omniglot_zip, tmp_path / "b", stop_at=10, **run)).run() == {"stopped_at": 10}
    Trainer(options(omniglot_zip, tmp_path / "b", resume=True, **run)).run()
    straight, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(straight) == len(resumed) == 20
    assert resumed[10] == straight[10]  # the first loss after the restart
    assert resumed == straight
    a = load_checkpoint(tmp_path / "a").state_dict()
    b = load_checkpoint(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learning_rate_schedule():
    opts = options("x", "y", lr=1.0, warmup=10)
    assert learning_rate(opts, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(opts, 10, 0.0) == pytest.approx(1.0)
    assert learning_rate(opts, 50, 1.0) == pytest.approx(0.05)


def test_ntm_eval_reports_the_instance_table(omniglot_zip, tmp_path, capsys):
    Trainer(options(omniglot_zip, tmp_path / "m", iterations=4, val_every=1000)).run()
    out_json = tmp_path / "eval.json"
    assert (
        eval_main(
            [
                "--data",
                str(omniglot_zip),
                "--alphabets",
                "Gamma",
                "Beta",
                "--model",
                str(tmp_path / "m"),
                "--episodes",
                "20",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| 1st | 2nd | 3rd | 4th | 5th | 10th |" in printed
    result = json.loads(out_json.read_text())[str(tmp_path / "m")]
    assert list(result["by_instance"]) == [str(k) for k in REPORTED_INSTANCES]
    assert all(0 <= v["accuracy"] <= 1 and v["ci95"] >= 0 for v in result["by_instance"].values())
    assert list(result["by_every_instance"]) == [str(k) for k in range(1, 11)]  # the 6th to 9th too
    assert all(result["by_every_instance"][k] == v for k, v in result["by_instance"].items())
    assert "| 1st | 2nd | 3rd | 4th | 5th | 6th | 7th | 8th | 9th | 10th |" in printed


def test_ntm_eval_plots_the_table_as_a_png(omniglot_zip, tmp_path):
    """--plot draws every row, the model's and its baseline's, into one PNG."""
    torch.manual_seed(0)
    # 3-way, as the one scored fixture alphabet has 4 classes; the other two fit the baseline
    save_checkpoint(NTM(dataclasses.replace(TINY, num_ways=3)), tmp_path / "m")
    plot = tmp_path / "by-instance.png"
    argv = ["--data", str(omniglot_zip), "--alphabets", "Gamma", "--model", str(tmp_path / "m")]
    assert eval_main([*argv, "--baseline", "prototype", "--episodes", "8", "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (800, 450)
        assert len(image.getcolors(1 << 16) or ()) > 2, "more than a blank canvas"


@pytest.mark.inductor
def test_compiled_training_matches_eager(omniglot_zip, tmp_path):
    """--compile trains the same parameters (to float tolerance) as the eager run."""
    run = dict(iterations=3, val_every=1000, log_every=1, shots=2, config=TINY)
    Trainer(options(omniglot_zip, tmp_path / "eager", **run)).run()
    Trainer(options(omniglot_zip, tmp_path / "compiled", compile=True, **run)).run()
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_metrics_log_keeps_training_episodes_apart_from_evaluation_episodes(omniglot_zip, tmp_path):
    Trainer(options(omniglot_zip, tmp_path, iterations=4, val_every=2, log_every=1, val_episodes=8)).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in rows if r["kind"] == "val"]
    assert validation and all(r["eval_episodes"] == 8 for r in validation)
    assert [r["episodes"] for r in validation] == [16, 32, 32]  # batch 8: training episodes at iterations 2, 4, end


def test_init_from_starts_with_the_checkpoint_weights_and_a_fresh_schedule(omniglot_zip, tmp_path):
    Trainer(options(omniglot_zip, tmp_path / "base", iterations=10, val_every=1000)).run()
    base = load_checkpoint(tmp_path / "base")
    other = NTMConfig(memory_slots=8, memory_width=4, hidden_size=16)
    tuned = Trainer(options(omniglot_zip, tmp_path / "tuned", config=other, init_from=tmp_path / "base", iterations=5))
    assert tuned.config == TINY and tuned.iteration == 0
    for name, value in base.state_dict().items():
        assert torch.equal(tuned.model.state_dict()[name], value), name
    tuned.run()
    assert load_checkpoint(tmp_path / "tuned").config == TINY


def test_lrua_trains_and_cuda_graph_is_ignored_without_a_gpu(omniglot_zip, tmp_path):
    """--addressing lrua trains end to end; --cuda-graph on a CPU run trains eagerly, the same losses."""
    from dataclasses import replace

    lrua = replace(TINY, addressing="lrua", read_heads=2)
    run = dict(config=lrua, iterations=6, val_every=1000, log_every=1)
    Trainer(options(omniglot_zip, tmp_path / "eager", **run)).run()
    graphed = Trainer(options(omniglot_zip, tmp_path / "graph", cuda_graph=True, **run))
    assert not graphed.cuda_graph
    graphed.run()
    assert train_losses(tmp_path / "graph") == train_losses(tmp_path / "eager")
    assert load_checkpoint(tmp_path / "graph").config.addressing == "lrua"


def test_set_learning_rate_reaches_float_and_tensor_rates():
    from models.train import make_optimizer, set_learning_rate

    model = torch.nn.Linear(2, 2)
    plain, tensor_lr = make_optimizer(model, 1e-3), torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3))
    for optimizer in (plain, tensor_lr):
        set_learning_rate(optimizer, 0.25)
        assert float(optimizer.param_groups[0]["lr"]) == 0.25
    assert isinstance(tensor_lr.param_groups[0]["lr"], torch.Tensor)


def test_the_encoder_can_learn_at_a_fraction_of_the_learning_rate():
    from models.train import make_optimizer, set_learning_rate

    model = NTM(
        NTMConfig(encoder="conv4", conv_channels=(8, 8, 8, 8), addressing="keyed", memory_width=13, hidden_size=16)
    )
    optimizer = make_optimizer(model, 1e-3, encoder_lr_scale=0.2)
    set_learning_rate(optimizer, 5e-4)
    rest, encoder = optimizer.param_groups
    assert rest["lr"] == 5e-4 and encoder["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in encoder["params"]} == {id(p) for p in model.encoder.parameters()}
    assert len(rest["params"]) + len(encoder["params"]) == len(list(model.parameters()))


def test_a_zero_encoder_learning_rate_freezes_the_encoder_and_its_statistics(omniglot_zip):
    from models.data.episodes import EpisodeSampler
    from models.data.omniglot import load_omniglot
    from models.train import make_optimizer, train_step

    torch.manual_seed(0)
    model = NTM(
        NTMConfig(encoder="conv4", conv_channels=(8, 8, 8, 8), addressing="keyed", memory_width=13, hidden_size=16)
    )
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    optimizer = make_optimizer(model, 1e-2, encoder_lr_scale=0.0)
    sampler = EpisodeSampler(load_omniglot(omniglot_zip, 28).as_array(), 5, 3, seed=1)
    rest = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    for _ in range(3):
        train_step(model, optimizer, sampler.sample(2), clip_norm=10.0)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in before.items())  # running stats too
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in rest.items())
