"""Selective log-prob (and entropy) fused with the LM head: hidden [N, H], weight [V, H]; no [N, V] made."""

from .op import fused_linear_logprob, fused_linear_logprob_grad_in_forward
from .reference import fused_linear_logprob_ref

__all__ = ["fused_linear_logprob", "fused_linear_logprob_grad_in_forward", "fused_linear_logprob_ref"]
