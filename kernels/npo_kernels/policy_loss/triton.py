"""Triton kernels for the policy loss: a forward that writes per-chunk sums, a backward that writes dlogp.

Both run over a (B, ⌈T/BLOCK_T⌉) grid, one program per chunk of BLOCK_T tokens of one sequence, and share
`_token_terms`, so the loss and its derivative come from one definition. The forward never writes a [B, T]
tensor: each program reduces its chunk to the loss sum and five metric counts, and the row sums, aggregation
and metrics are done on these tiny [B, C] outputs in torch (op.py), so any aggregation reuses one kernel.
The backward recomputes ∂L/∂logp from the inputs instead of saving it (no [B, T] fp32 residual).

Loss scalars (clip range, dual clip, ln γ) and mode flags are `tl.constexpr` (reference/kernels.md §2: a
Python float argument can become fp64 under Inductor). No autograd here (op.py holds it).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._dispatch import MAX_LOG_RATIO
from .reference import GUIDE_TRANSFORMS, NUM_STATS

# Kernel codes of the reference's guide transforms (the `GUIDE_TRANSFORM` constexpr of `_token_terms`).
_GUIDE_TRANSFORM_CODE = {"ppo": 0, "luffy": 1, "exgrpo": 2}
assert set(_GUIDE_TRANSFORM_CODE) == set(GUIDE_TRANSFORMS), "a guide transform has no Triton code"


@triton.jit
def _load_chunk(LOGP, BLOGP, ADV, MASK, row, offs, in_row, ADV_PER_TOKEN: tl.constexpr):
    """Load one chunk; masked and out-of-row entries read as 0, so they are zeroed before exp()."""
    m = tl.load(MASK + offs, mask=in_row, other=0) != 0
    logp = tl.load(LOGP + offs, mask=m, other=0.0).to(tl.float32)
    blogp = tl.load(BLOGP + offs, mask=m, other=0.0).to(tl.float32)
    if ADV_PER_TOKEN:
        adv = tl.load(ADV + offs, mask=m, other=0.0).to(tl.float32)
    else:
        # Broadcast the per-sequence advantage to the chunk: scalar-vs-block int1 ops fail in the interpreter.
        adv = tl.load(ADV + row).to(tl.float32) + tl.zeros_like(logp)
    return m, logp, blogp, adv


@triton.jit
def _token_terms(logp, blogp, adv, POLICY_ID, row,
                 CLIP_LOW: tl.constexpr, CLIP_HIGH: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
                 DUAL_CLIP: tl.constexpr, GUIDE_TRANSFORM: tl.constexpr, LOG_GAMMA: tl.constexpr,
                 MAX_LOG_RATIO: tl.constexpr):
    """Per-token loss, ∂loss/∂logp, clip flags and log-ratio; the formulas of reference.py."""
    delta = logp - blogp
    log_r = tl.minimum(tl.maximum(delta, -MAX_LOG_RATIO), MAX_LOG_RATIO)
    # The clamp passes the gradient only inside [−20, 20] (ends included, as torch.clamp).
    dlog_r = tl.where((delta >= -MAX_LOG_RATIO) & (delta <= MAX_LOG_RATIO), 1.0, 0.0)
    r = tl.exp(log_r)

    # PPO clip. The clipped term can be strictly larger only with r outside the clip range, where it is
    # constant in r; on ties (r inside the range) both terms are −A·r, so the gradient is −A·r.
    unclipped = -adv * r
    clipped_term = -adv * tl.minimum(tl.maximum(r, 1.0 - CLIP_LOW), 1.0 + CLIP_HIGH)
    clipped = clipped_term > unclipped
    loss = tl.where(clipped, clipped_term, unclipped)
    dloss = tl.where(clipped, 0.0, unclipped) * dlog_r
    if HAS_DUAL_CLIP:
        bound = -adv * DUAL_CLIP
        dual = (adv < 0) & (bound < loss)
        loss = tl.where(dual, bound, loss)
        dloss = tl.where(dual, 0.0, dloss)
    else:
        dual = tl.zeros_like(loss) > 0.0

    # Shaping transforms for guide rows: −A·sigmoid(x − ln γ) = −A·e^x/(e^x + γ), x = logp or log_r.
    # GUIDE_TRANSFORM is 0 ("ppo") whenever there is no policy_id, so POLICY_ID is only read here.
    if GUIDE_TRANSFORM != 0:
        # Broadcast to the chunk, as the advantage: scalar-vs-block int1 ops fail in the interpreter.
        policy_id = tl.load(POLICY_ID + row) + tl.zeros(logp.shape, dtype=tl.int32)
        is_guide = policy_id != 0
        is_on_policy = policy_id == 0
        if GUIDE_TRANSFORM == 1:  # luffy: x = logp
            s = tl.sigmoid(logp - LOG_GAMMA)
            dshaped = -adv * s * (1.0 - s)
        else:  # exgrpo: x = log_r
            s = tl.sigmoid(log_r - LOG_GAMMA)
            dshaped = -adv * s * (1.0 - s) * dlog_r
        loss = tl.where(is_guide, -adv * s, loss)
        dloss = tl.where(is_guide, dshaped, dloss)
        clipped = clipped & is_on_policy
        dual = dual & is_on_policy
    return loss, dloss, clipped, dual, log_r, r


@triton.jit
def _chunk_terms(LOGP, BLOGP, ADV, MASK, POLICY_ID, T,
                 CLIP_LOW: tl.constexpr, CLIP_HIGH: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
                 DUAL_CLIP: tl.constexpr, GUIDE_TRANSFORM: tl.constexpr, LOG_GAMMA: tl.constexpr,
                 MAX_LOG_RATIO: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's chunk (row, chunk, element offsets, in-row flags) and its per-token terms."""
    row = tl.program_id(0).to(tl.int64)  # int64 element offsets: B·T may exceed 2^31 (kernels.md §2)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = cols < T
    offs = row * T + cols
    m, logp, blogp, adv = _load_chunk(LOGP, BLOGP, ADV, MASK, row, offs, in_row, ADV_PER_TOKEN)
    loss, dloss, clipped, dual, log_r, r = _token_terms(
        logp, blogp, adv, POLICY_ID, row, CLIP_LOW, CLIP_HIGH, HAS_DUAL_CLIP, DUAL_CLIP, GUIDE_TRANSFORM,
        LOG_GAMMA, MAX_LOG_RATIO)
    return row, chunk, offs, in_row, m, loss, dloss, clipped, dual, log_r, r


@triton.jit
def _policy_loss_fwd_kernel(
    LOGP, BLOGP, ADV, MASK, POLICY_ID,  # [B, T], [B, T], [B] or [B, T], [B, T], [B]
    CHUNK_LOSS, CHUNK_STATS,  # [B, C] and [B, C, NUM_STATS] fp32 outputs
    T, NUM_CHUNKS,
    CLIP_LOW: tl.constexpr, CLIP_HIGH: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, DUAL_CLIP: tl.constexpr,
    GUIDE_TRANSFORM: tl.constexpr, LOG_GAMMA: tl.constexpr, MAX_LOG_RATIO: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr, NUM_STATS: tl.constexpr,
):
    row, chunk, offs, in_row, m, loss, dloss, clipped, dual, log_r, r = _chunk_terms(
        LOGP, BLOGP, ADV, MASK, POLICY_ID, T, CLIP_LOW, CLIP_HIGH, HAS_DUAL_CLIP, DUAL_CLIP, GUIDE_TRANSFORM,
        LOG_GAMMA, MAX_LOG_RATIO, ADV_PER_TOKEN, BLOCK_T)

    # tl.where(flag, 1.0, 0.0) rather than flag.to(float): int1 casts misbehave in some interpreter versions.
    out = row * NUM_CHUNKS + chunk
    tl.store(CHUNK_LOSS + out, tl.sum(tl.where(m, loss, 0.0), axis=0))
    stats = CHUNK_STATS + out * NUM_STATS
    tl.store(stats + 0, tl.sum(tl.where(m, 1.0, 0.0), axis=0))
    tl.store(stats + 1, tl.sum(tl.where(m & clipped, 1.0, 0.0), axis=0))
    tl.store(stats + 2, tl.sum(tl.where(m & dual, 1.0, 0.0), axis=0))
    tl.store(stats + 3, tl.sum(tl.where(m, r, 0.0), axis=0))
    tl.store(stats + 4, tl.sum(tl.where(m, -log_r, 0.0), axis=0))


@triton.jit
def _policy_loss_bwd_kernel(
    GRAD_CHUNK_LOSS,  # [B, C] fp32: ∂loss/∂(chunk loss sum), from the aggregation's autograd
    LOGP, BLOGP, ADV, MASK, POLICY_ID,
    DLOGP,  # [B, T] output, logp's dtype
    T, NUM_CHUNKS,
    CLIP_LOW: tl.constexpr, CLIP_HIGH: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, DUAL_CLIP: tl.constexpr,
    GUIDE_TRANSFORM: tl.constexpr, LOG_GAMMA: tl.constexpr, MAX_LOG_RATIO: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr, NUM_STATS: tl.constexpr,
):
    row, chunk, offs, in_row, m, loss, dloss, clipped, dual, log_r, r = _chunk_terms(
        LOGP, BLOGP, ADV, MASK, POLICY_ID, T, CLIP_LOW, CLIP_HIGH, HAS_DUAL_CLIP, DUAL_CLIP, GUIDE_TRANSFORM,
        LOG_GAMMA, MAX_LOG_RATIO, ADV_PER_TOKEN, BLOCK_T)
    g = tl.load(GRAD_CHUNK_LOSS + row * NUM_CHUNKS + chunk)
    dlogp = tl.where(m, g * dloss, 0.0)  # masked tokens get an exact zero
    tl.store(DLOGP + offs, dlogp.to(DLOGP.dtype.element_ty), mask=in_row)


def _kernel_args(logp, advantages, mask, policy_id, *, clip_low, clip_high, dual_clip, guide_transform,
                 shaping_gamma, block_t):
    """Tensor views and constexpr keywords shared by both launchers."""
    # bool has no pointer type the interpreter handles everywhere; a uint8 view is free (same itemsize).
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    # A real (unread) tensor instead of None: a None pointer fails only under the interpreter (Liger #508).
    policy_id_arg = policy_id if policy_id is not None else mask
    # Without policy_id every row is on-policy, so the guide transform is dead code: compile it out.
    transform = _GUIDE_TRANSFORM_CODE[guide_transform] if policy_id is not None else 0
    constexprs = dict(
        CLIP_LOW=float(clip_low), CLIP_HIGH=float(clip_high), HAS_DUAL_CLIP=dual_clip is not None,
        DUAL_CLIP=float(dual_clip or 0.0), GUIDE_TRANSFORM=transform, LOG_GAMMA=math.log(shaping_gamma),
        MAX_LOG_RATIO=MAX_LOG_RATIO, ADV_PER_TOKEN=advantages.dim() == 2, BLOCK_T=block_t,
        NUM_STATS=NUM_STATS,
    )
    return mask, policy_id_arg, constexprs


def policy_loss_fwd(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, policy_id: torch.Tensor | None, *, clip_low: float, clip_high: float,
                    dual_clip: float | None, guide_transform: str, shaping_gamma: float,
                    block_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk loss sums [B, C] and metric sums [B, C, 5] (fp32); inputs contiguous, C = ⌈T / block_t⌉."""
    num_rows, seq_len = logp.shape
    num_chunks = triton.cdiv(seq_len, block_t)
    chunk_loss = torch.zeros(num_rows, num_chunks, dtype=torch.float32, device=logp.device)
    chunk_stats = torch.zeros(num_rows, num_chunks, NUM_STATS, dtype=torch.float32, device=logp.device)
    if chunk_loss.numel() == 0:
        return chunk_loss, chunk_stats
    mask, policy_id_arg, constexprs = _kernel_args(
        logp, advantages, mask, policy_id, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        guide_transform=guide_transform, shaping_gamma=shaping_gamma, block_t=block_t)
    _policy_loss_fwd_kernel[(num_rows, num_chunks)](
        logp, behavior_logp, advantages, mask, policy_id_arg, chunk_loss, chunk_stats, seq_len, num_chunks,
        **constexprs)
    return chunk_loss, chunk_stats


def policy_loss_bwd(grad_chunk_loss: torch.Tensor, logp: torch.Tensor, behavior_logp: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, policy_id: torch.Tensor | None, *,
                    clip_low: float, clip_high: float, dual_clip: float | None, guide_transform: str,
                    shaping_gamma: float, block_t: int) -> torch.Tensor:
    """dlogp [B, T] in logp's dtype, given ∂loss/∂(chunk loss sums) [B, C]."""
    num_rows, seq_len = logp.shape
    dlogp = torch.empty_like(logp)
    if dlogp.numel() == 0:
        return dlogp
    mask, policy_id_arg, constexprs = _kernel_args(
        logp, advantages, mask, policy_id, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        guide_transform=guide_transform, shaping_gamma=shaping_gamma, block_t=block_t)
    num_chunks = triton.cdiv(seq_len, block_t)
    _policy_loss_bwd_kernel[(num_rows, num_chunks)](
        grad_chunk_loss.to(torch.float32).contiguous(), logp, behavior_logp, advantages, mask, policy_id_arg,
        dlogp, seq_len, num_chunks, **constexprs)
    return dlogp
