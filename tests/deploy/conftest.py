"""The deployment tests' marker: ``slow`` (still run by default; ``-m "not slow"`` leaves them out)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes minutes (runs by default; deselect with -m 'not slow')")
