"""One table of tolerances for every kernel test and benchmark check, and an `assert_close` that says where.

Widening a tolerance needs a comment next to it naming the cause (see reference/kernels.md, numerics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    # fp64 references against each other: only summation order differs.
    torch.float64: Tolerance(atol=1e-10, rtol=1e-10),
    # fp32 kernels against the fp32 reference: online (chunked) logsumexp reorders sums over up to ~1.5e5
    # terms, so a few ulps of the largest term; 1e-5 holds for |logits| up to ~1e2.
    torch.float32: Tolerance(atol=1e-5, rtol=1e-5),
    # bf16 inputs with fp32 accumulation, compared with an fp32 reference of the same bf16 inputs.
    torch.bfloat16: Tolerance(atol=2e-2, rtol=2e-2),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES[dtype]


def assert_close(name: str, expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype | None = None,
                 *, atol: float | None = None, rtol: float | None = None) -> None:
    """Assert elementwise closeness with the tolerance of `dtype` (default: expected's dtype).

    On failure the message names the tensor, the max abs error and the first mismatching indices.
    """
    tol = TOLERANCES[dtype or expected.dtype]
    atol = tol.atol if atol is None else atol
    rtol = tol.rtol if rtol is None else rtol
    expected = expected.detach().to(torch.float64).cpu()
    actual = actual.detach().to(torch.float64).cpu()
    if expected.shape != actual.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all() and torch.isfinite(expected).all():
        bad = (~torch.isfinite(actual)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values at {bad}")
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        first = tuple(idx[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
            f"max abs err {err.max().item():.3e}; first at {idx}: expected {expected[first].item():.8g}, "
            f"got {actual[first].item():.8g}"
        )
