"""Worker: TRL's `GRPOTrainer` on the e2e workload, one optimizer step per "step" command (see `_proc.py`).
Runs in a separate environment with TRL installed (`/work/venvs/trl`, see `__main__.py`).

    /work/venvs/trl/bin/python -m benchmarks.e2e.run_trl MODEL_DIR --threads 2 --steps 10 --micro-batch 16 ...

Configuration: no vLLM, no KL (beta 0, no reference model), 16 prompts x 8 generations per optimizer step
(`per_device_train_batch_size * gradient_accumulation_steps = 128`, one generation per optimizer step, so no
old-log-prob forward), exactly 32 new tokens (EOS is never sampled), temperature 1, no top-k / top-p.
A step is timed from the trainer's `on_step_begin` callback to its `on_step_end`: generation, rewards,
advantages, the log-prob forwards, backward and the optimizer update.
"""

from __future__ import annotations

import time

import torch

from benchmarks.e2e import _proc
from benchmarks.e2e.workload import read_problems


def main() -> None:
    args = _proc.worker_args()

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from npo_engine.rewards.verifiers import exact_match

    def reward(prompts, completions, answer, **_):
        return [exact_match(p, c, a) for p, c, a in zip(prompts, completions, answer)]

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    rows = read_problems(__import__("pathlib").Path(args.model_dir))
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    batch = 16 * 8
    config = GRPOConfig(
        output_dir=args.run_dir,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=batch // args.micro_batch,
        num_generations=8,
        max_completion_length=32,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        learning_rate=1e-6,
        max_steps=args.steps,
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # GRPOConfig's own default is on; the driver may set it for both engines
        **({} if args.checkpointing == "default" else {"gradient_checkpointing": args.checkpointing == "on"}),
    )

    class Stepper(TrainerCallback):
        """Waits for the driver's command before each optimizer step and reports after it."""

        def __init__(self):
            self.start = 0.0
            self.tokens = 0.0

        def on_step_begin(self, args_, state, control, **kwargs):
            if _proc.wait_command() != "step":
                _proc.send(event="done", peak_rss_bytes=_proc.status_bytes("VmHWM"), peak_since=peak_since)
                raise SystemExit(0)
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            seconds = time.perf_counter() - self.start
            _proc.send(event="step", seconds=seconds, tokens=float(batch * 32), phases={},
                       rss_bytes=_proc.status_bytes("VmRSS"))

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Stepper()])
    gen = trainer.generation_config
    if gen.top_k not in (0, None) or gen.top_p != 1.0 or gen.temperature != 1.0 or gen.max_new_tokens != 32:
        raise RuntimeError(f"unexpected TRL generation config: {gen}")
    _proc.send(event="ready", engine="trl", version=trl.__version__, transformers=transformers.__version__,
               torch=torch.__version__, threads=torch.get_num_threads(), rss_bytes=_proc.status_bytes("VmRSS"))
    peak_since = _proc.reset_peak()
    trainer.train()
    if _proc.wait_command() == "step":
        raise RuntimeError("TRL finished its max_steps before the driver's last step")
    # Every completion must have had exactly 32 tokens (EOS is never sampled), as on the other side.
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    if not lengths or any(abs(n - 32) > 1e-6 for n in lengths):
        raise RuntimeError(f"TRL completions were not all 32 tokens long: mean lengths {lengths}")
    _proc.send(event="done", peak_rss_bytes=_proc.status_bytes("VmHWM"), peak_since=peak_since)


if __name__ == "__main__":
    main()
