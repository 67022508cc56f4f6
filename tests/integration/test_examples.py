"""The README's examples run against a real server on the shipped model, and recognise characters."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def shipped():
    with server({}) as proc:  # no NTM_MODELS: the shipped model
        yield proc


def run_example(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_httpx_episode(shipped):
    out = run_example("episode.py", shipped.url)
    answers = re.findall(r"drew '(.)': model says '?([^' ]+)'?", out)
    assert len(answers) == 3, out
    assert sum(drawn == said for drawn, said in answers) >= 2, out


def test_tritonclient_episode(shipped):
    out = run_example("triton_episode.py", shipped.url.removeprefix("http://"))
    probabilities, label = re.fullmatch(r"\[(.*)\] -> (\d)\n", out, re.S).groups()
    assert len(probabilities.split()) == 5
    assert label == "3", out


def test_tritonclient_grpc_episode(shipped):
    """Unary and streaming over gRPC: the same episode, the same answer (character 3), the same probabilities."""
    out = run_example("grpc_episode.py", shipped.grpc_target)
    unary, unary_label, streamed, streamed_label = re.fullmatch(
        r"unary:  \[(.*)\] -> (\d)\nstream: \[(.*)\] -> (\d)\n", out, re.S
    ).groups()
    assert len(unary.split()) == 5 and unary == streamed, out
    assert unary_label == streamed_label == "3", out


def readme_block(heading: str, language: str) -> str:
    """The first ``language`` code block under the README heading ``heading``."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split(f"\n{heading}\n", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's curl episode needs curl")
def test_readme_curl_episode(shipped):
    """The README's curl commands, as written, against the shipped model: each answers as the comments say."""
    script = readme_block("### curl", "bash").replace("localhost:8000", shipped.url.removeprefix("http://"))
    # Each command's output on a line of its own, to read back.
    script = "set -e\n" + script.replace("\ncurl ", "\necho; curl ")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outputs = [line for line in result.stdout.splitlines() if line]  # DELETE's 204 writes nothing
    assert len(outputs) == 5, result.stdout
    teach_a, teach_b, query, info, reset = outputs
    assert json.loads(teach_a)["labels"][0] == "plus" and json.loads(teach_b)["labels"][1] == "cross"
    answer = json.loads(query)
    assert answer["step"] == 2 and answer["labels"] == ["plus", "cross", None, None, None]
    assert answer["prediction"] == "plus" and answer["predicted_slot"] == 0
    assert json.loads(info)["steps"] == 3 and json.loads(reset)["steps"] == 0


def test_enroll_then_classify_example(shipped):
    out = run_example("enroll.py", shipped.url)
    answers = re.findall(r"drew '(.)': model says '?([^' ]+)'?", out)
    assert len(answers) == 6, out
    assert sum(drawn == said for drawn, said in answers) >= 4, out
    assert "steps after the predictions: 6" in out, out
    first = answers[0][1]
    assert re.search(rf"restored session \S+ says '?{re.escape(first)}'?\n", out), out


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's curl commands need curl")
def test_readme_enroll_then_classify_curl(shipped, tmp_path):
    """The README's enroll-then-classify commands, as written: teach, predict read-only, snapshot, restore."""
    script = readme_block("### Enroll, then classify", "bash").replace(
        "localhost:8000", shipped.url.removeprefix("http://")
    )
    script = "set -e\n" + script.replace("\ncurl ", "\necho; curl ")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    taught, predicted, restored = [json.loads(line) for line in result.stdout.splitlines() if line]
    assert [r["step"] for r in taught["results"]] == [0, 1]
    assert predicted["steps"] == 2 and len(predicted["results"]) == 2
    assert all(r["prediction"] in ("plus", "cross", None) for r in predicted["results"])
    assert restored["model"] == "default" and len(restored["session_id"]) >= 22
    assert (tmp_path / "taught.ntmsnap").read_bytes()[:4] == b"NTMX"
