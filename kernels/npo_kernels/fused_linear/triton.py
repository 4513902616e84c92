"""GPU path of `fused_linear_logprob`: cuBLAS GEMMs on tiles of the logits, the selective_logprob Triton
kernels on each tile. No autograd here (op.py holds it); no [N, V] tensor is ever allocated.

Forward, token chunks of full rows (rows·V ≤ tile_elements):
    z = hidden[rows] @ weight.T (+ bias)       one GEMM, in the inputs' dtype, as the unfused model has it
    _selective_logprob_fwd_kernel(z)          logp, entropy, lse, mu = Σp·z for those rows
Backward, vocabulary-major tiles [rows, Vt] (all N rows at once whenever N·4096 ≤ tile_elements):
    z    = hidden[rows] @ weight[cols].T      recomputed (4 GEMMs in all: kernels.md §4.2, k = 4)
    dz   = _selective_logprob_bwd_kernel(z)   written over z, in z's dtype, from the saved lse / mu
    dX  += dz @ weight[cols]                  fp32 accumulator over vocabulary tiles, cast once at the end
    dW[cols] = dz.T @ hidden[rows]            the sum over N runs inside one GEMM (fp32 in the tensor
                                              cores); with several token chunks, an fp32 [Vt, H] accumulator,
                                              cast once
Numerics follow kernels.md §2: fp32 accumulation of dX and dW across chunks, (p_y - 1)·g formed in fp32 in
the kernel, int64 row offsets and -inf tails inside the kernels.
"""

from __future__ import annotations

import torch

from .._dispatch import empty_row_stats, tile_shape
from ..logprob.triton import selective_logprob_bwd, selective_logprob_fwd

# Tiles of 2^28 elements = 512 MB of bf16 logits, a tenth of the [N, V] bf16 tensor at the target shape
# (N = 16384, V = 151936), and GEMMs of ≥ 1766 rows (forward) or all 16384 rows (backward).
TILE_ELEMENTS = 1 << 28
# Preferred vocabulary width of a backward tile when N is too large to keep all rows in one tile.
MIN_VOCAB_TILE = 4096

_MM_OUT_DTYPE: bool | None = None


def _mm_fp32_out_supported(device: torch.device) -> bool:
    """Whether torch.mm(a, b, out_dtype=torch.float32) works for half inputs here (CUDA, torch ≥ 2.8)."""
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE is None:
        try:
            a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
            _MM_OUT_DTYPE = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return _MM_OUT_DTYPE


def logits_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """out [n, Vt] = x [n, H] @ w[Vt, H].T (+ b [Vt]), the GEMM writing straight into a reused buffer."""
    if b is None:
        return torch.mm(x, w.T, out=out)
    return torch.addmm(b, x, w.T, out=out)


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, with a, b in any float dtype.

    Half inputs use a GEMM with an fp32 output when torch has one, so no partial product is rounded to bf16;
    otherwise the partial is rounded once to the inputs' dtype and summed in fp32 (still no bf16 running sum).
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _mm_fp32_out_supported(a.device):
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.add_(torch.mm(a, b))


def fused_linear_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, *, temperature: float, return_entropy: bool,
                             tile_elements: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V, H], bias [V] or None, targets [N] int64.

    Returns logp [N], entropy [N] or None, lse [N], mu [N] or None (fp32). tile_elements: None for
    TILE_ELEMENTS.
    """
    tile_elements = TILE_ELEMENTS if tile_elements is None else tile_elements
    num_rows = hidden.shape[0]
    n_cols = weight.shape[0]
    rows = min(num_rows, max(1, tile_elements // n_cols))
    logp, entropy, lse, mu = empty_row_stats(num_rows, hidden.device, torch.float32, return_entropy)
    if num_rows == 0:
        return logp, entropy, lse, mu
    z_buf = torch.empty(rows, n_cols, device=hidden.device, dtype=hidden.dtype)
    for r0 in range(0, num_rows, rows):
        r1 = min(num_rows, r0 + rows)
        z = logits_into(z_buf[: r1 - r0], hidden[r0:r1], weight, bias)
        lp, ent, lse_c, mu_c = selective_logprob_fwd(z, targets[r0:r1], temperature=temperature,
                                                     return_entropy=return_entropy)
        logp[r0:r1] = lp
        lse[r0:r1] = lse_c
        if return_entropy:
            entropy[r0:r1] = ent
            mu[r0:r1] = mu_c
    return logp, entropy, lse, mu


def fused_linear_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, lse: torch.Tensor, mu: torch.Tensor | None,
                             dlogp: torch.Tensor | None, dentropy: torch.Tensor | None, *, temperature: float,
                             needs_dx: bool, needs_dw: bool, needs_db: bool,
                             tile_elements: int | None = None
                             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dhidden [N, H], dweight [V, H], dbias [V]) in the inputs' dtypes; None where not needed.

    lse, mu, dlogp, dentropy: [N] fp32 (dlogp or dentropy may be None, not both). tile_elements: None for
    TILE_ELEMENTS.
    """
    tile_elements = TILE_ELEMENTS if tile_elements is None else tile_elements
    num_rows, hidden_size = hidden.shape
    n_cols = weight.shape[0]
    dev = hidden.device
    rows, cols = tile_shape(num_rows, n_cols, tile_elements, MIN_VOCAB_TILE)
    one_token_chunk = rows >= num_rows
    dx32 = torch.zeros(num_rows, hidden_size, device=dev, dtype=torch.float32) if needs_dx else None
    dw = torch.empty_like(weight) if needs_dw else None
    db32 = torch.zeros(n_cols, device=dev, dtype=torch.float32) if needs_db else None
    if num_rows == 0:
        if dw is not None:
            dw.zero_()
        return (dx32.to(hidden.dtype) if needs_dx else None, dw,
                db32.to(bias.dtype) if needs_db else None)
    # Flat, so that every tile (also the narrower last one) is a contiguous [rows, Vt] view.
    z_buf = torch.empty(rows * cols, device=dev, dtype=hidden.dtype)
    dw_acc = None
    if needs_dw and not one_token_chunk:
        dw_acc = torch.empty(cols, hidden_size, device=dev, dtype=torch.float32)
    for v0 in range(0, n_cols, cols):
        v1 = min(n_cols, v0 + cols)
        w_v = weight[v0:v1]
        b_v = None if bias is None else bias[v0:v1]
        if dw_acc is not None:
            dw_acc[: v1 - v0].zero_()
        for r0 in range(0, num_rows, rows):
            r1 = min(num_rows, r0 + rows)
            x = hidden[r0:r1]
            z = logits_into(z_buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0), x, w_v, b_v)
            # dz overwrites z in place: this buffer is ours, and each kernel program reads its block first.
            dz = selective_logprob_bwd(
                z, targets[r0:r1], lse[r0:r1], None if mu is None else mu[r0:r1],
                None if dlogp is None else dlogp[r0:r1], None if dentropy is None else dentropy[r0:r1],
                temperature=temperature, out=z, col_offset=v0)
            if needs_dx:
                _addmm_fp32_(dx32[r0:r1], dz, w_v)
            if needs_dw:
                if one_token_chunk:
                    torch.mm(dz.T, x, out=dw[v0:v1])
                else:
                    _addmm_fp32_(dw_acc[: v1 - v0], dz.T, x)
            if needs_db:
                db32[v0:v1] += dz.sum(0, dtype=torch.float32)
        if dw_acc is not None:
            dw[v0:v1].copy_(dw_acc[: v1 - v0])
    return (dx32.to(hidden.dtype) if needs_dx else None, dw,
            db32.to(bias.dtype) if needs_db else None)
