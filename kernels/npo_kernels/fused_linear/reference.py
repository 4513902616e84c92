"""The specification of `fused_linear_logprob`, written to be read: the LM head, then `selective_logprob_ref`.

    logits = hidden @ weight.T (+ bias)          [N, V], in the inputs' dtype, as the unfused model has it
    logp, entropy = selective_logprob_ref(logits, targets, temperature=...)

It materializes [N, V] (several times, in fp32), which is what the fused op exists to avoid; tests and
benchmarks import it as the yardstick.
"""

from __future__ import annotations

import torch

from ..logprob.reference import selective_logprob_ref


def fused_linear_logprob_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             bias: torch.Tensor | None = None, temperature: float = 1.0,
                             return_entropy: bool = False
                             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Args:
        hidden: [N, H]; weight: [V, H] (an lm_head or a tied embedding); bias: [V] or None;
        targets: [N] int64, negative = ignored row.
    Returns:
        logp [N], or (logp [N], entropy [N]); fp32 (fp64 for fp64 inputs).
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return selective_logprob_ref(logits, targets, temperature=temperature, return_entropy=return_entropy)
