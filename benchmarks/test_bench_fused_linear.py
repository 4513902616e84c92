"""fused_linear_logprob fwd, bwd and fwd+bwd (each followed by the same token-level PPO loss) against the naive
`hidden @ weight.T` + log-softmax, checkpointed token chunks of 512 and, on CUDA, LigerFusedLinearGRPOLoss.
Shapes and providers: see `_cases.py`. Peak extra memory is measured for fwd+bwd on CPU (one subprocess per
provider, see `_memory.py`) and for every mode on CUDA. On CPU one fwd+bwd takes about a minute, so each
provider runs 2 rounds without warm-up (the memory probe warms up on its own).

    pytest benchmarks/test_bench_fused_linear.py --benchmark-enable \
        --benchmark-json=benchmarks/results/cpu_fused_linear.json
    python -m benchmarks.report benchmarks/results/cpu_fused_linear.json
"""

from __future__ import annotations

import pytest

from benchmarks._cases import HAS_CUDA, SMOKE, bench_case, fused_shape

PROVIDERS = ["naive", "chunked_torch", "npo"] + (["liger_flgrpo"] if HAS_CUDA else [])
MODES = ["fwd", "bwd", "fwd+bwd"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_logprob(benchmark, mode, provider):
    rounds, warmup = (3, 1) if SMOKE else ((5, 1) if HAS_CUDA else (2, 0))
    bench_case(benchmark, "fused_linear_logprob", provider, mode, fused_shape(), rounds=rounds, warmup=warmup,
               measure_memory=HAS_CUDA or mode == "fwd+bwd")
