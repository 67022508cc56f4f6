"""The warm start of a conv NTM: prototypical encoder pretraining, transplant, fitted input projection."""

import json

import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import NTMConfig
from models.data.episodes import EpisodeSampler
from models.data.omniglot import load_omniglot
from models.ntm import NTM
from models.protonet import pretrain_encoder, prototype_logits, prototype_loss
from models.train import Trainer
from models.warmstart import (
    RECORD_FILE,
    fit_input_projection,
    main,
    transplant,
)
from tests.unit.test_train import options

SMALL = dict(memory_slots=16, memory_width=8, hidden_size=32, conv_channels=(4, 8), feature_size=16)


def flatten_source(seed: int = 3, **overrides) -> NTM:
    torch.manual_seed(seed)
    return NTM(NTMConfig(**{**SMALL, "encoder": "flatten", **overrides}))


def conv_target(seed: int = 4) -> NTM:
    torch.manual_seed(seed)
    return NTM(NTMConfig(**{**SMALL, "encoder": "conv"}))


def test_prototype_logits_are_minus_squared_distances_to_the_support_means():
    features = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [1.0, 1.0]]])
    classes = torch.tensor([[0, 0, 1, 1]])
    support = torch.tensor([[True, True, True, False]])  # class 0: mean (1, 0); class 1: (0, 4)
    logits = prototype_logits(features, classes, support, ways=2)
    query = features[0, 3]
    assert logits[0, 3].tolist() == pytest.approx([-(query - torch.tensor([1.0, 0.0])).square().sum().item(), -10.0])


def test_encoder_pretraining_lowers_the_prototype_loss(omniglot_zip):
    torch.manual_seed(0)
    images = load_omniglot(omniglot_zip, 28).as_array()
    encoder = conv_target().encoder
    held = EpisodeSampler(images, 6, 4, seed=9).sample(16)
    before, _ = prototype_loss(encoder, held, 6, support_shots=1)
    losses = pretrain_encoder(encoder, EpisodeSampler(images, 6, 4, seed=1), 40, batch_size=8, lr=3e-3, progress=False)
    after, _ = prototype_loss(encoder, held, 6, support_shots=1)
    assert len(losses) == 40
    assert after.item() < 0.8 * before.item()


def test_transplant_copies_all_but_the_encoder_and_input_projection():
    source, target = flatten_source(), conv_target()
    encoder_before = {k: v.clone() for k, v in target.encoder.state_dict().items()}
    transplant(source, target)
    for name, tensor in source.state_dict().items():
        if not name.startswith(("encoder.", "input_proj.")):
            assert torch.equal(target.state_dict()[name], tensor), name
    for name, tensor in target.encoder.state_dict().items():
        assert torch.equal(tensor, encoder_before[name]), name


def test_transplant_refuses_a_source_of_another_shape():
    with pytest.raises(ValueError, match="hidden_size: 48 != 32"):
        transplant(flatten_source(hidden_size=48), conv_target())


def test_fitted_input_projection_is_the_least_squares_fit_of_the_source_preactivations(omniglot_zip):
    torch.manual_seed(0)
    source, target = flatten_source(), conv_target()
    images = EpisodeSampler(load_omniglot(omniglot_zip, 28).as_array(), 5, 10, seed=2).sample(8).images.flatten(0, 1)
    r2 = fit_input_projection(source, target, images, ridge=1e-6)
    ways = target.config.num_ways
    assert torch.equal(target.input_proj.weight[:, -ways:], source.input_proj.weight[:, -ways:])

    def squared_error(weight: torch.Tensor, bias: torch.Tensor) -> float:
        with torch.no_grad():
            wanted = source.input_proj(torch.cat([source.encoder(images), torch.zeros(len(images), ways)], 1))
            got = torch.nn.functional.linear(
                torch.cat([target.encoder(images), torch.zeros(len(images), ways)], 1), weight, bias
            )
            return (got - wanted).square().sum().item()

    weight, bias = target.input_proj.weight.detach().clone(), target.input_proj.bias.detach().clone()
    fitted = squared_error(weight, bias)
    assert 0.0 < r2 <= 1.0
    for seed in range(3):  # any other projection does worse
        torch.manual_seed(seed)
        nudged = weight.clone()
        nudged[:, :-ways] += 0.01 * torch.randn_like(nudged[:, :-ways])
        assert squared_error(nudged, bias) > fitted
    assert squared_error(weight, bias + 0.01) > fitted


def test_ntm_warmstart_writes_a_checkpoint_that_ntm_train_continues(omniglot_zip, tmp_path):
    source_dir = save_checkpoint(flatten_source(), tmp_path / "source")
    out = tmp_path / "warm"
    argv = ["--data", str(omniglot_zip), "--source", str(source_dir), "--out", str(out), "--encoder-iterations", "5"]
    argv += ["--encoder-ways", "6", "--encoder-shots", "4", "--conv-channels", "4", "8", "--feature-size", "16"]
    argv += ["--validation-alphabets", "Beta", "Gamma", "--no-progress"]
    assert main(argv) == 0
    model = load_checkpoint(out)
    assert model.config.encoder == "conv" and model.config.conv_channels == (4, 8)
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["encoder_iterations"] == 5
    assert 0.0 <= record["encoder_1shot_accuracy"] <= 1.0
    assert set(record["validation"]["by_instance"]) >= {"1", "2", "10"}
    source = load_checkpoint(source_dir)
    assert torch.equal(model.output.weight, source.output.weight)

    trainer = Trainer(options(omniglot_zip, tmp_path / "run", init_from=out, iterations=3, val_every=1000))
    assert trainer.config == model.config
    summary = trainer.run()
    assert summary["iterations"] == 3


def test_ntm_warmstart_no_memory_builds_the_lstm_baseline_with_the_pretrained_encoder(omniglot_zip, tmp_path):
    source_dir = save_checkpoint(flatten_source(), tmp_path / "source")
    out = tmp_path / "lstm"
    argv = ["--data", str(omniglot_zip), "--source", str(source_dir), "--out", str(out), "--encoder-iterations", "3"]
    argv += ["--encoder-ways", "6", "--encoder-shots", "4", "--conv-channels", "4", "8", "--feature-size", "16"]
    argv += ["--validation-alphabets", "Beta", "Gamma", "--no-progress", "--no-memory"]
    assert main(argv) == 0
    model = load_checkpoint(out)
    assert not model.config.use_memory and model.config.encoder == "conv"
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["input_projection_r2"] is None
    assert record["encoder_iterations"] == 3
