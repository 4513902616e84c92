"""npo_engine.models.LogprobModel against a direct Hugging Face forward and log_softmax in float64.

The reference runs each row alone and unpadded through a float64 copy of the model, so it shares nothing with
LogprobModel: not the padding, not the shift, not the head (the full [L, V] logits), not the kernels. It checks:
- the shift: the log-prob of token j comes from the logits at position j - 1;
- the scatter: [N] scored values land at their [B, L] positions; prompt and padding positions are exactly 0;
- temperature (logits / T before the softmax), the entropy of that distribution, and the gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from npo_engine.models import LogprobModel
from npo_kernels._dispatch import triton_interpreter_enabled

VOCAB = 29
PAD = 0
# (prompt, completion) token ids of different lengths; right-padded to the longest (9 tokens) in the batch.
ROWS = [
    ([3, 4, 5], [6, 7, 8, 9]),  # 7 tokens, 2 pads
    ([10, 11, 12, 13, 14], [15, 16, 17, 18]),  # 9 tokens, no pad
    ([19, 20], [21]),  # 3 tokens, 6 pads: a one-token completion
    ([22, 23, 24, 25], [26, 27, 28]),  # 7 tokens, 2 pads
]
# Tolerance of fp32 LogprobModel vs the fp64 reference: two layers of fp32 rounding, |logp| ~ 3.
ATOL, RTOL = 2e-5, 1e-5


def tiny_qwen2(*, tie: bool) -> Qwen2ForCausalLM:
    """2 layers, hidden 32, 4 query / 2 KV heads of dim 8; random weights, nothing downloaded."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=tie, pad_token_id=PAD, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger weights than the 0.02-std init, so the distributions are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask [B, L] (right-padded) and target_mask [B, L] over the completion tokens."""
    width = max(len(p) + len(c) for p, c in ROWS)
    input_ids = torch.full((len(ROWS), width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, (prompt, completion) in enumerate(ROWS):
        row = prompt + completion
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
        target_mask[b, len(prompt) : len(row)] = True
    return input_ids, attention_mask, target_mask


def reference(lm: Qwen2ForCausalLM, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp64 logp, entropy [B, L] (zeros off the completions) and d(Σ logp)/d(embedding) from a plain HF forward
    of each unpadded row: logp[b, j] = log_softmax(logits[j - 1] / T)[token j]."""
    lm64 = copy.deepcopy(lm).double()
    width = max(len(p) + len(c) for p, c in ROWS)
    logp = torch.zeros(len(ROWS), width, dtype=torch.float64)
    entropy = torch.zeros_like(logp)
    total = 0.0
    for b, (prompt, completion) in enumerate(ROWS):
        row = torch.tensor([prompt + completion])
        logits = lm64(input_ids=row).logits[0]  # [len, V]
        log_probs = torch.log_softmax(logits / temperature, dim=-1)
        for j in range(len(prompt), len(prompt) + len(completion)):
            logp[b, j] = log_probs[j - 1, row[0, j]].detach()
            entropy[b, j] = -(log_probs[j - 1].exp() * log_probs[j - 1]).sum().detach()
            total = total + log_probs[j - 1, row[0, j]]
    total.backward()
    return logp, entropy, lm64.model.embed_tokens.weight.grad


def describe_mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor) -> str:
    diff = (actual.double() - expected).abs()
    index = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
    return f"{name}: max abs diff {diff.max().item():.3e} at {index}: {actual[index].item()} vs {expected[index].item()}"


# "auto" is the trainer's CPU path (chunked online logsumexp); "torch" is the kernels' readable reference;
# "triton" is the GPU path, run here on CPU tensors through the Triton interpreter (tests/conftest.py sets it).
BACKENDS = [
    "auto",
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_interpreter_enabled(),
                                                   reason="CPU tensors need TRITON_INTERPRET=1")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_model_matches_hf_forward_in_float64(backend, tie, temperature):
    lm = tiny_qwen2(tie=tie)
    expected_logp, expected_entropy, expected_grad = reference(lm, temperature)
    input_ids, attention_mask, target_mask = batch()

    logp, entropy = LogprobModel(lm, kernel_backend=backend)(input_ids, attention_mask, target_mask,
                                                            temperature=temperature, return_entropy=True)
    assert logp.shape == entropy.shape == input_ids.shape
    assert logp.dtype == entropy.dtype == torch.float32
    # Prompt and padding positions (column 0 included) are exactly zero, scored ones strictly negative.
    assert torch.all(logp[~target_mask] == 0) and torch.all(entropy[~target_mask] == 0)
    assert torch.all(logp[target_mask] < 0) and torch.all(entropy[target_mask] > 0)
    torch.testing.assert_close(logp.double(), expected_logp, atol=ATOL, rtol=RTOL,
                               msg=lambda _: describe_mismatch("logp", logp, expected_logp))
    torch.testing.assert_close(entropy.double(), expected_entropy, atol=ATOL, rtol=RTOL,
                               msg=lambda _: describe_mismatch("entropy", entropy, expected_entropy))

    logp.sum().backward()  # padding and prompt entries are constant zeros: they add no gradient
    grad = lm.model.embed_tokens.weight.grad  # the tied case includes the head's share
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-4, rtol=1e-4,
                               msg=lambda _: describe_mismatch("d embed_tokens", grad, expected_grad))


def test_shifted_by_one_is_not_close():
    """The reference is sharp enough to see an off-by-one: unshifted log-probs (token j from logits at j)
    differ from it by far more than the tolerance."""
    lm = tiny_qwen2(tie=True)
    expected_logp, _, _ = reference(lm, 1.0)
    input_ids, attention_mask, target_mask = batch()
    with torch.no_grad():
        logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    unshifted = torch.log_softmax(logits, -1).gather(-1, input_ids[..., None])[..., 0] * target_mask
    assert (unshifted - expected_logp).abs().max() > 100 * ATOL


def test_padding_content_does_not_change_the_scored_log_probs():
    """Right padding is masked: any ids in the padded tail give the same log-probs of the real tokens."""
    lm = tiny_qwen2(tie=True)
    input_ids, attention_mask, target_mask = batch()
    noisy = input_ids.clone()
    noisy[attention_mask == 0] = torch.randint(1, VOCAB, (int((attention_mask == 0).sum()),),
                                               generator=torch.Generator().manual_seed(3))
    model = LogprobModel(lm, kernel_backend="auto")
    with torch.no_grad():
        clean, _ = model(input_ids, attention_mask, target_mask)
        padded, _ = model(noisy, attention_mask, target_mask)
    torch.testing.assert_close(padded, clean, atol=1e-6, rtol=0)
