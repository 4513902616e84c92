"""Accuracy of a model on the built-in arithmetic task, per difficulty level: pass@1 at temperature 1 and
greedy. Used to check the demo's headroom (the base model should solve 5-40% of the RL prompts).

    python -m benchmarks.demo_task                       # the built-in demo model (built if missing)
    python -m benchmarks.demo_task runs/demo/exports/step_000300
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from npo_engine.config import ModelConfig
from npo_engine.data.synthetic import LEVELS, arithmetic_problems
from npo_engine.models import ensure_demo_model, load_causal_lm, load_tokenizer
from npo_engine.rewards.verifiers import exact_match
from npo_engine.rollout.base import SamplingParams
from npo_engine.rollout.embedded import EmbeddedEngine


def accuracy(engine: EmbeddedEngine, tokenizer, records, temperature: float, seed: int = 0) -> float:
    prompts = [tokenizer(r.prompt)["input_ids"] for r in records]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=temperature, seed=seed))
    completions = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out.token_ids]
    return sum(exact_match(r.prompt, c, r.answer) for r, c in zip(records, completions)) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="HF model directory (default: the built-in demo model)")
    parser.add_argument("--per-level", type=int, default=400, help="problems per level (level 1 has fewer)")
    parser.add_argument("--split", choices=["train", "eval"], default="train")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = Path(args.model) if args.model else ensure_demo_model(ModelConfig())
    tokenizer = load_tokenizer(path)
    engine = EmbeddedEngine(load_causal_lm(path), eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    rows = {}
    for level in LEVELS:
        count = min(args.per_level, 150 if args.split == "train" else 15) if level == 1 else args.per_level
        records = arithmetic_problems(args.split, count, levels=(level,), seed=99)
        rows[level] = {"pass@1_T1": accuracy(engine, tokenizer, records, 1.0),
                       "greedy": accuracy(engine, tokenizer, records, 0.0), "problems": count}
    mix = arithmetic_problems(args.split, 5 * args.per_level, seed=98)
    rows["mix"] = {"pass@1_T1": accuracy(engine, tokenizer, mix, 1.0), "greedy": accuracy(engine, tokenizer, mix, 0.0),
                   "problems": len(mix)}
    print(f"model: {path}\n{'level':>6} {'pass@1 (T=1)':>13} {'greedy':>8} {'problems':>9}")
    for level, row in rows.items():
        print(f"{level!s:>6} {row['pass@1_T1']:>13.3f} {row['greedy']:>8.3f} {row['problems']:>9}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(path), "split": args.split, "levels": rows}, indent=2))


if __name__ == "__main__":
    main()
