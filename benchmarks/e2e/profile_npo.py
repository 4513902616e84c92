"""Where one e2e GRPO step of this engine goes: phase times from the trainer's metrics, and the top operators
of `torch.profiler` over one step (self CPU time), at one shape.

    python -m benchmarks.e2e.profile_npo --shape vocab151936 --threads 2 --steps 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.e2e.run_npo import npo_overrides
from benchmarks.e2e.workload import SHAPES, build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), default="vocab151936")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps before the profiled one")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from npo_engine import Trainer, load_config

    work = Path(tempfile.mkdtemp(prefix="npo_e2e_profile_"))
    model_dir = build(args.shape, work)
    cfg = load_config(None, npo_overrides(str(model_dir), args.threads, args.steps + 1, args.micro_batch))
    trainer = Trainer(cfg, run_dir=work / "run", overwrite=True)
    for step in range(args.steps):
        start = time.perf_counter()
        metrics = trainer.step()
        phases = ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("time/"))
        print(f"step {step + 1}: {time.perf_counter() - start:.3f} s ({phases})", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        metrics = trainer.step()
    print(f"profiled step: {time.perf_counter() - start:.3f} s (with profiler overhead); phases: "
          + ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("time/")))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    trainer.close()


if __name__ == "__main__":
    main()
