"""Sampling on its own: the top-k / top-p masks against hand-computed examples, temperature, the draw's
distribution, boundaries and determinism, and behaviour log-probs as `base.py` defines them (the log-prob under
the tempered, truncated, renormalized distribution the token was drawn from).

The hand example is one row of four tokens with probabilities 0.1, 0.4, 0.2, 0.3, so by rank the tokens are
1 (0.4), 3 (0.3), 2 (0.2), 0 (0.1); out of vocabulary order, so the masks are checked in the original order.
"""

from __future__ import annotations

import math

import pytest
import torch

from npo_engine.rollout.base import SamplingParams
from npo_engine.rollout.sampling import (
    behaviour_logprobs,
    draw,
    invert_running_sums,
    sample,
    tempered_logprobs,
    truncate,
)

PROBS = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
LOGP = PROBS.log()


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [
        (0, 1.0, {0, 1, 2, 3}),  # both filters off
        (4, 1.0, {0, 1, 2, 3}),  # k = V keeps everything
        (2, 1.0, {1, 3}),
        (1, 1.0, {1}),
        # top-p keeps a token while the strictly more likely ones cover less than p:
        (0, 0.65, {1, 3}),  # mass before each by rank: 0, 0.4, 0.7, 0.9
        (0, 0.75, {1, 2, 3}),
        (0, 1e-4, {1}),  # the most likely token always stays
        # top-k first, then top-p on the renormalized rest: 0.4, 0.3, 0.2 over 0.9 give mass before
        # 0, 0.444, 0.778, so p = 0.75 drops token 2, which it keeps without the top-k.
        (3, 0.75, {1, 3}),
    ],
)
def test_truncate_keeps_the_hand_computed_tokens(top_k, top_p, kept):
    out = truncate(LOGP, top_k=top_k, top_p=top_p)
    assert {i for i in range(4) if math.isfinite(out[0, i])} == kept
    assert torch.equal(out[0, sorted(kept)], LOGP[0, sorted(kept)])  # kept tokens unchanged, not renormalized


def test_truncate_rows_are_independent_and_top_k_keeps_ties():
    tied = torch.tensor([0.3, 0.3, 0.2, 0.2]).log()
    out = truncate(torch.stack([LOGP[0], tied]), top_k=1, top_p=1.0)
    assert torch.isfinite(out).tolist() == [[False, True, False, False], [True, True, False, False]]


def test_temperature_scales_the_logits_before_the_softmax():
    """Logits 0 and ln 3 give probabilities 1/4, 3/4 at T = 1; 1/10, 9/10 at T = 1/2 (logits doubled);
    1 / (1 + sqrt 3), sqrt 3 / (1 + sqrt 3) at T = 2. T = 0 (greedy) leaves them untempered."""
    logits = torch.tensor([[0.0, math.log(3.0)]])
    s = math.sqrt(3.0)
    expected = {1.0: [0.25, 0.75], 0.5: [0.1, 0.9], 2.0: [1 / (1 + s), s / (1 + s)], 0.0: [0.25, 0.75]}
    for temperature, probs in expected.items():
        logp = tempered_logprobs(logits, temperature)
        torch.testing.assert_close(logp.exp(), torch.tensor([probs]), rtol=0, atol=1e-6)

    half = tempered_logprobs(logits.to(torch.bfloat16), 0.5)
    assert half.dtype == torch.float32  # any input dtype gives fp32 log-probs


def test_draw_follows_the_truncated_distribution():
    """20,000 draws from the hand example with top-k 3 and top-p 0.75, which keeps tokens 1 and 3 at
    0.4 / 0.7 = 4/7 and 0.3 / 0.7 = 3/7. Seeded, so the counts are fixed; 0.015 is over 4 standard errors
    (sqrt(4/7 * 3/7 / 20000) = 0.0035). Truncated tokens are never drawn, and each draw's log-prob is that of
    the renormalized distribution."""
    rows = 20_000
    kept = truncate(LOGP.expand(rows, -1), top_k=3, top_p=0.75)
    tokens, logp = draw(kept, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4)
    assert counts[0] == 0 and counts[2] == 0
    torch.testing.assert_close(counts.float() / rows, torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]), rtol=0, atol=0.015)
    expected = torch.tensor([math.log(4 / 7), math.log(3 / 7)])[(tokens == 3).long()]
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)


def test_draw_matches_the_distribution_over_a_large_vocabulary():
    """One row of 4096 tokens with a peaked softmax (a few tokens hold most mass, a long tail the rest),
    100,000 draws; the frequencies of the 5 most likely tokens and of the tail as a whole agree with the
    softmax within 5 standard errors (at most 0.0079 for p = 0.5), and no -inf token is ever drawn."""
    vocab, rows = 4096, 100_000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 2
    logits[:5] = torch.tensor([12.0, 11.5, 11.0, 10.0, 9.0])
    logits[-100:] = float("-inf")  # at the end of the row, where a draw past the total would land
    probs = torch.softmax(logits, dim=-1)
    batch = logits.expand(20_000, -1)
    tokens = torch.cat([draw(batch, torch.Generator().manual_seed(seed))[0] for seed in range(5)])
    assert tokens.numel() == rows and int(tokens.max()) < vocab - 100
    counts = torch.bincount(tokens, minlength=vocab).double() / rows
    expected = torch.cat([probs[:5], probs[5:].sum()[None]]).double()
    observed = torch.cat([counts[:5], counts[5:].sum()[None]])
    tolerance = 5 * (expected * (1 - expected) / rows).sqrt()
    assert ((observed - expected).abs() <= tolerance).all(), (observed, expected)


def test_inverting_the_running_sums_stays_on_kept_tokens_at_the_boundaries():
    """Quantile 0 gives the first token with mass, the largest fp32 uniform below 1 the last one; tokens of
    zero mass (equal running sums) are never picked, however the quantile falls."""
    # Unnormalized masses 0, 2, 0, 1, 0: running sums 0, 2, 2, 3, 3.
    running = torch.tensor([[0.0, 2.0, 2.0, 3.0, 3.0]]).expand(5, -1).contiguous()
    almost_one = 1.0 - 2.0**-24
    uniform = torch.tensor([0.0, 0.5, 2 / 3, almost_one, 1.0])  # 1.0 itself is capped below the total
    assert invert_running_sums(running, uniform).tolist() == [1, 1, 3, 3, 3]
    # Exactly at a boundary (u * total == 2): the draw moves past it, to the next token with mass.
    assert invert_running_sums(running[:1], torch.tensor([2 / 3 - 1e-7])).tolist() == [1]
    for u in torch.linspace(0, almost_one, 1001):
        assert invert_running_sums(running[:1], u[None]).item() in (1, 3)


def test_seeded_sampling_is_deterministic():
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=1, temperature=0.8, top_k=10, top_p=0.9)
    a = sample(logits, params, torch.Generator().manual_seed(1))
    b = sample(logits, params, torch.Generator().manual_seed(1))
    c = sample(logits, params, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])

    gen = torch.Generator().manual_seed(1)
    first, second = sample(logits, params, gen)[0], sample(logits, params, gen)[0]
    assert torch.equal(first, a[0]) and not torch.equal(first, second)  # one generator advances per call


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=1, temperature=1.0),
        SamplingParams(max_new_tokens=1, temperature=0.6),
        SamplingParams(max_new_tokens=1, temperature=0.7, top_k=3, top_p=0.8),
        SamplingParams(max_new_tokens=1, temperature=1.5, top_p=0.5),
    ],
    ids=["T1", "T0.6", "T0.7-topk3-topp0.8", "T1.5-topp0.5"],
)
def test_behaviour_logprobs_are_of_the_truncated_renormalized_distribution(params):
    """The token is drawn from the truncated distribution, and its log-prob is
    `log_softmax(truncate(logits / T))[token]`, as base.py defines behaviour log-probs; without truncation
    that is the plain tempered log-softmax."""
    logits = torch.randn(256, 12, generator=torch.Generator().manual_seed(0))
    token, logp = sample(logits, params, torch.Generator().manual_seed(0))

    tempered = torch.log_softmax(logits / params.temperature, dim=-1)
    kept = truncate(tempered, top_k=params.top_k, top_p=params.top_p)
    assert logp.dtype == torch.float32 and token.dtype == torch.int64
    assert torch.isfinite(kept.gather(1, token[:, None])).all()  # never a truncated-away token
    renormalized = torch.log_softmax(kept, dim=-1).gather(1, token[:, None]).squeeze(1)
    torch.testing.assert_close(logp, renormalized, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        behaviour_logprobs(logits, token, params.temperature, top_k=params.top_k, top_p=params.top_p),
        logp, rtol=0, atol=1e-6,
    )
    plain = tempered.gather(1, token[:, None]).squeeze(1)
    if params.top_k or params.top_p < 1:
        assert (logp > plain + 1e-3).any()  # truncation moved mass onto the kept tokens
    else:
        torch.testing.assert_close(logp, plain, rtol=0, atol=1e-6)


def test_behaviour_logprobs_on_a_hand_example():
    """Probabilities 0.1, 0.4, 0.2, 0.3 at T = 1/2 become p^2 / sum p^2 = 1/30, 16/30, 4/30, 9/30; top-k 2
    keeps tokens 1 and 3, renormalized to 16/25 and 9/25; top-p 0.6 on those keeps token 1 alone (prob 1).
    Without truncation the tempered probabilities stand; at T = 0 the untempered ones, truncation ignored."""
    logits = LOGP + 5.0  # any shift: only the softmax matters
    tokens = torch.tensor([[1, 3, 0]])
    cases = [
        (0.5, 2, 1.0, [16 / 25, 9 / 25, 0.0]),
        (0.5, 2, 0.6, [1.0, 0.0, 0.0]),
        (0.5, 0, 1.0, [16 / 30, 9 / 30, 1 / 30]),
        (1.0, 0, 0.75, [0.4 / 0.9, 0.3 / 0.9, 0.0]),  # mass before token 2 is 0.7 < 0.75: it stays
        (0.0, 2, 0.5, [0.4, 0.3, 0.1]),
    ]
    for temperature, top_k, top_p, probs in cases:
        logp = behaviour_logprobs(logits.expand(1, 3, -1), tokens, temperature, top_k=top_k, top_p=top_p)
        torch.testing.assert_close(logp.exp(), torch.tensor([probs]), rtol=0, atol=1e-6)
    # What `sample` returns for the token it drew is that same number.
    params = SamplingParams(max_new_tokens=1, temperature=0.5, top_k=2)
    token, logp = sample(logits.expand(4000, -1), params, torch.Generator().manual_seed(0))
    assert set(token.tolist()) == {1, 3}
    torch.testing.assert_close(logp.exp(), torch.where(token == 1, 16 / 25, 9 / 25), rtol=0, atol=1e-6)


def test_greedy_takes_the_argmax_with_untempered_logprobs_and_no_randomness():
    logits = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    token, logp = sample(logits, SamplingParams(max_new_tokens=1, temperature=0.0, top_k=2), gen)
    assert torch.equal(token, logits.argmax(dim=-1))
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(1, token[:, None]).squeeze(1))
    assert torch.equal(gen.get_state(), state)


def test_behaviour_logprobs_take_any_leading_shape():
    """As a teacher-forced check uses it: logits [B, T, V] and the tokens [B, T] they were sampled from."""
    logits = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(1))
    logp = behaviour_logprobs(logits, tokens, 0.7)
    assert logp.shape == (2, 5)
    torch.testing.assert_close(logp, torch.log_softmax(logits / 0.7, -1).gather(2, tokens[..., None])[..., 0])
