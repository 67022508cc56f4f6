"""``ntm-recipe``: the default model's whole training, from the Omniglot zip alone, at toy sizes."""

import json

from models.checkpoint import load_checkpoint
from models.protonet import ProtoNet
from models.recipe import main
from tests.conftest import write_omniglot, zip_folder


def test_the_recipe_trains_from_nothing_evaluates_with_both_baselines_and_skips_what_is_done(tmp_path):
    """Six characters an alphabet, so that a held-out alphabet makes 5-way episodes."""
    data = zip_folder(write_omniglot(tmp_path / "omniglot", characters=6), tmp_path / "images_background.zip")
    out = tmp_path / "recipe"
    argv = ["--data", str(data), "--out", str(out), "--preset", "smoke", "--validation-alphabets", "Gamma"]
    assert main(argv) == 0
    record = json.loads((out / "recipe.json").read_text())
    assert list(record["stages"]) == ["protonet", "ntm", "eval"]
    assert (
        record["stages"]["ntm"]["command"].startswith("ntm-train ")
        and "--init-from" not in record["stages"]["ntm"]["command"]
    )
    model = load_checkpoint(out / "ntm")
    calibration = json.loads((out / "ntm" / "metrics.json").read_text())["calibration"]
    assert calibration["alphabets"] == ["Beta"] and calibration["accuracy"] >= calibration["accuracy_without"]
    assert model.config.addressing == "keyed" and model.config.encoder == "conv4"
    assert ProtoNet.load(out / "protonet").channels == model.config.conv_channels
    evaluation = json.loads((out / "ntm" / "evaluation.json").read_text())
    assert len(evaluation) == 3  # the model, the prototype rule on its encoder, the protonet
    assert all(set(row["by_instance"]) == {"1", "2", "3", "4", "5", "10"} for row in evaluation.values())
    seconds = record["total_seconds"]
    assert main(argv) == 0  # every stage done: nothing runs again
    assert json.loads((out / "recipe.json").read_text())["total_seconds"] == seconds
