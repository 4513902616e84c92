"""Inputs and providers shared by the selective_logprob / fused_linear_logprob benchmarks and by the memory
probe (`_memory.py` rebuilds a case in a fresh process from its name, so everything here is importable and
deterministic).

Shapes (N tokens, V vocab, H hidden):
    CPU:        selective N = 2048, V = 151936, fp32;  fused N = 2048, H = 1024, V = 151936, fp32
    CUDA:       selective N = 16384, V = 151936, bf16; fused N = 16384, H = 4096, V = 151936, bf16
                (the target shape of kernels.md)
    smoke:      NPO_GPU_SMOKE=1 shrinks both to a few rows so benchmarks/gpu/run.sh can be dry-run on CPU.

Providers (each returns a function `run(mode)` that does the timed work for mode fwd / bwd / fwd+bwd):
    npo            ours, backend="auto" (Triton on CUDA, the chunked PyTorch path on CPU)
    naive          eager `log_softmax(logits.float() / T).gather(...)` (after `hidden @ weight.T` when fused)
    row_loop       TRL's `selective_log_softmax`: a Python loop over sequences of `seq_len` tokens
    chunked_torch  row chunks of 512 under torch.utils.checkpoint (Unsloth / verl FusedLinearForPPO style)
    liger_grpo     Liger's Triton GRPO loss on logits [B, L+1, V] (CUDA, when liger_kernel imports)
    liger_ce       Liger's cross-entropy (reduction="none"), the bandwidth bar (CUDA, when importable)
    liger_flgrpo   LigerFusedLinearGRPOLoss, torch.compile'd chunks (CUDA, when importable)
The Liger providers compute a GRPO/CE loss rather than log-probs alone; ours then adds the same token-level
PPO loss in a few [N] torch ops, so the work compared is the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SMOKE = os.environ.get("NPO_GPU_SMOKE", "0") not in ("", "0")
TEMPERATURE = 1.0
_CHUNK_ROWS = 512


@dataclass(frozen=True)
class Shape:
    num_rows: int
    n_cols: int
    hidden_size: int = 0
    seq_len: int = 2048      # tokens per sequence for the [B, L] providers (TRL loop, Liger)
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def id(self) -> str:
        h = f"-H{self.hidden_size}" if self.hidden_size else ""
        return f"N{self.num_rows}{h}-V{self.n_cols}-{self.dtype}"


def logprob_shape() -> Shape:
    if SMOKE:
        return Shape(64, 1000, seq_len=16, dtype="bfloat16" if HAS_CUDA else "float32")
    if HAS_CUDA:
        return Shape(16384, 151936, seq_len=2048, dtype="bfloat16")
    return Shape(2048, 151936, seq_len=512)


def fused_shape() -> Shape:
    if SMOKE:
        return Shape(64, 1000, 64, seq_len=16, dtype="bfloat16" if HAS_CUDA else "float32")
    if HAS_CUDA:
        return Shape(16384, 151936, 4096, seq_len=2048, dtype="bfloat16")
    return Shape(2048, 151936, 1024, seq_len=512)


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()   # CUDA launches are asynchronous: time finished work


def make_logits(shape: Shape, extra_rows_per_seq: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N (+ B·extra), V] in shape.dtype and targets [N] int64, deterministic."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rows = shape.num_rows + extra_rows_per_seq * (shape.num_rows // shape.seq_len)
    logits = (torch.randn(rows, shape.n_cols, generator=g, device=DEVICE) * 2).to(shape.torch_dtype)
    targets = torch.randint(0, shape.n_cols, (shape.num_rows,), generator=g, device=DEVICE)
    return logits, targets


def make_fused(shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H] (scaled so logits have std ≈ 2), targets [N]."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(shape.num_rows, shape.hidden_size, generator=g, device=DEVICE).to(shape.torch_dtype)
    weight = (torch.randn(shape.n_cols, shape.hidden_size, generator=g, device=DEVICE)
              * (2 / shape.hidden_size ** 0.5)).to(shape.torch_dtype)
    targets = torch.randint(0, shape.n_cols, (shape.num_rows,), generator=g, device=DEVICE)
    return hidden, weight, targets


# ---- Baselines ------------------------------------------------------------------------------------------

def naive_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float() / TEMPERATURE, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL `trl/trainer/utils.py::selective_log_softmax` on [B, L, V] (loops over B to bound peak memory)."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    out = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)
        out.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def row_loop_logprob(logits: torch.Tensor, targets: torch.Tensor, seq_len: int) -> torch.Tensor:
    num_rows, n_cols = logits.shape
    return trl_selective_log_softmax(logits.view(-1, seq_len, n_cols) / TEMPERATURE,
                                     targets.view(-1, seq_len)).reshape(num_rows)


def chunked_torch_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Row chunks, each recomputed in the backward (checkpoint): one fp32 log-softmax chunk at a time."""
    parts = [checkpoint(naive_logprob, lg, t, use_reentrant=False)
             for lg, t in zip(logits.split(_CHUNK_ROWS), targets.split(_CHUNK_ROWS))]
    return torch.cat(parts)


def naive_fused(hidden, weight, targets):
    return naive_logprob(hidden @ weight.T, targets)


def chunked_torch_fused(hidden, weight, targets):
    parts = [checkpoint(naive_fused, h, weight, t, use_reentrant=False)
             for h, t in zip(hidden.split(_CHUNK_ROWS), targets.split(_CHUNK_ROWS))]
    return torch.cat(parts)


def ppo_token_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """On-policy PPO-clip token loss (old_logp = logp.detach(), as Liger's benchmarks call it), token mean."""
    ratio = torch.exp(logp - logp.detach())
    clipped = torch.clamp(ratio, 0.8, 1.2)
    return -torch.minimum(ratio * advantages, clipped * advantages).mean()


# ---- Providers -------------------------------------------------------------------------------------------

class Unavailable(Exception):
    """The provider cannot run here (not installed, no CUDA); the benchmark skips with this message."""


def _liger(module: str, name: str):
    if not HAS_CUDA:
        raise Unavailable("Liger's kernels need CUDA")
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError) as exc:
        raise Unavailable(f"liger_kernel not importable: {exc}") from exc


def logprob_forward(provider: str, shape: Shape):
    """(inputs, forward) where forward(*inputs) returns a scalar loss whose backward is the bwd work.

    Inputs are built here, outside any timed region; `inputs[0]` is the leaf whose .grad gets reset.
    """
    from npo_kernels.logprob.op import selective_logprob

    if provider in ("liger_grpo", "liger_ce"):
        fn = (_liger("liger_kernel.transformers.grpo_loss", "triton_grpo_loss") if provider == "liger_grpo"
              else _liger("liger_kernel.transformers.functional", "liger_cross_entropy"))
    extra = 1 if provider == "liger_grpo" else 0   # Liger's GRPO kernel reads logits [B, L + 1, V]
    logits, targets = make_logits(shape, extra_rows_per_seq=extra)
    leaf = logits.requires_grad_(True)
    num_seqs = shape.num_rows // shape.seq_len
    adv = torch.randn(num_seqs, device=DEVICE).repeat_interleave(shape.seq_len)

    if provider == "npo":
        return (leaf, targets), lambda x, t: ppo_token_loss(
            selective_logprob(x, t, temperature=TEMPERATURE), adv)
    if provider == "naive":
        return (leaf, targets), lambda x, t: ppo_token_loss(naive_logprob(x, t), adv)
    if provider == "row_loop":
        return (leaf, targets), lambda x, t: ppo_token_loss(row_loop_logprob(x, t, shape.seq_len), adv)
    if provider == "chunked_torch":
        return (leaf, targets), lambda x, t: ppo_token_loss(chunked_torch_logprob(x, t), adv)
    if provider == "liger_ce":
        # -CE = logp; reduction="none" gives per-token values (the gradient is formed in Liger's forward).
        return (leaf, targets), lambda x, t: ppo_token_loss(-fn(x, t, reduction="none"), adv)
    if provider == "liger_grpo":
        seq_adv = adv.view(num_seqs, shape.seq_len)[:, 0].contiguous()

        def liger_grpo(x, t):
            out = fn(x.view(num_seqs, shape.seq_len + 1, shape.n_cols), None, None,
                     t.view(num_seqs, shape.seq_len), seq_adv, temperature=TEMPERATURE, beta=0.0,
                     eps_low=0.2, eps_high=0.2, inplace=False)
            loss = out[0] if isinstance(out, tuple) else out
            return loss.mean()
        return (leaf, targets), liger_grpo
    raise ValueError(f"unknown provider {provider!r}")


def fused_forward(provider: str, shape: Shape):
    """(inputs, forward) for fused_linear_logprob and its baselines; inputs = (hidden, weight, targets)."""
    from npo_kernels.fused_linear.op import fused_linear_logprob

    if provider == "liger_flgrpo":
        loss_cls = _liger("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
    hidden, weight, targets = make_fused(shape)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    num_seqs = shape.num_rows // shape.seq_len
    adv = torch.randn(num_seqs, device=DEVICE).repeat_interleave(shape.seq_len)
    inputs = (hidden, weight, targets)
    if provider == "npo":
        return inputs, lambda h, w, t: ppo_token_loss(
            fused_linear_logprob(h, w, t, temperature=TEMPERATURE), adv)
    if provider == "naive":
        return inputs, lambda h, w, t: ppo_token_loss(naive_fused(h, w, t), adv)
    if provider == "chunked_torch":
        return inputs, lambda h, w, t: ppo_token_loss(chunked_torch_fused(h, w, t), adv)
    if provider == "liger_flgrpo":
        try:
            loss_mod = loss_cls(beta=0.0, use_ref_model=False, loss_type="dapo", temperature=TEMPERATURE)
        except TypeError:   # Liger releases before loss_type / temperature existed
            loss_mod = loss_cls(beta=0.0, use_ref_model=False)
        seq_adv = adv.view(num_seqs, shape.seq_len)[:, 0].contiguous()
        mask = torch.ones(num_seqs, shape.seq_len, device=DEVICE)

        def liger_flgrpo(h, w, t):
            out = loss_mod(h.view(num_seqs, shape.seq_len, -1), w, t.view(num_seqs, shape.seq_len), mask,
                           seq_adv)
            return out[0] if isinstance(out, tuple) else out
        return inputs, liger_flgrpo
    raise ValueError(f"unknown provider {provider!r}")


def runner(op: str, provider: str, shape: Shape):
    """(run, setup) pairs per mode for pytest-benchmark's pedantic(): run(mode) -> (fn, setup or None)."""
    inputs, forward = (logprob_forward if op == "selective_logprob" else fused_forward)(provider, shape)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def reset():
        for t in leaves:
            t.grad = None

    def fwd():
        with torch.no_grad():
            forward(*inputs)
        sync()

    def fwd_bwd():
        reset()
        forward(*inputs).backward()
        sync()

    def bwd_setup():
        reset()
        loss = forward(*inputs)
        sync()
        return (loss,), {}

    def bwd(loss):
        loss.backward()
        sync()

    return {"fwd": (fwd, None), "bwd": (bwd, bwd_setup), "fwd+bwd": (fwd_bwd, None)}


# ---- Suites: what each benchmark file parametrizes (also run without pytest by benchmarks/_shim.py) --------

SUITES = {
    "selective_logprob": {
        "providers": (["naive", "row_loop", "chunked_torch", "npo"]
                      + (["liger_grpo", "liger_ce"] if HAS_CUDA else [])),
        "shape": logprob_shape,
        # (rounds, warm-up rounds): one CPU fwd+bwd takes seconds, one CUDA call milliseconds.
        "rounds": (3, 1) if SMOKE else ((20, 2) if HAS_CUDA else (3, 1)),
    },
    "fused_linear_logprob": {
        "providers": ["naive", "chunked_torch", "npo"] + (["liger_flgrpo"] if HAS_CUDA else []),
        "shape": fused_shape,
        # One CPU fwd+bwd takes about a minute: 2 rounds, no warm-up (the memory probe warms up on its own).
        "rounds": (3, 1) if SMOKE else ((5, 1) if HAS_CUDA else (2, 0)),
    },
}
MODES = ["fwd", "bwd", "fwd+bwd"]


def run_suite_case(benchmark, op: str, mode: str, provider: str) -> None:
    """The body of every parametrized benchmark: peak memory for fwd+bwd on CPU (a subprocess per case), for
    every mode on CUDA (in-process and cheap)."""
    rounds, warmup = SUITES[op]["rounds"]
    bench_case(benchmark, op, provider, mode, SUITES[op]["shape"](), rounds=rounds, warmup=warmup,
               measure_memory=HAS_CUDA or mode == "fwd+bwd")


# ---- The shared benchmark body -----------------------------------------------------------------------------

# H100 SXM limits (kernels.md §4): HBM bandwidth and dense bf16 tensor-core throughput.
H100_BW = 3.35e12
H100_BF16_FLOPS = 9.9e14


def work(op: str, mode: str, shape: Shape) -> dict:
    """Bytes or useful FLOPs of one call and its roofline floor on an H100 (kernels.md §4).

    selective_logprob moves S = N·V·b per pass over the logits: fwd 1R (S), bwd 1R + 1W (2S), decoupled
    fwd+bwd 2R + 1W (3S). fused_linear_logprob does useful GEMM work 2NHV (fwd), 4NHV (bwd: dX and dW),
    6NHV (fwd+bwd), the TFLOP/s-equivalent convention; recomputing the logits costs another 2NHV not counted.
    """
    if op == "selective_logprob":
        size = shape.num_rows * shape.n_cols * torch.finfo(shape.torch_dtype).bits // 8
        moved = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode] * size
        return {"bytes_moved": moved, "floor_s": moved / H100_BW if HAS_CUDA else None}
    flops = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * shape.num_rows * shape.hidden_size * shape.n_cols
    return {"flops": flops, "floor_s": flops / H100_BF16_FLOPS if HAS_CUDA else None}


def bench_case(benchmark, op: str, provider: str, mode: str, shape: Shape, *, rounds: int, warmup: int,
               measure_memory: bool) -> None:
    """Time one (op, provider, mode) with pytest-benchmark and record throughput and peak memory."""
    import gc

    from benchmarks._memory import peak_extra_bytes

    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()
    try:
        fn, setup = runner(op, provider, shape)[mode]
    except Unavailable as exc:
        try:
            import pytest
        except ImportError:     # the pytest-free runner (benchmarks/_shim.py) reports the reason itself
            raise exc from None
        pytest.skip(str(exc))
    benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    del fn, setup
    gc.collect()
    peak = peak_extra_bytes(op, provider, mode, shape) if measure_memory else None
    benchmark.extra_info.update(
        op=op, provider=provider, mode=mode, device=DEVICE, shape=shape.id, dtype=shape.dtype,
        peak_extra_bytes=peak, smoke=SMOKE,
        gpu=torch.cuda.get_device_name() if HAS_CUDA else None, **work(op, mode, shape))
