"""npo_engine.sync: trainer weights -> rollout engine, checked against the trainer's own tensors.

References: the trainer model's state dict (round trip, tied embeddings, activation-checkpoint names), the
trainer's tensors cast with `Tensor.to` (bf16 engines), the trainer's LogprobModel (the engine's behaviour
log-probs after a sync) and, under a 2-rank torchrun, an unsharded model given the same optimizer step as the
FSDP2-sharded one (`sync_dist_worker.py`).

The engines are built the way `Trainer` builds its own: `EmbeddedEngine(copy.deepcopy(lm).to(engine_dtype))`.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM

from npo_engine.distributed import apply_activation_checkpointing
from npo_engine.models import LogprobModel, demo_model_config
from npo_engine.rollout.base import SamplingParams
from npo_engine.rollout.embedded import EmbeddedEngine
from npo_engine.sync import fingerprint, iter_full_weights, push_weights

HERE = Path(__file__).parent
# Odd, so that under FSDP2 the [V, H] embedding splits unevenly over 2 ranks (19 + 18 rows).
VOCAB = 37
EOS, PAD = 1, 0
# The models are tiny: more than one intra-op thread only adds hand-offs on a busy 2-core machine.
_WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_lm(seed: int = 0, *, tie: bool = True) -> Qwen2ForCausalLM:
    """The demo architecture (tied embeddings by default) with 2 layers and random weights."""
    torch.manual_seed(seed)
    config = demo_model_config(VOCAB)
    config.num_hidden_layers = 2
    config.tie_word_embeddings = tie
    return Qwen2ForCausalLM(config)


def make_engine(lm: torch.nn.Module, dtype: torch.dtype = torch.float32) -> EmbeddedEngine:
    """A colocated engine exactly as the Trainer builds it: a deep copy of the policy, cast to the engine dtype."""
    return EmbeddedEngine(copy.deepcopy(lm).to(dtype), eos_token_id=EOS, pad_token_id=PAD)


def perturb(lm: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter (tied ones once) by a seeded random amount, as an optimizer step would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():  # parameters() yields a tied parameter once
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


class RecordingEngine(EmbeddedEngine):
    """An EmbeddedEngine that also records each `update_weights` bucket as a list of (name, numel, dtype)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buckets: list[list[tuple[str, int, torch.dtype]]] = []

    def update_weights(self, named_tensors):
        named_tensors = list(named_tensors)
        self.buckets.append([(name, t.numel(), t.dtype) for name, t in named_tensors])
        super().update_weights(named_tensors)


def recording_engine(lm: torch.nn.Module, dtype: torch.dtype = torch.float32) -> RecordingEngine:
    return RecordingEngine(copy.deepcopy(lm).to(dtype), eos_token_id=EOS, pad_token_id=PAD)


def assert_state_equal(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys(), sorted(set(expected) ^ set(actual))
    for name, tensor in expected.items():
        if not torch.equal(tensor, actual[name]):
            diff = (tensor.double() - actual[name].double()).abs()
            first = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
            raise AssertionError(f"{name}: max abs diff {diff.max().item():.3e} first at index {first}")


# --------------------------------------------------------------------------------------------- round trip


def test_round_trip_engine_equals_trainer():
    lm = make_lm()
    engine = make_engine(lm)
    perturb(lm)  # the engine now holds stale weights
    assert fingerprint(engine.model.state_dict()) != fingerprint(lm.state_dict())

    metrics = push_weights(lm, engine)
    assert_state_equal(lm.state_dict(), engine.model.state_dict())
    assert engine.weights_version == 1
    unique = {id(p): p for p in lm.state_dict(keep_vars=True).values()}.values()
    assert metrics["sync/bytes"] == sum(p.numel() * p.element_size() for p in unique)
    assert metrics["time/sync"] >= 0.0


def test_engine_samples_with_the_trainer_log_probs_after_a_sync():
    """End to end: after a sync the engine's behaviour log-probs of its own greedy tokens are the trainer's.

    The engine's fast path runs fused q/k/v and gate/up weights (the modules' weights are views of them), so a
    sync that only updated the module tensors would pass a state-dict check and still sample from old weights.
    """
    lm = make_lm()
    engine = make_engine(lm)
    perturb(lm)
    push_weights(lm, engine)
    prompts = [[5, 6, 7, 8], [9, 10]]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))

    rows = [p + c for p, c in zip(prompts, out.token_ids)]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, (p, row) in enumerate(zip(prompts, rows)):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
        target_mask[b, len(p) : len(row)] = True
    with torch.no_grad():
        logp, _ = LogprobModel(lm, kernel_backend="torch")(input_ids, attention_mask, target_mask)
    for b, (p, row) in enumerate(zip(prompts, rows)):
        torch.testing.assert_close(out.logprobs[b], logp[b, len(p) : len(row)], atol=2e-5, rtol=1e-5)


def test_buckets_are_bounded_and_cover_every_tensor_once():
    lm = make_lm()
    perturb(lm)
    engine = recording_engine(lm)
    sizes = {name: t.numel() * t.element_size() for name, t in iter_full_weights(lm)}
    bucket_bytes = 100_000  # below the largest tensor (an MLP weight, 197 kB) and ~1/16 of the model
    push_weights(lm, engine, bucket_bytes=bucket_bytes)

    assert len(engine.buckets) > 2
    names = [name for bucket in engine.buckets for name, _, _ in bucket]
    assert sorted(names) == sorted(sizes) and len(names) == len(set(names))
    for bucket in engine.buckets[:-1]:
        total = sum(sizes[name] for name, _, _ in bucket)
        # a bucket is flushed as soon as it reaches the bound, so without its last tensor it is below it
        assert total >= bucket_bytes and total - sizes[bucket[-1][0]] < bucket_bytes
    assert_state_equal(lm.state_dict(), engine.model.state_dict())


# ----------------------------------------------------------------------------------------------- dtype cast


def test_fp32_trainer_to_bf16_engine_equals_the_cast():
    lm = make_lm()
    engine = recording_engine(lm, torch.bfloat16)
    perturb(lm)
    metrics = push_weights(lm, engine, dtype=torch.bfloat16)

    expected = {name: t.to(torch.bfloat16) for name, t in lm.state_dict().items()}
    assert_state_equal(expected, engine.model.state_dict())
    assert {dtype for bucket in engine.buckets for _, _, dtype in bucket} == {torch.bfloat16}  # cast before sending
    assert metrics["sync/bytes"] == sum(2 * t.numel() for _, t in iter_full_weights(lm))
    assert all(p.dtype == torch.float32 for p in lm.parameters())  # the trainer's master weights stay fp32


# ---------------------------------------------------------------------------------------------- tied weights


def test_tied_embedding_change_reaches_the_engine_lm_head():
    lm = make_lm(tie=True)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    engine = recording_engine(lm, torch.bfloat16)
    engine_head, engine_embed = engine.model.lm_head.weight, engine.model.model.embed_tokens.weight
    # The deep copy and the cast keep the engine's pair tied: one storage, so neither can go stale alone.
    assert engine_head.data_ptr() == engine_embed.data_ptr()

    with torch.no_grad():
        lm.model.embed_tokens.weight[3].add_(1.0)  # a change to one token's embedding row only
    push_weights(lm, engine, dtype=torch.bfloat16)

    expected = lm.model.embed_tokens.weight.detach().to(torch.bfloat16)
    assert torch.equal(engine.model.model.embed_tokens.weight, expected)
    assert torch.equal(engine.model.lm_head.weight, expected)
    # The tied tensor travelled once, under the embedding's name.
    names = [name for bucket in engine.buckets for name, _, _ in bucket]
    assert names.count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in names
    # And the engine's logits use it: the head row of token 3 moved with the embedding.
    hidden = torch.randn(1, lm.config.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(engine.model.lm_head(hidden), hidden @ expected.T)


def test_untied_head_and_embedding_are_each_sent():
    lm = make_lm(tie=False)
    engine = recording_engine(lm)
    perturb(lm)
    push_weights(lm, engine)
    names = [name for bucket in engine.buckets for name, _, _ in bucket]
    assert names.count("model.embed_tokens.weight") == 1 and names.count("lm_head.weight") == 1
    assert_state_equal(lm.state_dict(), engine.model.state_dict())


def test_activation_checkpointing_names_are_hugging_face_names():
    lm = make_lm()
    engine = make_engine(lm)
    apply_activation_checkpointing(lm)
    # The wrapper renames the parameters (its state-dict hooks strip the prefix again; the sync must not care).
    assert any("_checkpoint_wrapped_module" in name for name, _ in lm.named_parameters())
    perturb(lm)
    push_weights(lm, engine)  # an unknown name would raise KeyError in update_weights
    expected = {name.replace("_checkpoint_wrapped_module.", ""): t for name, t in lm.state_dict().items()}
    assert_state_equal(expected, engine.model.state_dict())


# ------------------------------------------------------------------------------------------------ fingerprint


def test_fingerprint_is_order_independent_and_sees_permutations():
    a, b = torch.arange(6.0).reshape(2, 3), torch.tensor([0.5, -1.0])
    assert fingerprint({"a": a, "b": b}) == fingerprint(iter([("b", b), ("a", a)]))
    assert fingerprint({"a": a.flip(1), "b": b}) != fingerprint({"a": a, "b": b})  # same values, moved
    assert fingerprint({"a": a.to(torch.bfloat16)}) == fingerprint({"a": a})  # exact in bf16: same checksum


# ----------------------------------------------------------------------------------- FSDP2, 2 ranks on gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_fsdp2_gather_two_ranks(tmp_path):
    """After one optimizer step of an FSDP2-sharded policy, every rank's engine holds the full weights.

    The worker (checks in `sync_dist_worker.py`'s docstring) writes one JSON report per rank; this asserts on them.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(HERE / "sync_dist_worker.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_WORKER_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert report["sharded_params"] > 0, f"rank {rank}: nothing was sharded, the gather was not exercised"
        assert report["embedding_rows_local"] == [19, 18][rank]  # uneven split of the odd vocabulary
        assert report["tied_after_sharding"], f"rank {rank}: FSDP2 untied lm_head from embed_tokens"
        assert report["moved"] > 1e-2, f"rank {rank}: the optimizer step did not change the weights"
        # fp32 engine vs the unsharded model given the same step, with the ranks' gradients averaged or summed
        # (shard_model's choice): one is only reduction-order rounding away, the other far off.
        diff = report["fp32_max_abs_diff"]
        assert min(diff.values()) < 1e-6, (rank, diff, report["fp32_worst"])
        assert max(diff.values()) > 1e-3, (rank, diff)
        assert report["fp32_keys_match"], rank
        assert report["bf16_equals_cast"], (rank, report["bf16_mismatch"])
        assert report["names_sent_once"], rank
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"]  # both engines hold the same bits
