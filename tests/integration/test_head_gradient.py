"""The LM head's gradient formed in the forward (`kernels.head_gradient_in_forward`) gives the update of the
ordinary forward and backward: the same gradients into AdamW and the same metrics, in each update path that
uses it (engine log-probs with one update, π_old from the update's own forward with and without a mismatch
correction, π_old recomputed before several updates); and it is bypassed where the loss is not a sum of
per-token terms (a KL term)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this file
from trainer_helpers import record_gradients, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("tests_on_path")

COMPARED = ["loss/pg", "entropy/mean", "pg/clipfrac", "pg/ppo_kl", "pg/ratio_mean", "reward/mean",
            "mismatch/logp_abs", "optim/grad_norm"]
PATHS = {"engine-logp, one update": ["rollout.behavior_logp=engine", "optim.mini_batches=1"],
         "pi_old from the update's own forward": ["rollout.behavior_logp=recompute", "optim.mini_batches=1"],
         "pi_old from its forward, TIS": ["rollout.behavior_logp=recompute", "optim.mini_batches=1",
                                          "algo.mismatch_correction=tis"],
         "recomputed pi_old, four updates": ["rollout.behavior_logp=recompute", "optim.mini_batches=4"],
         "KL term (bypassed)": ["algo.kl_coef=0.05", "optim.mini_batches=1"]}


@pytest.mark.parametrize("path", list(PATHS))
def test_head_gradient_in_forward_gives_the_same_update(tmp_path, cache_dir, monkeypatch, path):
    import npo_kernels
    from npo_engine import Trainer

    fused_calls = []
    fused = npo_kernels.fused_linear_logprob_grad_in_forward
    monkeypatch.setattr(npo_kernels, "fused_linear_logprob_grad_in_forward",
                        lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    trainers = {on: Trainer(tiny_config(cache_dir, "run.steps=1", "checkpoint.every=0", "optim.micro_batch_size=6",
                                        *PATHS[path], f"kernels.head_gradient_in_forward={str(on).lower()}"),
                            run_dir=tmp_path / f"in_forward_{on}") for on in (True, False)}
    grads = {on: record_gradients(t) for on, t in trainers.items()}
    metrics = {}
    for on, trainer in trainers.items():
        calls_before = len(fused_calls)
        metrics[on] = trainer.step()
        trainer.close()
        used = len(fused_calls) > calls_before
        assert used == (on and "KL" not in path), f"head gradient in forward used: {used}"
    for key in COMPARED:
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=1e-5, abs=1e-7), key
    assert len(grads[True]) == len(grads[False]) >= 1
    for update_fused, update_plain in zip(grads[True], grads[False]):
        for g_fused, g_plain in zip(update_fused, update_plain):
            # fp32 sums of the step's 64 scored tokens in another order: the bound of test_skip_zero_advantage
            torch.testing.assert_close(g_fused, g_plain, rtol=1e-4,
                                       atol=2e-5 * float(g_plain.abs().max()) + 1e-12)
    assert any(float(g.abs().max()) > 0 for update in grads[True] for g in update)
