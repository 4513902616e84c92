"""Fixtures the integration tests share: one demo model per module, and this folder on the workers' path."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture
def tests_on_path(monkeypatch):
    # The reward workers import verifiers from this folder (`trainer_helpers:digit_reward`); they inherit
    # sys.path through PYTHONPATH.
    monkeypatch.syspath_prepend(str(HERE))
