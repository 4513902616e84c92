"""Group-relative advantages (GRPO, Dr.GRPO, RLOO) over groups that may mix on-policy and guide samples."""

from __future__ import annotations

import torch
from npo_kernels import group_advantages

from npo_engine.config import AlgoConfig


def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: AlgoConfig, *,
                       policy_id: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """One scalar advantage per sample, shared by its tokens.

    Args:
        rewards: [B] float rewards.
        group_ids: [B] int; samples of the same prompt share an id (any order).
        cfg: `algo.adv_mode` (grpo | drgrpo | rloo), `algo.adv_eps`, `algo.adv_stats` (all | on_policy).
        policy_id: [B] int, 0 on-policy and 1 guide; None means all on-policy.

    Returns:
        [B] fp32. A group of one, or a group of equal rewards, gets 0.
    """
    return group_advantages(rewards.float(), group_ids, mode=cfg.adv_mode, eps=cfg.adv_eps, policy_id=policy_id,
                            stats=cfg.adv_stats, backend=backend)
