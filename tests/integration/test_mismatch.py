"""Log-probs the loss can trust, in a real run: with top-k / top-p sampling the trainer's recomputed log-probs
match the engine's behaviour log-probs (same support), and the mismatch correction runs and reports."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

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


SHIFT = 0.05  # added to every behaviour log-prob the engine returns: a mismatch of known size


# (rollout.behavior_logp, optim.mini_batches) -> the policy forwards of one step, by whether they had gradient
# (4 prompts x 4 samples, micro-batch 8: a whole-batch pass is 2 micro-batches, a mini-batch of 1 group is 1)
FORWARDS = {("engine", 4): [True] * 4,  # no row needs π_old: the first update's forward measures the mismatch
            ("recompute", 4): [False] * 2 + [True] * 4,  # later updates need π_old: a pass without gradient first
            ("recompute", 1): [True] * 2}  # one update: its own forward, before any weight moves, gives π_old


@pytest.mark.parametrize(("behavior_logp", "mini_batches"), list(FORWARDS))
def test_pi_old_costs_a_forward_only_where_a_later_update_needs_it(tmp_path, cache_dir, behavior_logp,
                                                                   mini_batches):
    """π_old (the trainer's log-probs before the step's first update) is recomputed by a forward without
    gradient only where later updates need it; otherwise the first update's forward gives it. Every path
    reports the same engine-vs-trainer mismatch, here a known one, and uses the right behaviour log-probs."""
    from npo_engine import Trainer

    trainer = Trainer(tiny_config(cache_dir, "run.steps=1", "checkpoint.every=0", "data.eval_size=0",
                                  "logging.eval_every=0", "optim.skip_zero_advantage=false",
                                  f"rollout.behavior_logp={behavior_logp}", f"optim.mini_batches={mini_batches}"),
                      run_dir=tmp_path / "run")
    make_batch = trainer.make_batch

    def shifted(groups):
        batch = make_batch(groups)
        batch.behavior_logp = torch.where(batch.completion_mask, batch.behavior_logp + SHIFT, batch.behavior_logp)
        return batch

    trainer.make_batch = shifted
    forwards = []
    trainer.policy.register_forward_hook(lambda module, args, output: forwards.append(torch.is_grad_enabled()))
    metrics = trainer.step()
    trainer.close()

    assert forwards == FORWARDS[behavior_logp, mini_batches]
    # π_trainer / π_engine = exp(-SHIFT) on every token, up to the rounding between the two fp32 forwards
    assert metrics["mismatch/logp_abs"] == pytest.approx(SHIFT, abs=1e-5)
    assert metrics["mismatch/ratio_max"] == pytest.approx(math.exp(-SHIFT), abs=1e-5)
    # The ratio's denominator: the shifted engine log-probs, or π_old (ratio 1 in the first update)
    expected_ratio = math.exp(-SHIFT) if behavior_logp == "engine" else 1.0
    tolerance = 1e-6 if mini_batches == 1 else 0.02  # later updates have moved the weights a little
    assert metrics["pg/ratio_mean"] == pytest.approx(expected_ratio, abs=tolerance)
