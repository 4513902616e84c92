"""Policy losses as registry entries: each maps per-token log-probs of a (possibly mixed) batch to a loss.

A new loss is a new function registered in `POLICY_LOSSES`, never a branch inside the trainer.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from npo_kernels import MAX_LOG_RATIO, policy_loss

from npo_engine.config import AlgoConfig


class PolicyLossFn(Protocol):
    def __call__(self, logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, cfg: AlgoConfig, *, policy_id: torch.Tensor | None, norm_length: int,
                 guide_transform: str, shaping_gamma: float,
                 backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


# algo.clip_on_policy = false: clip bounds no ratio can reach. The loss clamps log r into [-MAX_LOG_RATIO,
# MAX_LOG_RATIO] before exp(), so r lies in [e^-20, e^20]; a range one e-fold wider on each side never binds,
# the "clipped" branch is never strictly larger, and the loss is exactly -A * r.
_NEVER_BINDING_CLIP_LOW = 1.0 - math.exp(-(MAX_LOG_RATIO + 1))
_NEVER_BINDING_CLIP_HIGH = math.exp(MAX_LOG_RATIO + 1)


def ppo_clip(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             cfg: AlgoConfig, *, policy_id: torch.Tensor | None = None, norm_length: int,
             guide_transform: str = "ppo", shaping_gamma: float = 0.1,
             backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with clip-low/high and optional dual clip, aggregated by `cfg.loss_agg`; guide
    tokens take `guide_transform` ("ppo": the same clip; "luffy", "exgrpo": the shaped weights, no clip).

    Args:
        logp, behavior_logp, mask: [B, T]; advantages: [B] or [B, T]; policy_id: [B] (0 on-policy, 1 guide).
        norm_length: the constant of seq-mean-token-sum-norm when `cfg.norm_length` is unset.

    Returns:
        (0-d loss, metrics of detached 0-d tensors: pg/clipfrac, pg/ppo_kl, ...).
    """
    clip_low, clip_high = cfg.clip_low, cfg.clip_high
    if not cfg.clip_on_policy:
        clip_low, clip_high = _NEVER_BINDING_CLIP_LOW, _NEVER_BINDING_CLIP_HIGH
    return policy_loss(logp, behavior_logp, advantages, mask, policy_id=policy_id, clip_low=clip_low,
                       clip_high=clip_high, dual_clip=cfg.dual_clip, guide_transform=guide_transform,
                       shaping_gamma=shaping_gamma, agg=cfg.loss_agg, norm_length=cfg.norm_length or norm_length,
                       backend=backend)


POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo": ppo_clip}


def get_policy_loss(name: str) -> PolicyLossFn:
    if name not in POLICY_LOSSES:
        raise ValueError(f"policy loss {name!r} is not registered; choose one of {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def loss_units(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """[B] share of each sequence in the denominator of aggregation `agg` (the kernel's `AGGREGATIONS`).

    Every aggregation is Σ numerator / Σ units over the batch: tokens for token-mean, sequences with at least
    one token for the seq-mean modes, and every sequence for seq-mean-token-sum-norm (whose constant length
    factor is the same in every micro-batch, so it stays inside the kernel's value). A micro-batch whose loss
    is L_mb over units u_mb therefore contributes L_mb · u_mb / U to the loss of the whole batch, U the units
    summed over all micro-batches and ranks: that is the one normalizer, applied once.

    Args:
        mask: [B, T] bool, the scored tokens.
    """
    tokens = mask.sum(1).to(torch.float64)
    if agg == "token-mean":
        return tokens
    if agg == "seq-mean-token-sum-norm":
        return torch.ones_like(tokens)
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return (tokens > 0).to(torch.float64)
    raise ValueError(f"unknown loss aggregation {agg!r}; see AlgoConfig.loss_agg for the choices")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `mask` (same shape); 0 when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)
