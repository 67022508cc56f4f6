"""A small ``bench.chaos`` run: a replica SIGKILLed and redis-server restarted under retrying clients, and
afterwards every session as its client saw it and as one process would have made it."""

from __future__ import annotations

from pathlib import Path

from bench.chaos import run_chaos


def test_a_killed_replica_and_a_restarted_redis_lose_and_double_no_step(tiny_checkpoint: Path) -> None:
    result = run_chaos(tiny_checkpoint, clients=8, steps=20, seconds=9.0, redis_timeout=3.0)
    assert result["ok"], result["problems"]
    assert result["sessions"] >= 8 and result["steps"] == 20 * result["sessions"]
    assert result["retried_requests"] > 0  # the faults were felt: some requests needed another attempt
    assert result["max_probability_difference"] <= 1e-5 and result["max_state_difference"] <= 1e-5  # tiny model
    assert result["longest_unavailable_s"]["max"] < 30
