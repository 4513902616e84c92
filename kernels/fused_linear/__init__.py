"""Selective log-prob (and entropy) fused with the LM head: hidden [N, H] and weight [V, H] in, no [N, V] out."""

from .op import fused_linear_logprob
from .reference import fused_linear_logprob_ref

__all__ = ["fused_linear_logprob", "fused_linear_logprob_ref"]
