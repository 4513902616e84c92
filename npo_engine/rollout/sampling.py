"""Sampling one token per row from next-token logits: pure tensor functions, no engine state.

The embedded engine samples with `sample`; a guide engine and the vLLM parity test reuse the pieces.

- **Order** (that of HF and vLLM): temperature, then top-k, then top-p on the renormalized top-k
  distribution (`truncate`), then one draw from the renormalized kept set (`draw`).
- **Behaviour log-probs** follow `base.py`: the log-prob under the distribution the token was drawn from, i.e.
  `log_softmax(truncate(logits / T))[token]` in fp32 (`behaviour_logprobs`); with no truncation that is the
  plain `log_softmax(logits / T)`; with `temperature == 0`, the argmax and the untempered full distribution.
- **One uniform per row.** `draw` inverts the cumulative distribution: `e = exp(z - max z)`, `c = cumsum(e)`,
  `u ~ U[0, 1)` per row, and the token is the first `j` with `c[j] > u · c[V-1]`. That is one exp pass and one
  running-sum pass over `[B, V]`, where an exponential race (`argmax p / E`, `E ~ Exp(1)`) draws a random
  variate for every vocabulary entry: at `B = 128`, `V = 151936` that draw alone cost more than the rest of
  the sampling. No host synchronization either (`searchsorted` stays on the device), unlike
  `torch.multinomial` on CUDA.
- **Boundaries.** Tokens of probability 0 (truncated away, or `exp` underflow) never change the running sum, so
  no `c[j] > t` can first hold there: they are never drawn. The target `u · c[V-1]` is capped just below the
  total, so `u` close to 1 cannot run past the last kept token. The running sum is accumulated in fp64 on CPU
  (ATen's CPU cumsum accumulates floats in double) and stored in fp32, so each `c[j]` is the correctly rounded
  prefix sum; a token whose probability is below fp32 resolution of its prefix (~6e-8 relative) can be drawn
  less often than it should, a bias far below any sampling noise a run sees.
- **Randomness** comes only from the `torch.Generator` passed in (one `rand` of `B` values per call), so a seeded
  generator gives the same tokens for the same logits.
- **Workspace.** `draw` and `sample` take an optional preallocated `[B, V]` fp32 buffer for the exp / running
  sum, so a decode loop allocates nothing of vocabulary size per step (a fresh 78 MB block at `128 × 151936`
  is a fresh mmap on CPU: page faults and zeroing at every step).
"""

from __future__ import annotations

import torch

from npo_engine.rollout.base import SamplingParams


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    *,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return it and its behaviour log-prob.

    Args:
        logits: [B, V], any float dtype; not modified.
        workspace: optional [>= B, V] fp32 buffer that `draw` may overwrite (see the module docstring).
    Returns:
        token [B] int64 and logp [B] fp32: `log_softmax(truncate(logits / T))[token]`; with T = 0 the argmax
        and `log_softmax(logits)[token]`.
    """
    if params.temperature == 0:
        token = logits.argmax(dim=-1)
        return token, behaviour_logprobs(logits, token, 0.0)
    scaled = scaled_logits(logits, params.temperature)
    if _truncates(params, logits.shape[-1]):
        scaled = truncate(scaled, top_k=params.top_k, top_p=params.top_p)
    return draw(scaled, generator, workspace=workspace)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits / temperature` in fp32 (`temperature` 0 or 1: the logits as they are, without a copy if fp32)."""
    logits = logits.float()
    if temperature in (0, 1):
        return logits
    return logits / temperature


def tempered_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`log_softmax(logits / temperature)` in fp32 over the last dim, before any truncation; `temperature == 0`
    (greedy) leaves the logits untempered.

    Args:
        logits: [..., V], any float dtype.
    Returns:
        [..., V] fp32 log-probs.
    """
    return torch.log_softmax(scaled_logits(logits, temperature), dim=-1)


def behaviour_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, *, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The behaviour log-prob of each token, as `sample` returns it for the token it drew: the log-prob under
    the tempered, top-k / top-p truncated and renormalized distribution (`base.py`).

    Args:
        logits: [..., V], the logits each token was sampled from.
        tokens: [...] int64.
        temperature, top_k, top_p: as in `SamplingParams`; `temperature == 0` ignores the truncation (greedy
            decoding scores under the untempered full distribution).
    Returns:
        [...] fp32; -inf for a token outside the kept set.
    """
    scaled = scaled_logits(logits, temperature)
    if temperature != 0 and (top_k or top_p < 1.0):
        shape = scaled.shape
        scaled = truncate(scaled.reshape(-1, shape[-1]), top_k=top_k, top_p=top_p).view(shape)
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def truncate(logp: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the top-k, then outside the top-p nucleus of the renormalized rest.

    Tokens tied with the k-th most likely one stay. `top_k == 0` and `top_p == 1` turn each filter off. Works
    on log-probs or on (tempered) logits alike: both filters depend only on the softmax, which a constant
    shift leaves unchanged.

    Args:
        logp: [B, V] fp32 log-probs or logits.
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


def draw(
    logits: torch.Tensor, generator: torch.Generator, *, workspace: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from `softmax(logits)`, by one uniform per row on the cumulative distribution, and its
    log-prob under that distribution.

    Args:
        logits: [B, V] fp32 log-probs or logits, -inf for tokens that must not be drawn (at least one finite
            per row); not modified.
        workspace: optional [>= B, V] fp32 buffer on the logits' device, overwritten; None allocates one.
    Returns:
        token [B] int64 and logp [B] fp32, `log_softmax(logits)[token]`.
    """
    rows, vocab = logits.shape
    peak = logits.amax(dim=-1, keepdim=True)  # (B, 1)
    if workspace is None:
        running = torch.empty_like(logits, dtype=torch.float32)
    else:
        running = workspace[:rows]
    torch.sub(logits, peak, out=running).exp_()  # unnormalized probabilities, max 1; 0 where -inf
    torch.cumsum(running, dim=-1, out=running)  # (B, V) running sums, in place (see the module docstring)
    uniform = torch.rand(rows, generator=generator, device=logits.device, dtype=torch.float32)
    token = invert_running_sums(running, uniform)
    total = running[:, -1]  # (B,) >= 1: the peak's own term is exp(0)
    logp = logits.gather(1, token[:, None]).squeeze(1) - peak.squeeze(1) - total.log()
    return token, logp


def invert_running_sums(running: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token of each row at quantile `uniform` of the distribution whose running sums are `running`.

    Args:
        running: [B, V] fp32 running sums of unnormalized probabilities (last column: the total, > 0).
        uniform: [B] in [0, 1).
    Returns:
        [B] int64, the first j with running[j] > uniform * total, which always has probability > 0.
    """
    total = running[:, -1:]
    # Capped just below the total: u close to 1 could otherwise round to u * total == total, past every c[j].
    target = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(running, target, right=True).squeeze(1)


def _truncates(params: SamplingParams, vocab: int) -> bool:
    """Whether `params` drop any token of a `vocab`-sized distribution."""
    return 0 < params.top_k < vocab or params.top_p < 1.0
