"""What NPO costs on top of GRPO, side by side in one process on the demo model and task:

1. a step on the cache-hit path (a replay window whose cache covers every prompt) against a GRPO step of the
   same shape, alternating one step of each, median over the measured steps;
2. a rollback (`Trainer.restore(t, rollback=True)`) against its parts measured alone: a checkpoint load and
   one weight sync into the policy engine;
3. cache building, one batched generate of k_guide samples for every prompt of the window, as sequences per
   second next to the rollout phase of a training step.

    python -m benchmarks.bench_npo                     # writes benchmarks/results/cpu_npo_cost.{json,md}
    python -m benchmarks.bench_npo --steps 6 --no-write
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from npo_engine import Trainer, load_config
from npo_engine.guides import build_guide_cache
from npo_engine.sync import push_weights
from benchmarks._machine import cpu_name

_RESULTS = Path(__file__).parent / "results"


def _trainers(workdir: Path, prompts: int, window: int) -> tuple[Trainer, Trainer]:
    common = [f"data.prompts_per_step={prompts}", "logging.progress=false", "data.eval_size=0",
              f"run.steps={window + 1}"]
    grpo = Trainer(load_config(None, common), run_dir=workdir / "grpo")
    npo = Trainer(load_config(None, [*common, "mix.mode=npo", f"npo.early_steps={window}"]),
                  run_dir=workdir / "npo")
    return grpo, npo




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="steps of each kind in the window (median over them)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per step (the demo's 64)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        grpo, npo = _trainers(Path(tmp), args.prompts, args.steps)
        window = range(0, args.steps)

        # The guide: the base weights themselves (only the cost is measured here); the real path builds it.
        npo.state.interventions = [{"name": "bench", "start": 0, "length": args.steps, "phase": "ahead"}]
        npo.sync_guide_engine()
        start = time.perf_counter()
        prompts = list({r.id: r for step in window for r in npo.prompts_of_step(step)}.values())
        cache, stats = build_guide_cache(npo, "bench", prompts, guide_step=args.steps, window=window)
        cache_seconds = time.perf_counter() - start
        npo.mixer._caches["bench"] = cache
        npo.state.interventions[0]["phase"] = "replay"
        sequences = stats["prompts"] * npo.cfg.npo.k_guide

        grpo_times, npo_times, rollout_times, slots = [], [], [], []
        for _ in window:  # alternate, so load from other jobs hits both alike
            for trainer, times in ((grpo, grpo_times), (npo, npo_times)):
                begin = time.perf_counter()
                metrics = trainer.step()
                times.append(time.perf_counter() - begin)
                if trainer is grpo:
                    rollout_times.append(metrics["time/rollout"])
                else:
                    slots.append(metrics["guide/slots"])
        measured = slice(2, None)  # the first steps warm up allocators and caches
        grpo_median = statistics.median(grpo_times[measured])
        npo_median = statistics.median(npo_times[measured])

        # Rollback against its parts: one checkpoint load and one weight sync, each timed alone.
        target = npo.state.step
        npo.save_checkpoint()
        npo.step()
        rollbacks, loads, syncs = [], [], []
        for i in range(6):  # alternating which goes first, so the file cache favours neither
            def parts() -> None:
                begin = time.perf_counter()
                npo.checkpoints.load(npo.checkpoints.path_for(target), npo.policy, npo.optimizer,
                                     scheduler=npo.scheduler)
                loads.append(time.perf_counter() - begin)
                syncs.append(push_weights(npo.policy.lm, npo.engine, dtype=npo.engine_dtype)["time/sync"])

            if i % 2:
                parts()
            rollbacks.append(npo.restore(target, rollback=True)["time/restore"])
            if not i % 2:
                parts()
        grpo.close()
        npo.close()

    rollout_sequences = args.prompts * grpo.cfg.rollout.group_size
    result = {
        "machine": cpu_name(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "prompts_per_step": args.prompts, "steps": args.steps,
        "grpo_step_s_median": grpo_median, "npo_step_s_median": npo_median,
        "npo_over_grpo": npo_median / grpo_median, "guide_slots_per_step_mean": statistics.mean(slots),
        "restore_s_median": statistics.median(rollbacks), "load_s_median": statistics.median(loads),
        "sync_s_median": statistics.median(syncs),
        "restore_over_load_plus_sync": statistics.median(rollbacks) / (statistics.median(loads)
                                                                       + statistics.median(syncs)),
        "cache_build_s": cache_seconds, "cache_sequences": sequences, "cache_entries": stats["entries"],
        "cache_sequences_per_s": sequences / cache_seconds,
        "rollout_sequences_per_s": rollout_sequences / statistics.median(rollout_times),
    }
    table = "\n".join([
        "| what | value |", "|---|---|",
        f"| NPO step on the cache-hit path / GRPO step (median of steps 3..{args.steps}) | "
        f"{result['npo_over_grpo']:.3f} ({npo_median:.3f} s vs {grpo_median:.3f} s; "
        f"{result['guide_slots_per_step_mean']:.1f} guide slots per step) |",
        f"| rollback (restore) / (checkpoint load + weight sync, each alone) | "
        f"{result['restore_over_load_plus_sync']:.2f} |",
        f"| cache building, sequences per second / rollout phase's | "
        f"{result['cache_sequences_per_s'] / result['rollout_sequences_per_s']:.2f} "
        f"({sequences} sequences in one batched generate) |",
    ])
    print(json.dumps(result, indent=1))
    print(table)
    if not args.no_write:
        (_RESULTS / "cpu_npo_cost.json").write_text(json.dumps(result, indent=1) + "\n")
        (_RESULTS / "cpu_npo_cost.md").write_text(
            f"# NPO's cost over GRPO (CPU, ratios)\n\n`python -m benchmarks.bench_npo` on {result['machine']}, "
            f"torch {result['torch']}, {result['threads']} thread(s), demo model, {args.prompts} prompts x 8.\n\n"
            + table + "\n")


if __name__ == "__main__":
    main()
