"""The NTM module: gradients, step == sequence forward, batch independence, numerics."""

import copy
import io

import pytest
import torch

from models import NTM, NTMConfig, NTMState

SMALL = dict(memory_slots=16, memory_width=8, hidden_size=24, conv_channels=(4, 8), feature_size=12)


def make_model(seed: int = 0, **overrides) -> NTM:
    torch.manual_seed(seed)
    return NTM(NTMConfig(**{**SMALL, **overrides})).eval()


ACCESS = [{}, {"addressing": "lrua", "read_heads": 3}]  # the seed's NTM heads; least recently used access
ACCESS_IDS = ["ntm", "lrua"]


def compile_capturing(fn):
    """``fn`` compiled by dynamo with a backend that runs each graph as traced, and the list of their codes."""
    graphs: list[str] = []

    def backend(graph: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(graph.code)
        return graph.forward

    return torch.compile(fn, backend=backend, fullgraph=True), graphs


@pytest.fixture
def float64():
    """Models and tensors made in the test are float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_episode(steps: int, batch: int, ways: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(steps, batch, 28, 28, generator=gen)
    slots = torch.randint(-1, ways, (steps, batch), generator=gen)
    return images, slots


@pytest.mark.parametrize("encoder", ["conv", "flatten"])
@pytest.mark.parametrize("use_memory", [True, False])
@pytest.mark.parametrize("access", ACCESS, ids=ACCESS_IDS)
def test_gradients_reach_every_parameter(encoder, use_memory, access):
    model = make_model(encoder=encoder, use_memory=use_memory, **access).train()
    images, slots = random_episode(6, 3)
    logits = model(images, model.label_input(slots))
    logits.logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("encoder", ["conv", "flatten"])
@pytest.mark.parametrize("access", ACCESS, ids=ACCESS_IDS)
def test_step_equals_sequence_forward(encoder, access, float64):
    """In float64: LRUA's least-used slots are near-ties early in an episode, which float32 rounding
    (other kernels for other batch shapes) can order differently, writing the same rows to other slots."""
    model = make_model(encoder=encoder, **access)
    images, slots = random_episode(12, 4)
    labels = model.label_input(slots)
    with torch.inference_mode():
        sequence_logits, sequence_state = model.forward_sequence(images, labels)
        state = model.initial_state(4)
        stepped = []
        for t in range(12):
            logits, state = model.step(state, images[t], labels[t])
            stepped.append(logits)
    assert torch.allclose(torch.stack(stepped), sequence_logits, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(state.tensors(), sequence_state.tensors(), strict=True))


@pytest.mark.parametrize("access", ACCESS, ids=ACCESS_IDS)
def test_batch_independence(access):
    """A session's outputs do not depend on which sessions share its batch."""
    model = make_model(**access)
    images, slots = random_episode(8, 5)
    labels = model.label_input(slots)
    with torch.inference_mode():
        together, _ = model.forward_sequence(images, labels)
        for b in range(5):
            alone, _ = model.forward_sequence(images[:, b : b + 1], labels[:, b : b + 1])
            assert torch.allclose(alone[:, 0], together[:, b], atol=1e-5)


def test_step_is_pure_and_states_stack_and_split():
    model = make_model()
    states = [model.initial_state(1) for _ in range(3)]
    images, slots = random_episode(1, 3)
    before = [s.to_bytes() for s in states]
    with torch.inference_mode():
        _, new = model.step(NTMState.stack(states), images[0], model.label_input(slots[0]))
    assert [s.to_bytes() for s in states] == before
    parts = new.split()
    assert len(parts) == 3 and all(p.batch_size == 1 for p in parts)
    assert NTMState.stack(parts).equal(new)


def test_label_input_offsets_and_queries():
    model = make_model()
    one_hot = model.label_input(torch.tensor([2, -1]))
    assert one_hot.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("access", ACCESS, ids=ACCESS_IDS)
def test_numerically_safe_on_extreme_images_and_long_runs(access):
    model = make_model(memory_slots=32, memory_width=12, **access)
    with torch.inference_mode():
        state = model.initial_state(3)
        images = torch.stack([torch.zeros(28, 28), torch.ones(28, 28), torch.rand(28, 28)])
        for t in range(10_000):
            slots = torch.tensor([t % 5, -1, (t * 7) % 5])
            logits, state = model.step(state, images, model.label_input(slots))
        assert torch.isfinite(logits).all()
        assert all(torch.isfinite(x).all() for x in state.tensors())


def test_fingerprint_changes_with_weights_and_not_with_device_copy():
    a, b = make_model(seed=0), make_model(seed=1)
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == make_model(seed=0).fingerprint()


def test_config_validation_and_json_round_trip():
    config = NTMConfig(encoder="flatten", num_ways=7)
    assert NTMConfig.from_json(config.to_json()) == config
    assert NTMConfig.from_json(config.to_json()).hash() == config.hash()
    with pytest.raises(ValueError, match="encoder"):
        NTMConfig(encoder="resnet")
    with pytest.raises(ValueError, match="unknown config keys"):
        NTMConfig.from_dict({"num_wayz": 5})
    with pytest.raises(ValueError, match="addressing"):
        NTMConfig(addressing="dnc")
    with pytest.raises(ValueError, match="read_heads"):
        NTMConfig(read_heads=2)  # the seed's heads: one read, one write


def test_lrua_state_holds_read_weightings_then_usage_and_round_trips():
    model = make_model(addressing="lrua", read_heads=3)
    images, slots = random_episode(4, 1)
    with torch.inference_mode():
        _, state = model.forward_sequence(images, model.label_input(slots))
    assert state.weights.shape == (1, 4, 16) and state.read.shape == (1, 24)
    assert torch.allclose(state.weights[:, :3].sum(-1), torch.ones(1, 3))  # each read weighting sums to 1
    assert (state.weights[:, 3] > 0).all()  # every slot has been read a little: usage > 0
    assert NTMState.from_bytes(state.to_bytes()).equal(state)


def test_lrua_writes_new_samples_to_fresh_slots():
    """With alpha -> -inf every write goes to a least-used slot: R new slots per step, none reused early."""
    model = make_model(addressing="lrua", read_heads=2, memory_slots=16)
    with torch.no_grad():
        alpha_rows = [h * model._head_size + 8 + 1 for h in range(2)]  # after the key (8) and beta
        model.head_proj.bias[alpha_rows] = -1e4
        model.head_proj.weight[alpha_rows] = 0
    images, slots = random_episode(3, 1)
    with torch.inference_mode():
        _, state = model.forward_sequence(images, model.label_input(slots))
    written = (state.memory[0].abs() > 1e-3).any(-1)
    assert written.sum().item() == 6  # 3 steps x 2 heads, each in a slot of its own


def test_conv_encoder_in_onednn_blocked_layout_gives_the_same_features():
    """Without autograd, batches of 2+ images go through ``models.onednn``: the eager path's features."""
    model = make_model(encoder="conv").eval()
    for batch in (1, 2, 7, 64):
        images = torch.rand(batch, 28, 28, generator=torch.Generator().manual_seed(batch))
        eager = model.encoder(images)  # autograd on: the eager convolutions
        with torch.inference_mode():
            assert torch.allclose(model.encoder(images), eager, atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(model.encoder(images), eager, atol=1e-5)
    assert model.encoder._blocked is not None


def test_onednn_weights_follow_the_parameters_and_stay_out_of_copies():
    model = make_model(encoder="conv").eval()
    images = torch.rand(4, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        before = model.encoder(images)
    with torch.no_grad():
        model.encoder.convs[2].weight.mul_(1.5)  # in place, as an optimiser step
        after = model.encoder(images)
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, model.encoder(images), atol=1e-5)
    twin = copy.deepcopy(model)
    assert twin.encoder._blocked is None and model.encoder._blocked is not None
    buffer = io.BytesIO()
    torch.save(model, buffer)
    with torch.inference_mode():
        assert torch.allclose(twin.encoder(images), after, atol=1e-5)


def test_conv_encoder_with_channels_last_weights_gives_the_same_features():
    """``load_checkpoint`` serves the conv weights channels-last; the features must not change."""
    model = make_model(encoder="conv")
    images = torch.rand(6, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = model.encoder(images)
        model.to(memory_format=torch.channels_last)
        assert model.encoder.convs[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model.encoder(images), plain, atol=1e-6)


@pytest.mark.parametrize(
    ("stride", "padding", "bias", "size"), [(2, 1, True, 28), (2, 1, True, 7), (1, 1, False, 9), (1, 0, True, 6)]
)
def test_a_convolution_as_a_matrix_product_over_its_patches_is_the_convolution(stride, padding, bias, size):
    from models.encoders import convolve_as_matmul

    gen = torch.Generator().manual_seed(stride + 2 * padding + size)
    x = torch.rand(3, 5, size, size, generator=gen)
    weight, offset = torch.randn(7, 5, 3, 3, generator=gen), torch.randn(7, generator=gen) if bias else None
    want = torch.nn.functional.conv2d(x, weight, offset, stride=stride, padding=padding)
    have = convolve_as_matmul(x.permute(0, 2, 3, 1), weight, offset, stride, padding).permute(0, 3, 1, 2)
    torch.testing.assert_close(have, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_a_traced_step_takes_its_memory_products_as_multiply_and_sums_only_for_inference(training):
    """Traced without autograd, the NTM heads' products with the memory (keys against every slot, the
    read) are multiply-and-sums, which inductor fuses into its loops over the sessions; a traced
    training step keeps ``bmm``."""
    model = make_model().requires_grad_(training)
    images, slots = random_episode(3, 4)
    state = model.initial_state(4)
    for step in range(2):  # a state with something written
        _, state = model.step(state, images[step], model.label_input(slots[step]))
    state = NTMState(*(t.detach() for t in state.tensors()))
    pre = model.precompute_inputs(images[2], model.label_input(slots[2])).detach()
    compiled, graphs = compile_capturing(model.recurrent_step)
    with torch.set_grad_enabled(training):
        logits, new_state = compiled(pre, state)
        expected_logits, expected_state = model.recurrent_step(pre, state)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-6)
    for got, expected in zip(new_state.tensors(), expected_state.tensors(), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert len(graphs) == 1 and ("bmm" in graphs[0]) == training
    assert "roll" not in graphs[0]  # the heads' shift as slices of the circularly padded weighting


def test_an_exported_package_takes_its_memory_products_as_multiply_and_sums():
    """The one-row packages are exported (``torch.export``), not compiled by dynamo: the same formulation."""
    from models import aot

    code = aot.export_part(make_model(), "recurrent").graph_module.code
    assert "bmm" not in code and "aten.sum" in code


def test_the_conv_encoder_compiled_with_frozen_weights_gives_the_eager_features():
    """Compiled for inference (weights without autograd), the encoder convolves as matrix products over patches."""
    model = make_model(encoder="conv").eval().requires_grad_(False)
    images = torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(3))
    compiled, graphs = compile_capturing(model.encoder)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model.encoder(images), rtol=0, atol=1e-5)
    assert (
        len(graphs) == 1 and "conv2d" not in graphs[0] and graphs[0].count("torch.addmm") == 2
    )  # its two convolutions
