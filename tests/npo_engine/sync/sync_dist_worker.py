"""Worker for test_weights.py::test_fsdp2_gather_two_ranks: `torchrun --nproc_per_node=2 <this> <out_dir>`.

Each rank builds the same tiny tied-embedding Qwen2 (vocabulary 37, so the embedding shards unevenly), keeps an
unsharded copy as the reference, builds two colocated engines as the Trainer does (fp32 and bf16 deep copies),
then shards the policy with `npo_engine.distributed.shard_model` (FSDP2, gloo) and takes one SGD step on its
own batch. `push_weights` then fills both engines (counting its all-gathers), and a `WeightSync` with the
probe through the sharded policy syncs the fp32 engine again.

The reference takes the same SGD step unsharded, on both ranks' batches. Whether FSDP2 averages or sums the
ranks' gradients is `shard_model`'s choice (the trainer's loss normalizer depends on it), not the sync's, so the
reference is computed both ways, from the mean and from the sum of the two ranks' losses; the engine must match
one of them. SGD, not Adam: Adam's first step is nearly invariant to the gradient's scale, which would blur the
two apart. Each rank writes `rank<r>.json`: its fp32 engine's distance to both references, whether its bf16
engine holds exactly the fp32 weights cast to bf16, which names were sent, and a fingerprint to compare across
ranks.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import Qwen2ForCausalLM

from npo_engine.distributed import decoder_layers, init_distributed, shard_model, shutdown_distributed
from npo_engine.models import LogprobModel, demo_model_config
from npo_engine.rollout.embedded import EmbeddedEngine
from npo_engine.sync import SyncSettings, WeightSync, fingerprint, policy_logprob_fn, push_weights

VOCAB = 37
EOS, PAD = 1, 0
LR = 0.5  # SGD: large enough that every weight matrix moves far beyond fp32 rounding


class RecordingEngine(EmbeddedEngine):
    """Records the names of every tensor it receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received: list[str] = []

    def load_buckets(self, buckets, *, verify=True):
        def record():
            for bucket in buckets:
                self.received += [e.name for e in bucket.entries]
                yield bucket
        return super().load_buckets(record(), verify=verify)


class CountingGathers:
    """Counts the sync's all-gathers (one per group of shards, not one per parameter)."""

    def __init__(self):
        self.calls = 0
        self._original = dist.all_gather_into_tensor

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)
        dist.all_gather_into_tensor = counted
        return self

    def __exit__(self, *exc):
        dist.all_gather_into_tensor = self._original


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s batch: [2, 8] ids, the second row right-padded by 2; the last 4 real tokens are scored."""
    gen = torch.Generator().manual_seed(100 + rank)
    input_ids = torch.randint(3, VOCAB, (2, 8), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 6:], attention_mask[1, 6:] = PAD, 0
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    target_mask[0, 4:8] = True
    target_mask[1, 2:6] = True
    return input_ids, attention_mask, target_mask


def step_loss(policy: torch.nn.Module, rank: int) -> torch.Tensor:
    """Mean negative log-prob of the scored tokens of `rank`'s batch."""
    input_ids, attention_mask, target_mask = batch(rank)
    logp, _ = policy(input_ids, attention_mask, target_mask)
    return -(logp * target_mask).sum() / target_mask.sum()


def main(out: Path) -> None:
    d = init_distributed()
    torch.manual_seed(0)  # the same initial weights on both ranks
    config = demo_model_config(VOCAB)
    config.num_hidden_layers = 2
    lm = Qwen2ForCausalLM(config)
    initial = {name: t.clone() for name, t in lm.state_dict().items()}
    reference = copy.deepcopy(lm)
    engine32 = RecordingEngine(copy.deepcopy(lm), eos_token_id=EOS, pad_token_id=PAD)
    engine16 = RecordingEngine(copy.deepcopy(lm).to(torch.bfloat16), eos_token_id=EOS, pad_token_id=PAD)

    policy = shard_model(LogprobModel(lm), decoder_layers(lm), d, param_dtype=None)
    optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    step_loss(policy, d.rank).backward()
    optimizer.step()

    # The unsharded step on both batches: gradients averaged over ranks (mean of the losses) or summed.
    references = {}
    for reduction, scale in [("mean", 0.5), ("sum", 1.0)]:
        model = copy.deepcopy(reference)
        ref_policy = LogprobModel(model)
        ((step_loss(ref_policy, 0) + step_loss(ref_policy, 1)) * scale).backward()
        torch.optim.SGD(ref_policy.parameters(), lr=LR).step()
        references[reduction] = model.state_dict()

    with CountingGathers() as gathers:
        push_weights(lm, engine32)
    push_weights(lm, engine16, dtype=torch.bfloat16)

    got32, got16 = engine32.model.state_dict(), engine16.model.state_dict()
    expected = reference.state_dict()
    diffs = {reduction: {name: (got32[name] - t).abs().max().item() for name, t in ref.items()}
             for reduction, ref in references.items()}
    bf16_mismatch = [name for name, t in got32.items() if not torch.equal(got16[name], t.to(torch.bfloat16))]
    tied_names = {"model.embed_tokens.weight", "lm_head.weight"}
    report = {
        "sharded_params": sum(isinstance(p, DTensor) for p in lm.parameters()),
        "embedding_rows_local": lm.model.embed_tokens.weight.to_local().shape[0],
        "tied_after_sharding": lm.lm_head.weight is lm.model.embed_tokens.weight,
        "moved": max((got32[name] - t).abs().max().item() for name, t in initial.items()),
        "fp32_keys_match": got32.keys() == expected.keys(),
        "fp32_max_abs_diff": {reduction: max(d.values()) for reduction, d in diffs.items()},
        "fp32_worst": {reduction: max(d, key=d.get) for reduction, d in diffs.items()},
        "bf16_equals_cast": not bf16_mismatch,
        "bf16_mismatch": bf16_mismatch,
        # every tensor once, the tied pair under one of its names
        "names_sent_once": all(
            len(e.received) == len(set(e.received)) == len(expected) - 1
            and set(e.received) | tied_names == set(expected)
            for e in (engine32, engine16)
        ),
        "fingerprint": fingerprint(got32),
        "all_gathers": gathers.calls,
    }
    # The probe through the sharded policy (collective): a faithful engine passes it. (Its forward leaves the
    # root's parameters unsharded, as any forward does; the sync reads them as full tensors then.)
    probe = WeightSync(engine32, "policy", dtype=None, config=SyncSettings(probe_every=1),
                       trainer_logprobs=policy_logprob_fn(policy, device=torch.device("cpu"), pad_token_id=PAD,
                                                          temperature=1.0)).push(lm, step=1)
    report["probe_logp_diff"] = probe["sync/probe_logp_diff/policy"]
    (out / f"rank{d.rank}.json").write_text(json.dumps(report, indent=1))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
