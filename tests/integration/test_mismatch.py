"""Log-probs the loss can trust, in a real run: with top-k / top-p sampling the trainer's recomputed log-probs
match the engine's behaviour log-probs (same support), and the mismatch correction runs and reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this file
from trainer_helpers import rows, tiny_config, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("tests_on_path")
TRUNCATED = ["rollout.top_k=8", "rollout.top_p=0.9", "rollout.temperature=0.8", "run.steps=2",
             "checkpoint.every=0"]


@pytest.mark.parametrize("correction", ["none", "tis"])
def test_truncated_sampling_has_no_mismatch(tmp_path, cache_dir, correction):
    run = tmp_path / correction
    train(tiny_config(cache_dir, *TRUNCATED, f"algo.mismatch_correction={correction}"), run).close()
    for row in rows(run):
        # Same fp32 weights in engine and trainer: only rounding separates them (a wrong support would show
        # the log of the kept mass, ~0.1 or more).
        assert row["mismatch/logp_abs"] < 1e-5
        assert row["mismatch/corrected_frac"] == 0.0
        assert abs(row["mismatch/ratio_max"] - 1.0) < 1e-4
