"""The LM head on the CPU at one e2e micro-batch: fwd+bwd time of `fused_linear_logprob` keeping none, as many
bytes as dW (the default) or all of its forward tiles (`kernels.logits_cache_mb`), and of
`fused_linear_logprob_grad_in_forward` (`kernels.head_gradient_in_forward`), which forms the gradient in the
forward from blocks of rows of |dW| bytes.

    python -m benchmarks.bench_logits_cache --tokens 1024 --hidden 256 --vocab 151936 --rounds 3 --threads 1

Variants alternate within each round; the table gives medians. The memory a variant costs is the tiles it
keeps, held from the forward to the backward (the backward frees each as it consumes it; tests/kernels check
the bound); the default keeps no more than the weight gradient the backward allocates anyway.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from benchmarks._machine import cpu_name

MIB = 2**20


def fwd_bwd(hidden, weight, targets, grad, cache_bytes):
    """Seconds of one forward + backward with up to `cache_bytes` of kept tiles."""
    from npo_kernels import fused_linear_logprob

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    start = time.perf_counter()
    fused_linear_logprob(h, w, targets, cache_bytes=cache_bytes).backward(grad)
    return time.perf_counter() - start


def grad_in_forward(hidden, weight, targets, grad, _cache_bytes):
    """Seconds of the same gradient formed in the forward (the loss Σ grad·logp)."""
    from npo_kernels import fused_linear_logprob_grad_in_forward

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    start = time.perf_counter()
    _, _, anchor = fused_linear_logprob_grad_in_forward(h, w, targets, lambda logp, r0, r1: grad[r0:r1])
    anchor.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen)
    weight = torch.randn(args.vocab, args.hidden, generator=gen) * 0.02
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    grad = torch.randn(args.tokens, generator=gen)
    dw_bytes = weight.numel() * weight.element_size()
    # name -> (run, bytes of logits held at once beyond dW's)
    variants = {"none": (fwd_bwd, 0), "as many as dW (logits_cache_mb default)": (fwd_bwd, dw_bytes),
                "all": (fwd_bwd, args.tokens * args.vocab * 4),
                "gradient in forward (head_gradient_in_forward)": (grad_in_forward, dw_bytes)}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for run, cache_bytes in variants.values():  # warm-up: first calls, allocator
        run(hidden, weight, targets, grad, cache_bytes)
    for round_ in range(args.rounds):
        for name, (run, cache_bytes) in variants.items():
            samples[name].append(run(hidden, weight, targets, grad, cache_bytes))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
            f"{name} {s[-1]:.2f} s" for name, s in samples.items()), flush=True)
    print(f"\n{cpu_name()}, {args.threads} torch thread(s), torch {torch.__version__}, Python "
          f"{platform.python_version()}; N={args.tokens} tokens, H={args.hidden}, V={args.vocab}, fp32, median of "
          f"{args.rounds} alternating rounds\n")
    print("| LM head | MiB of logits held (at most) | fwd+bwd s | vs none |")
    print("|---|---:|---:|---:|")
    base = statistics.median(samples["none"])
    for name, (_, cache_bytes) in variants.items():
        seconds = statistics.median(samples[name])
        print(f"| {name} | {cache_bytes / MIB:.0f} | {seconds:.2f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
