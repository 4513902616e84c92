"""PPO-clip policy loss over mixed on-policy / guide batches in plain PyTorch: the spec, and the CPU path.

Per token (masked tokens contribute nothing):
    log_r = clamp(logp − behavior_logp, −20, 20)   masked entries zeroed first (reference/kernels.md §2)
    r     = exp(log_r)
On-policy tokens, and guide tokens under guide_transform="ppo" (NPO keeps the guide's own behaviour log-prob):
    L = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high))        separate ε's: DAPO's clip-higher
    L = min(L, −A·c)  where A < 0, with dual_clip=c > 1            verl's clip_ratio_c
Guide tokens under the shaping transforms (no clip):
    "luffy":  L = −A · p / (p + γ),  p = exp(logp)                 LUFFY's policy shaping
    "exgrpo": L = −A · r / (r + γ)                                  ExGRPO
Both are computed as −A · sigmoid(x − ln γ) (x = logp or log_r), which equals them and cannot overflow.

The per-token loss is summed per sequence, and an aggregation (verl's four `loss_agg_mode`s) turns those row
sums into the scalar loss; the Triton path reuses the aggregations and metrics below on its own row sums.
Any `policy_id != 0` counts as guide.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch

# The policy_id values (ON_POLICY = 0, GUIDE = 1) and the log-ratio clamp (MAX_LOG_RATIO = 20), shared by
# the ops.
from .._dispatch import GUIDE, MAX_LOG_RATIO, ON_POLICY  # noqa: F401  (GUIDE: importable from here)

GuideTransform = Literal["ppo", "luffy", "exgrpo"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


class LossParams(NamedTuple):
    clip_low: float
    clip_high: float
    dual_clip: float | None
    shaping_gamma: float


class TokenTerms(NamedTuple):
    """Per-token outputs of one loss form; all [B, T]."""

    loss: torch.Tensor
    clipped: torch.Tensor  # bool: the PPO-clipped term is strictly the larger one (clipfrac)
    dual_clipped: torch.Tensor  # bool: the dual-clip bound −A·c is strictly below the PPO loss


# ---- Token loss forms: (logp, log_r, A) -> TokenTerms, each [B, T] -----------------------------------------

def ppo_clip(logp: torch.Tensor, log_r: torch.Tensor, adv: torch.Tensor, p: LossParams) -> TokenTerms:
    """max(−A·r, −A·clip(r)), then min with −A·c for A < 0 when dual_clip is set."""
    r = torch.exp(log_r)
    unclipped = -adv * r
    clipped = -adv * r.clamp(1.0 - p.clip_low, 1.0 + p.clip_high)
    # where(strictly larger) rather than torch.maximum: on ties (r inside the clip range, where the two terms
    # are the same number) the gradient is then −A·r from one branch, not two halves, as in the Triton kernel.
    is_clipped = clipped > unclipped
    loss = torch.where(is_clipped, clipped, unclipped)
    dual = torch.zeros_like(is_clipped)
    if p.dual_clip is not None:
        bound = -adv * p.dual_clip
        dual = (adv < 0) & (bound < loss)
        loss = torch.where(dual, bound, loss)
    return TokenTerms(loss, is_clipped, dual)


def luffy_shaping(logp: torch.Tensor, log_r: torch.Tensor, adv: torch.Tensor, p: LossParams) -> TokenTerms:
    """−A · p/(p + γ), p = exp(logp): LUFFY's shaped off-policy term (behaviour prob taken as 1), no clip."""
    loss = -adv * torch.sigmoid(logp - math.log(p.shaping_gamma))
    never = torch.zeros_like(loss, dtype=torch.bool)
    return TokenTerms(loss, never, never)


def exgrpo_shaping(logp: torch.Tensor, log_r: torch.Tensor, adv: torch.Tensor, p: LossParams) -> TokenTerms:
    """−A · r/(r + γ): ExGRPO's shaping of the true importance ratio, no clip."""
    loss = -adv * torch.sigmoid(log_r - math.log(p.shaping_gamma))
    never = torch.zeros_like(loss, dtype=torch.bool)
    return TokenTerms(loss, never, never)


TokenLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LossParams], TokenTerms]
GUIDE_TRANSFORMS: dict[str, TokenLoss] = {"ppo": ppo_clip, "luffy": luffy_shaping, "exgrpo": exgrpo_shaping}


# ---- Aggregations: per-sequence sums -> scalar loss --------------------------------------------------------

class RowSums(NamedTuple):
    """Per-sequence sums over masked tokens; all [B] in the compute dtype. Only `loss` carries a gradient."""

    loss: torch.Tensor  # Σ_t L·m
    tokens: torch.Tensor  # Σ_t m
    clipped: torch.Tensor  # tokens with the PPO clip active
    dual_clipped: torch.Tensor  # tokens with the dual clip active
    ratio: torch.Tensor  # Σ_t r·m
    neg_log_ratio: torch.Tensor  # Σ_t −log_r·m


NUM_STATS = len(RowSums._fields) - 1  # the metric sums after `loss`, as the Triton forward writes them


def token_mean(row_loss, row_tokens, seq_len: int, norm_length: int | None) -> torch.Tensor:
    """Σ L·m / Σ m: every token weighs the same (DAPO)."""
    return row_loss.sum() / row_tokens.sum().clamp(min=1)


def seq_mean_token_mean(row_loss, row_tokens, seq_len: int, norm_length: int | None) -> torch.Tensor:
    """Mean over sequences with ≥ 1 token of (Σ_t L·m / Σ_t m): GRPO's and NPO's default."""
    num_seqs = (row_tokens > 0).sum().clamp(min=1)
    return (row_loss / row_tokens.clamp(min=1)).sum() / num_seqs


def seq_mean_token_sum(row_loss, row_tokens, seq_len: int, norm_length: int | None) -> torch.Tensor:
    """Mean over sequences with ≥ 1 token of Σ_t L·m."""
    return row_loss.sum() / (row_tokens > 0).sum().clamp(min=1)


def seq_mean_token_sum_norm(row_loss, row_tokens, seq_len: int, norm_length: int | None) -> torch.Tensor:
    """Σ L·m / (B · (norm_length or T)): Dr. GRPO's constant normalizer, no length bias."""
    return row_loss.sum() / (row_loss.numel() * (norm_length or seq_len))


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def policy_metrics(rows: RowSums, policy_id: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Detached fp32 0-d metrics from the row sums; no host sync. A fraction over zero tokens is 0."""
    rows = RowSums(*(x.detach().to(torch.float32) for x in rows))
    guide = (torch.zeros_like(rows.tokens, dtype=torch.bool) if policy_id is None
             else (policy_id != ON_POLICY).to(rows.tokens.device))
    # Weighted sums, not boolean indexing: x[mask] needs the element count on the host (a CUDA sync).
    on, guide = (~guide).float(), guide.float()

    def frac(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return num / den.clamp(min=1)

    tokens_all, tokens_on, tokens_guide = rows.tokens.sum(), rows.tokens @ on, rows.tokens @ guide
    return {
        "pg/clipfrac": frac(rows.clipped @ on, tokens_on),
        "pg/clipfrac_guide": frac(rows.clipped @ guide, tokens_guide),  # 0 under luffy/exgrpo (no clip)
        "pg/dual_clipfrac": frac(rows.dual_clipped.sum(), tokens_all),
        "pg/ratio_mean": frac(rows.ratio @ on, tokens_on),
        "pg/ratio_mean_guide": frac(rows.ratio @ guide, tokens_guide),  # 0 when there is no guide token
        "pg/ppo_kl": frac(rows.neg_log_ratio.sum(), tokens_all),
        "pg/guide_token_frac": frac(tokens_guide, tokens_all),
    }


# ---- The reference op --------------------------------------------------------------------------------------

def token_terms(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                policy_id: torch.Tensor | None, guide_transform: str,
                params: LossParams) -> tuple[TokenTerms, torch.Tensor]:
    """Per-token loss terms and log-ratios, both [B, T]; masked entries are finite and excluded later."""
    compute_dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    m = mask.bool()
    # Zero masked entries BEFORE exp (a padded −inf or garbage log-prob must not reach exp).
    logp = torch.where(m, logp.to(compute_dtype), 0.0)
    behavior_logp = torch.where(m, behavior_logp.detach().to(compute_dtype), 0.0)
    log_r = (logp - behavior_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    adv = advantages.detach().to(compute_dtype)
    adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv
    terms = ppo_clip(logp, log_r, adv, params)
    if policy_id is not None and guide_transform != "ppo":
        guide_terms = GUIDE_TRANSFORMS[guide_transform](logp, log_r, adv, params)
        is_guide = (policy_id != ON_POLICY)[:, None]
        terms = TokenTerms(*(torch.where(is_guide, g, o) for g, o in zip(guide_terms, terms)))
    return terms, log_r


def policy_loss_ref(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, policy_id: torch.Tensor | None, clip_low: float, clip_high: float,
                    dual_clip: float | None, guide_transform: str, shaping_gamma: float, agg: str,
                    norm_length: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference policy loss; autograd differentiates `logp`. Arguments (and their defaults) are those of
    `npo_kernels.policy_loss`, which checks them; call that with backend="torch" to run this.

    Args:
        logp, behavior_logp, mask: [B, T].  advantages: [B] or [B, T].  policy_id: [B] int or None.

    Returns:
        loss: 0-d, fp32 (fp64 for fp64 logp).  metrics: dict of detached fp32 0-d tensors.
    """
    params = LossParams(clip_low, clip_high, dual_clip, shaping_gamma)
    terms, log_r = token_terms(logp, behavior_logp, advantages, mask, policy_id, guide_transform, params)
    m = mask.bool()
    zero = torch.zeros((), dtype=log_r.dtype, device=log_r.device)
    rows = RowSums(
        loss=torch.where(m, terms.loss, zero).sum(1),
        tokens=m.sum(1).to(log_r.dtype),
        clipped=(terms.clipped & m).sum(1).to(log_r.dtype),
        dual_clipped=(terms.dual_clipped & m).sum(1).to(log_r.dtype),
        ratio=torch.where(m, torch.exp(log_r), zero).sum(1).detach(),
        neg_log_ratio=torch.where(m, -log_r, zero).sum(1).detach(),
    )
    loss = AGGREGATIONS[agg](rows.loss, rows.tokens, logp.shape[1], norm_length)
    return loss, policy_metrics(rows, policy_id)
