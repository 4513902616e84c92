"""Public `policy_loss`: argument checks, then the PyTorch reference or the Triton kernels behind custom ops.

Layers on the Triton path, bottom up:
    triton.policy_loss_fwd / _bwd   one launch each over a (B, ⌈T/BLOCK_T⌉) grid: per-chunk loss sums [B, C]
                                    and metric counts [B, C, 5] (no [B, T] intermediate is written); the
                                    backward recomputes dlogp = dloss_chunk · m · ∂L/∂logp from the inputs
    npo_kernels::policy_loss_fwd / _bwd   torch.library custom ops around them, with fake impls
    PolicyLossFunction              autograd: saves the inputs, differentiable in logp only
    policy_loss                     validation; row sums, aggregation and metrics are small torch ops on [B]
                                    vectors shared with the reference
The CPU path ("auto" on CPU tensors, or backend="torch") is the vectorized reference itself: its [B, T]
temporaries are a few MB, so there is no chunked path to add.
"""

from __future__ import annotations

import torch

from .._dispatch import BACKENDS, Backend, check_choice, chunk_size, fake_chunk_sums, use_triton
from .reference import (
    AGGREGATIONS,
    GUIDE_TRANSFORMS,
    NUM_STATS,
    Aggregation,
    GuideTransform,
    RowSums,
    policy_loss_ref,
    policy_metrics,
)

# ---- Custom ops (Triton kernels inside; imported lazily so CPU-only installs work without triton) ----------


@torch.library.custom_op("npo_kernels::policy_loss_fwd", mutates_args=())
def _policy_loss_fwd(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor, policy_id: torch.Tensor | None, clip_low: float, clip_high: float,
                     dual_clip: float | None, guide_transform: str,
                     shaping_gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton import policy_loss_fwd

    return policy_loss_fwd(logp, behavior_logp, advantages, mask, policy_id, clip_low=clip_low,
                           clip_high=clip_high, dual_clip=dual_clip, guide_transform=guide_transform,
                           shaping_gamma=shaping_gamma, block_t=chunk_size(logp.shape[1]))


@_policy_loss_fwd.register_fake
def _(logp, behavior_logp, advantages, mask, policy_id, clip_low, clip_high, dual_clip, guide_transform,
      shaping_gamma):
    return fake_chunk_sums(logp, NUM_STATS)


@torch.library.custom_op("npo_kernels::policy_loss_bwd", mutates_args=())
def _policy_loss_bwd(grad_chunk_loss: torch.Tensor, logp: torch.Tensor, behavior_logp: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor, policy_id: torch.Tensor | None,
                     clip_low: float, clip_high: float, dual_clip: float | None, guide_transform: str,
                     shaping_gamma: float) -> torch.Tensor:
    from .triton import policy_loss_bwd

    return policy_loss_bwd(grad_chunk_loss, logp, behavior_logp, advantages, mask, policy_id,
                           clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                           guide_transform=guide_transform, shaping_gamma=shaping_gamma,
                           block_t=chunk_size(logp.shape[1]))


@_policy_loss_bwd.register_fake
def _(grad_chunk_loss, logp, behavior_logp, advantages, mask, policy_id, clip_low, clip_high, dual_clip,
      guide_transform, shaping_gamma):
    return torch.empty_like(logp)


# ---- Autograd ----------------------------------------------------------------------------------------------

class PolicyLossFunction(torch.autograd.Function):
    """Autograd over the two custom ops: (chunk loss sums, chunk metric sums) from the inputs; differentiable
    in logp only (the metric sums are marked non-differentiable)."""

    @staticmethod
    def forward(ctx, logp, behavior_logp, advantages, mask, policy_id, *scalars):
        chunk_loss, chunk_stats = torch.ops.npo_kernels.policy_loss_fwd(
            logp, behavior_logp, advantages, mask, policy_id, *scalars)
        ctx.save_for_backward(logp, behavior_logp, advantages, mask, policy_id)
        ctx.scalars = scalars
        ctx.mark_non_differentiable(chunk_stats)
        return chunk_loss, chunk_stats

    @staticmethod
    def backward(ctx, grad_chunk_loss, grad_stats):
        logp, behavior_logp, advantages, mask, policy_id = ctx.saved_tensors
        dlogp = torch.ops.npo_kernels.policy_loss_bwd(grad_chunk_loss.contiguous(), logp, behavior_logp,
                                                      advantages, mask, policy_id, *ctx.scalars)
        return (dlogp,) + (None,) * (4 + len(ctx.scalars))


# ---- Public function ---------------------------------------------------------------------------------------

def _check_args(logp, behavior_logp, advantages, mask, policy_id, clip_low, clip_high, dual_clip,
                guide_transform, shaping_gamma, agg, norm_length, backend) -> None:
    check_choice("policy_loss", "agg", agg, list(AGGREGATIONS))
    check_choice("policy_loss", "guide_transform", guide_transform, list(GUIDE_TRANSFORMS))
    check_choice("policy_loss", "backend", backend, BACKENDS)
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"policy_loss: clip_low={clip_low!r} must be in [0, 1) so the lower bound "
                         "1 - clip_low stays a positive ratio")
    if not clip_high >= 0.0:
        raise ValueError(f"policy_loss: clip_high={clip_high!r} must be >= 0")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"policy_loss: dual_clip={dual_clip!r} must be > 1 (verl's clip_ratio_c, e.g. 3.0) "
                         "or None to disable it")
    if not shaping_gamma > 0.0:
        raise ValueError(f"policy_loss: shaping_gamma={shaping_gamma!r} must be > 0 (γ in p/(p+γ))")
    if norm_length is not None and (isinstance(norm_length, bool) or not isinstance(norm_length, int)
                                    or norm_length <= 0):
        raise ValueError(f"policy_loss: norm_length={norm_length!r} must be a positive int or None (use T)")
    if logp.dim() != 2 or not logp.is_floating_point():
        raise ValueError(f"policy_loss: logp must be a float tensor [B, T], got shape {tuple(logp.shape)} "
                         f"dtype {logp.dtype}")
    num_rows = logp.shape[0]
    expected = {"behavior_logp": (behavior_logp, [tuple(logp.shape)]),
                "mask": (mask, [tuple(logp.shape)]),
                "advantages": (advantages, [(num_rows,), tuple(logp.shape)]),
                "policy_id": (policy_id, [(num_rows,)])}
    for name, (t, shapes) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) not in shapes:
            raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}; expected one of {shapes} "
                             f"(logp is {tuple(logp.shape)})")
        if t.device != logp.device:
            raise ValueError(f"policy_loss: {name} is on {t.device} but logp on {logp.device}")
    if policy_id is not None and policy_id.is_floating_point():
        raise ValueError(f"policy_loss: policy_id must be an integer tensor, got dtype {policy_id.dtype}")


def policy_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                *, policy_id: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: float | None = None, guide_transform: GuideTransform = "ppo",
                shaping_gamma: float = 0.1, agg: Aggregation = "seq-mean-token-mean",
                norm_length: int | None = None,
                backend: Backend = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip policy-gradient loss over a mixed on-policy / guide batch, and its metrics.

    Formulas: see reference.py. Masked tokens contribute nothing; an all-masked batch gives loss 0 and a zero
    gradient.

    Args:
        logp: [B, T] float, log-probs under the current policy; the only differentiable input.
        behavior_logp: [B, T] float, log-probs under the policy that produced each sequence.
        advantages: [B] (per sequence) or [B, T] (per token) float.
        mask: [B, T] bool or float 0/1, the tokens that count.
        policy_id: [B] int, 0 on-policy and 1 guide (any nonzero counts as guide); None: all on-policy.
        clip_low, clip_high: PPO clip range [1 − clip_low, 1 + clip_high].
        dual_clip: c > 1 caps the loss at −A·c for A < 0; None disables it.
        guide_transform: loss form for guide tokens: "ppo" (clip, as on-policy), "luffy" (−A·p/(p+γ)),
            "exgrpo" (−A·r/(r+γ)).
        shaping_gamma: γ of the shaping transforms.
        agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or "seq-mean-token-sum-norm".
        norm_length: the constant length of "seq-mean-token-sum-norm" (default T).
        backend: "auto" (Triton for CUDA tensors, PyTorch otherwise), "triton", or "torch".

    Returns:
        loss: 0-d fp32 (fp64 for fp64 logp on the torch path).
        metrics: detached fp32 0-d tensors (no host sync): pg/clipfrac, pg/clipfrac_guide, pg/dual_clipfrac,
            pg/ratio_mean, pg/ratio_mean_guide, pg/ppo_kl, pg/guide_token_frac. A mean over no tokens is 0.
    """
    _check_args(logp, behavior_logp, advantages, mask, policy_id, clip_low, clip_high, dual_clip,
                guide_transform, shaping_gamma, agg, norm_length, backend)
    kwargs = dict(policy_id=policy_id, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                  guide_transform=guide_transform, shaping_gamma=shaping_gamma)
    if not use_triton("policy_loss", backend, logp.device):
        return policy_loss_ref(logp, behavior_logp, advantages, mask, agg=agg, norm_length=norm_length,
                               **kwargs)

    # The kernels index rows with a fixed stride, so they take contiguous inputs (a no-op when already so).
    args = [t.contiguous() for t in (logp, behavior_logp.detach(), advantages.detach(), mask)]
    if policy_id is not None:
        policy_id = policy_id.contiguous()
    chunk_loss, chunk_stats = PolicyLossFunction.apply(*args, policy_id, float(clip_low), float(clip_high),
                                                       None if dual_clip is None else float(dual_clip),
                                                       guide_transform, float(shaping_gamma))
    stats = chunk_stats.sum(1)  # [B, NUM_STATS]
    rows = RowSums(chunk_loss.sum(1), *stats.unbind(1))
    loss = AGGREGATIONS[agg](rows.loss, rows.tokens, logp.shape[1], norm_length)
    return loss, policy_metrics(rows, policy_id)
