"""The README's examples run against a real server on the shipped model, and recognise characters."""

from __future__ import annotations

import re
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
