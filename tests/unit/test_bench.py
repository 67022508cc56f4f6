"""Smoke tests of the benchmarks: each main() runs with tiny settings and writes the JSON it promises."""

import json

import pytest
import torch

from bench import model as model_bench
from bench import products
from bench import training as training_bench
from bench.seed_reference import SeedNTM
from models import NTMConfig


@pytest.mark.inductor
def test_model_bench_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "model.json"
    threads = torch.get_num_threads()
    try:
        assert (
            model_bench.main(
                ["--batches", "1", "--repeats", "1", "--min-time", "0.01", "--threads", "1", "--json", str(out)]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert set(data) >= {
        "steps_per_s",
        "matmul_gflops",
        "flops_per_step",
        "bound_steps_per_s",
        "products_steps_per_s",
        "us_per_step_batch_1",
        "targets",
    }
    assert set(data["products_steps_per_s"]) == set(model_bench.CONFIGS)
    assert all(rates["1"] > 0 for rates in data["products_steps_per_s"].values())
    assert set(data["steps_per_s"]) == {
        "prototype_conv4",
        "prototype_conv4_compiled",
        "ntm_conv",
        "ntm_conv_compiled",
        "ntm_flatten",
        "lrua_flatten",
        "seed",
    }
    assert all(rates["1"] > 0 for rates in data["steps_per_s"].values())
    assert "us_batch_1" in data["targets"]
    output = capsys.readouterr().out
    assert "| batch |" in output and "products alone" in output


def test_recorded_matrix_products_carry_nearly_all_of_the_counted_flops():
    """Two independent counts agree: the products recorded from a step and ``flops_per_session_step``."""
    for config in model_bench.CONFIGS.values():
        recorded = products.matrix_products(model_bench.NTM(config).eval())
        total = model_bench.flops_per_session_step(config)["total"]
        assert 0.95 * total < recorded.flops() <= total
        assert 0.9 * total < recorded.dense_flops() <= recorded.flops()
    conv = products.matrix_products(model_bench.NTM(NTMConfig(encoder="conv")).eval())
    assert [c.gemm() for c in conv.convolutions] == [(196, 9, 16), (49, 144, 32), (16, 288, 64)]  # im2col, per image


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_a_convolution_is_recorded_with_the_arguments_it_left_out(mode):
    """Stride, padding and dilation at their defaults, groups; as ``conv2d`` or (with autograd's key) ``convolution``."""
    recorder = products.MatrixProducts()
    with mode(), recorder:
        torch.nn.functional.conv2d(torch.rand(1, 4, 9, 9), torch.rand(6, 2, 3, 3), groups=2)
    (conv,) = recorder.convolutions
    assert (conv.stride, conv.padding, conv.dilation, conv.groups) == ((1, 1), (0, 0), (1, 1), 2)
    assert conv.gemm() == (49, 18, 6) and recorder.flops() == 2 * 49 * 18 * 6


def test_each_way_of_a_recorded_convolution_computes_its_whole_output():
    recorder = products.MatrixProducts()
    with torch.inference_mode(), recorder:
        torch.nn.functional.conv2d(torch.rand(1, 3, 12, 12), torch.rand(8, 3, 3, 3), stride=2, padding=1)
    (conv,) = recorder.convolutions
    with torch.inference_mode():
        gemm, direct = products.convolution_ways(conv, 5, torch.Generator().manual_seed(0))
        assert gemm().shape == (5 * 36, 8) and direct().to_dense().shape == (5, 8, 6, 6)
        products.products_runner(recorder, 5)(2)


def test_training_bench_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "training.json"
    threads = torch.get_num_threads()
    argv = [
        "--batches",
        "2",
        "--repeats",
        "1",
        "--iterations",
        "1",
        "--shots",
        "2",
        "--threads",
        "2",
        "--processes",
        "1",
        "2",
        "--parallel-batch",
        "2",
        "--min-time",
        "0.2",
        "--json",
        str(out),
    ]
    try:
        assert training_bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert set(data) >= {"episodes_per_s", "speedup_vs_seed", "targets"}
    assert set(data["episodes_per_s"]) == {"ntm_conv", "ntm_flatten", "lrua_flatten", "seed"}
    assert all(rates["2"] > 0 for rates in data["episodes_per_s"].values())
    parallel = data["data_parallel"]
    assert parallel["batch"] == 2 and set(parallel["episodes_per_s"]) == {"1", "2"}
    assert all(rate > 0 for rate in parallel["episodes_per_s"].values())
    output = capsys.readouterr().out
    assert "| batch |" in output and "| processes |" in output


def test_flop_count_is_dominated_by_the_encoder_and_projections():
    conv = model_bench.flops_per_session_step(NTMConfig())
    flatten = model_bench.flops_per_session_step(NTMConfig(encoder="flatten"))
    assert conv["total"] == sum(v for k, v in conv.items() if k != "total")
    assert 1.1e6 < conv["encoder"] < 1.3e6  # the ConvEncoder docstring's "about 1.2 MFLOP"
    assert flatten["encoder"] == 0 and flatten["input_projection"] == 2 * (784 + 5) * 800 + 800
    assert model_bench.flops_per_session_step(NTMConfig(use_memory=False))["addressing"] == 0
    conv4 = model_bench.flops_per_session_step(model_bench.CONFIGS["prototype_conv4"])
    assert 18e6 < conv4["encoder"] < 20e6  # the Conv4Encoder docstring's "about 19 MFLOP"
    assert conv4["encoder"] > 0.95 * conv4["total"]


def test_seed_reference_steps_and_learns():
    torch.manual_seed(0)
    seed = SeedNTM()
    images, labels = torch.rand(3, 2, 28, 28), torch.zeros(3, 2, 5)
    logits = seed(images, labels)
    assert logits.shape == (3, 2, 5) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert seed.write_head.fc_a.weight.grad is not None


def test_http_bench_runs_a_real_server_and_reports(tmp_path, tiny_checkpoint, redis_url, capsys):
    from bench import http

    out = tmp_path / "http.json"
    store = redis_url
    assert (
        http.main(
            [
                "--model",
                str(tiny_checkpoint),
                "--seconds",
                "0.3",
                "--concurrency",
                "4",
                "--store",
                "memory://",
                "--store",
                store,
                "--idle-sessions",
                "20",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    images = ["pixels", "png", "gray8"]
    assert [(r["store"], r["image"]) for r in report["results"]] == [
        (s, i) for s in ("memory://", store) for i in images
    ]
    assert all(
        r["errors"] == 0 and r["sessions_steps_per_s"] > 0 and r["batch_steps_per_s"] > 0 for r in report["results"]
    )
    for r in report["results"]:  # every step costs some CPU on the event loop and on the model thread
        assert r["batch_event_loop_us_per_step"] > 0 and r["batch_model_threads_us_per_step"] > 0
        assert r["predict_images_per_s"] > 0 and r["predict_64_images_per_s"] > 0
        assert r["one_session_steps_per_s"] > 0 and r["predict_vs_one_session_steps"] > 0
    assert report["redis_memory"]["sessions"] == 20 and report["redis_memory"]["bytes_per_session"] > 1000
    out = capsys.readouterr().out
    assert "steps vs /healthz" in out and "event loop / model" in out and "predict images/s" in out
    assert "label-less steps/s on the session" in out


def test_http_bench_starts_throwaway_stores_for_auto_and_takes_the_rest_as_given(monkeypatch):
    from bench import http

    started = []

    class Throwaway:
        def __init__(self) -> None:
            self.url, self.closed = f"redis+cluster://127.0.0.1:{7000 + len(started)}", False
            started.append(self)

        def close(self) -> None:
            self.closed = True

    monkeypatch.setitem(http.THROWAWAY, "redis+cluster://auto", Throwaway)
    stores = ["memory://", "redis://10.0.0.1:6379/0", "redis+cluster://auto"]
    with http.store_urls(stores) as urls:
        assert urls == {
            **{store: store for store in stores[:2]},
            "redis+cluster://auto": "redis+cluster://127.0.0.1:7000",
        }
        assert not started[0].closed
    assert started[0].closed
    with pytest.raises(SystemExit) as done:
        http.main(["--help"])
    assert done.value.code == 0


def test_grpc_bench_runs_every_transport_and_reports(tmp_path, tiny_checkpoint, capsys):
    from bench import grpc as grpc_bench

    out = tmp_path / "grpc.json"
    argv = ["--model", str(tiny_checkpoint), "--seconds", "0.3", "--rounds", "1", "--concurrency", "4"]
    assert grpc_bench.main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "tiny" and report["concurrency"] == 4
    assert [r["transport"] for r in report["results"]] == ["grpc-unary", "grpc-stream", "v2-rest", "v1"]
    assert set(report["ratios_to_v2_rest"]) == {"grpc-unary", "grpc-stream"}
    for r in report["results"]:
        assert r["errors"] == 0 and r["steps"] > 0 and r["steps_per_s"] > 0, r
        assert 0 < r["p50_ms"] <= r["p99_ms"], r
        assert r["server_event_loop_us_per_step"] > 0 and r["server_other_threads_us_per_step"] >= 0, r
    assert "grpc-stream" in capsys.readouterr().out


def test_http_ab_bench_runs_two_checkouts_side_by_side(tmp_path, capsys):
    from bench import http_ab
    from tests.servers import ROOT

    out = tmp_path / "ab.json"
    argv = ["--baseline", str(ROOT), "--image", "gray8", "--rounds", "1", "--seconds", "0.3", "--json", str(out)]
    assert http_ab.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert sorted((r["server"], r["image"], r["phase"]) for r in results) == sorted(
        (server, image, phase)
        for server in ("baseline", "this")
        for image, phase in (
            ("gray8", "single"),
            ("gray8", "batch"),
            ("gray8", "predict 1"),
            ("gray8", "predict 64"),
            ("-", "healthz"),
        )
    )
    assert all(r["errors"] == 0 and r["steps_per_s"] > 0 and r["cpu_us_per_step"] >= 0 for r in results)
    assert "context switches/step" in capsys.readouterr().out


@pytest.mark.inductor
def test_compiled_shapes_bench_times_every_way_at_every_size(tmp_path, tiny_checkpoint, capsys):
    from bench import compiled_shapes

    out = tmp_path / "shapes.json"
    argv = ["--model", str(tiny_checkpoint), "--rows", "1", "3", "4", "--largest", "4", "--repeats", "1"]
    assert compiled_shapes.main([*argv, "--min-time", "0.01", "--json", str(out)]) == 0
    timings = json.loads(out.read_text())["us_per_call"][str(tiny_checkpoint)]
    assert sorted(timings) == ["1", "3", "4"]
    assert all(sorted(ways) == sorted(compiled_shapes.WAYS) and min(ways.values()) > 0 for ways in timings.values())
    assert "| rows | eager | served | bmm products | roll shift | symbolic | ladder |" in capsys.readouterr().out
    assert compiled_shapes.main([*argv, "--min-time", "0.01", "--ways", "eager", "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())["us_per_call"][str(tiny_checkpoint)]["3"]) == ["eager"]
    assert "| rows | eager |\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compiled_shapes.main(["--model", str(tiny_checkpoint), "--rows", "5", "--largest", "4"])


@pytest.mark.inductor
def test_aoti_batch1_bench_times_every_way_and_matches_eager(tmp_path, tiny_checkpoint, capsys):
    from bench import aoti_batch1

    out = tmp_path / "aoti.json"
    argv = ["--model", str(tiny_checkpoint), "--repeats", "1", "--min-time", "0.01", "--json", str(out)]
    assert aoti_batch1.main(argv) == 0
    result = json.loads(out.read_text())["models"][str(tiny_checkpoint)]
    assert sorted(result["us_per_step"]) == sorted(aoti_batch1.WAYS) and min(result["us_per_step"].values()) > 0
    assert sorted(result["compile_seconds"]) == sorted(
        ["precompute", "whole step and recurrent step", "whole step, inductor's defaults"]
    )
    assert result["max_difference_served"] <= 1e-5
    header = "| model | eager | compiled graph | served | ATen convolutions | bmm products | inductor's defaults | AOTI parts |"
    assert header in capsys.readouterr().out


def test_soak_bench_completes_every_episode_without_errors(tmp_path, tiny_checkpoint):
    from bench import soak

    out = tmp_path / "soak.json"
    code = soak.main(
        [
            "--model",
            str(tiny_checkpoint),
            "--episodes",
            "6",
            "--clients",
            "3",
            "--steps",
            "10",
            "--chunk",
            "5",
            "--ttl",
            "1",
            "--seconds-per-window",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["live_sessions_end"] == 0 and report["settings"]["episodes"] == 6


def test_the_chaos_check_flags_a_lost_step_and_a_state_that_is_not_the_replay(tiny_checkpoint):
    import dataclasses

    from bench import chaos
    from models import PackedState, load_checkpoint
    from service.sessions.store import SessionRecord

    steps = 6
    episodes = [chaos.Episode(f"s{i}", seed=i, labels=[0, 1, None, 0, 2, 1]) for i in range(2)]
    probabilities, states = chaos.replay(tiny_checkpoint, episodes, steps)
    layout = load_checkpoint(tiny_checkpoint).initial_state(1).layout
    for episode, answered in zip(episodes, probabilities, strict=True):
        episode.probabilities = answered.tolist()
    records = [
        SessionRecord(e.session_id, "tiny", "f", PackedState(states[i].clone(), layout), 60, 0, steps=steps)
        for i, e in enumerate(episodes)
    ]
    log = chaos.ClientLog(episodes=episodes)
    assert chaos.verify(tiny_checkpoint, [log], records, steps)["problems"] == []
    lost = [dataclasses.replace(records[0], steps=steps - 1), records[1]]
    assert (
        "stored 5 steps, its client saw 6 succeed" in chaos.verify(tiny_checkpoint, [log], lost, steps)["problems"][0]
    )
    moved = PackedState(records[1].state.data + 1e-2, layout)
    doubled = [records[0], dataclasses.replace(records[1], state=moved)]
    assert "1 sessions differ from the replay" in chaos.verify(tiny_checkpoint, [log], doubled, steps)["problems"][0]
