"""The chunked PyTorch path of `selective_logprob`: what backend="auto" runs on CPU tensors.

Row chunks of at most `CHUNK_ELEMENTS` elements go through ATen's fused log_softmax; only per-row statistics
leave a chunk (logp, entropy, lse and mu = Σp·z for the backward), so the forward never holds an [N, V]
tensor, and the backward writes the [N, V] gradient chunk by chunk from the saved lse (and mu). fp32 math
(fp64 for fp64 logits, so gradcheck can run it), one cast per chunk. No autograd here (see op.py).
"""

from __future__ import annotations

import torch

from .._dispatch import LOGP_FLOOR, compute_dtype

# Elements per row chunk (fp32: 32 MB per buffer, ~55 rows at V = 151936). Large enough that per-call overhead
# and thread start-up vanish, small enough to stay near the L3 and add ≤ ~3 buffers of memory next to the
# [N, V] gradient.
CHUNK_ELEMENTS = 1 << 23


def _rows_per_chunk(n_cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(n_cols, 1))


def selective_logprob_fwd(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                          return_entropy: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row chunks through ATen's fused log_softmax; returns logp, entropy, lse, mu, each [N] (entropy, mu: [0]
    without return_entropy), in fp32 (fp64 for fp64 logits). Extra memory: ≤ 3 chunk buffers, never [N, V]."""
    num_rows, n_cols = logits.shape
    cdt, dev = compute_dtype(logits.dtype), logits.device
    rows = _rows_per_chunk(n_cols)
    valid = targets >= 0
    safe_targets = torch.where(valid, targets, 0).unsqueeze(1)   # ignored rows read column 0, then masked
    logp = torch.empty(num_rows, dtype=cdt, device=dev)
    lse = torch.empty(num_rows, dtype=cdt, device=dev)
    entropy = torch.empty(num_rows if return_entropy else 0, dtype=cdt, device=dev)
    convert = logits.dtype != cdt or temperature != 1.0
    z_buf = torch.empty(min(rows, num_rows), n_cols, dtype=cdt, device=dev) if convert else None
    lp_buf = torch.empty(min(rows, num_rows), n_cols, dtype=cdt, device=dev)
    p_buf = torch.empty(min(rows, num_rows), n_cols, dtype=cdt, device=dev) if return_entropy else None
    for r0 in range(0, num_rows, rows):
        r1 = min(num_rows, r0 + rows)
        n = r1 - r0
        z = logits[r0:r1]
        if convert:   # upcast first, then divide: dividing bf16 would round z to bf16
            z = z_buf[:n].copy_(z)
            if temperature != 1.0:
                z.div_(temperature)
        lp = torch.log_softmax(z, dim=1, out=lp_buf[:n])     # one fused ATen kernel: max, Σexp, write
        t = safe_targets[r0:r1]
        lp_y = lp.gather(1, t)
        logp[r0:r1] = lp_y.squeeze(1)
        # lse = z_y - log p_y, exact to a few ulp of max|z| (the accuracy of any fp32 log-softmax), and free:
        # log_softmax does not expose its lse, and a separate logsumexp would be another pass.
        lse[r0:r1] = (z.gather(1, t) - lp_y).squeeze(1)
        if return_entropy:
            p = torch.softmax(z, dim=1, out=p_buf[:n])
            lp.clamp_min_(LOGP_FLOOR)
            # H = -Σ p·log p as a batched dot product: no [n, V] product temporary.
            entropy[r0:r1] = -torch.bmm(p.view(n, 1, n_cols), lp.view(n, n_cols, 1)).view(n)
    # Σp·z = lse - H. Without entropy a distinct empty tensor: a custom op's outputs may not alias each other.
    mu = lse - entropy if return_entropy else entropy.new_empty(0)
    zero = logp.new_zeros(())
    logp = torch.where(valid, logp, zero)
    if return_entropy:
        entropy = torch.where(valid, entropy, zero)
    return logp, entropy, lse, mu


def selective_logprob_bwd(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, mu: torch.Tensor,
                          dlogp: torch.Tensor | None, dentropy: torch.Tensor | None, *, temperature: float
                          ) -> torch.Tensor:
    """dlogits [N, V] in logits' dtype, one row chunk at a time from the saved lse (and mu):

        dz_j = (1/T)·[g·1(j == y) - p_j·(a + b·lp_j)],  lp_j = z_j - lse,  a = g + g_H·(lse - mu),  b = g_H

    i.e. g·(onehot - p) - g_H·p_j·(z_j - Σp·z) (kernels.md §2) with z_j - mu rewritten as lp_j + (lse - mu),
    so the -inf logits are clamped in log-prob units (see LOGP_FLOOR). fp32 math, one cast per chunk.
    """
    num_rows, n_cols = logits.shape
    cdt, dev = compute_dtype(logits.dtype), logits.device
    rows = _rows_per_chunk(n_cols)
    grad = torch.empty_like(logits)
    valid = targets >= 0
    safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
    inv_t = 1.0 / temperature
    zero = lse.new_zeros(())
    g = torch.where(valid, dlogp.to(cdt), zero) if dlogp is not None else lse.new_zeros(num_rows)
    coef_a = (-inv_t * g).unsqueeze(1)                     # -(1/T)·a, per row
    if dentropy is not None:
        g_h = torch.where(valid, dentropy.to(cdt), zero)
        coef_a = (-inv_t * (g + g_h * (lse - mu))).unsqueeze(1)
        coef_b = (-inv_t * g_h).unsqueeze(1)               # -(1/T)·b
    onehot_value = (inv_t * g).unsqueeze(1)
    lse_col = lse.unsqueeze(1)

    direct = logits.dtype == cdt          # fp32/fp64 logits: compute straight into the gradient's rows
    convert = not direct or temperature != 1.0
    chunk = min(rows, num_rows)
    z_buf = torch.empty(chunk, n_cols, dtype=cdt, device=dev) if convert else None
    g_buf = None if direct else torch.empty(chunk, n_cols, dtype=cdt, device=dev)
    tmp_buf = torch.empty(chunk, n_cols, dtype=cdt, device=dev) if dentropy is not None else None
    for r0 in range(0, num_rows, rows):
        r1 = min(num_rows, r0 + rows)
        n = r1 - r0
        z = logits[r0:r1]
        if convert:
            z = z_buf[:n].copy_(z)
            if temperature != 1.0:
                z.div_(temperature)
        out = grad[r0:r1] if direct else g_buf[:n]
        torch.sub(z, lse_col[r0:r1], out=out)             # lp = log p
        if dentropy is not None:
            out.clamp_min_(LOGP_FLOOR)
            tmp = torch.addcmul(coef_a[r0:r1], out, coef_b[r0:r1], out=tmp_buf[:n])
            out.exp_()
            out.mul_(tmp)
        else:
            out.exp_()
            out.mul_(coef_a[r0:r1])
        out.scatter_add_(1, safe_targets[r0:r1], onehot_value[r0:r1])
        if not direct:
            grad[r0:r1].copy_(out)                          # the one cast to bf16/fp16
    if not bool(valid.all()):
        # Exact zeros for ignored rows, whatever their logits (an all -inf row has lse = -inf and NaN above).
        grad.index_fill_(0, torch.nonzero(~valid).squeeze(1), 0)
    return grad
