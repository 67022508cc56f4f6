"""Each NTM equation against small cases computed by hand."""

import math

import pytest
import torch

from models import addressing


def test_cosine_and_content_weighting_by_hand():
    memory = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # [1, 3, 2]
    key = torch.tensor([[[3.0, 0.0]]])  # [1, 1, 2]
    cos = addressing.cosine_similarity(memory, key)
    assert torch.allclose(cos, torch.tensor([[[1.0, 0.0, 1 / math.sqrt(2)]]]))
    beta = torch.tensor([[[2.0]]])
    expected = torch.tensor([math.exp(2.0), 1.0, math.exp(2 / math.sqrt(2))])
    expected = expected / expected.sum()
    assert torch.allclose(addressing.content_weighting(memory, key, beta)[0, 0], expected)


def test_cosine_of_zero_vectors_is_zero_not_nan():
    cos = addressing.cosine_similarity(torch.zeros(1, 4, 3), torch.zeros(1, 2, 3))
    assert torch.equal(cos, torch.zeros(1, 2, 4))


def test_interpolation_by_hand():
    w_c = torch.tensor([[[1.0, 0.0, 0.0]]])
    w_prev = torch.tensor([[[0.0, 0.0, 1.0]]])
    gate = torch.tensor([[[0.25]]])
    assert torch.allclose(addressing.interpolate(w_c, w_prev, gate), torch.tensor([[[0.25, 0.0, 0.75]]]))


def test_shift_moves_weight_across_the_wrap_around():
    w = torch.tensor([[[0.0, 0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0, 0.0]]])  # last slot; first slot
    forward = torch.tensor([[[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]]])  # +1 for the first, -1 for the second
    out = addressing.circular_shift(w, forward)
    assert torch.equal(out[0, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # slot 3 -> slot 0
    assert torch.equal(out[1, 0], torch.tensor([0.0, 0.0, 0.0, 1.0]))  # slot 0 -> slot 3


def test_shift_is_a_circular_convolution():
    w = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    s = torch.tensor([[[0.2, 0.5, 0.3]]])  # offsets -1, 0, +1
    out = addressing.circular_shift(w, s)[0, 0]
    # by hand: out[i] = s(-1) w[i+1] + s(0) w[i] + s(+1) w[i-1], indices mod 4
    assert torch.allclose(out, torch.tensor([0.21, 0.19, 0.29, 0.31]))
    assert out.sum().item() == pytest.approx(1.0)


def test_shift_equals_the_rolls_bit_for_bit_at_every_reach_up_to_the_slots():
    """The padded slices against ``torch.roll`` per offset, the formulation they replaced (``bench.compiled_shapes``)."""
    from bench.compiled_shapes import roll_circular_shift

    gen = torch.Generator().manual_seed(0)
    w = torch.rand(3, 2, 7, generator=gen)
    for reach in range(7):  # the config's shift_range: 0 up to N - 1
        s = torch.softmax(torch.rand(3, 2, 2 * reach + 1, generator=gen), dim=-1)
        assert torch.equal(addressing.circular_shift(w, s), roll_circular_shift(w, s))


def test_sharpening_by_hand():
    w = torch.tensor([[[0.2, 0.3, 0.5]]])
    gamma = torch.tensor([[[2.0]]])
    expected = torch.tensor([0.04, 0.09, 0.25]) / 0.38
    assert torch.allclose(addressing.sharpen(w, gamma)[0, 0], expected, atol=1e-6)


def test_sharpening_with_huge_gamma_stays_finite():
    w = torch.tensor([[[1e-20, 1e-30, 1e-25]]])
    out = addressing.sharpen(w, torch.tensor([[[1e4]]]))
    assert torch.isfinite(out).all() and out.sum().item() == pytest.approx(1.0)


def test_read_by_hand():
    memory = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    w = torch.tensor([[0.25, 0.75]])
    assert torch.allclose(addressing.read(memory, w), torch.tensor([[2.5, 3.5]]))


def test_erase_and_add_by_hand():
    memory = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    w = torch.tensor([[1.0, 0.5]])
    erase = torch.tensor([[0.5, 1.0]])
    add = torch.tensor([[10.0, 20.0]])
    out = addressing.write(memory, w, erase, add)
    # row 0: [1*(1-0.5), 2*(1-1)] + [10, 20]; row 1: [3*(1-0.25), 4*(1-0.5)] + [5, 10]
    assert torch.allclose(out, torch.tensor([[[10.5, 20.0], [7.25, 12.0]]]))
    assert torch.equal(memory, torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])), "write must not modify its input"


# ------------------------------------------------------------------ least recently used access


def test_least_used_marks_the_lowest_usages_and_breaks_ties_by_index():
    usage = torch.tensor([[0.5, 0.1, 0.0, 0.0, 0.3]])
    least = addressing.least_used(usage, 3)
    assert least.tolist() == [[[0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]]


def test_lrua_write_weighting_by_hand():
    read_prev = torch.tensor([[[0.0, 1.0, 0.0]]])
    least = torch.tensor([[[0.0, 0.0, 1.0]]])
    w = addressing.lrua_write_weighting(read_prev, least, torch.tensor([[[0.25]]]))
    assert torch.allclose(w, torch.tensor([[[0.0, 0.25, 0.75]]]))


def test_lrua_write_zeroes_least_used_slots_then_adds():
    memory = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    least = torch.tensor([[[0.0, 0.0, 1.0]]])
    w = torch.tensor([[[0.0, 0.5, 0.5]]])
    add = torch.tensor([[[10.0, 20.0]]])
    out = addressing.lrua_write(memory, least, w, add)
    # row 0 untouched; row 1: [3, 4] + [5, 10]; row 2 zeroed, then + [5, 10]
    assert torch.allclose(out, torch.tensor([[[1.0, 2.0], [8.0, 14.0], [5.0, 10.0]]]))
    assert torch.equal(memory, torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])), "must not modify its input"


def test_usage_update_by_hand():
    usage = torch.tensor([[1.0, 0.0]])
    read = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
    write = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert torch.allclose(addressing.update_usage(usage, read, write, 0.9), torch.tensor([[2.4, 1.5]]))


def test_write_equals_erase_then_add_at_batch_size():
    """The fused write (M - w (M e - a)) against eqs. 3 and 4 spelled out, on a batch of random memories."""
    generator = torch.Generator().manual_seed(5)
    memory, w = torch.rand(4, 16, 8, generator=generator), torch.softmax(torch.rand(4, 16, generator=generator), -1)
    erase, add = torch.rand(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    erased = memory * (1 - w.unsqueeze(-1) * erase.unsqueeze(1))
    assert torch.allclose(
        addressing.write(memory, w, erase, add), erased + w.unsqueeze(-1) * add.unsqueeze(1), atol=1e-6
    )
