"""Shared pieces of the trainer tests: a tiny run config and a dense reward for the random demo model."""

import json
from pathlib import Path

import torch

from npo_engine.config import load_config

HERE = Path(__file__).resolve().parent


def digit_reward(prompt: str, completion: str, answer: str) -> float:
    """Share of the completion's characters that are digits: dense, so even a barely trained model's groups
    have unequal rewards and nonzero advantages."""
    text = completion.strip()
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


def half_flat_reward(prompt: str, completion: str, answer: str) -> float:
    """`digit_reward` for prompts with an odd answer, 0.5 whatever the completion for an even one: the even
    prompts' groups have zero advantage everywhere, the odd ones' nonzero (a mix of both in most steps)."""
    return 0.5 if int(answer) % 2 == 0 else digit_reward(prompt, completion, answer)


def tiny_config(cache_dir: Path, *overrides: str):
    """A few-second run: the demo model after 20 warm-up steps, 4 prompts x 4 samples, dense rewards."""
    return load_config(None, [
        "model.demo_sft_steps=20", f"model.demo_cache_dir={cache_dir}",
        "data.prompts_per_step=4", "data.train_size=64", "data.eval_size=8", "data.levels=[1,2]",
        "rollout.group_size=4", "rollout.max_new_tokens=4",
        "reward.verifier=trainer_helpers:digit_reward", "optim.lr=1e-3", "optim.micro_batch_size=8",
        "logging.progress=false", "logging.eval_every=2", *overrides,
    ])


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    """Every line of a run's JSONL file (metrics by default), strictly parsed."""
    return [json.loads(line) for line in (Path(run_dir) / name).read_text().splitlines()]


def train(cfg, run_dir, **kwargs):
    """A Trainer on `run_dir`, trained to the end; returned for inspection."""
    from npo_engine import Trainer

    trainer = Trainer(cfg, run_dir=run_dir, **kwargs)
    trainer.train()
    return trainer


def record_gradients(trainer) -> list[list[torch.Tensor]]:
    """The gradients AdamW receives, per optimizer update (filled as the trainer steps)."""
    seen: list[list[torch.Tensor]] = []
    step = trainer.optimizer.step

    def recording(*args, **kwargs):
        seen.append([p.grad.detach().clone() for p in trainer.policy.parameters()])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording
    return seen
