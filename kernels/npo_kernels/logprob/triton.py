"""Triton kernels for `selective_logprob` and their launchers. No autograd here (op.py holds it).

Forward, one program per row, one online pass over the vocabulary in blocks of BLOCK_V columns:
    m      running max of z2 = logits · log2(e) / T      (base-2 units, so each element costs one exp2)
    sum_e  Σ 2^(z2 - m)                                  rescaled by 2^(m_old - m_new) when m grows
    s      Σ 2^(z2 - m) · (z2 - m)                       only with entropy; shifted along with m
and writes per row: logp, entropy (optional), lse (natural log units) and mu = Σ p·z (optional), which is all
the backward needs: it never stores an [N, V] tensor.

Backward, a 2-D grid (row, column block) with no reduction:
    dz_j = (1/T) · [ g · 1(j == y) - p_j · (g + g_H · (z_j - mu)) ],    p_j = exp(z_j - lse)
which is dlogp's term g·(onehot - p) plus the entropy term -g_H·p_j·(z_j - Σp·z) (kernels.md §2).

Numerics (kernels.md §2, each applied below where it is marked):
- int64 row offsets: N·V exceeds 2^31 at the target shape.
- tail and masked columns load as -inf; the running max starts at -inf and is never assumed finite.
- fp32 accumulators; exp2 with a log2(e) prescale; one transcendental per element per pass.
- entropy from s and sum_e, without an extra exp; the 0·(-inf) products of -inf columns are selected away.
- temperature (as 1/T) and the optional-output flags are constexprs, so no Python float is promoted to fp64
  and no store goes through a dummy pointer.
Works on Triton 3.6 through 3.9 and under TRITON_INTERPRET=1 (fp32/fp16 only there: numpy has no bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import LN2, LOG2E, empty_row_stats

# The shared constants as constexprs: a @triton.jit body may read a global only if it is a tl.constexpr.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)

# Columns per block. 4096 bf16 columns are 8 KB: with 8 warps each thread loads 16 contiguous elements
# (two 16-byte vectors), and a 151936 row takes 38 iterations.
_FWD_BLOCK_V = 4096
_BWD_BLOCK_V = 4096
_NUM_WARPS = 8


@triton.jit
def _selective_logprob_fwd_kernel(
    LOGITS, TARGETS, LOGP, ENTROPY, LSE, MU,
    stride_row, n_cols,
    SCALE2: tl.constexpr,          # log2(e) / T
    RETURN_ENTROPY: tl.constexpr,  # also store entropy and mu (the entropy gradient needs mu)
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row overflows int32 at N·V > 2^31
    row_ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    valid = target >= 0
    # An ignored (or out-of-range) target still reads column 0, so every load stays in bounds.
    safe_target = tl.where(valid & (target < n_cols), target, 0)

    m = float("-inf")   # the max identity is -inf, never 0 (verl #7439: positive logp)
    sum_e = 0.0
    s = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        # Tail columns load -inf: they add 2^-inf = 0 to sum_e and never raise the max (V % BLOCK_V != 0).
        z2 = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * SCALE2
        m_new = tl.maximum(m, tl.max(z2, axis=0))
        # m_new is -inf only while every logit so far is -inf; shifting by 0 then avoids (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        d = z2 - m_safe
        e = tl.exp2(d)
        if RETURN_ENTROPY:
            # s is kept relative to the running max: moving it from m to m_new rescales by alpha and adds
            # (m - m_new)·sum_e. While sum_e == 0, m is -inf, and the product would be (-inf)·0.
            shift = (tl.where(sum_e > 0.0, m, m_safe) - m_safe) * sum_e
            # e == 0 where d == -inf (tail or -inf logits): take d as 0 there, not 0·(-inf) = NaN.
            s = alpha * (s + shift) + tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=0)
        sum_e = sum_e * alpha + tl.sum(e, axis=0)
        m = m_new

    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log2_sum = tl.log2(sum_e)
    z2_target = tl.load(row_ptr + safe_target).to(tl.float32) * SCALE2
    # logp = (z_y - m) - log sum_e: the difference is taken before the (possibly large) max is added back,
    # so a peaked row keeps its tiny logp instead of ulp(|z|) noise. logp ≤ 0 and H ≥ 0 are then enforced:
    # compiled for a GPU, z·SCALE2 - m contracts into a fused multiply-add, which leaves the max's own shifted
    # logit at ±1 rounding instead of 0, enough to put a near-certain row at logp = +4e-9 or H = -2e-8
    # (inside the error budget, outside the invariants; the interpreter rounds the product first).
    logp = tl.minimum((z2_target - m_safe - log2_sum) * _LN2, 0.0)
    tl.store(LOGP + row, tl.where(valid, logp, 0.0))
    tl.store(LSE + row, (m_safe + log2_sum) * _LN2)
    if RETURN_ENTROPY:
        # H = lse - Σp·z = log sum_e - s/sum_e, again without adding the max back.
        entropy = tl.maximum((log2_sum - s / sum_e) * _LN2, 0.0)
        tl.store(ENTROPY + row, tl.where(valid, entropy, 0.0))
        tl.store(MU + row, (m_safe + s / sum_e) * _LN2)


@triton.jit
def _selective_logprob_bwd_kernel(
    LOGITS, TARGETS, LSE, MU, DLOGP, DENTROPY, DLOGITS,
    stride_row, stride_grad_row, n_cols, col_offset,
    INV_T: tl.constexpr,
    HAS_DLOGP: tl.constexpr,
    HAS_DENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < n_cols
    target = tl.load(TARGETS + row)
    valid = target >= 0
    lse = tl.load(LSE + row)

    z = tl.load(LOGITS + row * stride_row + cols, mask=col_mask, other=float("-inf")).to(tl.float32) * INV_T
    p = tl.exp2((z - lse) * _LOG2E)
    if HAS_DLOGP:
        g = tl.load(DLOGP + row)
    else:
        g = 0.0
    coef = g + tl.zeros_like(z)   # g + g_H·(z_j - mu), fp32
    if HAS_DENTROPY:
        g_h = tl.load(DENTROPY + row)
        mu = tl.load(MU + row)
        coef += g_h * (z - mu)
    # Where p == 0 (-inf logits, tail columns) coef can be infinite: take it as 0 rather than form 0·inf.
    # (p_y - 1)·g is formed here in fp32 and cast only at the store (Liger #1268: bf16 cancellation).
    dz = -p * tl.where(p > 0.0, coef, 0.0)
    if HAS_DLOGP:
        dz += tl.where(cols + col_offset == target, g, 0.0)
    # Ignored rows get an exact zero, whatever their logits (a fully -inf row would give NaN above).
    dz = tl.where(valid, dz * INV_T, 0.0)
    tl.store(DLOGITS + row * stride_grad_row + cols, dz.to(DLOGITS.dtype.element_ty), mask=col_mask)


def _check_rows(logits: torch.Tensor) -> None:
    # The kernels index columns with unit stride; rows may be strided (a slice of a larger buffer).
    assert logits.dim() == 2 and logits.stride(1) == 1, "internal: logits must be [N, V], unit column stride"


def selective_logprob_fwd(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                          return_entropy: bool
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel.

    Args:
        logits: [N, V] fp32/bf16/fp16, unit column stride.  targets: [N] int64 (negative = ignored row).
    Returns:
        logp [N], entropy [N] or None, lse [N], mu = Σp·z [N] or None (entropy and mu with return_entropy);
        all fp32.
    """
    _check_rows(logits)
    num_rows, n_cols = logits.shape
    logp, entropy, lse, mu = empty_row_stats(num_rows, logits.device, torch.float32, return_entropy)
    if num_rows == 0:
        return logp, entropy, lse, mu
    block_v = min(_FWD_BLOCK_V, triton.next_power_of_2(n_cols))
    _selective_logprob_fwd_kernel[(num_rows,)](
        logits, targets, logp,
        entropy if return_entropy else logp,   # never stored through: RETURN_ENTROPY is False
        lse,
        mu if return_entropy else lse,         # never stored through: RETURN_ENTROPY is False
        logits.stride(0), n_cols,
        SCALE2=LOG2E / float(temperature), RETURN_ENTROPY=return_entropy,
        BLOCK_V=block_v, num_warps=_NUM_WARPS if block_v >= 2048 else 4,
    )
    return logp, entropy, lse, mu


def selective_logprob_bwd(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                          mu: torch.Tensor | None, dlogp: torch.Tensor | None, dentropy: torch.Tensor | None,
                          *, temperature: float, out: torch.Tensor | None = None, col_offset: int = 0
                          ) -> torch.Tensor:
    """Launch the backward kernel: dlogits [N, V] in logits' dtype (or written into `out`).

    `logits` may be one column tile [N, Vt] of a wider vocabulary starting at `col_offset` (the fused-linear
    path); `lse`, `mu` are then those of the full rows. `out` may be `logits` itself when the caller owns that
    buffer: each element is read before it is overwritten by the same program.
    Args:
        lse, mu, dlogp, dentropy: [N] fp32; mu is required when dentropy is given.
    """
    _check_rows(logits)
    if dentropy is not None and mu is None:
        raise ValueError("selective_logprob_bwd: dentropy needs mu (from a forward with return_entropy=True)")
    num_rows, n_cols = logits.shape
    dlogits = torch.empty_like(logits) if out is None else out
    _check_rows(dlogits)
    if num_rows == 0 or n_cols == 0:
        return dlogits
    block_v = min(_BWD_BLOCK_V, triton.next_power_of_2(n_cols))
    grid = (num_rows, triton.cdiv(n_cols, block_v))
    _selective_logprob_bwd_kernel[grid](
        logits, targets, lse,
        mu if mu is not None else lse,
        dlogp if dlogp is not None else lse,        # not read: HAS_DLOGP is False
        dentropy if dentropy is not None else lse,  # not read: HAS_DENTROPY is False
        dlogits,
        logits.stride(0), dlogits.stride(0), n_cols, col_offset,
        INV_T=1.0 / float(temperature), HAS_DLOGP=dlogp is not None, HAS_DENTROPY=dentropy is not None,
        BLOCK_V=block_v, num_warps=_NUM_WARPS if block_v >= 2048 else 4,
    )
    return dlogits
