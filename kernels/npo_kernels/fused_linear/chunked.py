"""The chunked PyTorch path of `fused_linear_logprob`: what backend="auto" runs on CPU tensors.

Tiles are [rows, Vt] blocks of the logits, visited vocabulary-major (all token chunks of one weight slice,
then the next slice), in the same order in the forward and the backward; the GEMM of each tile lands in one
reused buffer, so no [N, V] tensor exists in either pass. The forward keeps an online logsumexp (and the
entropy's running sum) per row; the backward recomputes each tile's logits from hidden and weight (4 GEMMs
in all instead of the unfused 3; kernels.md §4.2). Tiles hold z2 = z·log2(e), base-2 logits, so that each
element costs one exp2 (≈ 40 % cheaper than exp in ATen on CPU), and the log2(e)/T scale rides on the GEMM's
alpha for free (kernels.md §2: exp2 with a LOG2E prescale). No autograd here (see op.py).

One trade on the eager CPU path, where GEMMs dominate the time: when dW is needed, the forward keeps its
first tiles, at most |dW| bytes of them (`cache`), and the backward consumes them instead of recomputing
(with N = 2H that is half the recompute GEMM). The backward frees each kept tile before it writes the
matching slice of dW, whose pages are committed only as they are written, so the backward's peak memory is
max(|kept|, |dW|) = |dW| plus one tile, as without the cache. What the cache does cost is |dW| bytes held
from the forward to the backward. `CACHE_TILES = False` turns it off.
"""

from __future__ import annotations

import torch

from .._dispatch import LN2, LOG2E, LOG2P_FLOOR, compute_dtype, tile_shape

# Tiles of 2^23 fp32 elements = 32 MB (a 2048 × 4096 tile at N ≥ 2048): GEMMs of 2048 × 4096 × H run at full
# BLAS speed, the tile stays near the L3, and a cached tile is large enough for glibc to mmap it, so freeing
# it returns its memory to the OS at once (smaller blocks can stay in the heap). The vocabulary width is kept
# ≥ 4096 so that each weight slice is read once per token chunk, not once per handful of rows.
TILE_ELEMENTS = 1 << 23
MIN_VOCAB_TILE = 4096
# Keep forward tiles for the backward when dW is needed (eager only; see the module docstring).
CACHE_TILES = True


def _tiles(num_rows: int, n_cols: int, tile_elements: int):
    """Yield (r0, r1, v0, v1) in the order both passes visit them."""
    rows, cols = tile_shape(num_rows, n_cols, tile_elements, MIN_VOCAB_TILE)
    for v0 in range(0, n_cols, cols):
        for r0 in range(0, num_rows, rows):
            yield r0, min(num_rows, r0 + rows), v0, min(n_cols, v0 + cols)


def _tile_logits2(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """out [n, Vt] = (x @ w.T + b)·scale in the compute dtype, scale = log2(e)/T.

    fp32/fp64 inputs: one GEMM straight into `out`, the scale as alpha. Half inputs: the product is rounded
    to their dtype first, as the reference's (and the model's) matmul is, then upcast and scaled.
    """
    if x.dtype == out.dtype:
        if b is None:
            return out.addmm_(x, w.T, beta=0.0, alpha=scale)   # beta = 0: out's old contents are ignored
        return torch.addmm(b * scale, x, w.T, alpha=scale, out=out)
    out.copy_(x @ w.T if b is None else torch.addmm(b, x, w.T))
    return out.mul_(scale)


def fused_linear_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, *, temperature: float, return_entropy: bool,
                             tile_elements: int | None = None, cache: list[torch.Tensor] | None = None,
                             cache_bytes: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online logsumexp over the tiles. Per row, in base-2 units, it keeps
        m = max z2,  sum_e = Σ 2^(z2 - m),  s = Σ 2^(z2 - m)·(z2 - m)  (entropy only),  z2_y (the target's)
    and rescales sum_e and s by 2^(m_old - m_new) as m grows (kernels.md §2: entropy without extra exps).

    If `cache` is a list, the first tiles (at most `cache_bytes` in all) are appended to it for the backward
    instead of being overwritten. Returns logp, entropy ([0] without it), lse, mu = Σp·z ([0] without
    entropy); [N] each, natural-log units. tile_elements: None for TILE_ELEMENTS.
    """
    tile_elements = TILE_ELEMENTS if tile_elements is None else tile_elements
    num_rows = hidden.shape[0]
    n_cols = weight.shape[0]
    cdt, dev = compute_dtype(hidden.dtype), hidden.device
    scale = LOG2E / temperature
    rows, cols = tile_shape(num_rows, n_cols, tile_elements, MIN_VOCAB_TILE)
    m = torch.full((num_rows,), float("-inf"), dtype=cdt, device=dev)
    sum_e = torch.zeros(num_rows, dtype=cdt, device=dev)
    s = torch.zeros(num_rows, dtype=cdt, device=dev)
    z2_y = torch.zeros(num_rows, dtype=cdt, device=dev)
    z_buf = torch.empty(rows * cols, dtype=cdt, device=dev)
    e_buf = torch.empty(rows * cols, dtype=cdt, device=dev) if return_entropy else None
    cached = 0
    keeping = cache is not None
    for r0, r1, v0, v1 in _tiles(num_rows, n_cols, tile_elements):
        n, vt = r1 - r0, v1 - v0
        # A prefix of the tiles, so that the backward, visiting them in the same order, pops them in turn.
        keeping = keeping and cached + n * vt * z_buf.element_size() <= cache_bytes
        keep = keeping
        z = torch.empty(n, vt, dtype=cdt, device=dev) if keep else z_buf[: n * vt].view(n, vt)
        _tile_logits2(z, hidden[r0:r1], weight[v0:v1], None if bias is None else bias[v0:v1], scale)
        if keep:
            cache.append(z)
            cached += z.numel() * z.element_size()
        local = targets[r0:r1] - v0
        inside = (local >= 0) & (local < vt)
        picked = z.gather(1, local.clamp(0, vt - 1).unsqueeze(1)).squeeze(1)
        z2_y[r0:r1] = torch.where(inside, picked, z2_y[r0:r1])

        m_old, sum_old = m[r0:r1], sum_e[r0:r1]
        m_new = torch.maximum(m_old, z.amax(dim=1))
        # m_new = -inf only while every logit so far is -inf: shift by 0 then, not by -inf.
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp2(m_old - m_safe)
        # d = z2 - m, in place unless the tile is kept for the backward
        d = torch.sub(z, m_safe.unsqueeze(1), out=z_buf[: n * vt].view(n, vt) if keep else z)
        if return_entropy:
            d.clamp_min_(LOG2P_FLOOR)
            e = torch.exp2(d, out=e_buf[: n * vt].view(n, vt))
            # Σ e·d as a batched dot product: no [n, Vt] product temporary.
            s_tile = torch.bmm(e.view(n, 1, vt), d.view(n, vt, 1)).view(n)
            # Move s from the old max to the new: 2^(z-m_new)(z-m_new) = α·2^(z-m_old)·((z-m_old) +
            # (m_old-m_new)).
            # While sum_old == 0, m_old is -inf and the shift term must be 0, not (-inf)·0.
            shift = torch.where(sum_old > 0, m_old - m_safe, 0.0) * sum_old
            s[r0:r1] = alpha * (s[r0:r1] + shift) + s_tile
            sum_tile = e.sum(dim=1)
        else:
            sum_tile = d.exp2_().sum(dim=1)
        sum_e[r0:r1] = alpha * sum_old + sum_tile
        m[r0:r1] = m_new

    valid = targets >= 0
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    log2_sum = torch.log2(sum_e)
    zero = m.new_zeros(())
    # logp = (z_y - m) - log sum_e: the max is subtracted first, so a peaked row keeps its tiny logp.
    logp = torch.where(valid, ((z2_y - m_safe) - log2_sum) * LN2, zero)
    lse = (m_safe + log2_sum) * LN2
    if not return_entropy:
        return logp, m.new_empty(0), lse, m.new_empty(0)
    mean_shifted = s / sum_e                              # Σp·(z2 - m)
    entropy = torch.where(valid, (log2_sum - mean_shifted) * LN2, zero)
    return logp, entropy, lse, (m_safe + mean_shifted) * LN2


def fused_linear_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, lse: torch.Tensor, mu: torch.Tensor,
                             dlogp: torch.Tensor | None, dentropy: torch.Tensor | None, *, temperature: float,
                             needs_dx: bool, needs_dw: bool, needs_db: bool,
                             tile_elements: int | None = None, cache: list[torch.Tensor] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile (recomputed, or popped from `cache` and freed after use), form dz in place:

        dz_j = (1/T)·[g·1(j == y) - p_j·(a + b·lp2_j)],  lp2_j = log2 p_j = z2_j - lse2,
        a = g + g_H·(lse - mu),  b = g_H·ln 2

    i.e. g·(onehot - p) - g_H·p_j·(z_j - Σp·z) (kernels.md §2) with z_j - mu = lp2_j·ln 2 + (lse - mu), then
    dX += dz @ W_t and dW_t += dz.T @ X_t. dX, dW and db accumulate in fp32 (fp64 for fp64 inputs) across
    tiles and are cast once (kernels.md §2). Returns (dhidden, dweight, dbias), an empty [0] tensor for each
    one not needed. tile_elements: None for TILE_ELEMENTS (the forward's tiling, which a cache relies on).
    """
    tile_elements = TILE_ELEMENTS if tile_elements is None else tile_elements
    num_rows, hidden_size = hidden.shape
    n_cols = weight.shape[0]
    cdt, dev = compute_dtype(hidden.dtype), hidden.device
    scale = LOG2E / temperature
    rows, cols = tile_shape(num_rows, n_cols, tile_elements, MIN_VOCAB_TILE)
    valid = targets >= 0
    inv_t = 1.0 / temperature
    zero = lse.new_zeros(())
    g = torch.where(valid, dlogp.to(cdt), zero) if dlogp is not None else lse.new_zeros(num_rows)
    coef_a = -inv_t * g
    coef_b = None
    if dentropy is not None:
        g_h = torch.where(valid, dentropy.to(cdt), zero)
        coef_a = -inv_t * (g + g_h * (lse - mu))
        coef_b = (-inv_t * LN2 * g_h).unsqueeze(1)
    coef_a = coef_a.unsqueeze(1)
    onehot_value = inv_t * g
    # Ignored rows: lse = +inf makes p = 2^(z2 - inf) = 0 and their coefficients are 0, so their dz is exactly
    # 0 without a separate pass (and without NaN from an all -inf row).
    lse2_col = torch.where(valid, lse * LOG2E, float("inf")).unsqueeze(1)

    dx32 = torch.zeros(num_rows, hidden_size, dtype=cdt, device=dev) if needs_dx else None
    # fp32 weights accumulate straight into the gradient. torch.empty commits no pages: dW's memory grows only
    # as its rows are written, tile by tile, while the cached tiles are freed (see the module docstring).
    dw_direct = needs_dw and weight.dtype == cdt
    dw = torch.empty_like(weight) if needs_dw else hidden.new_empty(0)
    dw_acc = torch.empty(cols, hidden_size, dtype=cdt, device=dev) if needs_dw and not dw_direct else None
    db32 = torch.zeros(n_cols, dtype=cdt, device=dev) if needs_db else None
    z_buf = torch.empty(rows * cols, dtype=cdt, device=dev)
    tmp_buf = torch.empty(rows * cols, dtype=cdt, device=dev) if dentropy is not None else None
    w_v_c = None
    for r0, r1, v0, v1 in _tiles(num_rows, n_cols, tile_elements):
        n, vt = r1 - r0, v1 - v0
        if r0 == 0:                                         # a new weight slice
            w_v_c = weight[v0:v1].to(cdt)
            if dw_acc is not None:
                dw_acc[:vt].zero_()
        if cache:
            z = cache.pop(0)                                # freed at the end of this iteration
        else:
            z = _tile_logits2(z_buf[: n * vt].view(n, vt), hidden[r0:r1], weight[v0:v1],
                              None if bias is None else bias[v0:v1], scale)
        lp2 = z.sub_(lse2_col[r0:r1])
        if coef_b is not None:
            lp2.clamp_min_(LOG2P_FLOOR)
            tmp = torch.addcmul(coef_a[r0:r1], lp2, coef_b[r0:r1], out=tmp_buf[: n * vt].view(n, vt))
            dz = lp2.exp2_().mul_(tmp)
        else:
            dz = lp2.exp2_().mul_(coef_a[r0:r1])
        local = targets[r0:r1] - v0
        inside = valid[r0:r1] & (local >= 0) & (local < vt)
        dz.scatter_add_(1, local.clamp(0, vt - 1).unsqueeze(1),
                        torch.where(inside, onehot_value[r0:r1], zero).unsqueeze(1))
        x_c = hidden[r0:r1].to(cdt)
        if needs_dx:
            dx32[r0:r1].addmm_(dz, w_v_c)
        if needs_dw:
            dw_v = dw[v0:v1] if dw_direct else dw_acc[:vt]
            if r0 == 0:
                torch.mm(dz.T, x_c, out=dw_v)
            else:
                dw_v.addmm_(dz.T, x_c)
            if r1 == num_rows and not dw_direct:
                dw[v0:v1].copy_(dw_v)                       # the one cast of this slice of dW
        if needs_db:
            db32[v0:v1] += dz.sum(dim=0)
        del z, lp2, dz
    # Distinct empty tensors for the gradients not needed: a custom op's outputs may not alias each other.
    return (dx32.to(hidden.dtype) if needs_dx else hidden.new_empty(0), dw,
            db32.to(bias.dtype) if needs_db else hidden.new_empty(0))


# ---- The gradient formed in the forward --------------------------------------------------------------------
# Width of the vocabulary slices the row-block forward exponentiates into a scratch buffer (the block itself
# keeps the shifted logits, which the gradient needs).
SCRATCH_COLS = 8192


def fused_linear_logprob_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, token_grad, *, temperature: float, return_entropy: bool,
                               block_bytes: int, needs_dx: bool, needs_dw: bool, needs_db: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs and, in the same pass, the gradient of a loss whose derivative in each row's log-prob depends
    on that row's log-prob alone: 3 LM-head GEMMs per token (logits, dX, dW) instead of the 4 of a forward
    and a backward that recomputes the logits, holding one block of rows' logits instead of all of them.

    Row blocks of r rows with all V logits each (r·V elements of the compute dtype ≤ block_bytes, r ≥ 1):
        z2 = (X_b @ W.T + b)·log2(e)/T           one GEMM
        logp, entropy of each row                  max, then Σ 2^(z2 - m) over scratch slices
        g = token_grad(logp_b, r0, r1)             dloss/dlogp of these rows, [r]
        dz = (g/T)·(onehot - p)                    in place over the block
        dX_b = dz @ W,  dW += dz.T @ X_b,  db += Σ_rows dz
    The entropy is returned without gradient. Accumulation in fp32 (fp64 for fp64 inputs), as in the
    backward above.

    Args:
        token_grad: (logp [r] in the compute dtype, r0, r1) -> [r] dloss/dlogp for rows r0:r1; rows with a
            negative target get 0 whatever it returns.
    Returns:
        logp [N], entropy [N] (or [0]), dhidden, dweight, dbias (an empty [0] tensor for each not needed).
    """
    num_rows, hidden_size = hidden.shape
    n_cols = weight.shape[0]
    cdt, dev = compute_dtype(hidden.dtype), hidden.device
    scale = LOG2E / temperature
    inv_t = 1.0 / temperature
    rows = max(1, min(num_rows, block_bytes // (n_cols * (torch.finfo(cdt).bits // 8))))  # rows per block
    valid = targets >= 0
    zero = hidden.new_zeros((), dtype=cdt)
    logp = torch.zeros(num_rows, dtype=cdt, device=dev)
    entropy = torch.zeros(num_rows if return_entropy else 0, dtype=cdt, device=dev)
    dx = torch.empty(num_rows, hidden_size, dtype=cdt, device=dev) if needs_dx else None
    dw32 = torch.empty(n_cols, hidden_size, dtype=cdt, device=dev) if needs_dw else None
    db32 = torch.zeros(n_cols, dtype=cdt, device=dev) if needs_db else None
    w_c = weight.to(cdt)
    block = torch.empty(rows * n_cols, dtype=cdt, device=dev)
    scratch_cols = min(n_cols, SCRATCH_COLS)
    scratch = torch.empty(rows * scratch_cols, dtype=cdt, device=dev)
    for r0 in range(0, num_rows, rows):
        r1 = min(num_rows, r0 + rows)
        n = r1 - r0
        d = _tile_logits2(block[: n * n_cols].view(n, n_cols), hidden[r0:r1], weight, bias, scale)
        m = d.amax(dim=1)
        m = torch.where(m == float("-inf"), 0.0, m)        # a row of -inf logits: shift by 0, not by -inf
        d.sub_(m.unsqueeze(1))                              # d = z2 - m ≤ 0
        if return_entropy:
            d.clamp_min_(LOG2P_FLOOR)                       # Σ p·d stays finite; such p are 0 in fp32 anyway
        sum_e = torch.zeros(n, dtype=cdt, device=dev)
        s = torch.zeros(n, dtype=cdt, device=dev)
        for v0 in range(0, n_cols, scratch_cols):
            v1 = min(n_cols, v0 + scratch_cols)
            d_slice = d[:, v0:v1]
            e = torch.exp2(d_slice, out=scratch[: n * (v1 - v0)].view(n, v1 - v0))
            sum_e += e.sum(dim=1)
            if return_entropy:
                s += (e * d_slice).sum(dim=1)
        local = targets[r0:r1].clamp(0, n_cols - 1).unsqueeze(1)
        log2_sum = torch.log2(sum_e)
        block_valid = valid[r0:r1]
        logp[r0:r1] = torch.where(block_valid, (d.gather(1, local).squeeze(1) - log2_sum) * LN2, zero)
        if return_entropy:
            entropy[r0:r1] = torch.where(block_valid, (log2_sum - s / sum_e) * LN2, zero)
        g = torch.where(block_valid, token_grad(logp[r0:r1].clone(), r0, r1).to(cdt), zero)
        # dz = (g/T)·(onehot - p), p = 2^(d - log2 Σ): the block becomes dz in place
        dz = d.sub_(log2_sum.unsqueeze(1)).exp2_().mul_((-inv_t * g).unsqueeze(1))
        dz.scatter_add_(1, local, torch.where(block_valid, inv_t * g, zero).unsqueeze(1))
        x_c = hidden[r0:r1].to(cdt)
        if needs_dx:
            torch.mm(dz, w_c, out=dx[r0:r1])
        if needs_dw:
            if r0 == 0:
                torch.mm(dz.T, x_c, out=dw32)
            else:
                dw32.addmm_(dz.T, x_c)
        if needs_db:
            db32 += dz.sum(dim=0)
    # Distinct empty tensors for the gradients not needed, as in the backward above.
    return (logp, entropy, dx.to(hidden.dtype) if needs_dx else hidden.new_empty(0),
            dw32.to(weight.dtype) if needs_dw else hidden.new_empty(0),
            db32.to(bias.dtype) if needs_db else hidden.new_empty(0))
