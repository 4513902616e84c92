"""Sampling one token per row from next-token logits: pure tensor functions, no engine state.

The embedded engine samples with `sample`; a guide engine and the vLLM parity test reuse the pieces.

- **Order** (that of HF and vLLM): temperature, then top-k, then top-p on the renormalized top-k
  distribution (`truncate`), then one draw (`draw`).
- **Behaviour log-probs** follow `base.py`: `log_softmax(logits / T)` in fp32, before truncation
  (`tempered_logprobs`, `behaviour_logprobs`); with `temperature == 0`, the argmax and the untempered
  log-probs.
- **Randomness** comes only from the `torch.Generator` passed in, so a seeded generator gives the same tokens
  for the same logits.
"""

from __future__ import annotations

import torch

from npo_engine.rollout.base import SamplingParams


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return it and its behaviour log-prob.

    Args:
        logits: [B, V] fp32.
    Returns:
        token [B] int64 and logp [B] fp32, `log_softmax(logits / T)[token]` (T = 1 when greedy).
    """
    logp_all = tempered_logprobs(logits, params.temperature)
    if params.temperature == 0:
        token = logits.argmax(dim=-1)
    else:
        token = draw(truncate(logp_all, top_k=params.top_k, top_p=params.top_p), generator)
    return token, logp_all.gather(1, token[:, None]).squeeze(1)


def tempered_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`log_softmax(logits / temperature)` in fp32 over the last dim; `temperature == 0` (greedy) leaves the
    logits untempered.

    Args:
        logits: [..., V], any float dtype.
    Returns:
        [..., V] fp32 log-probs, before any top-k / top-p truncation.
    """
    logits = logits.float()
    if temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    return torch.log_softmax(logits / temperature, dim=-1)


def behaviour_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """The behaviour log-prob of each token, as `sample` returns it for the token it drew.

    Args:
        logits: [..., V], the logits each token was sampled from.
        tokens: [...] int64.
    Returns:
        [...] fp32, `tempered_logprobs(logits, temperature)[token]`.
    """
    return tempered_logprobs(logits, temperature).gather(-1, tokens[..., None]).squeeze(-1)


def truncate(logp: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the top-k, then outside the top-p nucleus of the renormalized rest.

    Tokens tied with the k-th most likely one stay. `top_k == 0` and `top_p == 1` turn each filter off.

    Args:
        logp: [B, V] fp32 log-probs.
    Returns:
        [B, V]: `logp` where kept, -inf elsewhere (not renormalized).
    """
    if 0 < top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logp, dim=-1)
        # Drop a token once the strictly more likely tokens already cover top_p; the most likely always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp


def draw(logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from `softmax(logp)`.

    Args:
        logp: [B, V] fp32 log-probs or logits, -inf for tokens that must not be drawn.
    Returns:
        [B] int64.
    """
    probs = torch.softmax(logp, dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p, without torch.multinomial's
    # device synchronization on CUDA.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
