"""selective_logprob fwd, bwd and fwd+bwd (each followed by the same token-level PPO loss) against the naive
eager log-softmax, TRL's row loop, checkpointed row chunks and, on CUDA, Liger's Triton GRPO loss and
cross-entropy. Shapes, providers and rounds: `_cases.py`. Peak extra memory is measured for fwd+bwd on CPU
(one subprocess per provider, see `_memory.py`) and for every mode on CUDA.

    pytest benchmarks/test_bench_logprob.py --benchmark-enable
    --benchmark-json=benchmarks/results/cpu_logprob.json
    python -m benchmarks.report benchmarks/results/cpu_logprob.json --targets
"""

from __future__ import annotations

import pytest

from benchmarks._cases import MODES, SUITES, run_suite_case

OP = "selective_logprob"


@pytest.mark.parametrize("provider", SUITES[OP]["providers"])
@pytest.mark.parametrize("mode", MODES)
def test_selective_logprob(benchmark, mode, provider):
    run_suite_case(benchmark, OP, mode, provider)
