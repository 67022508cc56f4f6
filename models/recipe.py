"""``ntm-recipe``: train the default model from the Omniglot zip alone, in one command.

Stages, each an ordinary command of this package whose exact arguments are recorded in
``recipe.json`` (and in the model's ``metrics.json``):

1. ``ntm-protonet``: a Conv-4 prototypical network on the training alphabets (Snell et al.
   2017). It is the ``protonet`` baseline and the NTM's starting encoder.
2. ``ntm-train --encoder conv4 --addressing prototype --encoder-from <stage 1>``: the NTM
   with a feature-keyed LRUA memory read by class prototypes, meta-trained on Santoro et al.'s
   episodes with the encoder frozen; then its novelty offset is fit on the calibration
   alphabets, which neither stage trained on.
3. ``ntm-eval`` on the held-out validation alphabets, with both no-memory baselines beside it.

A stage that finished is skipped when the command runs again, and one that was interrupted
resumes from its last checkpoint, so the recipe survives a restart. ``recipe.json`` keeps each
stage's command, the wall time this command spent on it, and the training time the stage's
own record counts (``train_seconds``, summed over resumes). ``--preset smoke`` is
the same pipeline at toy sizes, for tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from models import evaluate, protonet, train
from models.data.omniglot import VALIDATION_ALPHABETS

DEFAULT_DATA = Path("../shared/data/omniglot/images_background.zip")
RECIPE_FILE = "recipe.json"
# Every fifth of the 25 training alphabets (sorted): left out of both training stages, so that the
# NTM's novelty offset is fit on alphabets as unseen as the ones it will be scored on.
CALIBRATION_ALPHABETS = ("Alphabet_of_the_Magi", "Balinese", "Early_Aramaic", "Japanese_(hiragana)", "N_Ko")
EVALUATION_FILE = "evaluation.json"

PRESETS: dict[str, dict[str, list[str]]] = {
    "default": {
        "protonet": ["--ways", "60", "--iterations", "12000", "--halve-every", "2400"],
        "ntm": [
            "--encoder", "conv4", "--addressing", "prototype", "--memory-width", "69", "--hidden-size", "128",
            "--batch-size", "16", "--lr", "1e-3", "--encoder-lr-scale", "0", "--warmup", "100", "--iterations", "1000000",
            "--max-minutes", "38", "--val-every", "500", "--val-episodes", "500", "--calibration-episodes", "4000",
        ],
        "calibration": list(CALIBRATION_ALPHABETS),
        "eval": ["--episodes", "1000"],
    },
    "smoke": {
        "protonet": ["--channels", "8", "8", "8", "8", "--ways", "5", "--iterations", "20", "--fit-episodes", "20",
                     "--eval-episodes", "20"],
        "ntm": [
            "--encoder", "conv4", "--conv-channels", "8", "8", "8", "8", "--addressing", "keyed", "--memory-width",
            "13", "--memory-slots", "16", "--hidden-size", "16", "--batch-size", "4", "--iterations", "6",
            "--val-every", "3", "--val-episodes", "10", "--calibration-episodes", "10", "--warmup", "2",
        ],
        "calibration": ["Beta"],
        "eval": ["--episodes", "20"],
    },
}  # fmt: skip


def stage_commands(preset: str, data: Path, out: Path, device: str, validation: list[str]) -> dict[str, list[str]]:
    """The argv of each stage, in order."""
    stages = PRESETS[preset]
    protonet_dir, ntm_dir = out / "protonet", out / "ntm"
    common = ["--data", str(data), "--validation-alphabets", *validation]
    return {
        "protonet": [
            "ntm-protonet", *common, "--out", str(protonet_dir), "--held-out-alphabets", *stages["calibration"],
            *stages["protonet"], "--no-progress",
        ],
        "ntm": [
            "ntm-train", *common, "--out", str(ntm_dir), "--encoder-from", str(protonet_dir), "--device", device,
            "--calibration-alphabets", *stages["calibration"], *stages["ntm"], "--no-progress",
        ],
        "eval": [
            "ntm-eval", "--data", str(data), "--alphabets", *validation, "--model", str(ntm_dir),
            "--baseline", "prototype", "--baseline", "protonet", "--protonet", str(protonet_dir), "--device", device,
            *stages["eval"], "--json", str(ntm_dir / EVALUATION_FILE),
        ],
    }  # fmt: skip


def run_recipe(preset: str, data: Path, out: Path, device: str, validation: list[str]) -> dict:
    """Run (or finish) every stage; returns the record written to ``recipe.json``."""
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / RECIPE_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {"stages": {}}
    record.update({"preset": preset, "device": device, "validation_alphabets": validation})
    commands = stage_commands(preset, data, out, device, validation)
    entry_points = {"protonet": protonet.main, "ntm": train.main, "eval": evaluate.main}
    done_markers = {
        "protonet": out / "protonet" / protonet.SUMMARY_FILE,
        "ntm": out / "ntm" / train.SUMMARY_FILE,
        "eval": out / "ntm" / EVALUATION_FILE,
    }
    for name, argv in commands.items():
        stage = record["stages"].setdefault(name, {"seconds": 0.0})
        stage["command"] = " ".join(argv)
        if done_markers[name].exists():
            continue
        resumable = name != "eval" and (out / name / train.TRAIN_STATE_FILE).exists()
        started = time.monotonic()
        entry_points[name](argv[1:] + (["--resume"] if resumable else []))
        stage["seconds"] = round(stage["seconds"] + time.monotonic() - started, 1)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    for name in ("protonet", "ntm"):  # training time as each stage's own record counts it, across resumes
        if done_markers[name].exists():
            record["stages"][name]["train_seconds"] = json.loads(done_markers[name].read_text()).get("train_seconds")
    record["total_seconds"] = round(sum(s["seconds"] for s in record["stages"].values()), 1)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ntm-recipe", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Omniglot background zip or folder")
    parser.add_argument("--out", type=Path, required=True, help="directory for every stage's output")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for the NTM stage and the evaluation")
    parser.add_argument("--validation-alphabets", nargs="+", default=list(VALIDATION_ALPHABETS))
    args = parser.parse_args(argv)
    record = run_recipe(args.preset, args.data, args.out, args.device, args.validation_alphabets)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
