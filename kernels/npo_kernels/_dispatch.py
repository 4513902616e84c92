"""What the ops share, defined once: constants, backend choice, argument checks, tiling and the fake
implementations that let torch.compile trace the custom ops. Imports torch only (no triton), so CPU-only
installs import every op.

Every op folder stacks the same layers (QuACK's and flash-linear-attention's layout):
    reference.py  the readable spec in plain PyTorch; tests and benchmarks import it
    chunked.py    the memory-efficient PyTorch path that backend="auto" runs on CPU (logprob, fused_linear).
                  policy_loss and advantages have none: their CPU path is the vectorized reference, whose
                  [B, T] / [B] temporaries are a few MB, so there is nothing to chunk.
    triton.py     @triton.jit kernels and their launchers; no autograd, never imports op.py
    op.py         torch.library custom ops (fake impls from here) -> autograd.Function -> the public function

One autograd style for all ops: a torch.autograd.Function over torch.library custom ops (`<Op>Function`,
QuACK's layering and the house naming `_<op>_fwd_kernel -> <op>_fwd -> <Op>Function -> <op>`). The custom
ops make each backend call one opaque graph node with a fake impl, so torch.compile traces through it
(fullgraph). The Function on top holds what a custom op cannot return: Python-side state, such as the
forward tiles that fused_linear's eager CPU path keeps for its backward and frees one by one (the
custom_op + register_autograd style has the op itself as the forward, which returns tensors only), and
`set_materialize_grads(False)`, which hands the backward None for an unused output, so a logp-only loss
skips the entropy term.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch

# ---- Constants ---------------------------------------------------------------------------------------------

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
Backend = Literal["auto", "triton", "torch"]

ON_POLICY = 0  # policy_id of sequences sampled from the current policy
GUIDE = 1  # policy_id of NPO guide (or other off-policy) sequences; any nonzero id counts as guide

# Clamp the log-ratio before exp(): exp(20) ≈ 4.9e8 is finite in fp32 and far beyond any clip range, while an
# unclamped |Δ| = 100 overflows to inf and turns 0·inf into NaN (unsloth-zoo grpo_compute_loss fix).
MAX_LOG_RATIO = 20.0

# exp2 with a log2(e) prescale costs one transcendental per element (kernels.md §2); ln 2 converts back.
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# Log-probs are clamped here before they multiply p: e^-1024 (2^-1477 in base 2) is 0 in fp32 and fp64
# alike, so the clamp changes no product p·log p except 0·(-inf) = NaN, which it turns into the correct 0.
LOGP_FLOOR = -1024.0
LOG2P_FLOOR = LOGP_FLOOR * LOG2E


# ---- Backend choice ----------------------------------------------------------------------------------------

def check_choice(op: str, name: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
    """Raise a ValueError naming the op, the argument, the value seen and the valid choices."""
    if value not in choices:
        raise ValueError(f"{op}: {name}={value!r} is not valid; {name} must be one of {tuple(choices)}")


def triton_interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter (any value but empty or "0", as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(op: str, backend: str, device: torch.device) -> bool:
    """True to run the Triton kernels: "auto" on CUDA tensors, "triton" anywhere the kernels can run.

    CPU tensors only work under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported).
    """
    check_choice(op, "backend", backend, BACKENDS)
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda"
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (set before "
                         f"importing triton) for CPU tensors; got device {device}")
    return True


def resolve_impl(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The log-prob ops' implementation: "torch" (the reference), "triton", or "chunked" (auto on CPU)."""
    if backend == "torch":
        return "torch"
    if not use_triton(op, backend, device):
        return "chunked"
    if dtype == torch.float64:
        raise ValueError(f"{op}: backend='triton' supports fp32/bf16/fp16 inputs, got float64; "
                         "use backend='torch'")
    if device.type != "cuda" and dtype == torch.bfloat16:
        raise ValueError(f"{op}: the Triton interpreter (TRITON_INTERPRET=1) has no bf16; "
                         "use fp32/fp16 on CPU")
    return "triton"


# ---- Argument checks ---------------------------------------------------------------------------------------

def check_targets(targets: torch.Tensor, num_rows: int, n_cols: int, device: torch.device) -> torch.Tensor:
    """Validate `targets` [N] against N rows of V = n_cols columns; returns it as int64."""
    if targets.dim() != 1 or targets.shape[0] != num_rows:
        raise ValueError(f"targets must have shape [N] = [{num_rows}], got {list(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the inputs are on {device}")
    # Out-of-range targets are checked on CPU only: on CUDA the check would cost a host sync per call, and
    # under torch.compile it would be a data-dependent branch.
    if device.type == "cpu" and num_rows and not torch.compiler.is_compiling():
        largest = int(targets.max())
        if largest >= n_cols:
            raise ValueError(f"targets must be < V = {n_cols} (or negative to ignore a row), got {largest}")
    return targets.to(torch.int64).contiguous()


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


# ---- Compute dtype and tiling ------------------------------------------------------------------------------

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (so that gradcheck can exercise the chunked paths); everything else computes in
    fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_shape(num_rows: int, n_cols: int, tile_elements: int, min_vocab_tile: int) -> tuple[int, int]:
    """(rows, cols) of a vocabulary-major tile of the logits with rows·cols ≤ tile_elements (at least 1×1).

    All rows in one tile when a `min_vocab_tile`-wide tile of them fits, so that the dW GEMM sums over N
    internally; otherwise token chunks of tile_elements / min_vocab_tile rows.
    """
    rows = min(num_rows, max(1, tile_elements // min(n_cols, min_vocab_tile)))
    cols = min(n_cols, max(1, tile_elements // max(rows, 1)))
    return rows, cols


def chunk_size(seq_len: int) -> int:
    """Tokens per policy-loss program: a power of two ≤ 1024 (one program's registers), ≥ 16, covering
    short rows."""
    return max(16, min(1024, 1 << max(seq_len - 1, 0).bit_length()))


def empty_row_stats(num_rows: int, device: torch.device, dtype: torch.dtype, return_entropy: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Uninitialized logp, entropy (or None), lse, mu = Σp·z (or None), each [N]: the per-row outputs of the
    log-prob forwards."""
    logp = torch.empty(num_rows, device=device, dtype=dtype)
    lse = torch.empty(num_rows, device=device, dtype=dtype)
    entropy = torch.empty(num_rows, device=device, dtype=dtype) if return_entropy else None
    mu = torch.empty(num_rows, device=device, dtype=dtype) if return_entropy else None
    return logp, entropy, lse, mu


# ---- Fake implementations (shapes and dtypes only, for torch.compile) --------------------------------------

def fake_row_stats(x: torch.Tensor, return_entropy: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-prob forwards' outputs for input rows x [N, ·]: logp, entropy, lse, mu, each [N] in the compute
    dtype; entropy and mu are [0] without return_entropy (distinct tensors: custom-op outputs may not
    alias)."""
    num_rows = x.shape[0]
    dt = compute_dtype(x.dtype)
    n_ent = num_rows if return_entropy else 0
    return (x.new_empty(num_rows, dtype=dt), x.new_empty(n_ent, dtype=dt),
            x.new_empty(num_rows, dtype=dt), x.new_empty(n_ent, dtype=dt))


def fake_linear_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs_dx: bool,
                      needs_dw: bool, needs_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias) like their inputs, or an empty [0] tensor for each gradient not needed."""
    return (torch.empty_like(hidden) if needs_dx else hidden.new_empty(0),
            torch.empty_like(weight) if needs_dw else hidden.new_empty(0),
            torch.empty_like(bias) if needs_db else hidden.new_empty(0))


def fake_chunk_sums(logp: torch.Tensor, num_stats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy-loss forward's per-chunk loss sums [B, C] and metric sums [B, C, num_stats], fp32."""
    num_rows, seq_len = logp.shape
    num_chunks = -(-seq_len // chunk_size(seq_len))
    return (logp.new_empty(num_rows, num_chunks, dtype=torch.float32),
            logp.new_empty(num_rows, num_chunks, num_stats, dtype=torch.float32))


def fake_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Advantages [B] fp32 for rewards [B]."""
    return rewards.new_empty(rewards.shape[0], dtype=torch.float32)
