"""The Conv-4 prototypical network baseline: its online rule, its threshold fit, its trainer and its file."""

import json
import math

import pytest
import torch

from models.data.episodes import EpisodeSampler, evaluation_sampler
from models.data.omniglot import load_omniglot
from models.encoders import Conv4Encoder
from models.protonet import (
    ProtoNet,
    evaluate_prototype_rule,
    fit_novelty_threshold,
    main,
    online_distances,
    online_predictions,
    pretrain_encoder,
    prototype_loss,
)

WAYS = 3


def hand_made_episode():
    """Four steps of one episode, 2-d features: class 0 at (0, 0), class 1 at (10, 0)."""
    features = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 0.0], [9.0, 1.0]]).unsqueeze(1)  # [T, 1, 2]
    targets = torch.tensor([0, 1, 0, 1]).unsqueeze(1)
    labeled = torch.ones(4, 1, dtype=torch.bool)
    return features, targets, labeled


def test_online_distances_use_only_the_labeled_steps_before_each_step():
    features, targets, labeled = hand_made_episode()
    distances, used = online_distances(features, targets, labeled, WAYS)
    assert used[:, 0].tolist() == [0, 1, 2, 2]
    assert torch.isinf(distances[0, 0]).all()  # nothing stored before the first step
    assert distances[1, 0, 0] == 100.0 and torch.isinf(distances[1, 0, 1:]).all()
    assert distances[3, 0, :2].tolist() == [pytest.approx(73.25), pytest.approx(2.0)]  # prototypes (0.5, 0), (10, 0)
    labeled[0, 0] = False  # an unlabeled step makes no prototype
    distances, used = online_distances(features, targets, labeled, WAYS)
    assert used[:, 0].tolist() == [0, 0, 1, 2] and distances[2, 0, 0] == math.inf


def test_the_prototype_rule_says_new_past_the_threshold_and_else_names_the_nearest():
    features, targets, labeled = hand_made_episode()
    distances, used = online_distances(features, targets, labeled, WAYS)
    # Step 1's class is new, 100 away from class 0; steps 2 and 3 are 1 and 2 from their own prototypes.
    assert online_predictions(distances, used, threshold=50.0)[:, 0].tolist() == [0, 1, 0, 1]
    assert online_predictions(distances, used, threshold=1.5)[:, 0].tolist() == [0, 1, 0, 2]  # step 3: "new"
    assert online_predictions(distances, used, threshold=200.0)[:, 0].tolist() == [0, 0, 0, 1]


def test_the_fitted_threshold_separates_new_classes_from_known_ones():
    features, targets, labeled = hand_made_episode()
    distances, used = online_distances(features, targets, labeled, WAYS)
    threshold = fit_novelty_threshold(distances, used, targets)
    assert 2.0 < threshold < 100.0
    assert (online_predictions(distances, used, threshold) == targets).all()


def test_protonet_training_lowers_its_loss_and_the_file_round_trips(omniglot_zip, tmp_path):
    images = load_omniglot(omniglot_zip, 28).as_array()
    torch.manual_seed(0)
    net = ProtoNet((8, 8, 8, 8))
    held = EpisodeSampler(images, 6, 4, seed=99).sample(8)
    before, _ = prototype_loss(net, held, 6, support_shots=1)
    pretrain_encoder(net.encoder, EpisodeSampler(images, 6, 4, seed=1), 40, batch_size=4, lr=3e-3, progress=False)
    after, _ = prototype_loss(net, held, 6, support_shots=1)
    assert after.item() < 0.8 * before.item()
    net.novelty_threshold.fill_(3.5)
    net.save(tmp_path / "pn")
    loaded = ProtoNet.load(tmp_path / "pn")
    assert float(loaded.novelty_threshold) == 3.5
    x = images[:2, 0]
    with torch.no_grad():
        assert torch.allclose(loaded(torch.from_numpy(x)), net.eval()(torch.from_numpy(x)), atol=1e-5)


def test_ntm_protonet_trains_fits_and_records(omniglot_zip, tmp_path):
    out = tmp_path / "pn"
    argv = ["--data", str(omniglot_zip), "--out", str(out), "--validation-alphabets", "Gamma", "--channels", "8", "8"]
    argv += ["--ways", "4", "--iterations", "10", "--fit-episodes", "20", "--eval-episodes", "20", "--no-progress"]
    assert main(argv) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["iterations"] == 10 and record["validation_alphabets"] == ["Gamma"]
    assert math.isfinite(record["novelty_threshold"])
    assert set(record["validation"]["by_instance"]) == {"1", "2", "3", "4", "5", "10"}
    assert float(ProtoNet.load(out).novelty_threshold) == record["novelty_threshold"]
    # The validation figures are the rule's on those episodes, as the scorer computes them.
    gamma = load_omniglot(omniglot_zip, 28, ["Gamma"]).as_array()
    again = evaluate_prototype_rule(
        ProtoNet.load(out), record["novelty_threshold"], evaluation_sampler(gamma, 4, 10), 20
    )
    assert again["by_instance"] == record["validation"]["by_instance"]


def test_conv4_folds_its_batchnorms_for_inference_and_keeps_them_out_of_its_state():
    torch.manual_seed(0)
    encoder = Conv4Encoder((8, 16, 16, 8))
    encoder.train()
    encoder(torch.rand(32, 28, 28))  # moves the running statistics off their defaults
    encoder.eval()
    images = torch.rand(5, 28, 28)
    with torch.enable_grad():
        plain = encoder(images).detach()  # autograd on: the BatchNorm path
    with torch.no_grad():
        folded = encoder(images)
    assert torch.allclose(plain, folded, atol=1e-5)
    assert not any("_folded" in name for name in encoder.state_dict())
    with torch.no_grad():  # a changed weight rebuilds the folded copy
        encoder.blocks[0][0].weight.mul_(2)
        assert not torch.allclose(encoder(images), folded, atol=1e-3)


def test_an_encoder_made_under_inference_mode_runs_unfolded_and_sees_its_weights_change():
    """Inference tensors keep no version counter, so such an encoder cannot keep a folded copy."""
    with torch.inference_mode():
        torch.manual_seed(0)
        encoder = Conv4Encoder((8, 8, 8, 8)).eval()
        images = torch.rand(3, 28, 28)
        before = encoder(images)
        encoder.blocks[0][0].weight.mul_(2)
        assert not torch.allclose(encoder(images), before, atol=1e-3)


def test_the_shipped_protonet_loads_with_the_threshold_it_records():
    from pathlib import Path

    import models

    shipped = Path(models.__file__).parent / "protonet_baseline"
    record = json.loads((shipped / "metrics.json").read_text())
    net = ProtoNet.load(shipped)
    assert net.channels == (64, 64, 64, 64) and float(net.novelty_threshold) == record["novelty_threshold"]
    assert "Bengali" in record["validation_alphabets"] and record["episode"]["ways"] == 60
