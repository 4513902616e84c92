"""Pure algorithm functions: tensors (and config values) in, tensors and metric dicts out.

Nothing here imports torch.distributed, a rollout backend or Triton directly: the heavy ops are reached through
`npo_kernels`, which falls back to PyTorch wherever Triton cannot run.
"""

from npo_kernels import GUIDE, ON_POLICY  # policy_id values, defined once in the kernels

from npo_engine.algo.advantages import compute_advantages
from npo_engine.algo.kl import kl_penalty
from npo_engine.algo.losses import POLICY_LOSSES, PolicyLossFn, get_policy_loss, loss_units, masked_mean
from npo_engine.algo.micro_batches import MicroBatch, count_micro_batches, plan_micro_batches, rows_with_gradient
from npo_engine.algo.mismatch import add_mismatch_sums, mismatch_sums_empty, mismatch_weights
from npo_engine.algo.npo import (decoupled_weights, gate_groups, guide_slot, guide_transform, needs_old_logp,
                                 passes_gate)

__all__ = ["GUIDE", "ON_POLICY", "POLICY_LOSSES", "MicroBatch", "PolicyLossFn", "add_mismatch_sums",
           "compute_advantages", "count_micro_batches", "decoupled_weights", "gate_groups", "get_policy_loss",
           "guide_slot", "guide_transform", "kl_penalty", "loss_units", "masked_mean", "mismatch_sums_empty",
           "mismatch_weights", "needs_old_logp", "passes_gate", "plan_micro_batches", "rows_with_gradient"]
