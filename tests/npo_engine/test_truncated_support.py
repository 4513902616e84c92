"""The trainer scores log-probs on the support the rollout sampled from (`rollout/base.py`): with top-k / top-p
on, `LogprobModel` gives exactly the embedded engine's behaviour log-probs of its own samples, so the ratio of
the first update is 1 and not off by the kept mass."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from npo_engine.models import LogprobModel
from npo_engine.rollout.base import SamplingParams
from npo_engine.rollout.embedded import EmbeddedEngine

VOCAB, PAD, NEVER = 48, 0, 48
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [21], [5, 6, 7]]
# fp32: a cached, batched decode and one padded teacher-forced forward of the same weights (as test_embedded).
LOGP_ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.2, pad_token_id=PAD)
    return Qwen2ForCausalLM(config).eval()


def _padded(prompts, completions):
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), length), PAD)
    attention, target = torch.zeros_like(ids), torch.zeros(ids.shape, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        target[i, len(p) : len(p) + len(c)] = True
    return ids, attention, target


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 8, 1.0), (0.7, 0, 0.8), (1.3, 10, 0.9)])
def test_trainer_logprobs_equal_the_engines_under_truncation(model, temperature, top_k, top_p):
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    engine = EmbeddedEngine(copy.deepcopy(model), eos_token_id=NEVER, pad_token_id=PAD)
    out = engine.generate([p for p in PROMPTS for _ in range(4)], params)
    prompts = [p for p in PROMPTS for _ in range(4)]
    ids, attention, target = _padded(prompts, out.token_ids)
    scorer = LogprobModel(copy.deepcopy(model), kernel_backend="torch")
    with torch.no_grad():
        truncated, entropy = scorer(ids, attention, target, temperature=temperature, top_k=top_k, top_p=top_p,
                                    return_entropy=True)
        full, full_entropy = scorer(ids, attention, target, temperature=temperature, return_entropy=True)
    engine_logp = torch.cat(out.logprobs)
    assert torch.allclose(truncated[target], engine_logp, atol=LOGP_ATOL, rtol=0)
    # Without the replayed support, each ratio would be off by the kept mass (log of it < 0 somewhere).
    assert (engine_logp - full[target]).max() > 1e-2
    assert torch.all(truncated[target] >= full[target] - LOGP_ATOL)
    # A truncated distribution has less entropy than the full one.
    assert torch.all(entropy[target] <= full_entropy[target] + 1e-5)


def test_truncated_logprobs_carry_gradients_through_the_kept_set(model):
    ids, attention, target = _padded([[5, 6, 7]], [[9, 11]])
    scorer = LogprobModel(copy.deepcopy(model), kernel_backend="torch")
    logp, _ = scorer(ids, attention, target, temperature=1.0, top_k=4)
    logp[target].sum().backward()
    grads = [p.grad for p in scorer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
