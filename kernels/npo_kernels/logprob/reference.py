"""The specification of `selective_logprob`, written to be read: plain fp32 PyTorch, autograd for gradients.

    z       = logits.float() / temperature                  [N, V]
    logp_n  = log_softmax(z_n)[target_n]                    [N]   (≤ 0)
    H_n     = -Σ_v p_nv · log p_nv,  p_n = softmax(z_n)     [N]
    rows with target_n < 0 give logp_n = H_n = 0 and no gradient.

Tests and benchmarks import this file; it materializes several [N, V] fp32 tensors, so it is the yardstick for
correctness, not for speed or memory.
"""

from __future__ import annotations

import torch


def selective_logprob_ref(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                          return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` (and entropy) under softmax(logits / temperature), in fp32.

    Args:
        logits: [N, V] any float dtype; upcast to fp32 (fp64 stays fp64, for gradcheck).
        targets: [N] int64; a negative target marks an ignored row.
    Returns:
        logp [N], or (logp [N], entropy [N]), in fp32 (fp64 for fp64 logits).
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute_dtype) / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    valid = targets >= 0
    # Ignored rows still need an in-range index for gather; their value is masked out just below.
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logprobs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    # torch.where (not multiplication) so that a non-finite ignored row cannot leak NaN into the result
    # or its gradient.
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    probs = logprobs.exp()
    # p·log p is 0 where p == 0. For -inf logits log p = -inf and 0·(-inf) = NaN, so log p is replaced before
    # the product (replacing the product instead would still send NaN through its backward).
    safe_logprobs = torch.where(probs > 0, logprobs, torch.zeros_like(logprobs))
    entropy = -(probs * safe_logprobs).sum(dim=-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy
