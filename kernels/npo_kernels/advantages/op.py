"""Public `group_advantages`: argument checks, then the Triton kernel (CUDA) behind a custom op, or the
vectorized PyTorch reference.

Layers, bottom up:
    triton.group_advantages_triton    one kernel launch, one program per group
    npo_kernels::group_advantages     a torch.library custom op around it, with a fake impl, so torch.compile
                                      keeps it as one node
    group_advantages                  validation and dispatch
Not differentiable (advantages are constants of the policy-gradient loss), so there is no autograd layer.
The CPU path ("auto" on CPU tensors, or backend="torch" on CPU) is `cpu.group_advantages_cpu`: the
reference's statistics over a dense group index found without torch.unique, in fp64 (no shift pass), so the
public op costs no more than the simplest vectorized PyTorch; backend="torch" on CUDA runs the reference.
"""

from __future__ import annotations

import torch

from .._dispatch import BACKENDS, Backend, check_choice, fake_advantages, use_triton
from .cpu import group_advantages_cpu
from .reference import ADVANTAGE_MODES, STATS_MODES, AdvantageMode, StatsMode, group_advantages_ref

# ---- Custom op ---------------------------------------------------------------------------------------------


@torch.library.custom_op("npo_kernels::group_advantages", mutates_args=())
def _group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, mode: str, eps: float,
                      policy_id: torch.Tensor | None, stats: str) -> torch.Tensor:
    from .triton import group_advantages_triton  # lazily: CPU-only installs may lack triton

    return group_advantages_triton(rewards, group_ids, mode=mode, eps=eps, policy_id=policy_id, stats=stats)


@_group_advantages.register_fake
def _(rewards, group_ids, mode, eps, policy_id, stats):
    return fake_advantages(rewards)


# ---- Public function ---------------------------------------------------------------------------------------

def _check_inputs(rewards: torch.Tensor, group_ids: torch.Tensor, policy_id: torch.Tensor | None) -> None:
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"group_advantages: rewards must be a 1-D float tensor [B], got shape "
                         f"{tuple(rewards.shape)} dtype {rewards.dtype}")
    for name, t in (("group_ids", group_ids), ("policy_id", policy_id)):
        if t is None:
            continue
        if t.shape != rewards.shape or t.is_floating_point() or t.is_complex():
            raise ValueError(f"group_advantages: {name} must be an integer tensor of shape "
                             f"{tuple(rewards.shape)} (like rewards), got shape {tuple(t.shape)} "
                             f"dtype {t.dtype}")
        if t.device != rewards.device:
            raise ValueError(f"group_advantages: {name} is on {t.device} but rewards on {rewards.device}")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, mode: AdvantageMode = "grpo",
                     eps: float = 1e-6, policy_id: torch.Tensor | None = None, stats: StatsMode = "all",
                     backend: Backend = "auto") -> torch.Tensor:
    """Group-relative advantages over arbitrary groups: [B] fp32.

    Args:
        rewards: [B] float, one scalar reward per sample.
        group_ids: [B] int, samples with equal ids form a group; any order, any sizes, any values.
        mode: "grpo" (r − mean) / (std + eps) with the unbiased std; "drgrpo" r − mean;
            "rloo" r_i − mean of the other members. A group of one, or of equal rewards, gives 0.
        eps: added to the std in "grpo".
        policy_id: [B] int (0 on-policy, 1 guide) or None (all on-policy).
        stats: "all" members feed the mean/std, or only "on_policy" ones (applied to the whole group; a group
            with none uses all members; with fewer than 2 feeding members "grpo" scales by 1, and "rloo"
            compares each member with the other on-policy members). See reference.py for the exact rules.
        backend: "auto" (Triton for CUDA tensors, PyTorch otherwise), "triton", or "torch".

    Returns:
        advantages: [B] fp32 on rewards' device.
    """
    check_choice("group_advantages", "mode", mode, list(ADVANTAGE_MODES))
    check_choice("group_advantages", "stats", stats, STATS_MODES)
    check_choice("group_advantages", "backend", backend, BACKENDS)
    if not eps >= 0:
        raise ValueError(f"group_advantages: eps={eps!r} must be >= 0 (it is added to the group std)")
    _check_inputs(rewards, group_ids, policy_id)
    if use_triton("group_advantages", backend, rewards.device):
        # detach: the kernel's output never carried a gradient (advantages are constants of the loss).
        return torch.ops.npo_kernels.group_advantages(rewards.detach(), group_ids, mode, float(eps),
                                                      policy_id, stats)
    if rewards.device.type == "cpu":
        return group_advantages_cpu(rewards.detach(), group_ids, mode=mode, eps=eps, policy_id=policy_id, stats=stats)
    return group_advantages_ref(rewards, group_ids, mode=mode, eps=eps, policy_id=policy_id, stats=stats)
