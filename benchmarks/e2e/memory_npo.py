"""Where this engine's memory goes on the e2e workload: resident memory after the imports and after setup, and
the peak (VmHWM, reset before each phase) of the rollout and of the update in each step, at one shape.

    python -m benchmarks.e2e.memory_npo --shape vocab151936 --threads 1 --steps 2

Linux only (VmHWM is reset through /proc/self/clear_refs). Each line is one process's view, so a figure here
compares with the e2e table's peak RSS, which is the same process's VmHWM over all its steps.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.e2e import _proc

MIB = 2**20


def resident_mib(key: str = "VmRSS") -> float:
    return _proc.status_bytes(key) / MIB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=["vocab50", "vocab151936"], default="vocab151936")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=None, help="models and run directory (default: temp)")
    args = parser.parse_args()
    print(f"python + torch: {resident_mib():.0f} MiB", flush=True)

    import torch
    import transformers  # noqa: F401  (counted with the engine's own imports)

    from benchmarks.e2e.run_npo import npo_overrides
    from benchmarks.e2e.workload import build
    from npo_engine import Trainer, load_config

    torch.set_num_threads(args.threads)
    print(f"+ transformers, npo_engine: {resident_mib():.0f} MiB", flush=True)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="npo_e2e_memory_"))
    model_dir = build(args.shape, work / "models")
    cfg = load_config(None, npo_overrides(str(model_dir), args.threads, args.steps, args.micro_batch))
    trainer = Trainer(cfg, run_dir=work / "run", overwrite=True)
    print(f"after setup: {resident_mib():.0f} MiB (setup's peak {resident_mib('VmHWM'):.0f} MiB)", flush=True)

    def measured(name, phase):
        def run(*a, **k):
            before = resident_mib()
            _proc.reset_peak()
            out = phase(*a, **k)
            print(f"  {name}: {before:.0f} MiB before, peak {resident_mib('VmHWM'):.0f} MiB, "
                  f"{resident_mib():.0f} MiB after", flush=True)
            return out
        return run

    trainer.rollout = measured("rollout", trainer.rollout)
    trainer.update = measured("update", trainer.update)
    for step in range(args.steps):
        trainer.step()
        print(f"step {step + 1}: {resident_mib():.0f} MiB resident", flush=True)
    trainer.close()


if __name__ == "__main__":
    main()
