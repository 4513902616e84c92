"""AutoNPO's controller as a pure state machine (npo_method.md §11): it eats per-step signals and emits
decisions; `npo_engine.guides.AutoNPOMixing` carries them out (probe rollouts, guide cache, rollback).

No I/O, no torch.distributed, no engines: every function takes numbers (or small tensors) and the controller
state, a JSON-able dataclass that lives in `TrainState.controller` and so survives resume and rollback.

    state = observe(state, params, step, reward, entropy)        # after every optimizer step
    fire, why = should_probe(state, params, step)                 # before a step: trigger, t_min, cooldown
    d_star, table = choose_distance(q_hat, v_hat)                 # after a confirming probe
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from npo_kernels import MAX_LOG_RATIO

from npo_engine.config import AutoNPOConfig


@dataclass(frozen=True)
class ControllerParams:
    """The trigger's knobs; their defaults and meanings live once, in `AutoNPOConfig`."""

    ema: float
    window: int
    min_gain: float
    entropy_drop: float
    t_min: int
    cooldown: int
    probe_pass: float
    probe_retry: int

    @classmethod
    def from_config(cls, cfg: AutoNPOConfig) -> ControllerParams:
        return cls(ema=cfg.reward_ema, window=cfg.window, min_gain=cfg.min_gain, entropy_drop=cfg.entropy_drop,
                   t_min=cfg.t_min, cooldown=cfg.cooldown, probe_pass=cfg.probe_pass, probe_retry=cfg.probe_retry)


@dataclass
class ControllerState:
    """What the controller remembers; `history` holds the EMA values of the last `window` + 1 steps."""

    reward_ema: float | None = None
    entropy_ema: float | None = None
    reward_history: list[float] = field(default_factory=list)
    entropy_history: list[float] = field(default_factory=list)
    last_end: int | None = None
    """Step at which the last intervention's replay ended (the cooldown counts from it)."""
    last_probe: int | None = None
    """Step of the last probe that did not confirm (a new probe waits `probe_retry` steps)."""
    interventions: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ControllerState:
        return cls(**data) if data else cls()


def observe(state: ControllerState, params: ControllerParams, reward: float, entropy: float) -> ControllerState:
    """Fold one step's on-policy mean reward and policy entropy into the EMAs (α = params.ema)."""
    def ema(previous: float | None, value: float) -> float:
        return value if previous is None else params.ema * previous + (1 - params.ema) * value

    reward_ema, entropy_ema = ema(state.reward_ema, reward), ema(state.entropy_ema, entropy)
    keep = params.window + 1
    return dataclasses.replace(state, reward_ema=reward_ema, entropy_ema=entropy_ema,
                               reward_history=(state.reward_history + [reward_ema])[-keep:],
                               entropy_history=(state.entropy_history + [entropy_ema])[-keep:])


def should_probe(state: ControllerState, params: ControllerParams, step: int) -> tuple[bool, dict[str, Any]]:
    """Whether the warning state holds at `step` and a confirmation probe may run.

    Both must hold [paper]: the reward EMA gained less than `min_gain` over the last `window` steps
    (stagnation), and the entropy EMA is at least `entropy_drop` (relative) below its value `window` steps ago
    (decline); and t ≥ t_min, ≥ `cooldown` steps since the last intervention ended, ≥ `probe_retry` steps since
    a probe that did not confirm. Returns the decision and its inputs (for the event).
    """
    why: dict[str, Any] = {}
    if len(state.reward_history) <= params.window:
        return False, {**why, "reason": "warming up"}
    gain = state.reward_history[-1] - state.reward_history[0]
    old_entropy = state.entropy_history[0]
    drop = (old_entropy - state.entropy_history[-1]) / abs(old_entropy) if old_entropy else 0.0
    why |= {"reward_ema": state.reward_history[-1], "reward_gain": gain, "entropy_ema": state.entropy_history[-1],
            "entropy_drop": drop}
    stagnating, declining = gain < params.min_gain, drop >= params.entropy_drop
    if not (stagnating and declining):
        return False, {**why, "reason": "no stagnation" if not stagnating else "no entropy decline"}
    if step < params.t_min:
        return False, {**why, "reason": f"t < t_min = {params.t_min}"}
    if state.last_end is not None and step - state.last_end < params.cooldown:
        return False, {**why, "reason": f"cooldown since step {state.last_end}"}
    if state.last_probe is not None and step - state.last_probe < params.probe_retry:
        return False, {**why, "reason": f"probe retry after step {state.last_probe}"}
    return True, {**why, "reason": "stagnation and entropy decline"}


def stratified_pick(steps: list[int], now: int, distances: tuple[int, ...], m: int) -> list[int]:
    """Indices of up to `m` mistake-pool entries spread evenly over the slices [now − d_i, now − d_{i−1}) of
    the candidate distances (oldest slice last), taking them round-robin so every slice is represented.

    Args:
        steps: the step at which each pool entry was recorded.
    """
    bounds = sorted(distances)
    slices: list[list[int]] = [[] for _ in bounds]
    for index, step in enumerate(steps):
        age = now - step
        for k, d in enumerate(bounds):
            if 0 < age <= d:
                slices[k].append(index)
                break
    picked: list[int] = []
    while len(picked) < m and any(slices):
        for bucket in slices:
            if bucket and len(picked) < m:
                picked.append(bucket.pop(0))
    return picked


def q_hat(passed: list[float], steps: list[int], now: int, distance: int) -> float | None:
    """Q̂(Δ): the current policy's pass rate on the probed mistakes recorded in [now − Δ, now); None if none."""
    rates = [p for p, s in zip(passed, steps) if now - distance <= s < now]
    return sum(rates) / len(rates) if rates else None


def k3_per_token(logp_now: torch.Tensor, logp_then: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_then ‖ π_now) on tokens sampled from π_then: r − 1 − log r with
    r = π_now / π_then (non-negative, unbiased, low variance). Both [T] log-probs of the same tokens."""
    log_r = (logp_now - logp_then).double().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(log_r) - 1.0 - log_r


def v_hat(kl_tokens: list[torch.Tensor], steps: list[int], now: int, distance: int) -> float | None:
    """V̂(Δ) = exp(mean per-token k3 KL) over the stored failing rollouts of B_Δ; None if there are none."""
    parts = [k for k, s in zip(kl_tokens, steps) if now - distance <= s < now and k.numel()]
    if not parts:
        return None
    return math.exp(float(torch.cat(parts).mean()))


def choose_distance(q: dict[int, float | None], v: dict[int, float | None]) -> tuple[int | None, list[dict]]:
    """Δ* = argmax over the candidates of S = Q̂/V̂ (ties: the nearer one); candidates without data are skipped.

    Returns Δ* (None when no candidate has both Q̂ and V̂, or every Q̂ is 0) and a table with Q̂, V̂, S per Δ.
    """
    table, best = [], None
    for d in sorted(q):
        score = None
        if q[d] is not None and v.get(d) is not None:
            score = q[d] / v[d]
            if score > 0 and (best is None or score > best[1]):
                best = (d, score)
        table.append({"distance": d, "Q": q[d], "V": v.get(d), "S": score})
    return (best[0] if best else None), table
