"""The embedded engine's forward on its own, against Hugging Face: the Llama-family transcription against one
plain HF forward per step, the grouped attention against attention over repeated K/V heads (what HF's
`repeat_kv` does), and registration with transformers happening only when an engine is built.

The engine-level alarm for transformers upgrades is `test_embedded.py::test_fast_forward_equals_hf_forward`;
the parity test here runs without the engine, so a failure there and not here points at the engine.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from npo_engine.rollout.decoder import LlamaFamilyForward, grouped_sdpa_attention
from npo_engine.rollout.kv_cache import PreallocatedCache

# fp32 logits of the transcription and of HF's forward: the same ops up to fusion and order (~1e-7 seen).
LOGITS_ATOL = 1e-5

CONFIG = dict(
    vocab_size=48,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped: 2 query heads per K/V head
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=True,
    initializer_range=0.2,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from intra-op threads; on a shared CPU, extra threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**CONFIG)).eval()


def test_supports_llama_family_only():
    torch.manual_seed(0)
    assert LlamaFamilyForward.supports(_qwen2())
    # Qwen3 adds q/k norms, which the transcription does not have.
    assert not LlamaFamilyForward.supports(Qwen3ForCausalLM(Qwen3Config(**CONFIG)))


def test_fast_forward_matches_hf_forward_at_prefill_and_each_decode_step():
    """Two rows prefilled together (causal, no padding), then greedy decode steps one column at a time; at
    each step the last-position logits equal those of HF's forward over the whole sequence so far,
    uncached."""
    model = _qwen2()
    forward = LlamaFamilyForward(model)
    ids = torch.randint(1, CONFIG["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    prompt_len, steps = ids.shape[1], 4
    cache = PreallocatedCache(CONFIG["num_hidden_layers"], batch=2, capacity=prompt_len + steps)

    with torch.inference_mode():
        rows = torch.arange(2)
        cache.prefill_into(rows, rows, column=0)
        logits = forward(ids, None, torch.arange(prompt_len).expand(2, -1), cache)
        cache.start_decoding(prompt_len)
        for step in range(steps + 1):
            ref = model(ids).logits[:, -1].float()
            assert logits.dtype == torch.float32 and logits.shape == ref.shape
            err = (logits - ref).abs().max()
            assert err <= LOGITS_ATOL, f"step {step}: max |fast - HF| = {err:.2e}"
            if step == steps:
                break
            token = logits.argmax(dim=-1, keepdim=True)  # (2, 1)
            position = torch.full((2, 1), ids.shape[1])
            ids = torch.cat([ids, token], dim=1)
            logits = forward(token, None, position, cache)


@pytest.mark.parametrize("queries", [1, 5], ids=["decode", "prefill"])
def test_grouped_attention_equals_attention_over_repeated_heads(queries):
    gen = torch.Generator().manual_seed(0)
    batch, heads_q, heads_kv, keys, dim = 2, 4, 2, 6, 8
    q = torch.randn(batch, heads_q, queries, dim, generator=gen)
    k, v = (torch.randn(batch, heads_kv, keys, dim, generator=gen) for _ in range(2))
    mask = torch.zeros(batch, 1, queries, keys)
    mask[0, :, :, :2] = float("-inf")  # row 0: two left-pad keys

    out, weights = grouped_sdpa_attention(torch.nn.Module(), q, k, v, mask, scaling=0.5)

    k_rep, v_rep = (t.repeat_interleave(heads_q // heads_kv, dim=1) for t in (k, v))  # HF's repeat_kv
    probs = torch.softmax(q @ k_rep.transpose(2, 3) * 0.5 + mask, dim=-1)
    ref = (probs @ v_rep).transpose(1, 2)  # (B, Q, H_q, D), HF's layout
    assert weights is None and out.shape == (batch, queries, heads_q, dim)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_importing_the_package_registers_nothing_until_an_engine_is_built():
    """In a fresh interpreter, since other tests here already built engines."""
    script = textwrap.dedent(
        """
        import torch
        from transformers import AttentionInterface, Qwen3Config, Qwen3ForCausalLM
        from transformers.masking_utils import AttentionMaskInterface

        def registered():
            return set(AttentionInterface().valid_keys()), set(AttentionMaskInterface().valid_keys())

        before = registered()
        import npo_engine.rollout
        from npo_engine.rollout import decoder, embedded, kv_cache, sampling
        assert registered() == before, f"importing registered {registered()[0] - before[0]}"
        assert decoder.ATTENTION_NAME not in before[0]

        config = Qwen3Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8)
        embedded.EmbeddedEngine(Qwen3ForCausalLM(config), eos_token_id=1, pad_token_id=0)
        attention, masks = registered()
        assert decoder.ATTENTION_NAME in attention and decoder.ATTENTION_NAME in masks
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
