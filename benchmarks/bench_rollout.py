"""Rollout throughput: the embedded engine against Hugging Face `model.generate`, same model, same job.

Workload: that of the e2e GRPO benchmark (`benchmarks/e2e/workload.py`): a random-init 4-layer Qwen2
(hidden 256), vocabulary 50 or 151936 (`--shape`), 16 prompts "a+b=" x 8 copies = 128 sequences of exactly
32 new tokens. Both sides sample at temperature 1 with no truncation, and both end with per-token behaviour
log-probs: the engine returns them, and the baseline computes them from `output_logits`
(`log_softmax(logits.float())[token]`), as a trainer using `generate` would. EOS is an id outside the
vocabulary, so no sequence stops early on either side.

The LM-head floor is the time of the decode steps' LM-head GEMMs alone (`[B, H] @ [H, V]` into a reused
buffer, once per new token), measured in the same job: at vocabulary 151936 it is most of the arithmetic of a
decode step, so `rollout time / floor` says how much the rest (layers, sampling, bookkeeping) adds.

Runs alternate (baseline, engine, baseline, ...) after one warm-up each, so load from other jobs on a shared
machine hits both alike. The speed-up is the median over run pairs of engine / baseline wall-clock throughput;
the table also gives each side's median throughput, and throughput per second of this process's CPU time, a
check less sensitive to that load. The default of one intra-op thread keeps a 2-core shared box from
oversubscription, which makes multi-threaded timings swing by several times; `--threads` changes it.

    python -m benchmarks.bench_rollout --shape vocab50       # writes benchmarks/results/cpu_rollout_vocab50.*
    python -m benchmarks.bench_rollout --shape vocab151936 --threads 2
    python -m benchmarks.bench_rollout --repeats 3 --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen2ForCausalLM

from benchmarks.e2e.workload import SHAPES, build_tokenizer, model_config, problems
from npo_engine.rollout.base import SamplingParams
from npo_engine.rollout.embedded import EmbeddedEngine
from benchmarks._machine import cpu_name

_RESULTS = Path(__file__).parent / "results"


def make_prompts(tokenizer, num: int, *, group: int = 8):
    """`num // group` e2e prompts ("a+b="), each repeated `group` times (GRPO groups), as token ids."""
    distinct = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in problems(num // group)]
    return [ids for ids in distinct for _ in range(group)]


def lm_head_floor(model, batch: int, new_tokens: int, runs: int = 5) -> tuple[float, float]:
    """Wall-clock and CPU seconds of `new_tokens` LM-head GEMMs [batch, H] @ [H, V] into one reused buffer
    (medians of `runs` runs after one warm-up). On a shared machine the CPU seconds are the steadier floor."""
    weight = model.lm_head.weight.detach()
    hidden = torch.randn(batch, weight.shape[1])
    out = torch.empty(batch, weight.shape[0])
    walls, cpus = [], []
    for _ in range(runs + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):
            torch.mm(hidden, weight.t(), out=out)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls[1:]), statistics.median(cpus[1:])


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




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="vocab50")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides")
    parser.add_argument("--no-write", action="store_true", help="print only; keep the committed results")
    parser.add_argument("--prefix", default="cpu", help="results file prefix (e.g. the machine's name)")
    parser.add_argument("--floor-only", action="store_true", help="time the LM-head floor alone and exit")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = SHAPES[args.shape]
    tokenizer = build_tokenizer(vocab)
    model = Qwen2ForCausalLM(model_config(vocab)).float().eval()
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
    if args.floor_only:
        wall, cpu = lm_head_floor(model, args.sequences, args.new_tokens, runs=args.repeats)
        print(f"LM-head floor ({args.new_tokens} GEMMs [{args.sequences}, H] @ [H, {vocab}], {args.threads} "
              f"thread(s), median of {args.repeats}): {wall:.3f} s wall-clock, {cpu:.3f} CPU-s")
        return
    with torch.inference_mode():
        floor_s, floor_cpu_s = lm_head_floor(model, args.sequences, args.new_tokens)
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
    engine_s = args.sequences * args.new_tokens / medians["embedded"]
    engine_cpu_s = args.sequences * args.new_tokens / cpu_medians["embedded"]
    header = (
        f"rollout throughput: {args.sequences} sequences x {args.new_tokens} new tokens, e2e Qwen2 (4 layers, "
        f"hidden 256, vocab {vocab}, random init, fp32), 16 prompts 'a+b=' x 8\n"
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
    rows.append(f"LM-head floor ({args.new_tokens} GEMMs [{args.sequences}, H] @ [H, {vocab}]): {floor_s:.3f} s, "
                f"{floor_cpu_s:.3f} CPU-s; embedded rollout (median) {engine_s:.3f} s = {engine_s / floor_s:.2f}x "
                f"the floor wall-clock, {engine_cpu_s:.3f} CPU-s = {engine_cpu_s / floor_cpu_s:.2f}x per CPU-second")
    text = header + "\n\n" + "\n".join(rows) + "\n"
    print(text)

    if not args.no_write:
        _RESULTS.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "rollout_throughput",
            "shape": args.shape,
            "vocab": vocab,
            "lm_head_floor_s": floor_s,
            "lm_head_floor_cpu_s": floor_cpu_s,
            "embedded_rollout_cpu_s": engine_cpu_s,
            "embedded_rollout_s": engine_s,
            "command": "python -m benchmarks.bench_rollout " + " ".join(__import__("sys").argv[1:]),
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
        (_RESULTS / f"{args.prefix}_rollout_{args.shape}.json").write_text(json.dumps(record, indent=2) + "\n")
        (_RESULTS / f"{args.prefix}_rollout_{args.shape}.txt").write_text(text)


if __name__ == "__main__":
    main()
