"""policy_loss fwd, bwd and fwd+bwd against a naive eager PyTorch PPO loss.

Providers:
    torch_naive    verl's `compute_policy_loss` (vanilla PPO with dual clip) + `agg_loss`, eager, as written
    torch_compile  the same function under torch.compile (CUDA only: Inductor on CPU needs a C++ toolchain)
    torch_ref      our reference (`backend="torch"`, what "auto" runs on CPU)
    triton         our kernels (CUDA only; the CPU interpreter is not a performance path)
Shapes: B = 512, T = 1024 on CPU; B = 1024, T = 16384 (the target T) on CUDA. fp32 inputs, token-level
advantages [B, T], a ~70 % mask, seq-mean-token-mean with dual clip 3.0.

    pytest benchmarks/test_bench_policy_loss.py --benchmark-enable --benchmark-json=<file>.json
"""

from __future__ import annotations

import pytest
import torch

from npo_kernels.policy_loss.op import policy_loss

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SHAPE = (1024, 16384) if HAS_CUDA else (512, 1024)
PROVIDERS = ["torch_naive", "torch_ref"] + (["torch_compile", "triton"] if HAS_CUDA else [])
CLIP, DUAL_CLIP = 0.2, 3.0


def verl_policy_loss(log_prob, old_log_prob, advantages, response_mask, cliprange=CLIP,
                     clip_ratio_c=DUAL_CLIP):
    """verl `compute_policy_loss` (core_algos.py) with seq-mean-token-mean `agg_loss`; all inputs [B, T]."""
    def masked_mean(values, mask):
        return (values * mask).sum() / mask.sum().clamp(min=1)

    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(),
                                    response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    seq_losses = (pg_losses * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)  # agg_loss
    return seq_losses.mean(), (pg_clipfrac, ppo_kl, pg_clipfrac_lower)


_compiled_verl_policy_loss = torch.compile(verl_policy_loss) if HAS_CUDA else None


def make_inputs():
    """logp, behavior_logp, advantages [B, T] fp32 and a bool mask [B, T] (float 0/1 for the verl code)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    num_rows, seq_len = SHAPE
    logp = -torch.rand(SHAPE, generator=g, device=DEVICE) * 3
    behavior_logp = logp + 0.3 * torch.randn(SHAPE, generator=g, device=DEVICE)
    advantages = torch.randn(num_rows, 1, generator=g, device=DEVICE).expand(SHAPE).contiguous()
    mask = torch.rand(SHAPE, generator=g, device=DEVICE) < 0.7
    return logp, behavior_logp, advantages, mask


def loss_fn(provider):
    if provider in ("torch_naive", "torch_compile"):
        fn = verl_policy_loss if provider == "torch_naive" else _compiled_verl_policy_loss
        return lambda lp, blp, adv, m, mf: fn(lp, blp, adv, mf)[0]
    backend = "torch" if provider == "torch_ref" else "triton"
    return lambda lp, blp, adv, m, mf: policy_loss(lp, blp, adv, m, dual_clip=DUAL_CLIP, clip_low=CLIP,
                                                   clip_high=CLIP, backend=backend)[0]


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()  # CUDA launches are asynchronous; time finished work


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_policy_loss(benchmark, mode, provider):
    logp, behavior_logp, advantages, mask = make_inputs()
    mask_float = mask.float()
    fn = loss_fn(provider)
    leaf = logp.clone().requires_grad_(True)

    def forward():
        return fn(leaf, behavior_logp, advantages, mask, mask_float)

    def backward(loss):
        leaf.grad = None
        loss.backward()

    rounds = 10 if HAS_CUDA else 5
    if mode == "fwd":
        def run():
            loss = forward()
            sync()
            return loss
        benchmark.pedantic(run, rounds=rounds * 2, warmup_rounds=3, iterations=1)
    elif mode == "bwd":
        def setup():  # a fresh graph per round, built outside the timed region
            loss = forward()
            sync()
            return (loss,), {}

        def run(loss):
            backward(loss)
            sync()
        benchmark.pedantic(run, setup=setup, rounds=rounds * 2, warmup_rounds=3, iterations=1)
    else:
        def run():
            backward(forward())
            sync()
        benchmark.pedantic(run, rounds=rounds * 2, warmup_rounds=3, iterations=1)

    # Every provider computes the same loss (fp32, different summation order).
    reference = verl_policy_loss(logp, behavior_logp, advantages, mask_float)[0]
    torch.testing.assert_close(forward().detach(), reference, atol=1e-4, rtol=1e-4)

    tokens = logp.numel()
    # Forward reads logp, behavior_logp, advantages (4 B each) and the mask (1 B); the backward re-reads
    # them and writes dlogp (4 B). The naive providers also move their [B, T] intermediates, not counted.
    fwd_bytes, bwd_bytes = tokens * 13, tokens * 17
    benchmark.extra_info.update(
        op="policy_loss", provider=provider, mode=mode, device=DEVICE, shape=f"B{SHAPE[0]}-T{SHAPE[1]}",
        dtype="float32", agg="seq-mean-token-mean",
        bytes_moved={"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[mode],
        gpu=torch.cuda.get_device_name() if HAS_CUDA else None,
    )
