"""The feature-keyed LRUA memory: rows of (key, label), a soft nearest-neighbour read, and its start from a protonet."""

import json

import pytest
import torch

from models.config import NTMConfig
from models.data.episodes import EpisodeSampler, evaluation_sampler
from models.data.omniglot import load_omniglot
from models.ntm import NTM
from models.protonet import ProtoNet, episode_distances, online_predictions
from models.scoring import by_instance, per_episode_accuracy
from models.state import NTMState
from models.train import init_from_protonet

CHANNELS = (8, 8, 8, 8)
SMALL = dict(encoder="conv4", conv_channels=CHANNELS, addressing="keyed", memory_width=8 + 5, hidden_size=16)


def keyed(slots: int = 32, seed: int = 0, addressing: str = "keyed") -> NTM:
    torch.manual_seed(seed)
    return NTM(NTMConfig(**{**SMALL, "addressing": addressing}, memory_slots=slots)).eval()


@pytest.mark.parametrize("addressing", ["keyed", "prototype"])
def test_steps_one_at_a_time_give_the_sequence_forward_with_unlabeled_steps(omniglot_zip, addressing):
    model = keyed(addressing=addressing)
    batch = EpisodeSampler(load_omniglot(omniglot_zip, 28).as_array(), 5, 6, unlabeled_prob=0.3, seed=2).sample(3)
    with torch.no_grad():
        whole, last = model.forward_sequence(batch.images, batch.label_inputs)
        state, steps = model.initial_state(3), []
        for t in range(batch.images.shape[0]):
            logits, state = model.step(state, batch.images[t], batch.label_inputs[t])
            steps.append(logits)
    assert torch.allclose(torch.stack(steps), whole, atol=1e-5)
    assert last.weights.shape == (3, 3, 32) and torch.isfinite(whole).all()
    assert NTMState.from_bytes(state.select([1]).to_bytes()).equal(state.select([1]))


def decisive(distances: torch.Tensor, threshold: float, margin: float = 1e-2) -> torch.Tensor:
    """Steps whose answer rounding cannot flip: the nearest prototype nearer than the second by more than
    ``margin`` of its distance, and that distance off the threshold by more than ``margin`` of it.

    The untrained protonet's distances are small (about 1e-4), and the memory computes them by another
    sum of floats: two prototypes 0.1% apart in distance have been found in the other order.
    """
    two = distances.topk(2, dim=-1, largest=False).values
    nearest, second = two[..., 0], two[..., 1]
    apart = ((second - nearest) > margin * nearest) & ((nearest - threshold).abs() > margin * threshold)
    return apart | nearest.isinf()  # no prototype yet: nothing to confuse


def protonet_episodes(omniglot_zip):
    """A small protonet, 60 episodes, its online distances and a threshold that makes both answers common.

    Returns the protonet, the episodes, the free slot of each step, the online rule's answers, and which
    steps are ``decisive``."""
    torch.manual_seed(3)
    net = ProtoNet(CHANNELS).eval()
    batch = evaluation_sampler(load_omniglot(omniglot_zip, 28).as_array(), 5, 4, seed=5).sample(60)
    distances, used = episode_distances(net, batch)
    threshold = float(distances[torch.isfinite(distances)].median())
    net.novelty_threshold.fill_(threshold)
    return net, batch, used, online_predictions(distances, used, threshold), decisive(distances, threshold)


def predictions_from(net: ProtoNet, batch, addressing: str) -> torch.Tensor:
    model = keyed(addressing=addressing)
    init_from_protonet(model, net)
    with torch.no_grad():
        logits, _ = model.forward_sequence(batch.images, batch.label_inputs)
    return logits.argmax(-1)


def test_started_from_a_protonet_the_memory_reads_as_the_prototype_rule(omniglot_zip):
    """With at most one stored drawing per class, the first read predicts what the protonet's online rule does."""
    net, batch, used, rule, clear = protonet_episodes(omniglot_zip)
    predicted = predictions_from(net, batch, "keyed")
    members = torch.nn.functional.one_hot(batch.targets, 5)
    one_stored = (members.cumsum(0) - members).amax(-1) <= 1  # no class has two drawings before this step
    one_stored &= clear
    assert one_stored.sum() > 150
    assert torch.equal(predicted[one_stored], rule[one_stored])
    new = rule[one_stored] == used[one_stored]
    assert 0.1 < new.float().mean() < 0.9


def test_started_from_a_protonet_the_prototype_read_is_the_prototype_rule_at_every_instance(omniglot_zip):
    """Reading by class mean, the untrained memory answers as the protonet's online rule on every step,
    classes with several stored drawings included; reading by row does not once a class has two."""
    net, batch, used, rule, clear = protonet_episodes(omniglot_zip)
    members = torch.nn.functional.one_hot(batch.targets, 5)
    several = (members.cumsum(0) - members).amax(-1) >= 2
    assert several[clear].sum() > 200 and clear.float().mean() > 0.9
    assert torch.equal(predictions_from(net, batch, "prototype")[clear], rule[clear])
    assert not torch.equal(predictions_from(net, batch, "keyed")[several & clear], rule[several & clear])


def test_an_unlabeled_step_is_forgotten_and_its_slot_freed():
    model = keyed(slots=4)
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        state = model.initial_state(1)
        _, state = model.step(state, images[0], model.label_input(torch.tensor([-1])))
        written = state.weights[0, 1].argmax()
        assert state.memory[0, written, :8].abs().sum() > 0  # the key waits for its label
        _, state = model.step(state, images[1], model.label_input(torch.tensor([-1])))  # step 0 had no label
        assert state.memory[0, written].abs().sum() == 0 or state.weights[0, 1].argmax() == written
        _, state = model.step(state, images[2], model.label_input(torch.tensor([2])))  # step 1's label: slot 2
        labels = state.memory[0, :, 8:]
        assert labels.sum() == 1 and labels[:, 2].sum() == 1  # only the labeled drawing is stored


def test_more_labeled_steps_than_slots_reuse_the_least_used_ones():
    model = keyed(slots=4)
    with torch.no_grad():
        state = model.initial_state(2)
        for t in range(12):
            logits, state = model.step(state, torch.rand(2, 28, 28), model.label_input(torch.tensor([t % 5, 1])))
            assert torch.isfinite(logits).all()
    labels = state.memory[:, :, 8:]
    assert (labels.sum(-1) <= 1).all() and labels.sum() <= 2 * 4


def test_a_class_mass_is_the_mean_of_its_kernels_with_the_count_offset():
    from models.addressing import keyed_weighting

    keys = torch.tensor([[[0.0], [0.0], [3.0], [9.0]]])  # rows 0 and 1: class A (twice), row 2: class B, row 3: empty
    present = torch.tensor([[True, True, True, False]])
    counts = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    query, beta, none = torch.tensor([[1.0]]), torch.ones(1, 1), torch.tensor([[-30.0]])
    summed, _ = keyed_weighting(keys, present, query, beta, none, torch.zeros(1, 4))
    mean, _ = keyed_weighting(keys, present, query, beta, none, torch.log(counts.clamp_min(1)))
    kernel_a, kernel_b = torch.exp(torch.tensor(-1.0)), torch.exp(torch.tensor(-4.0))
    assert torch.allclose(summed[0, :2].sum() / summed[0, 2], 2 * kernel_a / kernel_b)
    assert torch.allclose(mean[0, :2].sum() / mean[0, 2], kernel_a / kernel_b)
    assert mean[0, 3] == 0 and summed[0, 3] == 0


def test_the_novelty_offset_fit_is_the_best_on_its_episodes_and_is_applied(omniglot_zip):
    from models.calibration import NOVELTY_OFFSETS, calibrate_novelty

    model = keyed()
    sampler = evaluation_sampler(load_omniglot(omniglot_zip, 28).as_array(), 5, 4, seed=8)
    before = model.head_proj.bias[1].item()
    result = calibrate_novelty(model, sampler, 20)
    assert result["offset"] in NOVELTY_OFFSETS
    assert result["worst_instance"] == min(result["by_instance"].values())
    assert result["worst_instance"] >= min(result["by_instance_without"].values())
    assert model.head_proj.bias[1].item() == before + result["offset"]
    batch = evaluation_sampler(load_omniglot(omniglot_zip, 28).as_array(), 5, 4, seed=8).sample(20)
    with torch.no_grad():
        logits, _ = model.forward_sequence(batch.images, batch.label_inputs)
    correct = logits.argmax(-1) == batch.targets
    assert correct.float().mean().item() == result["accuracy"]
    table = by_instance(per_episode_accuracy(correct, batch.instance, 4))
    assert {k: row["accuracy"] for k, row in table.items()} == result["by_instance"]


def test_ntm_calibrate_refits_from_the_uncalibrated_bias_so_a_second_run_changes_nothing(omniglot_zip, tmp_path):
    from models.calibration import CALIBRATION_FILE, main
    from models.checkpoint import load_checkpoint, save_checkpoint

    model = keyed(addressing="prototype")
    save_checkpoint(model, tmp_path)
    base = model.head_proj.bias[1].item()
    argv = [
        "--model",
        str(tmp_path),
        "--data",
        str(omniglot_zip),
        "--alphabets",
        "Beta",
        "Gamma",
        "--episodes",
        "12",
        "--shots",
        "4",
    ]
    assert main(argv) == 0
    first = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert first["base_bias"] == base and first["alphabets"] == ["Beta", "Gamma"] and first["episodes"] == 12
    calibrated = load_checkpoint(tmp_path).head_proj.bias[1].item()
    assert calibrated == pytest.approx(base + first["offset"], abs=1e-6)
    assert main(argv) == 0
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text()) == first
    assert load_checkpoint(tmp_path).head_proj.bias[1].item() == calibrated


def test_calibration_in_chunks_scores_every_episode_of_every_chunk(omniglot_zip):
    from models.calibration import calibrate_novelty

    data = load_omniglot(omniglot_zip, 28).as_array()
    whole = calibrate_novelty(keyed(), evaluation_sampler(data, 5, 4, seed=8), 20, chunk=20)
    model = keyed()
    chunked = calibrate_novelty(model, evaluation_sampler(data, 5, 4, seed=8), 20, chunk=7)
    sampler = evaluation_sampler(data, 5, 4, seed=8)
    batches = [sampler.sample(n) for n in (7, 7, 6)]
    with torch.no_grad():
        correct = torch.cat(
            [model.forward_sequence(b.images, b.label_inputs)[0].argmax(-1) == b.targets for b in batches], dim=1
        )
    assert chunked["episodes"] == whole["episodes"] == 20
    assert correct.float().mean().item() == pytest.approx(chunked["accuracy"], abs=1e-6)
