"""selective_logprob fwd, bwd and fwd+bwd (each followed by the same token-level PPO loss) against the naive
eager log-softmax, TRL's row loop, checkpointed row chunks and, on CUDA, Liger's Triton GRPO loss and
cross-entropy. Shapes and providers: see `_cases.py`. Peak extra memory is measured for fwd+bwd on CPU (one
subprocess per provider, see `_memory.py`) and for every mode on CUDA.

    pytest benchmarks/test_bench_logprob.py --benchmark-enable --benchmark-json=benchmarks/results/cpu_logprob.json
    python -m benchmarks.report benchmarks/results/cpu_logprob.json
"""

from __future__ import annotations

import pytest

from benchmarks._cases import HAS_CUDA, SMOKE, bench_case, logprob_shape

PROVIDERS = ["naive", "row_loop", "chunked_torch", "npo"] + (["liger_grpo", "liger_ce"] if HAS_CUDA else [])
MODES = ["fwd", "bwd", "fwd+bwd"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
def test_selective_logprob(benchmark, mode, provider):
    rounds = 3 if SMOKE else (20 if HAS_CUDA else 3)
    bench_case(benchmark, "selective_logprob", provider, mode, logprob_shape(), rounds=rounds, warmup=1,
               measure_memory=HAS_CUDA or mode == "fwd+bwd")
