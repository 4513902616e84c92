"""fused_linear_logprob fwd, bwd and fwd+bwd (each followed by the same token-level PPO loss) against the
naive `hidden @ weight.T` + log-softmax, checkpointed token chunks of 512 and, on CUDA,
LigerFusedLinearGRPOLoss. Shapes, providers and rounds: `_cases.py` (on CPU one fwd+bwd takes about a
minute: 2 rounds per provider). Peak extra memory is measured for fwd+bwd on CPU (one subprocess per
provider, see `_memory.py`) and for every mode on CUDA.

    pytest benchmarks/test_bench_fused_linear.py --benchmark-enable \
        --benchmark-json=benchmarks/results/cpu_fused_linear.json
    python -m benchmarks.report benchmarks/results/cpu_fused_linear.json --targets
"""

from __future__ import annotations

import pytest

from benchmarks._cases import MODES, SUITES, run_suite_case

OP = "fused_linear_logprob"


@pytest.mark.parametrize("provider", SUITES[OP]["providers"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_logprob(benchmark, mode, provider):
    run_suite_case(benchmark, OP, mode, provider)
