"""State serialisation: bit-identical, compact, and strict about what it accepts."""

import pytest
import torch

from models import NTM, NTMConfig, NTMState, PackedState
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


def stepped_batch(batch: int, config: NTMConfig | None = None) -> tuple[NTM, NTMState]:
    torch.manual_seed(1)
    model = NTM(config or NTMConfig(memory_slots=16, memory_width=8, hidden_size=12)).eval()
    with torch.inference_mode():
        state = model.initial_state(batch)
        for t in range(3):
            slots = torch.arange(batch) % model.config.num_ways if t else torch.full((batch,), -1)
            _, state = model.step(state, torch.rand(batch, 28, 28), model.label_input(slots))
    return model, state


def test_pack_and_unpack_are_inverse_and_unpack_copies_nothing():
    _, state = stepped_batch(4)
    flat = state.pack()
    assert flat.shape == (4, state.layout.size)
    unpacked = NTMState.unpack(flat, state.layout)
    assert unpacked.equal(state)
    assert all(t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for t in unpacked.tensors())


def test_packed_sessions_stack_back_to_the_batch_and_own_their_storage():
    _, state = stepped_batch(5)
    sessions = state.sessions()
    assert len(sessions) == 5 and all(s.data.shape == (state.layout.size,) for s in sessions)
    assert PackedState.stack(sessions).equal(state)
    assert PackedState.stack(sessions[2:3]).equal(state.split()[2])
    before = sessions[1].data.clone()
    sessions[0].data.fill_(7.0)
    assert torch.equal(sessions[1].data, before), "sessions share no storage"


def test_packed_state_bytes_are_the_state_bytes():
    _, state = stepped_batch(2)
    for one, packed in zip(state.split(), state.sessions(), strict=True):
        assert packed.to_bytes() == one.to_bytes()
        assert PackedState.from_bytes(packed.to_bytes()).equal(packed)
        assert packed.unpack().equal(one)


def test_stack_refuses_mixed_layouts_and_nothing():
    _, small = stepped_batch(1)
    _, other = stepped_batch(1, NTMConfig(memory_slots=8, memory_width=4, hidden_size=8))
    with pytest.raises(ValueError, match="layouts"):
        PackedState.stack([small.sessions()[0], other.sessions()[0]])
    with pytest.raises(ValueError, match="empty"):
        PackedState.stack([])


def test_ntm_states_stay_format_1_and_lrua_states_need_format_2():
    """A replica of an older release (format 1 only) still reads the shipped kind of state during a
    rolling upgrade; only several read vectors need format 2, whose header counts them."""
    import struct

    from models.state import STATE_FORMAT_VERSION

    ntm = NTM(NTMConfig(memory_slots=8, memory_width=4, hidden_size=8)).initial_state(1).detach()
    lrua_model = NTM(NTMConfig(memory_slots=8, memory_width=4, hidden_size=8, addressing="lrua", read_heads=3))
    lrua = lrua_model.initial_state(1).detach()
    version_and_reads = struct.Struct("<4sHH")
    assert version_and_reads.unpack_from(ntm.to_bytes())[1:] == (1, 0)
    assert version_and_reads.unpack_from(lrua.to_bytes())[1:] == (STATE_FORMAT_VERSION, 3)
    assert NTMState.from_bytes(lrua.to_bytes()).equal(lrua) and NTMState.from_bytes(ntm.to_bytes()).equal(ntm)
