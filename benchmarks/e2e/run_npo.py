"""Worker: this engine's `Trainer` on the e2e workload, one optimizer step per "step" command (see `_proc.py`).

    python -m benchmarks.e2e.run_npo MODEL_DIR --threads 2 --steps 10 --micro-batch 16 --run-dir DIR
"""

from __future__ import annotations

import time

import torch

from benchmarks.e2e import _proc


def npo_overrides(model_dir: str, threads: int, steps: int, micro_batch: int) -> list[str]:
    """The e2e workload as config overrides of this engine's `Trainer`."""
    return [
        f"model.path={model_dir}",
        "data.source=files",
        f"data.train_files=[{model_dir}/prompts.jsonl]",
        "data.eval_size=0",
        "data.prompts_per_step=16",
        "rollout.group_size=8",
        "rollout.max_new_tokens=32",
        "rollout.temperature=1.0",
        # The engine's own log-probs as the behaviour policy, as TRL uses the generating policy's (no second
        # forward to recompute them when each generation feeds one optimizer step).
        "rollout.behavior_logp=engine",
        "reward.verifier=exact_match",
        "algo.kl_coef=0.0",
        # The random model scores 0 everywhere, so every row has zero advantage and this engine would skip every
        # backward; the comparison is of the full step's work, as TRL does it.
        "optim.skip_zero_advantage=false",
        "optim.mini_batches=1",
        "optim.epochs=1",
        f"optim.micro_batch_size={micro_batch}",
        "optim.lr=1e-6",
        "optim.warmup_steps=0",
        f"run.steps={steps}",
        f"run.cpu_threads={threads}",
        "checkpoint.every=0",
        "checkpoint.export_final=false",
        "logging.progress=false",
        "logging.eval_every=0",
    ]


def main() -> None:
    args = _proc.worker_args()

    import npo_engine
    from npo_engine import Trainer, load_config

    overrides = npo_overrides(args.model_dir, args.threads, args.steps, args.micro_batch)
    if args.checkpointing != "default":
        overrides.append(f"model.activation_checkpointing={str(args.checkpointing == 'on').lower()}")
    trainer = Trainer(load_config(None, overrides), run_dir=args.run_dir, overwrite=True)
    _proc.send(event="ready", engine="npo_engine", version=getattr(npo_engine, "__version__", "?"),
               torch=torch.__version__, threads=torch.get_num_threads(), rss_bytes=_proc.status_bytes("VmRSS"))
    peak_since = _proc.reset_peak()
    while _proc.wait_command() == "step":
        start = time.perf_counter()
        metrics = trainer.step()
        seconds = time.perf_counter() - start
        phases = {k: float(v) for k, v in metrics.items() if k.startswith("time/")}
        _proc.send(event="step", seconds=seconds, tokens=float(metrics["rollout/tokens"]), phases=phases,
                   rss_bytes=_proc.status_bytes("VmRSS"))
    _proc.send(event="done", peak_rss_bytes=_proc.status_bytes("VmHWM"), peak_since=peak_since)
    trainer.close()


if __name__ == "__main__":
    main()
