"""Checkpoints: config.json + model.safetensors round trip, and clear refusals."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
from models import NTM, CheckpointError, NTMConfig, load_checkpoint, save_checkpoint
from models.data.omniglot import VALIDATION_ALPHABETS

SMALL = NTMConfig(memory_slots=8, memory_width=4, hidden_size=8, conv_channels=(4,), feature_size=6)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(3)
    model = NTM(SMALL)
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == SMALL
    assert loaded.fingerprint() == model.fingerprint()
    x = torch.rand(3, 2, 28, 28)
    labels = torch.zeros(3, 2, 5)
    with torch.inference_mode():  # loaded for inference: channels-last convolutions, the same values
        assert torch.allclose(model.eval()(x, labels), loaded(x, labels), atol=1e-6)
    again = load_checkpoint(save_checkpoint(loaded, tmp_path / "again"))
    assert again.fingerprint() == model.fingerprint()


def test_shape_mismatch_is_refused_naming_the_file(tmp_path):
    save_checkpoint(NTM(SMALL), tmp_path)
    (tmp_path / "config.json").write_text(
        NTMConfig(memory_slots=8, memory_width=4, hidden_size=9, conv_channels=(4,), feature_size=6).to_json()
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*shape"):
        load_checkpoint(tmp_path)


def test_missing_and_unexpected_tensors_are_refused(tmp_path):
    save_checkpoint(NTM(SMALL), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("output.bias")
    tensors["extra"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing output.bias.*unexpected extra"):
        load_checkpoint(tmp_path)


def test_malformed_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: no such file"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid config"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_ways": 5, "layers": 3}))
    with pytest.raises(CheckpointError, match="unknown config keys: layers"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(SMALL.to_json())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("directory", ["pretrained", "fast", "flatten"])
def test_shipped_models_load_and_record_their_evaluation(directory):
    """Each shipped model loads, and its record names held-out alphabets and the table ntm-eval printed."""
    path = Path(models.__file__).parent / directory
    model = load_checkpoint(path)
    record = json.loads((path / "metrics.json").read_text())
    evaluation = record["evaluation"]
    assert evaluation["episodes"] == 1000 and evaluation["ways"] == model.config.num_ways
    assert set(evaluation["by_instance"]) == {"1", "2", "3", "4", "5", "10"}
    assert tuple(evaluation["validation_alphabets"]) == VALIDATION_ALPHABETS


def test_every_shipped_model_records_both_no_memory_baselines_on_the_same_episodes():
    shipped = Path(models.__file__).parent
    for directory in ("pretrained", "fast", "flatten"):
        record = json.loads((shipped / directory / "metrics.json").read_text())
        assert set(record["baselines"]) == {"prototype", "protonet"}, directory
        for baseline in record["baselines"].values():
            assert baseline["episodes"] == 1000 and set(baseline["by_instance"]) == {"1", "2", "3", "4", "5", "10"}
            assert "novelty_threshold" in baseline
        scored = record["evaluation"] if directory == "pretrained" else record["baselines_evaluation"]
        assert (
            scored["command"].startswith("ntm-eval ")
            and "--baseline prototype --baseline protonet" in scored["command"]
        )
        assert tuple(scored["validation_alphabets"]) == VALIDATION_ALPHABETS


def test_the_default_model_record_against_its_accuracy_targets():
    """What the record shows, target by target: >= 96% at the 1st and 2nd instances and >= 99.5% at the
    10th; within 0.3 points of the better no-memory baseline at every instance from the 1st to the 10th;
    above both at the 1st and the 2nd (at the 1st by 0.02 points, inside either interval: the README says so)."""
    record = json.loads((Path(models.__file__).parent / "pretrained" / "metrics.json").read_text())
    model = {k: v["accuracy"] for k, v in record["evaluation"]["by_every_instance"].items()}
    best = {k: max(b["by_every_instance"][k]["accuracy"] for b in record["baselines"].values()) for k in model}
    assert list(model) == [str(k) for k in range(1, 11)]
    assert all(model[k] >= best[k] - 0.003 for k in model), (model, best)
    assert model["1"] > best["1"] and model["2"] > best["2"], (model, best)
    assert model["1"] >= 0.96 and model["2"] >= 0.96 and model["10"] >= 0.995
    assert record["training"]["recipe"] == "ntm-recipe --out runs"
    assert "--init-from" not in json.dumps(record["training"]["stages"])  # trained from nothing
