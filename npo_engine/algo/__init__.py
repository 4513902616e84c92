"""Pure algorithm functions: tensors (and config values) in, tensors and metric dicts out.

Nothing here imports torch.distributed, a rollout backend or Triton directly: the heavy ops are reached through
`npo_kernels`, which falls back to PyTorch wherever Triton cannot run.
"""

from npo_kernels import GUIDE, ON_POLICY  # policy_id values, defined once in the kernels

from npo_engine.algo.advantages import compute_advantages
from npo_engine.algo.kl import kl_penalty
from npo_engine.algo.losses import POLICY_LOSSES, PolicyLossFn, get_policy_loss, masked_mean

__all__ = ["GUIDE", "ON_POLICY", "POLICY_LOSSES", "PolicyLossFn", "compute_advantages", "get_policy_loss",
           "kl_penalty", "masked_mean"]
