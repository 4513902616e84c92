"""One rank of test_vllm_trainer.py's tensor-parallel check, launched by torchrun with 2 processes.

Both ranks share one vLLM engine (vllm.tensor_parallel_size = 2), each with its own prompts (rank 0 has one
more); each checks its completions' behaviour log-probs against an HF forward of the same weights and prints
the largest difference, then loads new weights and checks again.
"""

import copy
import sys

import npo_engine  # noqa: F401  (first: hides unloadable torchvision & co.)
import torch
import torch.distributed as dist
from transformers import Qwen2ForCausalLM

from npo_engine.config import VLLMConfig
from npo_engine.models import demo_model_config
from npo_engine.rollout import sampling
from npo_engine.rollout.base import SamplingParams
from npo_engine.rollout.vllm_engine import VLLMEngine


def model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(demo_model_config(52)).eval()
    with torch.no_grad():
        m.model.norm.weight.mul_(8.0)
    return m


def worst_difference(engine, m, prompts, rank) -> float:
    out = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, seed=rank))
    assert len(out) == len(prompts)
    worst = 0.0
    with torch.no_grad():
        for p, c, logp in zip(prompts, out.token_ids, out.logprobs):
            logits = m(torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
            worst = max(worst, (sampling.behaviour_logprobs(logits, torch.tensor(c), 1.0) - logp).abs().max().item())
    return worst


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    a, b = model(0), model(1)
    engine = VLLMEngine(copy.deepcopy(a), eos_token_id=18, pad_token_id=0,
                        settings=VLLMConfig(dtype="float32", kv_cache_gib=1 / 16, tensor_parallel_size=2))
    prompts = [[5, 6, 7 + rank], [8, 9, 10, 11 + rank]] + ([[21]] if rank == 0 else [])
    before = worst_difference(engine, a, prompts, rank)
    engine.update_weights(b.state_dict().items())
    after = worst_difference(engine, b, prompts, rank)
    print(f"RESULT rank={rank} before={before:.3e} after={after:.3e}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
