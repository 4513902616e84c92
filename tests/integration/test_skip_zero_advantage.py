"""Rows with zero advantage skip their backward (`optim.skip_zero_advantage`) and the update stays the same: the
same gradient into AdamW and the same metrics as a step that runs every row's backward."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this file
from trainer_helpers import record_gradients, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("tests_on_path")

HALF_FLAT = ["run.steps=1", "reward.verifier=trainer_helpers:half_flat_reward", "optim.micro_batch_size=3",
             "checkpoint.every=0"]
COMPARED = ["loss/pg", "entropy/mean", "entropy/on_policy", "pg/clipfrac", "pg/ppo_kl", "pg/ratio_mean",
            "reward/mean", "optim/grad_norm"]


@pytest.mark.parametrize("mini_batches", [1, 4])  # 4: one group per update, so some updates have no gradient
def test_skipping_zero_advantage_rows_gives_the_same_update(tmp_path, cache_dir, mini_batches):
    from npo_engine import Trainer

    trainers = {skip: Trainer(tiny_config(cache_dir, *HALF_FLAT, f"optim.mini_batches={mini_batches}",
                                          f"optim.skip_zero_advantage={str(skip).lower()}"),
                              run_dir=tmp_path / f"skip_{skip}") for skip in (True, False)}
    grads = {skip: record_gradients(t) for skip, t in trainers.items()}
    metrics = {skip: t.step() for skip, t in trainers.items()}

    assert 0 < metrics[True]["optim/rows_without_backward"] < 1  # the step had both kinds of rows
    assert metrics[False]["optim/rows_without_backward"] == 0
    for key in COMPARED:
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=1e-5, abs=1e-7), key
    assert len(grads[True]) == len(grads[False]) == mini_batches
    for update_skip, update_all in zip(grads[True], grads[False]):
        for g_skip, g_all in zip(update_skip, update_all):
            # Each element sums the step's 64 scored tokens' fp32 terms in an order set by how the micro-batches
            # (and the LM head's row blocks) are composed: |error| <= 64·u·Σ|terms|, u = 2^-24, and Σ|terms|
            # stays within a few times the largest gradient here: 2e-5·max|g| bounds it.
            torch.testing.assert_close(g_skip, g_all, rtol=1e-4, atol=2e-5 * float(g_all.abs().max()) + 1e-12)
    assert any(float(g.abs().max()) > 0 for update in grads[True] for g in update)
    for trainer in trainers.values():
        trainer.close()
