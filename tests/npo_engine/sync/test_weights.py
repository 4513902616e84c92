"""npo_engine.sync: trainer weights -> buckets -> rollout engine, checked against the trainer's own tensors.

References: the trainer model's state dict (round trip, tied embeddings, activation-checkpoint names), the
trainer's tensors cast with `Tensor.to` (bf16 engines), the trainer's LogprobModel (the engine's behaviour
log-probs after a sync, the probe), the fingerprint recomputed from the bucket bytes, the PyTorch fallback for the
csrc/ path and, under a 2-rank torchrun, an unsharded model given the same optimizer step as the FSDP2-sharded
one (`sync_dist_worker.py`). Failure paths use engines that corrupt a bucket, raise mid-sync, or hold a weight
other than the one they loaded.

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
from npo_engine.rollout.base import BUCKET_ALIGN, SamplingParams
from npo_engine.rollout.embedded import EmbeddedEngine
from npo_engine.sync import (
    SyncError,
    SyncSettings,
    WeightSync,
    bucket_fingerprint,
    fingerprint,
    iter_full_weights,
    policy_logprob_fn,
    push_weights,
)

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
    """An EmbeddedEngine that also records each bucket it loads as a list of (name, nbytes, dtype)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buckets: list[list[tuple[str, int, torch.dtype]]] = []

    def load_buckets(self, buckets, *, verify=True):
        def record():
            for bucket in buckets:
                self.buckets.append([(e.name, e.nbytes, e.dtype) for e in bucket.entries])
                assert bucket.data.numel() % BUCKET_ALIGN == 0 and all(e.offset % BUCKET_ALIGN == 0
                                                                      for e in bucket.entries)
                if verify:  # the sender's fingerprint is that of the bytes it handed over
                    assert bucket.fingerprint == bucket_fingerprint(bucket.data)
                yield bucket
        return super().load_buckets(record(), verify=verify)


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
    assert metrics["sync/bytes/policy"] == sum(p.numel() * p.element_size() for p in unique)
    assert metrics["time/sync"] == metrics["time/sync/policy"] >= 0.0
    assert metrics["sync/buckets/policy"] >= 1


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
    # Below the largest tensors (the MLP weights, 197 kB, and the embedding) and ~1/16 of the model.
    bucket_bytes = 100_000
    push_weights(lm, engine, bucket_bytes=bucket_bytes)

    assert len(engine.buckets) > 2
    names = [name for bucket in engine.buckets for name, _, _ in bucket]
    assert sorted(names) == sorted(sizes) and len(names) == len(set(names))
    assert names == list(sizes)  # state-dict order: the groups go out block by block
    for bucket in engine.buckets:
        used = sum(-(-n // BUCKET_ALIGN) * BUCKET_ALIGN for _, n, _ in bucket)
        # within the bound, or one tensor larger than a bucket sent alone
        assert used <= bucket_bytes or len(bucket) == 1, bucket
    assert any(len(b) == 1 and b[0][1] > bucket_bytes for b in engine.buckets)
    assert_state_equal(lm.state_dict(), engine.model.state_dict())


def test_plan_is_built_once_and_reused():
    """Names are mapped and offsets laid out at the first sync only; later syncs reuse the plan. The bucket
    memory is freed after each sync (the training step never holds it) unless `keep_buffers`."""
    lm = make_lm()
    engine = make_engine(lm)
    sync = WeightSync(engine, "policy", dtype=None, config=SyncSettings(bucket_mb=0.05, probe_every=0))
    sync.push(lm, step=0)
    plan = sync.plan
    assert sync._buffers == {} and sync._views == {}
    perturb(lm)
    sync.push(lm, step=1)
    assert sync.plan is plan and sync._buffers == {}
    assert_state_equal(lm.state_dict(), engine.model.state_dict())
    assert [g.name for g in plan.groups] == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm"]


def test_kept_buffers_are_reused_between_syncs():
    lm = make_lm()
    engine = make_engine(lm)
    sync = WeightSync(engine, "policy", dtype=None,
                      config=SyncSettings(bucket_mb=0.05, probe_every=0, keep_buffers=True))
    sync.push(lm, step=0)
    buffers = dict(sync._buffers)
    assert len(buffers) == 1  # the embedded engine releases each bucket: one buffer serves them all
    perturb(lm)
    sync.push(lm, step=1)
    assert sync._buffers == buffers
    assert_state_equal(lm.state_dict(), engine.model.state_dict())


@pytest.mark.parametrize("backend", ["torch", "csrc"])
def test_fallback_and_csrc_fill_the_engine_alike(backend):
    from npo_engine.sync import ops

    if backend == "csrc" and ops.get().name != "csrc":
        pytest.skip(f"csrc/ did not build: {ops.build_notes()}")
    lm = make_lm()
    perturb(lm)
    engine = recording_engine(lm, torch.bfloat16)
    settings = SyncSettings(bucket_mb=0.05, probe_every=0, backend=backend)
    WeightSync(engine, "policy", dtype=torch.bfloat16, config=settings).push(lm, step=0)
    expected = {name: t.to(torch.bfloat16) for name, t in lm.state_dict().items()}
    assert_state_equal(expected, engine.model.state_dict())


# ----------------------------------------------------------------------------------------------- dtype cast


def test_fp32_trainer_to_bf16_engine_equals_the_cast():
    lm = make_lm()
    engine = recording_engine(lm, torch.bfloat16)
    perturb(lm)
    metrics = push_weights(lm, engine, dtype=torch.bfloat16)

    expected = {name: t.to(torch.bfloat16) for name, t in lm.state_dict().items()}
    assert_state_equal(expected, engine.model.state_dict())
    assert {dtype for bucket in engine.buckets for _, _, dtype in bucket} == {torch.bfloat16}  # cast before sending
    assert metrics["sync/bytes/policy"] == sum(2 * t.numel() for _, t in iter_full_weights(lm))
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
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240,
                            env=_WORKER_ENV)
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
        # one collective per group of shards (embed_tokens, layers.0, layers.1, norm), not one per parameter
        assert report["all_gathers"] == 4, report["all_gathers"]
        assert report["probe_logp_diff"] < 1e-5, report["probe_logp_diff"]
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"]  # both engines hold the same bits


# --------------------------------------------------------------------------------------------- verification


class CorruptingEngine(EmbeddedEngine):
    """Flips one bit of bucket 1 on the way in, as a faulty transport would."""

    def load_buckets(self, buckets, *, verify=True):
        def damaged():
            for bucket in buckets:
                if bucket.index == 1:
                    bucket.data[bucket.entries[0].offset + 5] ^= 16
                yield bucket
        return super().load_buckets(damaged(), verify=verify)


class FailingEngine(EmbeddedEngine):
    """Raises when it asks for bucket 2."""

    def load_buckets(self, buckets, *, verify=True):
        def until_two():
            for bucket in buckets:
                if bucket.index == 2:
                    raise OSError("device lost")
                yield bucket
        return super().load_buckets(until_two(), verify=verify)


class DriftingEngine(EmbeddedEngine):
    """Loads and fingerprints faithfully, then samples from a different down_proj in layer 1 (a stale or
    mis-mapped weight the engine's forward uses)."""

    def load_buckets(self, buckets, *, verify=True):
        received = super().load_buckets(buckets, verify=verify)
        with torch.no_grad():
            self.model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
        return received


def _engine(cls, lm, dtype=torch.float32):
    return cls(copy.deepcopy(lm).to(dtype), eos_token_id=EOS, pad_token_id=PAD)


def _probe_fn(lm):
    return policy_logprob_fn(LogprobModel(lm, kernel_backend="torch"), device=torch.device("cpu"), pad_token_id=PAD,
                             temperature=1.0)


def test_a_corrupted_bucket_is_caught_by_the_fingerprint():
    lm = make_lm()
    perturb(lm)
    engine = _engine(CorruptingEngine, lm)
    sync = WeightSync(engine, "guide", dtype=None, config=SyncSettings(bucket_mb=0.05, probe_every=0))
    with pytest.raises(SyncError, match=r"guide engine's weight sync at step 7: 1 of \d+ buckets arrived different "
                                        r"from what was sent \(bucket 1: sent fingerprint 0x[0-9a-f]{16}, engine "
                                        r"holds 0x[0-9a-f]{16}; its groups: "):
        sync.push(lm, step=7)
    assert "bucket 1" in engine.weights_stale and "guide" in engine.weights_stale


def test_without_verify_the_same_corruption_goes_unseen():
    """The check is the fingerprint's: with sync.verify off the damaged sync passes (and the engine is wrong)."""
    lm = make_lm()
    perturb(lm)
    engine = _engine(CorruptingEngine, lm)
    WeightSync(engine, "policy", dtype=None, config=SyncSettings(bucket_mb=0.05, probe_every=0, verify=False)
               ).push(lm, step=0)
    state = engine.model.state_dict()
    assert any(not torch.equal(state[k], v) for k, v in lm.state_dict().items())


def test_an_exception_mid_sync_marks_the_engine_stale():
    lm = make_lm()
    engine = _engine(FailingEngine, lm)
    sync = WeightSync(engine, "policy", dtype=None, config=SyncSettings(bucket_mb=0.05, probe_every=0))
    perturb(lm)
    with pytest.raises(SyncError, match=r"failed after 3 of \d+ buckets .*OSError: device lost.*mix of old and new "
                                        r"weights and is marked stale"):
        sync.push(lm, step=3)
    assert "OSError" in engine.weights_stale
    # Half-updated indeed: the first buckets' tensors are new, the last ones old.
    state, trainer = engine.model.state_dict(), lm.state_dict()
    first, last = sync.plan.buckets[0].entries[0].name, sync.plan.buckets[-1].entries[-1].name
    assert torch.equal(state[first], trainer[first]) and not torch.equal(state[last], trainer[last])


def test_a_good_sync_clears_the_stale_mark():
    lm = make_lm()
    engine = _engine(EmbeddedEngine, lm)
    engine.weights_stale = "an earlier failure"
    WeightSync(engine, "policy", dtype=None, config=SyncSettings(probe_every=0)).push(lm, step=0)
    assert engine.weights_stale is None


def test_probe_passes_on_a_faithful_engine_and_reports_its_metrics():
    lm = make_lm()
    perturb(lm)
    engine = _engine(EmbeddedEngine, lm)
    sync = WeightSync(engine, "policy", dtype=None, config=SyncSettings(probe_every=2), trainer_logprobs=_probe_fn(lm))
    first = sync.push(lm, step=0)
    assert first["sync/probe_logp_diff/policy"] < 1e-5 and first["sync/probe_logp_maxdiff/policy"] < 1e-4
    assert "sync/probe_logp_diff/policy" not in sync.push(lm, step=1)  # every 2 syncs
    assert "sync/probe_logp_diff/policy" in sync.push(lm, step=2)


def test_probe_catches_a_wrong_weight_and_names_its_group():
    lm = make_lm()
    perturb(lm)
    engine = _engine(DriftingEngine, lm)
    sync = WeightSync(engine, "guide", dtype=None, config=SyncSettings(probe_every=1, probe_tolerance=0.05),
                      trainer_logprobs=_probe_fn(lm))
    with pytest.raises(SyncError, match=r"guide engine's weight sync at step 12: the log-prob parity probe failed"
                                        r".*above sync.probe_tolerance = 0.05.*parameter group 'model.layers.1'"):
        sync.push(lm, step=12)
    assert "parity probe" in engine.weights_stale


def test_engine_score_matches_the_trainer_at_a_temperature():
    lm = make_lm()
    perturb(lm)
    engine = make_engine(lm)
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    trainer = policy_logprob_fn(LogprobModel(lm, kernel_backend="torch"), device=torch.device("cpu"),
                                pad_token_id=PAD, temperature=0.7)(prompts, completions)
    got = engine.score(prompts, completions, temperature=0.7)
    for a, b, c in zip(got, trainer, completions):
        assert a.dtype == torch.float32 and a.shape == (len(c),)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("verify", [True, False])
def test_cuda_sync_fills_a_bf16_engine_with_the_cast(verify):
    """On CUDA: fp32 trainer weights into a bf16 engine through the CUDA kernels (or the fallback where nvcc was
    missing); the engine holds exactly the cast, and a corrupted bucket is still caught."""
    lm = make_lm().cuda()
    perturb(lm)
    engine = make_engine(lm, torch.bfloat16)
    sync = WeightSync(engine, "policy", dtype=torch.bfloat16, config=SyncSettings(bucket_mb=0.05, probe_every=0,
                                                                                 verify=verify))
    metrics = sync.push(lm, step=0)
    expected = {name: t.to(torch.bfloat16) for name, t in lm.state_dict().items()}
    assert_state_equal(expected, engine.model.state_dict())
    assert metrics["sync/buckets/policy"] == len(sync.plan.buckets) > 1
    if verify:
        bad = _engine(CorruptingEngine, lm, torch.bfloat16)
        with pytest.raises(SyncError, match="arrived different"):
            WeightSync(bad, "policy", dtype=torch.bfloat16, config=SyncSettings(bucket_mb=0.05, probe_every=0)
                       ).push(lm, step=1)
