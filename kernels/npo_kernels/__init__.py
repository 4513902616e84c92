"""npo_kernels: Triton kernels for RL post-training, each beside a readable PyTorch reference.

Ops (each takes `backend="auto" | "triton" | "torch"`):
- `selective_logprob(logits, targets)`: log-prob (and entropy) of the sampled token, never a full log-softmax.
- `fused_linear_logprob(hidden, weight, targets)`: the same, fused with the LM head; no [N, V] tensor exists.
- `fused_linear_logprob_grad_in_forward(hidden, weight, targets, token_grad)`: the same on CPU for a loss that
  is a sum of per-row terms, its gradient formed in the forward (3 LM-head GEMMs per token instead of 4).
- `policy_loss(logp, behavior_logp, advantages, mask, policy_id=...)`: PPO-clip loss over mixed batches.
- `group_advantages(rewards, group_ids)`: GRPO / Dr.GRPO / RLOO advantages over arbitrary groups.
Constants: `ON_POLICY` / `GUIDE` (policy_id values) and `MAX_LOG_RATIO` (the log-ratio clamp before exp).

Each op folder holds reference.py (the spec), chunked.py (the CPU path, where one exists), triton.py and
op.py; the layers and what they share are described in `_dispatch.py`.
"""

from ._dispatch import GUIDE, MAX_LOG_RATIO, ON_POLICY
from .advantages.op import group_advantages
from .fused_linear.op import fused_linear_logprob, fused_linear_logprob_grad_in_forward
from .logprob.op import selective_logprob
from .policy_loss.op import policy_loss

__all__ = ["GUIDE", "MAX_LOG_RATIO", "ON_POLICY", "fused_linear_logprob", "fused_linear_logprob_grad_in_forward",
           "group_advantages", "policy_loss", "selective_logprob"]
