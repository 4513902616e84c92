"""Weight sync on one GPU: a 7B-shaped bf16 engine filled from an fp32 trainer (pack + hand-over), the csrc/ CUDA
build, and CPU == CUDA fingerprints on the same bytes. Degrades gracefully: without nvcc the CUDA kernels are
not built and the PyTorch fallback runs (reported); without CUDA only the CPU checks run.

    python -m benchmarks.gpu.bench_sync --out benchmarks/results/gpu_h200      # part `sync` of run.sh
    python -m benchmarks.gpu.bench_sync --shape 0.5b --out /tmp/smoke           # small shape (CPU smoke run)

What is timed (median of --repeats after one warm-up; CUDA synchronized before the clock stops):
- `bucketed`: `WeightSync.push` as the trainer runs it: fp32 master weights cast to bf16 and packed into
  buckets (`sync.bucket_mb`), each handed to the embedded engine, which copies it into its parameters; bucket
  fingerprints on both sides (`sync.verify`, the default).
- `bucketed_noverify`: the same without fingerprints.
- `per_param`: one `update_weights([(name, tensor.to(bf16))])` call per parameter (TRL's colocate loop).
Goal: `bucketed` <= 0.5 s for the 7B shape on one H100/H200. Single GPU: no gather (world size 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

SHAPES = {
    # Qwen2-7B: 28 layers, hidden 3584, intermediate 18944, 28 / 4 heads, vocab 152064, untied (7.6 B parameters)
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def log(report: dict, key: str, value) -> None:
    report[key] = value
    print(f"{key}: {value}", flush=True)


def make_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(max_position_embeddings=512, torch_dtype="float32", **SHAPES[shape])
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)  # buffers were left on meta
    model.tie_weights()
    return model.eval()


def sync_now(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_fingerprints(report: dict, device: torch.device) -> None:
    """CPU and device kernels (or fallback) on identical bytes: buckets and fingerprints must be equal."""
    from npo_engine.sync import ops
    from npo_engine.sync.fingerprints import FingerprintBlocks, bucket_fingerprint

    gen = torch.Generator().manual_seed(0)
    sizes = [1, 6, 4096, 4100, 1 << 20, (64 << 20) + 12]
    results = []
    for n in sizes:
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        cpu = bucket_fingerprint(data)
        dev = bucket_fingerprint(data.to(device))
        ref = bucket_fingerprint(data, backend="torch")
        results.append(cpu == dev == ref)
    log(report, "fingerprint_cpu_equals_device", all(results))
    # A pack with casts on both devices (fp32 -> bf16 / fp16, strided source, odd sizes).
    srcs = [torch.randn(37, 5, generator=gen), torch.randn(7, 3, generator=gen).t(), torch.randn(1001, generator=gen)]
    dtypes = [torch.bfloat16, torch.float16, torch.bfloat16]
    offsets, size = [0, 384, 512], 4096 * 3 + 64
    out = []
    for where, kernels in (("cpu", ops.get("torch")), (device, ops.get())):  # the fallback on CPU is the reference
        bucket = torch.full((size,), 7, dtype=torch.uint8, device=where)
        views = [bucket[o : o + s.numel() * d.itemsize].view(d).view(s.shape) for s, d, o in zip(srcs, dtypes, offsets)]
        sums = FingerprintBlocks(size, device=where, backend=kernels.name)
        kernels.pack([s.to(where) for s in srcs], views, bucket, sums.sums)
        out.append((bucket.cpu(), sums.value()))
    (a, fa), (b, fb) = out
    log(report, "pack_cpu_fallback_equals_device_kernels", bool(torch.equal(a, b)) and fa == fb)
    damaged = b.clone()
    damaged[100] ^= 1
    log(report, "flipped_bit_caught_on_device", bucket_fingerprint(damaged.to(device)) != fb)


def bench_7b(report: dict, shape: str, device: torch.device, repeats: int, bucket_mb: float) -> None:
    from npo_engine.rollout.embedded import EmbeddedEngine
    from npo_engine.sync import SyncSettings, WeightSync, iter_full_weights

    engine_dtype = torch.bfloat16
    trainer = make_model(shape, device, torch.float32)  # fp32 master weights, as the trainer keeps them
    engine = EmbeddedEngine(make_model(shape, device, engine_dtype), eos_token_id=1, pad_token_id=0)
    from npo_engine.sync.plan import unique_state
    nbytes = sum(t.numel() * 2 for _, t in unique_state(trainer))  # a tied pair counts once
    log(report, "shape", shape)
    log(report, "engine_bytes", nbytes)
    log(report, "gpu_memory_allocated_gb", round(torch.cuda.memory_allocated(device) / 1e9, 2)
        if device.type == "cuda" else None)

    syncs = {v: WeightSync(engine, "policy", dtype=engine_dtype,
                           config=SyncSettings(bucket_mb=bucket_mb, verify=v, probe_every=0)) for v in (False, True)}

    def bucketed(verify):
        def run():
            sync_now(device)
            start = time.perf_counter()
            syncs[verify].push(trainer, step=0)
            sync_now(device)
            return time.perf_counter() - start
        return run

    def per_param():
        sync_now(device)
        start = time.perf_counter()
        for name, tensor in iter_full_weights(trainer, engine_dtype):
            engine.update_weights([(name, tensor)])
        sync_now(device)
        return time.perf_counter() - start

    runners = {"bucketed_noverify": bucketed(False), "bucketed": bucketed(True), "per_param": per_param}
    times = {k: [] for k in runners}
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(repeats):
        for key, fn in runners.items():
            times[key].append(fn())
    for key, values in times.items():
        log(report, f"{key}_s", round(statistics.median(values), 4))
        log(report, f"{key}_all_s", [round(v, 4) for v in values])
    log(report, "buckets", len(syncs[True].plan.buckets))
    log(report, "bucketed_gb_per_s", round(nbytes / report["bucketed_s"] / 1e9, 1))
    log(report, "fingerprint_overhead_pct", round(100 * (report["bucketed_s"] / report["bucketed_noverify_s"] - 1), 1))
    state = engine.model.state_dict()
    exact = all(torch.equal(state[k], v.to(engine_dtype)) for k, v in trainer.state_dict().items())
    log(report, "engine_equals_trainer_cast", exact)
    log(report, "goal_7b_le_0.5s", report["bucketed_s"] <= 0.5 if shape == "7b" else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="gpu")
    args = parser.parse_args()
    from npo_engine.config import SyncConfig
    from npo_engine.sync import ops

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    log(report, "device", torch.cuda.get_device_name() if device.type == "cuda" else "CPU (no CUDA)")
    log(report, "torch", torch.__version__)
    start = time.perf_counter()
    kernels = ops.get()
    log(report, "csrc_build_s", round(time.perf_counter() - start, 1))
    log(report, "ops", kernels.name)
    log(report, "cuda_kernels_built", ops.has_cuda_kernels())
    log(report, "build_notes", ops.build_notes())
    for name, part in (("fingerprints", lambda: check_fingerprints(report, device)),
                       ("sync", lambda: bench_7b(report, args.shape, device, args.repeats,
                                                 args.bucket_mb or SyncConfig().bucket_mb))):
        try:
            part()
        except Exception as exc:  # report and go on: the other part may still run
            log(report, f"{name}_error", f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
    path = args.out / f"{args.tag}_sync.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
