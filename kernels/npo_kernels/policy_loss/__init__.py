"""PPO-clip policy loss over mixed on-policy / guide batches, with its metrics."""

from .op import policy_loss
from .reference import policy_loss_ref

__all__ = ["policy_loss", "policy_loss_ref"]
