"""Per-token KL estimators between the current policy and a reference policy (Schulman's k1, k2, k3)."""

from __future__ import annotations

from typing import Callable

import torch
from npo_kernels import MAX_LOG_RATIO as _MAX_LOG_RATIO  # the policy loss's clamp: exp() beyond ±20 overflows


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    # KL(pi || ref) estimated with samples from pi: ref/pi - 1 - log(ref/pi), always >= 0 (low variance).
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || ref) estimates, zero on masked tokens.

    Args:
        logp: [B, T] current log-probs of the sampled tokens (differentiable).
        ref_logp: [B, T] reference log-probs of the same tokens.
        mask: [B, T] bool or 0/1.
        estimator: "k1" (log r), "k2" ((log r)^2 / 2) or "k3" (exp(-log r) - 1 + log r), with r = pi / ref.

    Returns:
        [B, T] fp32.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator {estimator!r} is unknown; choose one of {sorted(KL_ESTIMATORS)}")
    keep = mask.bool()
    # Zero masked entries before anything nonlinear, so padding garbage can never produce inf or NaN.
    log_ratio = torch.where(keep, logp.float() - ref_logp.float(), 0.0).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.where(keep, KL_ESTIMATORS[estimator](log_ratio), 0.0)
