"""Omniglot loading (folder, zip, download), the one preprocessing function, episode sampling."""

import http.server
import io
import threading
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.episodes import EpisodeSampler, affine_grid, assign_slots, instance_numbers, offset_label_inputs
from models.data.omniglot import download_omniglot, load_omniglot
from models.data.preprocess import check_gray, decode_grayscale, fit_size, ink, preprocess
from tests.conftest import CHARACTERS_PER_ALPHABET, DRAWINGS, FIXTURE_ALPHABETS


def test_folder_and_zip_load_the_same_drawings(omniglot_folder, omniglot_zip):
    from_folder = load_omniglot(omniglot_folder)
    from_zip = load_omniglot(omniglot_zip)
    assert from_folder.alphabets == list(FIXTURE_ALPHABETS)
    assert len(from_folder.characters) == len(FIXTURE_ALPHABETS) * CHARACTERS_PER_ALPHABET
    assert from_folder.characters == from_zip.characters
    array = from_zip.as_array()
    assert array.shape == (12, DRAWINGS, 28, 28) and array.dtype == np.float32
    assert np.array_equal(array, from_folder.as_array())
    assert array.min() >= 0.0 and array.max() <= 1.0


def test_select_holds_alphabets_out(omniglot_zip):
    data = load_omniglot(omniglot_zip)
    held_out = data.select(["Beta"])
    rest = data.select(["Beta"], exclude=True)
    assert held_out.alphabets == ["Beta"] and rest.alphabets == ["Alpha", "Gamma"]
    with pytest.raises(ValueError, match="unknown alphabets"):
        data.select(["Klingon"])


def test_preprocess_inverts_and_resizes():
    gray = np.full((105, 105), 255.0)
    gray[40:60, :] = 0.0  # a dark horizontal bar
    out = preprocess(gray, 28)
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert out[0].max() == 0.0 and out[14].min() == pytest.approx(1.0)
    assert 0.0 < out[10:18].mean() < 1.0  # antialiased edges


def test_preprocess_of_8_bit_levels_equals_the_float_path_bit_for_bit():
    levels = np.arange(256, dtype=np.uint8)
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    for gray in (np.resize(levels, (28, 28)), image):
        assert np.array_equal(preprocess(gray, 28), preprocess(gray.astype(np.float32), 28))
        assert preprocess(gray, 28).dtype == np.float32
    small = image[:20, :17]  # another size: the float path resizes it
    assert np.array_equal(preprocess(small, 28), preprocess(small.astype(np.float64), 28))


def test_ink_of_a_mixed_stack_equals_each_image_preprocessed_alone():
    """The service's split: fit_size per request, ink over the batch (8-bit and float images mixed)."""
    rng = np.random.default_rng(1)
    grays = [
        rng.integers(0, 256, (28, 28), dtype=np.uint8),
        rng.uniform(0, 255, (28, 28)).astype(np.float32),
        rng.integers(0, 256, (40, 33), dtype=np.uint8),  # resized: float32
    ]
    batch = ink(np.stack([fit_size(check_gray(g), 28) for g in grays]))
    assert batch.dtype == np.float32
    for row, gray in zip(batch, grays, strict=True):
        assert np.array_equal(row, preprocess(gray, 28))


@pytest.mark.parametrize(
    "bad", [np.zeros((0, 4)), np.zeros((3,)), np.full((4, 4), np.nan), np.full((4, 4), -1.0), np.full((4, 4), 256.0)]
)
def test_preprocess_rejects_bad_arrays(bad):
    with pytest.raises(ValueError):
        preprocess(bad, 28)


def test_decode_handles_png_jpeg_and_transparency():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.putpixel((5, 5), (0, 0, 0, 255))
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    gray = decode_grayscale(buffer.getvalue())
    assert gray.dtype == np.uint8 and gray[0, 0] == 255 and gray[5, 5] == 0
    jpeg = io.BytesIO()
    Image.new("L", (8, 6), 200).save(jpeg, "JPEG")
    assert decode_grayscale(jpeg.getvalue()).shape == (6, 8)
    with pytest.raises(ValueError, match="more than"):
        decode_grayscale(buffer.getvalue(), max_pixels=50)


def test_slot_rule_and_offsets_by_hand():
    classes = torch.tensor([[2, 0, 2, 1, 0, 1]])
    labeled = torch.tensor([[True, False, True, True, True, True]])
    targets = assign_slots(classes, labeled, ways=3)
    # class 2 -> slot 0; class 0 unlabeled at step 1 -> "next free" 1, labeled at step 4 -> slot 2
    assert targets.tolist() == [[0, 1, 0, 1, 2, 1]]
    inputs = offset_label_inputs(targets, labeled, ways=3)
    assert inputs[0].argmax(-1).tolist()[1:] == [0, 0, 0, 1, 2] and inputs[0, 0].sum() == 0 and inputs[0, 2].sum() == 0
    assert instance_numbers(classes, 3).tolist() == [[1, 1, 2, 1, 2, 2]]


def slots_step_by_step(classes: list[int], labeled: list[bool]) -> list[int]:
    """The slot rule as the service applies it, one step at a time."""
    slot_of: dict[int, int] = {}
    targets = []
    for cls, has_label in zip(classes, labeled, strict=True):
        targets.append(slot_of.get(cls, len(slot_of)))
        if has_label and cls not in slot_of:
            slot_of[cls] = len(slot_of)
    return targets


def test_vectorised_slot_rule_equals_the_step_by_step_rule():
    generator = torch.Generator().manual_seed(4)
    classes = torch.randint(0, 5, (300, 50), generator=generator)
    labeled = torch.rand(300, 50, generator=generator) < 0.6
    targets = assign_slots(classes, labeled, ways=5)
    for b in range(300):
        assert targets[b].tolist() == slots_step_by_step(classes[b].tolist(), labeled[b].tolist()), b


def test_affine_grid_equals_torch():
    theta = torch.randn(64, 2, 3, generator=torch.Generator().manual_seed(2))
    for size in (1, 5, 28):
        expected = torch.nn.functional.affine_grid(theta, [64, 1, size, size], align_corners=False)
        assert torch.allclose(affine_grid(theta, size), expected, atol=1e-5)


def test_sampler_invariants(omniglot_zip):
    data = load_omniglot(omniglot_zip).as_array()
    sampler = EpisodeSampler(data, ways=5, shots=10, unlabeled_prob=0.2, seed=7)
    batch = sampler.sample(32)
    assert batch.images.shape == (50, 32, 28, 28)
    assert batch.label_inputs.shape == (50, 32, 5)
    for b in range(32):
        counts = torch.bincount(batch.instance[:, b])
        assert (batch.instance[:, b] <= 10).all() and counts[1] == 5  # five classes, ten each
        labeled_targets = batch.targets[:, b][batch.labeled[:, b]]
        first_seen = list(dict.fromkeys(labeled_targets.tolist()))
        assert first_seen == list(range(len(first_seen)))  # slots appear in order 0, 1, 2, ...
        assert batch.label_inputs[0, b].sum() == 0
        for t in range(1, 50):
            expected = torch.zeros(5)
            if batch.labeled[t - 1, b]:
                expected[batch.targets[t - 1, b]] = 1
            assert torch.equal(batch.label_inputs[t, b], expected)
    assert 0.1 < (~batch.labeled).float().mean() < 0.3


def test_rotated_characters_are_distinct_classes():
    base = np.zeros((28, 28), dtype=np.float32)
    base[4:10, 3:20] = 1.0  # an asymmetric mark: each quarter turn looks different
    base[10:24, 3:7] = 1.0
    one_character = np.repeat(base[None, None], 10, axis=1)
    sampler = EpisodeSampler(one_character, ways=4, shots=2, max_shift=0, max_rotation_deg=0, seed=0)
    batch = sampler.sample(3)
    turns = [torch.rot90(torch.from_numpy(base), k) for k in range(4)]
    for b in range(3):
        turn_of_slot: dict[int, set[int]] = {}
        for t in range(8):
            matches = [k for k in range(4) if torch.allclose(batch.images[t, b], turns[k], atol=1e-4)]
            assert len(matches) == 1, "each drawing is the character at exactly one quarter turn"
            turn_of_slot.setdefault(int(batch.targets[t, b]), set()).add(matches[0])
        assert len(turn_of_slot) == 4 and all(len(v) == 1 for v in turn_of_slot.values())
        assert set().union(*turn_of_slot.values()) == {0, 1, 2, 3}  # one character, four classes


def test_same_seed_same_episodes(omniglot_zip):
    data = load_omniglot(omniglot_zip).as_array()
    a = EpisodeSampler(data, seed=3).sample(4)
    b = EpisodeSampler(data, seed=3).sample(4)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_download_from_a_local_http_server(omniglot_zip, tmp_path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(omniglot_zip.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{omniglot_zip.name}"
        paths = download_omniglot(tmp_path, base_urls={"images_background": url})
    finally:
        server.shutdown()
        server.server_close()
    assert paths[0].read_bytes() == omniglot_zip.read_bytes()
    assert load_omniglot(paths[0]).alphabets == list(FIXTURE_ALPHABETS)
