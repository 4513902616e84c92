"""group_advantages on CPU against the simplest correct vectorized PyTorch, call by call in one process.

4096 samples in shuffled groups of 8, GRPO (unbiased std, eps = 1e-6), fp32 rewards; group ids spread out
(large, far apart) or dense (0..G-1, as the trainer numbers its groups). Calls alternate (simple, public,
simple, ...) so that load from other jobs on a shared machine hits both alike; each round reports the median
of 301 calls of each and the median of the per-pair ratios, and three rounds run. `public` is
`npo_kernels.group_advantages(..., mode="grpo")` as a user calls it (argument checks and dispatch included);
`simple` is `simple_torch_advantages` from `test_bench_group_advantages.py` (torch.unique, index_add_).

    python -m benchmarks.bench_group_advantages_cpu          # writes benchmarks/results/cpu_group_advantages_vs_simple.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.test_bench_group_advantages import EPS, make_batch, simple_torch_advantages
from npo_kernels import group_advantages

RESULTS = Path(__file__).parent / "results"


def one_round(ids: str, calls: int) -> dict[str, float]:
    rewards, group_ids, _ = make_batch("cpu", ids)
    torch.testing.assert_close(group_advantages(rewards, group_ids, mode="grpo", eps=EPS),
                               simple_torch_advantages(rewards, group_ids), atol=1e-5, rtol=1e-5)
    sides = {"simple": lambda: simple_torch_advantages(rewards, group_ids),
             "public": lambda: group_advantages(rewards, group_ids, mode="grpo", eps=EPS)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(20):
        for run in sides.values():
            run()
    for _ in range(calls):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    pairs = [s / p for s, p in zip(times["simple"], times["public"])]
    return {"simple_us": statistics.median(times["simple"]) * 1e6,
            "public_us": statistics.median(times["public"]) * 1e6,
            "speedup_pairs": statistics.median(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=301)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from benchmarks._machine import cpu_name

    rows = ["| ids | round | simple (median) | public op (median) | speed-up (median of call pairs) |",
            "|---|---:|---:|---:|---:|"]
    for ids in ("spread", "dense"):
        for k in range(args.rounds):
            r = one_round(ids, args.calls)
            rows.append(f"| {ids} | {k + 1} | {r['simple_us']:.0f} µs | {r['public_us']:.0f} µs "
                        f"| **{r['speedup_pairs']:.2f}×** |")
            print(rows[-1], flush=True)
    text = ("# group_advantages on CPU vs the simplest vectorized PyTorch\n\n"
            f"Machine: {cpu_name()}, {args.threads} torch thread(s), shared with other jobs; torch {torch.__version__}, "
            f"Python {platform.python_version()}. 4096 samples in shuffled groups of 8, GRPO; {args.calls} "
            f"alternating calls of each per round.\n\nCommand: `python -m benchmarks.bench_group_advantages_cpu`\n\n"
            + "\n".join(rows) + "\n")
    print(text)
    if not args.no_write:
        (RESULTS / "cpu_group_advantages_vs_simple.md").write_text(text)


if __name__ == "__main__":
    main()
