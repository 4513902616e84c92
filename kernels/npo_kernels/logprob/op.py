"""Public `selective_logprob`: custom ops over the backends, autograd, and the public function.

Layers, bottom up:
    chunked.selective_logprob_fwd / _bwd   row chunks in PyTorch (the CPU "auto" path)
    triton.selective_logprob_fwd / _bwd    Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)
    npo_kernels::selective_logprob_fwd / _bwd   torch.library custom ops around either, with fake impls, so
                                           torch.compile traces through them as single nodes
    SelectiveLogprobFunction               autograd: saves logits, targets and per-row lse, mu = Σp·z
    selective_logprob                      validation and dispatch; backend="torch" is the reference itself

Nothing here writes into the caller's logits (kernels.md §3: in-place gradients corrupt shared logits).
"""

from __future__ import annotations

import torch

from .._dispatch import Backend, check_targets, check_temperature, fake_row_stats, resolve_impl
from . import chunked
from .reference import selective_logprob_ref

# ---- Custom ops --------------------------------------------------------------------------------------------


@torch.library.custom_op("npo_kernels::selective_logprob_fwd", mutates_args=())
def _selective_logprob_fwd(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                           return_entropy: bool, impl: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns logp [N], entropy [N] (or [0]), lse [N], mu [N] (or [0]); the last two are for the backward."""
    if impl == "triton":
        from .triton import selective_logprob_fwd  # lazily: CPU-only installs may lack triton

        logp, entropy, lse, mu = selective_logprob_fwd(logits, targets, temperature=temperature,
                                                       return_entropy=return_entropy)
        empty = logp.new_empty(0)
        return logp, entropy if return_entropy else empty, lse, mu if return_entropy else empty.clone()
    return chunked.selective_logprob_fwd(logits, targets, temperature=temperature,
                                         return_entropy=return_entropy)


@_selective_logprob_fwd.register_fake
def _(logits, targets, temperature, return_entropy, impl):
    return fake_row_stats(logits, return_entropy)


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
    return chunked.selective_logprob_bwd(logits, targets, lse, mu, dlogp, dentropy, temperature=temperature)


@_selective_logprob_bwd.register_fake
def _(logits, targets, lse, mu, dlogp, dentropy, temperature, impl):
    return torch.empty_like(logits)


# ---- Autograd ----------------------------------------------------------------------------------------------

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
    impl = resolve_impl("selective_logprob", backend, logits.device, logits.dtype)
    if impl == "torch":
        return selective_logprob_ref(logits, targets, temperature=temperature, return_entropy=return_entropy)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    logp, entropy = SelectiveLogprobFunction.apply(logits, targets, temperature, return_entropy, impl)
    return (logp, entropy) if return_entropy else logp
