"""The embedded rollout engine against references: a teacher-forced HF forward for every behaviour log-prob,
HF `generate` for greedy decoding, and the distribution it samples from.

Two tiny random models cover the two forward paths: Qwen2 (the Llama-family transcription) and Qwen3 (its own
HF forward, since it is not in `_LLAMA_FAMILY`). Prompt batches mix lengths (left padding, several prefill
buckets) and repeat prompts (deduplicated prefill); EOS ids are chosen among frequent tokens so rows stop at
different steps and the batch is compacted mid-generation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from npo_engine.rollout.base import RolloutEngine, SamplingParams
from npo_engine.rollout.decoder import LlamaFamilyForward
from npo_engine.rollout.embedded import EmbeddedEngine
from npo_engine.rollout.sampling import truncate

VOCAB = 48
PAD = 0
NEVER = VOCAB  # an EOS id outside the vocabulary: never sampled
# fp32 log-probs of the same sequence from a batched, cached, left-padded run and one unpadded forward.
LOGP_ATOL = 1e-5

# Lengths 1..13: a one-token prompt, several prefill buckets, padding inside buckets; two repeated prompts.
PROMPTS = [
    [5, 6, 7],
    [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [21],
    [5, 6, 7],
    [22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33],
    [34, 35, 36, 37, 38, 39],
    [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [40, 41, 42, 43, 44],
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a shared CPU extra threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(kind: str):
    config_class = Qwen2Config if kind == "qwen2" else Qwen3Config
    return config_class(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        # Wider than HF's default 0.02, so next-token distributions are peaked and greedy has clear winners.
        initializer_range=0.2,
        pad_token_id=PAD,
    )


def _model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if kind == "qwen2" else Qwen3ForCausalLM
    return cls(_config(kind)).eval()


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def model(request) -> torch.nn.Module:
    """The reference model; engines get deep copies of it."""
    return _model(request.param)


def _engine(model: torch.nn.Module, eos=NEVER, **kwargs) -> EmbeddedEngine:
    return EmbeddedEngine(copy.deepcopy(model), eos_token_id=eos, pad_token_id=PAD, **kwargs)


def _teacher_forced_logp(
    model, prompt: list[int], completion: list[int], temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The behaviour log-prob of each completion token as base.py defines it, from one unpadded forward:
    log_softmax(truncate(logits / T))[token] (T = 0: untempered, untruncated), (T,) fp32."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()  # (P + T, V)
    logits = logits[len(prompt) - 1 : -1] / (temperature or 1.0)
    if temperature:
        logits = truncate(logits, top_k=top_k, top_p=top_p)
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def _frequent_tokens(model, count: int) -> list[int]:
    """The `count` tokens a seeded sample from `model` produces most often (EOS candidates)."""
    out = _engine(model).generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=1))
    counts = torch.bincount(torch.tensor([t for row in out.token_ids for t in row]), minlength=VOCAB)
    return counts.topk(count).indices.tolist()


def test_is_a_rollout_engine(model):
    assert isinstance(_engine(model), RolloutEngine)
    assert (_engine(model)._fast_forward is not None) == isinstance(model, Qwen2ForCausalLM)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=12, temperature=1.0, seed=3),
        SamplingParams(max_new_tokens=12, temperature=0.7, top_k=8, top_p=0.9, seed=4),
        SamplingParams(max_new_tokens=12, temperature=0.0),
    ],
    ids=["T1", "T0.7-topk8-topp0.9", "greedy"],
)
def test_logprobs_match_teacher_forced_forward(model, params):
    eos = _frequent_tokens(model, 2)
    out = _engine(model, eos=eos).generate(PROMPTS, params)

    assert len(out) == len(PROMPTS)
    assert "stop" in out.finish_reasons  # some rows stopped early, so the batch was compacted
    for i, (prompt, tokens, logp) in enumerate(zip(PROMPTS, out.token_ids, out.logprobs)):
        assert logp.dtype == torch.float32 and logp.shape == (len(tokens),)
        assert torch.isfinite(logp).all() and (logp <= 0).all()
        ref = _teacher_forced_logp(model, prompt, tokens, params.temperature, params.top_k, params.top_p)
        assert torch.isfinite(ref).all()  # every token drawn lies in its step's kept set
        err = (logp - ref).abs()
        assert err.max() <= LOGP_ATOL, f"row {i}: worst token {int(err.argmax())}, error {err.max():.2e}"


def test_greedy_matches_hf_generate(model):
    eos = _frequent_tokens(model, 1)[0]
    out = _engine(model, eos=eos).generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0))
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD
            )[0, len(prompt) :].tolist()
        assert out.token_ids[i] == ref, f"row {i}"
        assert out.finish_reasons[i] == ("stop" if ref[-1] == eos else "length")


def test_stops_at_eos_and_keeps_it(model):
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    free = _engine(model).generate(PROMPTS, params)
    assert free.finish_reasons == ["length"] * len(PROMPTS)
    assert all(len(t) == 16 for t in free.token_ids)

    # Greedy rows do not depend on each other: with an EOS, each row is the free row cut after its first EOS.
    eos = max(range(VOCAB), key=lambda t: sum(t in row for row in free.token_ids))
    out = _engine(model, eos=[eos, NEVER]).generate(PROMPTS, params)
    for i, row in enumerate(free.token_ids):
        if eos in row:
            cut = row.index(eos) + 1
            assert out.token_ids[i] == row[:cut] and out.finish_reasons[i] == "stop", f"row {i}"
        else:
            assert out.token_ids[i] == row and out.finish_reasons[i] == "length", f"row {i}"
        assert len(out.logprobs[i]) == len(out.token_ids[i])
        torch.testing.assert_close(
            out.logprobs[i], free.logprobs[i][: len(out.token_ids[i])], atol=LOGP_ATOL, rtol=0
        )
    assert "stop" in out.finish_reasons and out.stats["tokens_generated"] == sum(map(len, out.token_ids))


def test_sampled_rows_end_at_their_first_eos(model):
    eos = _frequent_tokens(model, 3)
    out = _engine(model, eos=eos).generate(PROMPTS * 4, SamplingParams(max_new_tokens=20, seed=5))
    assert "stop" in out.finish_reasons
    for tokens, reason in zip(out.token_ids, out.finish_reasons):
        eos_at = [j for j, t in enumerate(tokens) if t in eos]
        if reason == "stop":
            assert eos_at == [len(tokens) - 1]
        else:
            assert eos_at == [] and len(tokens) == 20


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    a = _engine(model).generate(PROMPTS, params)
    b = _engine(model).generate(PROMPTS, params)
    c = _engine(model).generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert a.token_ids == b.token_ids
    assert all(torch.equal(x, y) for x, y in zip(a.logprobs, b.logprobs))
    assert a.token_ids != c.token_ids

    # Without a seed, the engine's own generator (seeded at construction) advances from call to call.
    unseeded = SamplingParams(max_new_tokens=12)
    e1, e2 = _engine(model, seed=1), _engine(model, seed=1)
    first = e1.generate(PROMPTS, unseeded).token_ids
    assert first == e2.generate(PROMPTS, unseeded).token_ids
    assert first != e1.generate(PROMPTS, unseeded).token_ids


def test_top_k_1_is_greedy(model):
    """Top-k 1 draws greedy's tokens, each with probability 1 under the truncated distribution (log-prob 0),
    where greedy reports the untempered full distribution's log-probs."""
    engine = _engine(model)
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0))
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=0))
    assert top1.token_ids == greedy.token_ids
    for a, b in zip(top1.logprobs, greedy.logprobs):
        assert torch.equal(a, torch.zeros_like(a))
        assert (b < 0).all()


def test_truncation_keeps_only_the_allowed_tokens(model):
    """Many first-step draws for one prompt: top-k=2 draws only (and both of) the 2 most likely tokens;
    a tiny top-p draws only the most likely one."""
    prompt = PROMPTS[1]
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1]
    top2 = set(first.topk(2).indices.tolist())
    engine = _engine(model)

    out = engine.generate([prompt] * 400, SamplingParams(max_new_tokens=1, top_k=2, seed=0))
    drawn = {t[0] for t in out.token_ids}
    assert drawn == top2
    out = engine.generate([prompt] * 100, SamplingParams(max_new_tokens=1, top_p=1e-4, seed=0))
    assert {t[0] for t in out.token_ids} == {int(first.argmax())}


def test_max_batch_size_splits_without_changing_results(model):
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    whole = _engine(model).generate(PROMPTS, params)
    split = _engine(model, max_batch_size=3).generate(PROMPTS, params)
    assert split.token_ids == whole.token_ids
    for prompt, tokens, logp in zip(PROMPTS, split.token_ids, split.logprobs):
        ref = _teacher_forced_logp(model, prompt, tokens, 1.0)
        assert (logp - ref).abs().max() <= LOGP_ATOL


def test_update_weights_matches_a_fresh_engine(model):
    kind = "qwen2" if isinstance(model, Qwen2ForCausalLM) else "qwen3"
    new_model = _model(kind, seed=1)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=2)
    engine = _engine(model)
    before = engine.generate(PROMPTS, params)
    assert engine.weights_version == 0

    # Tied embeddings arrive once, under the input-embedding name; the LM head shares them.
    state = {k: v for k, v in new_model.state_dict().items() if k != "lm_head.weight"}
    engine.update_weights(state.items())
    assert engine.weights_version == 1
    assert torch.equal(engine.model.lm_head.weight, new_model.lm_head.weight)
    after = engine.generate(PROMPTS, params)
    fresh = _engine(new_model).generate(PROMPTS, params)
    assert after.token_ids != before.token_ids
    assert after.token_ids == fresh.token_ids
    assert all(torch.equal(a, b) for a, b in zip(after.logprobs, fresh.logprobs))

    # Both tied names at once, as a full state dict has them.
    engine.update_weights(model.state_dict().items())
    assert engine.weights_version == 2
    assert engine.generate(PROMPTS, params).token_ids == before.token_ids

    with pytest.raises(KeyError, match="model.layers.0.mlp.nope"):
        engine.update_weights([("model.layers.0.mlp.nope", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(3,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])


def test_rejects_bad_input(model):
    engine = _engine(model)
    assert len(engine.generate([], SamplingParams(max_new_tokens=4))) == 0
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[3], []], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_batch_size"):
        _engine(model, max_batch_size=0)


def test_fast_forward_equals_hf_forward():
    """The Llama-family transcription gives HF's logits on the same cached, padded inputs."""
    model = _model("qwen2")
    engine = _engine(model)
    assert isinstance(engine._fast_forward, LlamaFamilyForward)
    slow = _engine(model)
    slow._fast_forward = None
    slow.model.set_attn_implementation("npo_embedded_sdpa")
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=9)
    fast_out, slow_out = engine.generate(PROMPTS, params), slow.generate(PROMPTS, params)
    assert fast_out.token_ids == slow_out.token_ids
    for a, b in zip(fast_out.logprobs, slow_out.logprobs):
        torch.testing.assert_close(a, b, atol=LOGP_ATOL, rtol=0)


def test_parameters_replaced_behind_the_engine_are_used():
    """The Llama-family path fuses q/k/v and gate/up weights into shared storage; swapping parameters out from
    under it (here `load_state_dict(assign=True)`) makes it fuse them again rather than use stale copies."""
    engine, new_model = _engine(_model("qwen2")), _model("qwen2", seed=1)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    engine.generate(PROMPTS, params)
    engine.model.load_state_dict(copy.deepcopy(new_model.state_dict()), assign=True)
    assert (
        engine.generate(PROMPTS, params).token_ids == _engine(new_model).generate(PROMPTS, params).token_ids
    )
