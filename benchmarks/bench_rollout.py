"""Rollout throughput: the embedded engine against Hugging Face `model.generate`, same model, same job.

Both sides sample B sequences of exactly T new tokens from the demo architecture (random init, fp32, CPU) at
temperature 1 with no truncation, and both end with per-token behaviour log-probs: the engine returns them,
and the baseline computes them from `output_logits` (`log_softmax(logits.float())[token]`), as a trainer using
`generate` would. EOS is an id outside the vocabulary, so no sequence stops early on either side.

Runs alternate (baseline, engine, baseline, ...) after one warm-up each, so load from other jobs on a shared
machine hits both alike. The speed-up is the median over run pairs of engine / baseline wall-clock throughput;
the table also gives each side's median throughput, and throughput per second of this process's CPU time, a
check less sensitive to that load. The default of one intra-op thread keeps a 2-core shared box from
oversubscription, which makes multi-threaded timings swing by several times; `--threads` changes it.

    python -m benchmarks.bench_rollout                  # writes benchmarks/results/cpu_rollout.{json,txt}
    python -m benchmarks.bench_rollout --repeats 3 --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen2ForCausalLM

from npo_engine.models import build_demo_tokenizer, demo_model_config
from npo_engine.rollout.base import SamplingParams
from npo_engine.rollout.embedded import EmbeddedEngine

_RESULTS = Path(__file__).parent / "results"


def make_prompts(tokenizer, num: int, *, min_len: int = 10, max_len: int = 20, seed: int = 0):
    """`num` random digit strings of min_len..max_len characters as token ids (one token per digit)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(num):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        digits = "".join(str(int(d)) for d in torch.randint(0, 10, (length,), generator=gen))
        prompts.append(tokenizer(digits, add_special_tokens=False)["input_ids"])
    return prompts


def hf_generate(model, prompts: list[list[int]], *, new_tokens: int, pad_id: int, eos_id: int) -> int:
    """The baseline: left-padded `model.generate`, then behaviour log-probs from its logits. Returns #tokens."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention_mask = (input_ids != pad_id).long()  # digits never equal the pad id
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    completion = out.sequences[:, width:]  # (B, T)
    logits = torch.stack(out.logits, dim=1).float()  # (B, T, V)
    logp = torch.log_softmax(logits, dim=-1).gather(2, completion[..., None]).squeeze(2)  # (B, T)
    if completion.shape[1] != new_tokens or not torch.isfinite(logp).all():
        raise RuntimeError(f"baseline produced {tuple(completion.shape)} tokens or non-finite log-probs")
    return completion.numel()


def engine_generate(engine: EmbeddedEngine, prompts: list[list[int]], *, new_tokens: int) -> int:
    out = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=1.0))
    if any(len(t) != new_tokens for t in out.token_ids):
        raise RuntimeError("engine stopped a sequence early; the throughput comparison needs equal lengths")
    return sum(len(t) for t in out.token_ids)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides")
    parser.add_argument("--no-write", action="store_true", help="print only; keep the committed results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = build_demo_tokenizer()
    vocab = len(tokenizer)
    model = Qwen2ForCausalLM(demo_model_config(vocab)).eval()
    engine = EmbeddedEngine(copy.deepcopy(model), eos_token_id=vocab, pad_token_id=tokenizer.pad_token_id)
    prompts = make_prompts(tokenizer, args.sequences)
    sides = {
        "hf_generate": lambda: hf_generate(
            model, prompts, new_tokens=args.new_tokens, pad_id=tokenizer.pad_token_id, eos_id=vocab
        ),
        "embedded": lambda: engine_generate(engine, prompts, new_tokens=args.new_tokens),
    }

    rates: dict[str, list[float]] = {name: [] for name in sides}  # generated tokens per wall-clock second
    cpu_rates: dict[str, list[float]] = {name: [] for name in sides}  # ... per second of this process's CPU
    with torch.inference_mode():
        for run in sides.values():  # warm-up: allocator, lazy imports
            run()
        for _ in range(args.repeats):
            for name, run in sides.items():
                wall, cpu = time.perf_counter(), time.process_time()
                tokens = run()
                rates[name].append(tokens / (time.perf_counter() - wall))
                cpu_rates[name].append(tokens / (time.process_time() - cpu))

    medians = {name: statistics.median(r) for name, r in rates.items()}
    cpu_medians = {name: statistics.median(r) for name, r in cpu_rates.items()}
    # The speed-up is the median over runs of (engine run / the baseline run just before it): neighbours share
    # the machine's load of the moment, so a load swing mid-benchmark moves both and cancels.
    pair_ratios = [e / h for e, h in zip(rates["embedded"], rates["hf_generate"])]
    cpu_pair_ratios = [e / h for e, h in zip(cpu_rates["embedded"], cpu_rates["hf_generate"])]
    speedup, cpu_speedup = statistics.median(pair_ratios), statistics.median(cpu_pair_ratios)
    ratio_of_medians = medians["embedded"] / medians["hf_generate"]
    header = (
        f"rollout throughput: {args.sequences} sequences x {args.new_tokens} new tokens, demo Qwen2 "
        f"(vocab {vocab}, random init, fp32), prompts 10-20 tokens\n"
        f"machine: {cpu_name()}, {args.threads} torch thread(s); torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {args.repeats} alternating runs per side"
    )
    rows = [f"{'side':<14}{'tokens/s (median)':>20}{'min':>10}{'max':>10}{'tokens/CPU-s (median)':>24}"]
    for name, r in rates.items():
        cpu = cpu_medians[name]
        rows.append(f"{name:<14}{medians[name]:>20.0f}{min(r):>10.0f}{max(r):>10.0f}{cpu:>24.0f}")
    rows.append(
        f"speed-up embedded / hf_generate, median of run pairs: {speedup:.2f}x wall-clock "
        f"(pairs range {min(pair_ratios):.2f}-{max(pair_ratios):.2f}), {cpu_speedup:.2f}x per CPU-second"
    )
    rows.append(f"ratio of the median throughputs: {ratio_of_medians:.2f}x wall-clock")
    text = header + "\n\n" + "\n".join(rows) + "\n"
    print(text)

    if not args.no_write:
        _RESULTS.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "rollout_throughput",
            "machine": cpu_name(),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sequences": args.sequences,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "speedup_wall": speedup,
            "speedup_cpu": cpu_speedup,
            "ratio_of_median_throughputs": ratio_of_medians,
            "median_tokens_per_s": medians,
            "median_tokens_per_cpu_s": cpu_medians,
            "tokens_per_s": rates,
            "tokens_per_cpu_s": cpu_rates,
            "pair_ratios_wall": pair_ratios,
            "pair_ratios_cpu": cpu_pair_ratios,
        }
        (_RESULTS / "cpu_rollout.json").write_text(json.dumps(record, indent=2) + "\n")
        (_RESULTS / "cpu_rollout.txt").write_text(text)


if __name__ == "__main__":
    main()
