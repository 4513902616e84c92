"""Train/inference mismatch: the rollout engine's log-probs of its own tokens against the trainer's, and the
optional correction of the policy gradient by their ratio (truncated importance sampling, or masking), as verl
and slime ship it.

The ratio per on-policy token is ρ = π_trainer(old weights) / π_engine: 1 if the two computed the same
distribution; different kernels, dtypes or a stale engine move it away from 1.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

MismatchCorrection = Literal["none", "tis", "mask"]


def mismatch_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                     correction: MismatchCorrection, threshold: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights of the policy-gradient term and the mismatch statistics.

    Args:
        trainer_logp, engine_logp: [B, T] log-probs of the same tokens by the trainer (before the update) and
            by the engine that sampled them.
        mask: [B, T] bool, the on-policy tokens the correction applies to (weights are 1 elsewhere).
        correction: "none" (weights 1; statistics only), "tis" (weight min(ρ, threshold)), "mask" (weight 1
            where 1/threshold <= ρ <= threshold, else 0).
        threshold: the cap C > 1 of both corrections.

    Returns:
        weights [B, T] fp32, and this rank's sums for the metrics (`mismatch_sums`), to be reduced over ranks.
    """
    mask = mask.to(torch.bool)
    log_rho = torch.where(mask, trainer_logp - engine_logp, torch.zeros_like(trainer_logp))
    log_cap = math.log(threshold)
    if correction == "tis":
        # min(ρ, C) = exp(min(log ρ, log C)): no overflow whatever ρ is.
        weights, binds = torch.exp(log_rho.clamp(max=log_cap)), log_rho > log_cap
    elif correction == "mask":
        binds = log_rho.abs() > log_cap
        weights = (~binds).to(torch.float32)
    elif correction == "none":
        weights, binds = torch.ones_like(log_rho), torch.zeros_like(mask)
    else:
        raise ValueError(f"mismatch correction {correction!r} is not one of 'none', 'tis', 'mask'")
    weights = torch.where(mask, weights.float(), torch.ones_like(weights, dtype=torch.float32))
    return weights, mismatch_sums(log_rho, binds & mask, mask)


def mismatch_sums(log_rho: torch.Tensor, corrected: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """This rank's sums for the metrics: tokens, Σ|log ρ|, tokens the correction's bound acted on (capped by
    tis, dropped by mask), and the largest log ρ."""
    tokens = mask.sum()
    return {"tokens": float(tokens), "abs_log_ratio": float(log_rho.abs()[mask].sum()),
            "corrected": float(corrected.sum()),
            "max_log_ratio": float(log_rho[mask].max()) if tokens else -math.inf}


def mismatch_sums_empty() -> dict[str, float]:
    """Sums over no tokens, to accumulate micro-batches into with `add_mismatch_sums`."""
    return {"tokens": 0.0, "abs_log_ratio": 0.0, "corrected": 0.0, "max_log_ratio": -math.inf}


def add_mismatch_sums(total: dict[str, float], part: dict[str, float]) -> None:
    """Add one micro-batch's `mismatch_sums` to `total` in place (the largest log ρ is a max, the rest sums)."""
    for key in ("tokens", "abs_log_ratio", "corrected"):
        total[key] += part[key]
    total["max_log_ratio"] = max(total["max_log_ratio"], part["max_log_ratio"])
