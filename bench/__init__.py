"""Benchmarks: ``python -m bench.model`` (inference steps) and ``python -m bench.training`` (episodes/s)."""
