"""State serialisation: bit-identical, compact, and strict about what it accepts."""

import pytest
import torch

from models import NTM, NTMConfig, NTMState
from models.state import StateFormatError


def test_state_bytes_round_trip_bit_identically():
    torch.manual_seed(0)
    model = NTM(NTMConfig()).eval()
    with torch.inference_mode():
        state = model.initial_state(1)
        for _ in range(5):
            _, state = model.step(state, torch.rand(1, 28, 28), model.label_input(torch.tensor([1])))
    data = state.to_bytes()
    assert len(data) == 24 + 4 * (128 * 40 + 40 + 2 * 128 + 2 * 200) == 23_288
    restored = NTMState.from_bytes(data)
    assert restored.equal(state)
    assert restored.to_bytes() == data


def test_baseline_state_round_trips():
    model = NTM(NTMConfig(use_memory=False, hidden_size=16))
    state = model.initial_state(1).detach()
    assert NTMState.from_bytes(state.to_bytes()).equal(state)


def test_from_bytes_refuses_garbage_and_truncation():
    data = NTM(NTMConfig(memory_slots=8, memory_width=4, hidden_size=8)).initial_state(1).detach().to_bytes()
    with pytest.raises(StateFormatError):
        NTMState.from_bytes(b"nonsense")
    with pytest.raises(StateFormatError):
        NTMState.from_bytes(data[:-4])
    with pytest.raises(StateFormatError):
        NTMState.from_bytes(b"XXXX" + data[4:])


def test_to_bytes_takes_one_session():
    state = NTM(NTMConfig(memory_slots=8, memory_width=4, hidden_size=8)).initial_state(2).detach()
    with pytest.raises(ValueError, match="one session"):
        state.to_bytes()
