"""models.allocator: with glibc's thresholds raised, a freed tensor's pages are reused, not faulted in again."""

import subprocess
import sys

import pytest

# A batcher's pattern: a model thread's eager recurrent steps over batches of varying size, each
# allocating its outputs and temporaries afresh. Prints the minor page faults a step after warm-up.
CALLS = """
import resource, sys, threading, torch
from models import NTM, NTMConfig
from models.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
model = NTM(NTMConfig()).eval()
out = {}
def steps():
    with torch.inference_mode():
        inputs = []
        for rows in (64, 40, 56, 24):
            pre = model.precompute_inputs(torch.rand(rows, 28, 28), model.label_input(torch.full((rows,), -1)))
            inputs.append((pre, model.initial_state(rows)))
        for pre, state in inputs:
            model.recurrent_step(pre, state)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(40):
            model.recurrent_step(*inputs[i % 4])
        out["faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40
t = threading.Thread(target=steps); t.start(); t.join()
print(out["faults"])
"""


def page_faults(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CALLS, mode], capture_output=True, text=True, timeout=120, check=True
    )
    return float(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_are_reused_without_page_faults():
    default, kept = page_faults("default"), page_faults("keep")
    # glibc's defaults unmap or trim the freed blocks, so each step faults tens of pages in again
    assert default > 50
    # kept mapped, the steps after the first reuse them (90 against 0.95 a step when last measured)
    assert kept < 10


def test_a_process_without_mallopt_is_left_alone(monkeypatch):
    from models import allocator

    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
