"""One GRPO step, this engine vs TRL's `GRPOTrainer`, on the same workload, in the same job.

    python -m benchmarks.e2e                                   # both shapes; writes benchmarks/results/cpu_e2e_grpo.*
    python -m benchmarks.e2e --shapes vocab50 --steps 6 --no-write

Workload (`workload.py`): a random-init 4-layer Qwen2 (hidden 256), vocabulary 50 or 151936, prompts
"a+b=", 16 prompts x 8 completions of exactly 32 tokens, one optimizer update per step, no KL, no vLLM.

How it is measured:
- Each engine runs in its own process (`run_npo.py` here, `run_trl.py` in TRL's environment), so each has its
  own peak-memory reading, and both stay alive for the whole shape. The driver tells one of them at a time to
  take one optimizer step, alternating (TRL first on odd steps, this engine first on even ones), so load from
  other jobs on a shared machine hits both alike and they never compete for the cores.
- Seconds per step: wall clock of one optimizer step; the median over steps 3..N (steps 1-2 are warm-up:
  allocator, lazy initialisation). Generated tokens per second: 128 x 32 tokens over that median.
- Peak memory: each process's resident high-water mark (VmHWM) over the steps (`_proc.py`).
- `--concurrent` (for a dedicated machine with cores to spare): both take each step at the same time, on
  their own threads; they still share the memory bandwidth, which the table's note then says.
- Same micro-batch on both sides (`--micro-batch`, default 32: 4 backward passes per update).
- Activation checkpointing: each engine's default (TRL's `GRPOConfig` turns it on, this engine leaves it off),
  or `--checkpointing on|off` for both alike.

TRL runs from a separate virtual environment, never the system one:
    python3.11 -m venv /work/venvs/trl && /work/venvs/trl/bin/pip install torch==2.13.0 trl \\
        && /work/venvs/trl/bin/pip install -e .        # or: pip install -e ".[bench]" inside that venv
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from benchmarks.e2e import _proc
from benchmarks.e2e.workload import SHAPES, build
from benchmarks._machine import cpu_name

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
NEW_TOKENS, BATCH = 32, 16 * 8




class Worker:
    """One engine's worker process, spoken to over its stdin/stdout (protocol in `_proc.py`)."""

    def __init__(self, name: str, python: str, module: str, model_dir: Path, args, work: Path):
        self.name = name
        self.log_path = work / f"{name}.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   OMP_NUM_THREADS=str(args.threads))
        command = [python, "-m", module, str(model_dir), "--threads", str(args.threads), "--steps",
                   str(args.steps), "--micro-batch", str(args.micro_batch), "--run-dir", str(work / f"run_{name}"),
                   "--checkpointing", args.checkpointing]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1)
        self.ready = self.receive("ready")

    def receive(self, event: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_proc.MARK):
                record = json.loads(line[len(_proc.MARK):])
                if record["event"] != event:
                    raise RuntimeError(f"{self.name}: expected {event!r}, got {record}")
                return record
        raise RuntimeError(f"{self.name} exited (code {self.proc.wait()}); see {self.log_path}:\n"
                           + self.log_path.read_text()[-3000:])

    def start_step(self) -> None:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()

    def step(self) -> dict:
        self.start_step()
        return self.receive("step")

    def finish(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        done = self.receive("done")
        self.proc.wait(timeout=120)
        self.log.close()
        return done


def run_shape(shape: str, args, work: Path) -> dict:
    model_dir = build(shape, work / "models")
    print(f"[{shape}] model and tokenizer in {model_dir}; starting both workers", flush=True)
    workers = {
        "trl": Worker("trl", args.trl_python, "benchmarks.e2e.run_trl", model_dir, args, work / shape),
        "npo_engine": Worker("npo_engine", sys.executable, "benchmarks.e2e.run_npo", model_dir, args, work / shape),
    } if (work / shape).mkdir(parents=True, exist_ok=True) is None else {}
    steps: dict[str, list[dict]] = {name: [] for name in workers}
    for step in range(1, args.steps + 1):
        order = ["trl", "npo_engine"] if step % 2 else ["npo_engine", "trl"]
        if args.concurrent:
            for name in order:
                workers[name].start_step()
            for name in order:
                steps[name].append(workers[name].receive("step"))
        else:
            for name in order:
                steps[name].append(workers[name].step())
        print(f"[{shape}] step {step}/{args.steps}: " + " | ".join(
            f"{name} {steps[name][-1]['seconds']:.2f} s" for name in ("trl", "npo_engine")), flush=True)
    done = {name: w.finish() for name, w in workers.items()}

    out = {}
    for name, w in workers.items():
        timed = steps[name][2:]  # steps 3..N
        seconds = [s["seconds"] for s in timed]
        median = statistics.median(seconds)
        phases = {}
        for key in timed[0]["phases"]:
            phases[key] = statistics.median(s["phases"][key] for s in timed)
        out[name] = {
            "ready": w.ready,
            "seconds_per_step_median": median,
            "seconds_per_step": [s["seconds"] for s in steps[name]],
            "tokens_per_step": timed[0]["tokens"],
            "tokens_per_s": timed[0]["tokens"] / median,
            "peak_rss_bytes": done[name]["peak_rss_bytes"],
            "peak_since": done[name].get("peak_since"),
            "rss_after_setup_bytes": w.ready["rss_bytes"],
            "phase_medians_s": phases,
        }
    out["speedup"] = out["trl"]["seconds_per_step_median"] / out["npo_engine"]["seconds_per_step_median"]
    out["pair_speedups"] = [t / n for t, n in zip(out["trl"]["seconds_per_step"][2:],
                                                  out["npo_engine"]["seconds_per_step"][2:])]
    out["memory_ratio"] = out["npo_engine"]["peak_rss_bytes"] / out["trl"]["peak_rss_bytes"]
    return out


def table(results: dict, meta: dict) -> str:
    lines = [
        "| shape | engine | s/step (median, steps 3..N) | min-max | generated tokens/s | peak RSS | speed-up vs TRL | peak memory vs TRL |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, r in results.items():
        for name in ("trl", "npo_engine"):
            e = r[name]
            label = f"TRL {meta['trl']}" if name == "trl" else "npo_engine"
            sec = e["seconds_per_step"][2:]
            speed = "1×" if name == "trl" else f"**{r['speedup']:.2f}×**"
            mem = "1×" if name == "trl" else f"**{r['memory_ratio']:.2f}×**"
            lines.append(f"| {shape} | {label} | {e['seconds_per_step_median']:.2f} s | {min(sec):.2f}-{max(sec):.2f} "
                         f"| {e['tokens_per_s']:.0f} | {e['peak_rss_bytes'] / 2**20:.0f} MiB | {speed} | {mem} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per engine (the first 2 are warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of each engine")
    parser.add_argument("--micro-batch", type=int, default=32, help="rows per forward/backward, both engines")
    parser.add_argument("--trl-python", default="/work/venvs/trl/bin/python",
                        help="python of the environment with TRL installed")
    parser.add_argument("--work-dir", default=None, help="models and run directories (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="print only; keep the committed results")
    parser.add_argument("--concurrent", action="store_true",
                        help="both engines take each step at the same time (a machine with idle cores to spare: "
                             "halves the wall time; they share memory bandwidth) instead of alternating")
    parser.add_argument("--checkpointing", choices=["default", "on", "off"], default="default",
                        help="activation checkpointing of both engines: each one's default (TRL's GRPOConfig: on; "
                             "this engine: off), or on / off for both")
    parser.add_argument("--prefix", default="cpu", help="results go to benchmarks/results/PREFIX_e2e_grpo.{json,md}")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3 (steps 1-2 are warm-up)")
    versions = subprocess.run([args.trl_python, "-c", "import trl, transformers, torch; "
                               "print(trl.__version__, transformers.__version__, torch.__version__)"],
                              capture_output=True, text=True, check=True).stdout.split()
    meta = {"machine": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": versions[0],
            "trl_env": {"transformers": versions[1], "torch": versions[2]}, "steps": args.steps,
            "micro_batch": args.micro_batch, "concurrent": args.concurrent, "checkpointing": args.checkpointing, "command": "python -m benchmarks.e2e " + " ".join(sys.argv[1:])}
    print(f"e2e GRPO step: npo_engine vs TRL {meta['trl']} ({meta['machine']}, {args.threads} threads each, "
          f"{args.steps} alternating steps per shape)", flush=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="npo_e2e_"))
    started = time.time()
    results = {shape: run_shape(shape, args, work) for shape in args.shapes.split(",")}
    text = table(results, meta)
    print("\n" + text + f"\n\n({time.time() - started:.0f} s in all)")
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.prefix}_e2e_grpo.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        profile = "\n".join(
            f"- {shape}, npo_engine phase medians: "
            + ", ".join(f"{k.removeprefix('time/')} {v:.2f} s" for k, v in r["npo_engine"]["phase_medians_s"].items())
            for shape, r in results.items())
        (RESULTS / f"{args.prefix}_e2e_grpo.md").write_text(
            "# One GRPO step: npo_engine vs TRL GRPOTrainer (CPU)\n\n"
            f"Machine: {meta['machine']}, {meta['cores']} cores, {args.threads} torch threads per engine; "
            f"Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}; "
            f"TRL {meta['trl']} (its venv: transformers {versions[1]}, torch {versions[2]}).\n"
            f"Workload: random-init 4-layer Qwen2 (hidden 256, intermediate 768, 4 heads of 64, 2 KV heads, tied "
            f"embeddings, fp32), 16 prompts x 8 completions of exactly 32 tokens, one optimizer update per step, "
            f"micro-batch {args.micro_batch} on both, no KL, no vLLM; activation checkpointing: "
            + {"default": "each engine's default (TRL's GRPOConfig: on, this engine: off)",
               "on": "on in both", "off": "off in both"}[args.checkpointing]
            + f"; {args.steps} steps each, "
            + ("both engines stepping at the same time on their own cores" if args.concurrent
               else "alternating step by step") + f", medians of steps 3..{args.steps}. Peak memory: each process's VmHWM over the steps.\n\n"
            f"Command: `{meta['command']}`\n\n{text}\n\n{profile}\n")


if __name__ == "__main__":
    main()
