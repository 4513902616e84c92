"""Selective log-prob (and entropy) of the sampled tokens from materialized logits [N, V]."""

from .op import selective_logprob
from .reference import selective_logprob_ref

__all__ = ["selective_logprob", "selective_logprob_ref"]
