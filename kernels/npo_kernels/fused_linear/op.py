"""Public `fused_linear_logprob`: custom ops over the backends, autograd, and the public function.

Layers, bottom up:
    chunked.fused_linear_logprob_fwd / _bwd  PyTorch over [rows, Vt] tiles with an online logsumexp (the CPU
                                           "auto" path): the GEMM of each tile lands in one reused buffer
    triton.fused_linear_logprob_fwd / _bwd   cuBLAS GEMMs per tile + the selective_logprob Triton kernels
                                           (CUDA, or CPU tensors under TRITON_INTERPRET=1)
    npo_kernels::fused_linear_logprob_fwd / _bwd   torch.library custom ops around either, with fake impls
    FusedLinearLogprobFunction             autograd: saves hidden, weight, bias (no copies), per-row lse, mu
    fused_linear_logprob                   validation and dispatch; backend="torch" is the reference itself
    fused_linear_logprob_grad_in_forward   CPU only, for a loss that is a sum of per-row terms: the gradient
                                           formed in the forward (chunked.fused_linear_logprob_grads, 3 GEMMs)

No [N, V] tensor exists in the forward or the backward of the chunked and Triton paths: the backward
recomputes each tile's logits from hidden and weight (4 GEMMs in all instead of the unfused 3; kernels.md
§4.2), except for the forward tiles the eager CPU path keeps for it (chunked.py). It is a plain autograd
Function over tensors, so a tied embedding (the same weight used elsewhere) and FSDP2 (which hands modules
their unsharded weight during forward) need nothing special: autograd sums the weight's gradients.
"""

from __future__ import annotations

import torch

from .._dispatch import (
    Backend,
    check_targets,
    check_temperature,
    fake_linear_grads,
    fake_row_stats,
    resolve_impl,
)
from . import chunked
from .reference import fused_linear_logprob_ref

__all__ = ["fused_linear_logprob", "fused_linear_logprob_grad_in_forward"]


# ---- Custom ops --------------------------------------------------------------------------------------------

@torch.library.custom_op("npo_kernels::fused_linear_logprob_fwd", mutates_args=())
def _fused_linear_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              targets: torch.Tensor, temperature: float, return_entropy: bool, impl: str,
                              tile_elements: int | None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns logp [N], entropy [N] (or [0]), lse [N], mu [N] (or [0]); the last two are for the backward.
    tile_elements: None for the backend's own tile size (read when the op runs, so tests can patch it)."""
    if impl == "triton":
        from .triton import fused_linear_logprob_fwd  # lazily: CPU-only installs may lack triton

        logp, entropy, lse, mu = fused_linear_logprob_fwd(
            hidden, weight, bias, targets, temperature=temperature, return_entropy=return_entropy,
            tile_elements=tile_elements)
        if not return_entropy:
            entropy, mu = logp.new_empty(0), logp.new_empty(0)
        return logp, entropy, lse, mu
    return chunked.fused_linear_logprob_fwd(hidden, weight, bias, targets, temperature=temperature,
                                            return_entropy=return_entropy, tile_elements=tile_elements)


@_fused_linear_logprob_fwd.register_fake
def _(hidden, weight, bias, targets, temperature, return_entropy, impl, tile_elements):
    return fake_row_stats(hidden, return_entropy)


@torch.library.custom_op("npo_kernels::fused_linear_logprob_bwd", mutates_args=())
def _fused_linear_logprob_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              targets: torch.Tensor, lse: torch.Tensor, mu: torch.Tensor,
                              dlogp: torch.Tensor | None, dentropy: torch.Tensor | None, temperature: float,
                              impl: str, tile_elements: int | None, needs_dx: bool, needs_dw: bool,
                              needs_db: bool
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
    return chunked.fused_linear_logprob_bwd(hidden, weight, bias, targets, lse, mu, dlogp, dentropy,
                                            temperature=temperature, needs_dx=needs_dx, needs_dw=needs_dw,
                                            needs_db=needs_db, tile_elements=tile_elements)


@_fused_linear_logprob_bwd.register_fake
def _(hidden, weight, bias, targets, lse, mu, dlogp, dentropy, temperature, impl, tile_elements, needs_dx,
      needs_dw, needs_db):
    return fake_linear_grads(hidden, weight, bias, needs_dx, needs_dw, needs_db)


# ---- Autograd ----------------------------------------------------------------------------------------------

class FusedLinearLogprobFunction(torch.autograd.Function):
    """Autograd over the two custom ops. Saves the inputs (no copies) and lse, mu [N].

    With `cache_bytes` > 0 (eager CPU path, dW needed) the forward runs the chunked forward directly and keeps
    its first logits tiles, up to that many bytes, on `ctx.cache`, a plain list, so that the backward can pop
    and free them one by one; autograd's saved tensors would stay alive until the whole backward ends. A second backward (retain_graph)
    finds the list empty and recomputes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, return_entropy, impl, tile_elements,
                cache_bytes):
        ctx.cache = None
        if cache_bytes > 0:
            ctx.cache = []
            logp, entropy, lse, mu = chunked.fused_linear_logprob_fwd(
                hidden, weight, bias, targets, temperature=temperature, return_entropy=return_entropy,
                tile_elements=tile_elements, cache=ctx.cache, cache_bytes=cache_bytes)
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
            dx, dw, db = chunked.fused_linear_logprob_bwd(
                hidden, weight, bias, targets, lse, mu, dlogp, dentropy, temperature=ctx.temperature,
                needs_dx=needs_dx, needs_dw=needs_dw, needs_db=needs_db, tile_elements=ctx.tile_elements,
                cache=ctx.cache)
        else:
            dx, dw, db = torch.ops.npo_kernels.fused_linear_logprob_bwd(
                hidden, weight, bias, targets, lse, mu, dlogp, dentropy, ctx.temperature, ctx.impl,
                ctx.tile_elements, needs_dx, needs_dw, needs_db)
        return (dx if needs_dx else None, dw if needs_dw else None, db if needs_db else None,
                None, None, None, None, None, None)


class FusedLinearGradInForwardFunction(torch.autograd.Function):
    """Autograd for `fused_linear_logprob_grad_in_forward`: the forward computes the gradients
    (`chunked.fused_linear_logprob_grads`) and returns a zero scalar `anchor`; the backward hands them on,
    scaled by the anchor's incoming gradient. logp and entropy carry no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_grad, temperature, return_entropy, block_bytes):
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        logp, entropy, dx, dw, db = chunked.fused_linear_logprob_grads(
            hidden, weight, bias, targets, token_grad, temperature=temperature, return_entropy=return_entropy,
            block_bytes=block_bytes, needs_dx=needs_dx, needs_dw=needs_dw, needs_db=needs_db)
        ctx.grads = (dx if needs_dx else None, dw if needs_dw else None, db if needs_db else None)
        ctx.mark_non_differentiable(logp, entropy)
        return logp.new_zeros(()), logp, entropy

    @staticmethod
    def backward(ctx, d_anchor, _dlogp, _dentropy):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_logprob_grad_in_forward: its gradient was already handed on; it "
                               "cannot be backpropagated twice")
        grads, ctx.grads = ctx.grads, None  # freed as soon as autograd has taken them
        scaled = tuple(None if g is None or d_anchor is None else g.mul_(d_anchor.to(g.dtype)) for g in grads)
        return (*scaled, None, None, None, None, None)


# ---- Public functions --------------------------------------------------------------------------------------

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
                         return_entropy: bool = False, backend: Backend = "auto", cache_bytes: int | None = None
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
        cache_bytes: eager CPU training step only: bytes of the forward's logits tiles kept for the backward
            instead of recomputed there (a trade of memory for GEMMs, see chunked.py). None: as many as dW has
            (the backward's own peak, so no extra peak memory); 0: none; N·V·4 or more: all of them.
    Returns:
        logp [N] fp32 (≤ 0), or (logp [N], entropy [N]) when return_entropy.

    Example:
        >>> logp = fused_linear_logprob(hidden_states, model.lm_head.weight, input_ids)
    """
    _check_inputs(hidden, weight, bias)
    targets = check_targets(targets, hidden.shape[0], weight.shape[0], hidden.device)
    temperature = check_temperature(temperature)
    impl = resolve_impl("fused_linear_logprob", backend, hidden.device, hidden.dtype)
    if impl == "torch":
        return fused_linear_logprob_ref(hidden, weight, targets, bias=bias, temperature=temperature,
                                        return_entropy=return_entropy)
    # Eager CPU training step: keep up to `cache_bytes` of forward tiles instead of recomputing them (see
    # chunked.py); never under torch.compile, whose graphs carry no Python-side state.
    if cache_bytes is None:
        cache_bytes = weight.numel() * weight.element_size()
    if cache_bytes < 0:
        raise ValueError(f"cache_bytes must be >= 0 (or None for |dW|), got {cache_bytes}")
    caching = (impl == "chunked" and chunked.CACHE_TILES and weight.requires_grad
               and torch.is_grad_enabled() and not torch.compiler.is_compiling())
    # tile_elements=None: each backend's own tile size (chunked.TILE_ELEMENTS, triton.TILE_ELEMENTS).
    logp, entropy = FusedLinearLogprobFunction.apply(hidden, weight, bias, targets, temperature,
                                                     return_entropy, impl, None,
                                                     int(cache_bytes) if caching else 0)
    return (logp, entropy) if return_entropy else logp


def fused_linear_logprob_grad_in_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                         token_grad, *, bias: torch.Tensor | None = None,
                                         temperature: float = 1.0, return_entropy: bool = False,
                                         block_bytes: int | None = None
                                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`fused_linear_logprob` for a loss that is a sum of per-row terms, with the LM head's gradient formed
    in the forward (CPU, chunked path): 3 GEMMs per token instead of 4, one block of rows' logits in memory.

    The caller's loss must be separable: its derivative in logp[i] depends on logp[i] alone (the PPO-clip and
    KL-free GRPO losses are, their normalizers being fixed by the mask). The function returns logp without
    gradient and an `anchor`, a zero scalar carrying the gradient: add it to the loss computed from logp,
    `loss = loss_fn(logp) + anchor`, and `loss.backward()` (scaled as the anchor's gradient says) delivers
    dloss/dhidden, dloss/dweight and dloss/dbias.

    Args:
        hidden [N, H], weight [V, H], targets [N], bias [V] or None, temperature: as `fused_linear_logprob`.
        token_grad: (logp_rows [r], r0, r1) -> [r], the loss's derivative in logp for rows r0:r1, computed
            from their log-probs alone; called once per block of rows.
        return_entropy: also return the entropy of each row (without gradient).
        block_bytes: bytes of one block of rows' logits (None: |weight| in fp32, the size of dW).
    Returns:
        (logp [N], entropy [N] or None, anchor []), fp32 (fp64 for fp64 inputs).
    """
    _check_inputs(hidden, weight, bias)
    targets = check_targets(targets, hidden.shape[0], weight.shape[0], hidden.device)
    temperature = check_temperature(temperature)
    if hidden.device.type != "cpu":
        raise ValueError("fused_linear_logprob_grad_in_forward runs the chunked CPU path; on "
                         f"{hidden.device.type} use fused_linear_logprob, whose kernels recompute in the backward")
    if block_bytes is None:
        block_bytes = weight.numel() * 4
    anchor, logp, entropy = FusedLinearGradInForwardFunction.apply(hidden, weight, bias, targets, token_grad,
                                                                   temperature, return_entropy, int(block_bytes))
    return logp, entropy if return_entropy else None, anchor
