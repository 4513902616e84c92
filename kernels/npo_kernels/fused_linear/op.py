"""Public `fused_linear_logprob`: argument checks, backend dispatch, custom ops and autograd.

Layers, bottom up:
    _chunked_fwd / _chunked_bwd          PyTorch over [rows, Vt] tiles with an online logsumexp (the CPU
                                         "auto" path): the GEMM of each tile lands in one reused buffer
    triton.fused_linear_logprob_fwd/_bwd cuBLAS GEMMs per tile + the selective_logprob Triton kernels
                                         (CUDA, or CPU tensors under TRITON_INTERPRET=1)
    npo_kernels::fused_linear_logprob_fwd / _bwd   torch.library custom ops around either, with fake impls
    FusedLinearLogprobFunction           autograd: saves hidden, weight, bias (no copies) and per-row lse, mu
    fused_linear_logprob                 validation and dispatch; backend="torch" is the reference itself

No [N, V] tensor exists in the forward or the backward of the chunked and Triton paths: the backward
recomputes each tile's logits from hidden and weight (4 GEMMs in all instead of the unfused 3; kernels.md
§4.2). It is a plain autograd Function over tensors, so a tied embedding (the same weight used elsewhere) and
FSDP2 (which hands modules their unsharded weight during forward) need nothing special: autograd sums the
weight's gradients.

One trade on the eager CPU path, where GEMMs dominate the time: when dW is needed, the forward keeps its
first tiles, at most |dW| bytes of them, and the backward consumes them instead of recomputing (with N = 2H
that is half the recompute GEMM). The backward frees each kept tile before it writes the matching slice of
dW, whose pages are committed only as they are written, so the backward's peak memory is max(|kept|, |dW|)
= |dW| plus one tile, as without the cache. What the cache does cost is |dW| bytes held from the forward to
the backward. `_CPU_CACHE_TILES = False` turns it off.
"""

from __future__ import annotations

import math

import torch

from ..logprob.op import (
    BACKENDS,
    Backend,
    _compute_dtype,
    check_targets,
    check_temperature,
    resolve_impl,
)
from .reference import fused_linear_logprob_ref

__all__ = ["BACKENDS", "fused_linear_logprob"]

# CPU tiles: 2^23 fp32 elements = 32 MB (a 2048 × 4096 tile at N ≥ 2048): GEMMs of 2048 × 4096 × H run at full
# BLAS speed, the tile stays near the L3, and a cached tile is large enough for glibc to mmap it, so freeing
# it returns its memory to the OS at once (smaller blocks can stay in the heap). The vocabulary width is kept
# ≥ 4096 so that each weight slice is read once per token chunk, not once per handful of rows.
_CPU_TILE_ELEMENTS = 1 << 23
_CPU_MIN_VOCAB_TILE = 4096
# Keep forward tiles for the backward when dW is needed (eager CPU only; see the module docstring).
_CPU_CACHE_TILES = True
# GPU tiles: 2^28 elements = 512 MB of bf16 logits, a tenth of the [N, V] bf16 tensor at the target shape
# (N = 16384, V = 151936), and GEMMs of ≥ 1766 rows (forward) or all 16384 rows (backward).
_TRITON_TILE_ELEMENTS = 1 << 28
# Base-2 log-probs are clamped here before they multiply p: 2^-2048 is 0 in fp32 and fp64 alike, so the clamp
# changes no product p·log p except 0·(-inf) = NaN, which it turns into the correct 0.
_LOG2P_FLOOR = -2048.0
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


# ---- Tiling helpers (shared with triton.py) ----------------------------------------------------------------

def tile_shape(num_rows: int, n_cols: int, tile_elements: int, min_vocab_tile: int) -> tuple[int, int]:
    """(rows, cols) of a vocabulary-major tile with rows·cols ≤ tile_elements (at least 1×1).

    All rows in one tile when a `min_vocab_tile`-wide tile of them fits, so that the dW GEMM sums over N
    internally; otherwise token chunks of tile_elements / min_vocab_tile rows.
    """
    rows = min(num_rows, max(1, tile_elements // min(n_cols, min_vocab_tile)))
    cols = min(n_cols, max(1, tile_elements // max(rows, 1)))
    return rows, cols


def logits_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """out [n, Vt] = x [n, H] @ w[Vt, H].T (+ b [Vt]), the GEMM writing straight into a reused buffer."""
    if b is None:
        return torch.mm(x, w.T, out=out)
    return torch.addmm(b, x, w.T, out=out)


# ---- Chunked PyTorch path ----------------------------------------------------------------------------------
#
# Tiles are [rows, Vt] blocks of the logits, visited vocabulary-major (all token chunks of one weight slice,
# then the next slice), in the same order in the forward and the backward. They hold z2 = z·log2(e), base-2
# logits, so that each element costs one exp2 (≈ 40 % cheaper than exp in ATen on CPU), and the log2(e)/T
# scale rides on the GEMM's alpha for free (kernels.md §2: exp2 with a LOG2E prescale).


def _tiles(num_rows: int, n_cols: int, tile_elements: int):
    """Yield (r0, r1, v0, v1) in the order both passes visit them."""
    rows, cols = tile_shape(num_rows, n_cols, tile_elements, _CPU_MIN_VOCAB_TILE)
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


def _chunked_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 temperature: float, return_entropy: bool, tile_elements: int,
                 cache: list[torch.Tensor] | None = None, cache_bytes: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online logsumexp over the tiles. Per row, in base-2 units, it keeps
        m = max z2,  sum_e = Σ 2^(z2 - m),  s = Σ 2^(z2 - m)·(z2 - m)  (entropy only),  z2_y (the target's)
    and rescales sum_e and s by 2^(m_old - m_new) as m grows (kernels.md §2: entropy without extra exps).

    If `cache` is a list, the first tiles (at most `cache_bytes` in all) are appended to it for the backward
    instead of being overwritten. Returns logp, entropy ([0] without it), lse, mu = Σp·z ([0] without
    entropy); [N] each, natural-log units.
    """
    num_rows = hidden.shape[0]
    n_cols = weight.shape[0]
    cdt, dev = _compute_dtype(hidden.dtype), hidden.device
    scale = _LOG2E / temperature
    rows, cols = tile_shape(num_rows, n_cols, tile_elements, _CPU_MIN_VOCAB_TILE)
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
            d.clamp_min_(_LOG2P_FLOOR)
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
    logp = torch.where(valid, ((z2_y - m_safe) - log2_sum) * _LN2, zero)
    lse = (m_safe + log2_sum) * _LN2
    if not return_entropy:
        return logp, m.new_empty(0), lse, m.new_empty(0)
    mean_shifted = s / sum_e                              # Σp·(z2 - m)
    entropy = torch.where(valid, (log2_sum - mean_shifted) * _LN2, zero)
    return logp, entropy, lse, (m_safe + mean_shifted) * _LN2


def _chunked_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 lse: torch.Tensor, mu: torch.Tensor, dlogp: torch.Tensor | None,
                 dentropy: torch.Tensor | None, temperature: float, needs_dx: bool, needs_dw: bool,
                 needs_db: bool, tile_elements: int, cache: list[torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tile (recomputed, or popped from `cache` and freed after use), form dz in place:

        dz_j = (1/T)·[g·1(j == y) - p_j·(a + b·lp2_j)],  lp2_j = log2 p_j = z2_j - lse2,
        a = g + g_H·(lse - mu),  b = g_H·ln 2

    i.e. g·(onehot - p) - g_H·p_j·(z_j - Σp·z) (kernels.md §2) with z_j - mu = lp2_j·ln 2 + (lse - mu), then
    dX += dz @ W_t and dW_t += dz.T @ X_t. dX, dW and db accumulate in fp32 (fp64 for fp64 inputs) across
    tiles and are cast once (kernels.md §2). Returns (dhidden, dweight, dbias), an empty [0] tensor for each
    one not needed.
    """
    num_rows, hidden_size = hidden.shape
    n_cols = weight.shape[0]
    cdt, dev = _compute_dtype(hidden.dtype), hidden.device
    scale = _LOG2E / temperature
    rows, cols = tile_shape(num_rows, n_cols, tile_elements, _CPU_MIN_VOCAB_TILE)
    valid = targets >= 0
    inv_t = 1.0 / temperature
    zero = lse.new_zeros(())
    g = torch.where(valid, dlogp.to(cdt), zero) if dlogp is not None else lse.new_zeros(num_rows)
    coef_a = -inv_t * g
    coef_b = None
    if dentropy is not None:
        g_h = torch.where(valid, dentropy.to(cdt), zero)
        coef_a = -inv_t * (g + g_h * (lse - mu))
        coef_b = (-inv_t * _LN2 * g_h).unsqueeze(1)
    coef_a = coef_a.unsqueeze(1)
    onehot_value = inv_t * g
    # Ignored rows: lse = +inf makes p = 2^(z2 - inf) = 0 and their coefficients are 0, so their dz is exactly
    # 0 without a separate pass (and without NaN from an all -inf row).
    lse2_col = torch.where(valid, lse * _LOG2E, float("inf")).unsqueeze(1)

    dx32 = torch.zeros(num_rows, hidden_size, dtype=cdt, device=dev) if needs_dx else None
    # fp32 weights accumulate straight into the gradient. torch.empty commits no pages: dW's memory grows only
    # as its rows are written, tile by tile, while the cached tiles are freed (see fused_linear_logprob).
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
            lp2.clamp_min_(_LOG2P_FLOOR)
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


# ---- Custom ops --------------------------------------------------------------------------------------------

@torch.library.custom_op("npo_kernels::fused_linear_logprob_fwd", mutates_args=())
def _fused_linear_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              targets: torch.Tensor, temperature: float, return_entropy: bool, impl: str,
                              tile_elements: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns logp [N], entropy [N] (or [0]), lse [N], mu [N] (or [0]); the last two are for the backward."""
    if impl == "triton":
        from .triton import fused_linear_logprob_fwd

        logp, entropy, lse, mu = fused_linear_logprob_fwd(
            hidden, weight, bias, targets, temperature=temperature, return_entropy=return_entropy,
            tile_elements=tile_elements)
        if not return_entropy:
            entropy, mu = logp.new_empty(0), logp.new_empty(0)
        return logp, entropy, lse, mu
    return _chunked_fwd(hidden, weight, bias, targets, temperature, return_entropy, tile_elements)


@_fused_linear_logprob_fwd.register_fake
def _(hidden, weight, bias, targets, temperature, return_entropy, impl, tile_elements):
    num_rows = hidden.shape[0]
    dt = _compute_dtype(hidden.dtype)
    n_ent = num_rows if return_entropy else 0
    return (hidden.new_empty(num_rows, dtype=dt), hidden.new_empty(n_ent, dtype=dt),
            hidden.new_empty(num_rows, dtype=dt), hidden.new_empty(n_ent, dtype=dt))


@torch.library.custom_op("npo_kernels::fused_linear_logprob_bwd", mutates_args=())
def _fused_linear_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              targets: torch.Tensor, lse: torch.Tensor, mu: torch.Tensor,
                              dlogp: torch.Tensor | None, dentropy: torch.Tensor | None, temperature: float,
                              impl: str, tile_elements: int, needs_dx: bool, needs_dw: bool, needs_db: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dhidden, dweight, dbias); an empty [0] tensor for each gradient not needed."""
    if impl == "triton":
        from .triton import fused_linear_logprob_bwd

        dx, dw, db = fused_linear_logprob_bwd(
            hidden, weight, bias, targets, lse, mu if dentropy is not None else None,
            None if dlogp is None else dlogp.float().contiguous(),
            None if dentropy is None else dentropy.float().contiguous(),
            temperature=temperature, needs_dx=needs_dx, needs_dw=needs_dw, needs_db=needs_db,
            tile_elements=tile_elements)
        return tuple(t if t is not None else hidden.new_empty(0) for t in (dx, dw, db))
    return _chunked_bwd(hidden, weight, bias, targets, lse, mu, dlogp, dentropy, temperature, needs_dx,
                        needs_dw, needs_db, tile_elements)


@_fused_linear_logprob_bwd.register_fake
def _(hidden, weight, bias, targets, lse, mu, dlogp, dentropy, temperature, impl, tile_elements, needs_dx,
      needs_dw, needs_db):
    return (torch.empty_like(hidden) if needs_dx else hidden.new_empty(0),
            torch.empty_like(weight) if needs_dw else hidden.new_empty(0),
            torch.empty_like(bias) if needs_db else hidden.new_empty(0))


class FusedLinearLogprobFunction(torch.autograd.Function):
    """Autograd over the two custom ops. Saves the inputs (no copies) and lse, mu [N].

    With `cache_tiles` (eager CPU path, dW needed) the forward runs `_chunked_fwd` directly and keeps its
    first logits tiles on `ctx.cache`, a plain list, so that the backward can pop and free them one by one;
    autograd's saved tensors would stay alive until the whole backward ends. A second backward (retain_graph)
    finds the list empty and recomputes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, return_entropy, impl, tile_elements,
                cache_tiles):
        ctx.cache = None
        if cache_tiles:
            ctx.cache = []
            logp, entropy, lse, mu = _chunked_fwd(hidden, weight, bias, targets, temperature, return_entropy,
                                                  tile_elements, cache=ctx.cache,
                                                  cache_bytes=weight.numel() * weight.element_size())
        else:
            logp, entropy, lse, mu = torch.ops.npo_kernels.fused_linear_logprob_fwd(
                hidden, weight, bias, targets, temperature, return_entropy, impl, tile_elements)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, mu)
        ctx.temperature = temperature
        ctx.impl = impl
        ctx.tile_elements = tile_elements
        ctx.set_materialize_grads(False)   # an unused entropy arrives as None: no entropy term in backward
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp, dentropy):
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        if (dlogp is None and dentropy is None) or not (needs_dx or needs_dw or needs_db):
            return (None,) * 9
        hidden, weight, bias, targets, lse, mu = ctx.saved_tensors
        if ctx.cache is not None:
            dx, dw, db = _chunked_bwd(hidden, weight, bias, targets, lse, mu, dlogp, dentropy,
                                      ctx.temperature, needs_dx, needs_dw, needs_db, ctx.tile_elements,
                                      cache=ctx.cache)
        else:
            dx, dw, db = torch.ops.npo_kernels.fused_linear_logprob_bwd(
                hidden, weight, bias, targets, lse, mu, dlogp, dentropy, ctx.temperature, ctx.impl,
                ctx.tile_elements, needs_dx, needs_dw, needs_db)
        return (dx if needs_dx else None, dw if needs_dw else None, db if needs_db else None,
                None, None, None, None, None, None)


# ---- Public function ---------------------------------------------------------------------------------------

def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t, dims in (("hidden", hidden, 2), ("weight", weight, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-D tensor, got shape {list(getattr(t, 'shape', []))}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] disagree on H: hidden {list(hidden.shape)}, "
                         f"weight {list(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have V ≥ 1 rows, got V = 0")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"hidden must be fp32, bf16 or fp16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight ({weight.dtype}) must have hidden's dtype ({hidden.dtype}); cast one, e.g. "
                         "weight.to(hidden.dtype), as the model's own matmul would need")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {list(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must match hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
                             f"got {bias.dtype}, {bias.device}")


def fused_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, temperature: float = 1.0,
                         return_entropy: bool = False, backend: Backend = "auto"
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`selective_logprob(hidden @ weight.T + bias, targets, ...)` without ever forming the [N, V] logits.

    Args:
        hidden: [N, H] fp32, bf16 or fp16 (fp64 on CPU), differentiable: the final hidden states.
        weight: [V, H], hidden's dtype, differentiable: the lm_head weight or a tied embedding.
        targets: [N] int64; a negative target marks an ignored row: logp = entropy = 0, zero gradient.
        bias: [V] or None.
        temperature: divides the logits before the softmax.
        return_entropy: also return the entropy of softmax(logits / T), differentiable too.
        backend: "auto" (Triton on CUDA tensors, the chunked PyTorch path on CPU), "triton" (CUDA, or CPU
            tensors under TRITON_INTERPRET=1), or "torch" (the reference, which does form [N, V]).
    Returns:
        logp [N] fp32 (≤ 0), or (logp [N], entropy [N]) when return_entropy.

    Example:
        >>> logp = fused_linear_logprob(hidden_states, model.lm_head.weight, input_ids)
    """
    _check_inputs(hidden, weight, bias)
    targets = check_targets(targets, hidden.shape[0], weight.shape[0], hidden.device)
    temperature = check_temperature(temperature)
    impl = resolve_impl(backend, hidden.device, hidden.dtype)
    if impl == "torch":
        return fused_linear_logprob_ref(hidden, weight, targets, bias=bias, temperature=temperature,
                                        return_entropy=return_entropy)
    tile_elements = _TRITON_TILE_ELEMENTS if impl == "triton" else _CPU_TILE_ELEMENTS
    # Eager CPU training step: keep up to |dW| bytes of forward tiles instead of recomputing them (see the
    # module docstring); never under torch.compile, whose graphs carry no Python-side state.
    cache_tiles = (impl == "chunked" and _CPU_CACHE_TILES and weight.requires_grad and torch.is_grad_enabled()
                   and not torch.compiler.is_compiling())
    logp, entropy = FusedLinearLogprobFunction.apply(hidden, weight, bias, targets, temperature,
                                                     return_entropy, impl, tile_elements, cache_tiles)
    return (logp, entropy) if return_entropy else logp
