"""Public `selective_logprob`: argument checks, backend dispatch, custom ops and autograd.

Layers, bottom up:
    _chunked_fwd / _chunked_bwd          PyTorch over row chunks (the CPU "auto" path)
    triton.selective_logprob_fwd / _bwd  Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)
    npo_kernels::selective_logprob_fwd / _bwd   torch.library custom ops around either, with fake impls, so
                                         torch.compile traces through them as single nodes
    SelectiveLogprobFunction             autograd: saves logits, targets and per-row lse, mu = Σp·z
    selective_logprob                    validation and dispatch; backend="torch" is the reference itself

Nothing here writes into the caller's logits (kernels.md §3: in-place gradients corrupt shared logits).
"""

from __future__ import annotations

from typing import Literal

import torch

from .._dispatch import BACKENDS, triton_interpreter_enabled
from .reference import selective_logprob_ref

Backend = Literal["auto", "triton", "torch"]

# Elements per row chunk of the CPU path (fp32: 32 MB per buffer, ~55 rows at V = 151936). Large enough that
# per-call overhead and thread start-up vanish, small enough to stay near the L3 and add ≤ ~3 buffers of
# memory next to the [N, V] gradient.
_CPU_CHUNK_ELEMENTS = 1 << 23
# Log-probs are clamped here before they multiply p: exp(-1024) is 0 in fp32 and fp64 alike, so the clamp
# changes no product p·log p except 0·(-inf) = NaN, which it turns into the correct 0.
_LOGP_FLOOR = -1024.0


def _rows_per_chunk(n_cols: int) -> int:
    return max(1, _CPU_CHUNK_ELEMENTS // max(n_cols, 1))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 stays fp64 so that gradcheck can exercise the chunked path; everything else computes in fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- Chunked PyTorch path ----------------------------------------------------------------------------------

def _chunked_fwd(logits: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row chunks through ATen's fused log_softmax; returns logp, entropy, lse, mu, each [N] (entropy, mu: [0]
    without return_entropy), in fp32 (fp64 for fp64 logits). Extra memory: ≤ 3 chunk buffers, never [N, V]."""
    num_rows, n_cols = logits.shape
    cdt, dev = _compute_dtype(logits.dtype), logits.device
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
            lp.clamp_min_(_LOGP_FLOOR)
            # H = -Σ p·log p as a batched dot product: no [n, V] product temporary.
            entropy[r0:r1] = -torch.bmm(p.view(n, 1, n_cols), lp.view(n, n_cols, 1)).view(n)
    # Σp·z = lse - H. Without entropy a distinct empty tensor: a custom op's outputs may not alias each other.
    mu = lse - entropy if return_entropy else entropy.new_empty(0)
    zero = logp.new_zeros(())
    logp = torch.where(valid, logp, zero)
    if return_entropy:
        entropy = torch.where(valid, entropy, zero)
    return logp, entropy, lse, mu


def _chunked_bwd(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, mu: torch.Tensor,
                 dlogp: torch.Tensor | None, dentropy: torch.Tensor | None, temperature: float
                 ) -> torch.Tensor:
    """dlogits [N, V] in logits' dtype, one row chunk at a time from the saved lse (and mu):

        dz_j = (1/T)·[g·1(j == y) - p_j·(a + b·lp_j)],  lp_j = z_j - lse,  a = g + g_H·(lse - mu),  b = g_H

    i.e. g·(onehot - p) - g_H·p_j·(z_j - Σp·z) (kernels.md §2) with z_j - mu rewritten as lp_j + (lse - mu),
    so the -inf logits are clamped in log-prob units (see _LOGP_FLOOR). fp32 math, one cast per chunk.
    """
    num_rows, n_cols = logits.shape
    cdt, dev = _compute_dtype(logits.dtype), logits.device
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
            out.clamp_min_(_LOGP_FLOOR)
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


# ---- Custom ops --------------------------------------------------------------------------------------------

@torch.library.custom_op("npo_kernels::selective_logprob_fwd", mutates_args=())
def _selective_logprob_fwd(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                           return_entropy: bool, impl: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns logp [N], entropy [N] (or [0]), lse [N], mu [N] (or [0]); the last two are for the backward."""
    if impl == "triton":
        from .triton import selective_logprob_fwd

        logp, entropy, lse, mu = selective_logprob_fwd(logits, targets, temperature=temperature,
                                                       return_entropy=return_entropy)
        empty = logp.new_empty(0)
        return logp, entropy if return_entropy else empty, lse, mu if return_entropy else empty.clone()
    return _chunked_fwd(logits, targets, temperature, return_entropy)


@_selective_logprob_fwd.register_fake
def _(logits, targets, temperature, return_entropy, impl):
    num_rows = logits.shape[0]
    dt = _compute_dtype(logits.dtype)
    n_ent = num_rows if return_entropy else 0
    return (logits.new_empty(num_rows, dtype=dt), logits.new_empty(n_ent, dtype=dt),
            logits.new_empty(num_rows, dtype=dt), logits.new_empty(n_ent, dtype=dt))


@torch.library.custom_op("npo_kernels::selective_logprob_bwd", mutates_args=())
def _selective_logprob_bwd(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, mu: torch.Tensor,
                           dlogp: torch.Tensor | None, dentropy: torch.Tensor | None, temperature: float,
                           impl: str) -> torch.Tensor:
    if impl == "triton":
        from .triton import selective_logprob_bwd

        return selective_logprob_bwd(logits, targets, lse, mu if dentropy is not None else None,
                                     None if dlogp is None else dlogp.float().contiguous(),
                                     None if dentropy is None else dentropy.float().contiguous(),
                                     temperature=temperature)
    return _chunked_bwd(logits, targets, lse, mu, dlogp, dentropy, temperature)


@_selective_logprob_bwd.register_fake
def _(logits, targets, lse, mu, dlogp, dentropy, temperature, impl):
    return torch.empty_like(logits)


class SelectiveLogprobFunction(torch.autograd.Function):
    """Autograd over the two custom ops. Saves logits (the caller's tensor, no copy), targets, lse and mu."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, return_entropy, impl):
        logp, entropy, lse, mu = torch.ops.npo_kernels.selective_logprob_fwd(
            logits, targets, temperature, return_entropy, impl)
        ctx.save_for_backward(logits, targets, lse, mu)
        ctx.temperature = temperature
        ctx.impl = impl
        # Unused outputs arrive as None instead of zero tensors, so a logp-only loss skips the entropy term.
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp, dentropy):
        if dlogp is None and dentropy is None:
            return None, None, None, None, None
        logits, targets, lse, mu = ctx.saved_tensors
        dlogits = torch.ops.npo_kernels.selective_logprob_bwd(
            logits, targets, lse, mu, dlogp, dentropy, ctx.temperature, ctx.impl)
        return dlogits, None, None, None, None


# ---- Public function ---------------------------------------------------------------------------------------

def resolve_impl(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map the public `backend` to "triton", "chunked" or "torch", or raise a ValueError that says why."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device.type}), or TRITON_INTERPRET=1 "
                         "set before triton is imported to run the kernels on CPU tensors")
    if dtype == torch.float64:
        raise ValueError("backend='triton' supports fp32/bf16/fp16 logits, got float64; use backend='torch'")
    if device.type != "cuda" and dtype == torch.bfloat16:
        raise ValueError("the Triton interpreter (TRITON_INTERPRET=1) has no bf16; use fp32/fp16 on CPU")
    return "triton"


def check_targets(targets: torch.Tensor, num_rows: int, n_cols: int, device: torch.device) -> torch.Tensor:
    """Validate `targets` [N] against N rows of V = n_cols columns; returns it as int64."""
    if targets.dim() != 1 or targets.shape[0] != num_rows:
        raise ValueError(f"targets must have shape [N] = [{num_rows}], got {list(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the inputs are on {device}")
    # Out-of-range targets are checked on CPU only: on CUDA the check would cost a host sync per call, and
    # under torch.compile it would be a data-dependent branch.
    if device.type == "cpu" and num_rows and not torch.compiler.is_compiling():
        largest = int(targets.max())
        if largest >= n_cols:
            raise ValueError(f"targets must be < V = {n_cols} (or negative to ignore a row), got {largest}")
    return targets.to(torch.int64).contiguous()


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def selective_logprob(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                      return_entropy: bool = False, backend: Backend = "auto"
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each row's target under softmax(logits / temperature), and optionally the entropy.

    Only per-row statistics are kept for the backward (lse, and Σp·z with entropy), never [N, V] log-probs.

    Args:
        logits: [N, V] fp32, bf16 or fp16 (fp64 with backend="torch" or on CPU), differentiable.
        targets: [N] int64; a negative target marks an ignored row: logp = entropy = 0, zero gradient.
        temperature: divides the logits before the softmax.
        return_entropy: also return H = -Σ_v p_v log p_v of the same distribution, differentiable too.
        backend: "auto" (Triton on CUDA tensors, the chunked PyTorch path on CPU), "triton" (CUDA, or CPU
            tensors under TRITON_INTERPRET=1), or "torch" (the fp32 reference, `selective_logprob_ref`).
    Returns:
        logp [N] fp32 (≤ 0), or (logp [N], entropy [N]) when return_entropy.

    Example:
        >>> logp, entropy = selective_logprob(logits, input_ids, temperature=0.7, return_entropy=True)
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = list(getattr(logits, "shape", []))
        raise ValueError(f"logits must be a 2-D tensor [N, V], got shape {shape}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"logits must be fp32, bf16 or fp16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have V ≥ 1 columns, got V = 0")
    targets = check_targets(targets, logits.shape[0], logits.shape[1], logits.device)
    temperature = check_temperature(temperature)
    impl = resolve_impl(backend, logits.device, logits.dtype)
    if impl == "torch":
        return selective_logprob_ref(logits, targets, temperature=temperature, return_entropy=return_entropy)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    logp, entropy = SelectiveLogprobFunction.apply(logits, targets, temperature, return_entropy, impl)
    return (logp, entropy) if return_entropy else logp
