"""Everything a restore needs besides weights, optimizer, scheduler and RNG: the trainer's own state.

Saved as JSON in every checkpoint (`extra.json`) and loaded by `Trainer.restore`, which `--resume` and every
rollback use. The prompt sampler is a pure function of (seed, step), so `step` is also the data position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_VERSION = 1


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps on the final trajectory: the next step to run (0-based), and the data position."""
    total_steps: int = 0
    """Every optimizer step spent, scouts, train-ahead and replays included; never goes back on a rollback."""
    interventions: list[dict[str, Any]] = field(default_factory=list)
    """One record per guide intervention (plan, phase, guide step, cache manifest, outcome); see guides.py."""
    controller: dict[str, Any] = field(default_factory=dict)
    """State of an adaptive intervention controller (EMAs, cooldown, history); empty when there is none."""
    mistake_pool: list[dict[str, Any]] = field(default_factory=list)
    """Recent failed prompts an adaptive controller draws on; empty when there is none."""
    experience: dict[str, Any] = field(default_factory=dict)
    """A replay buffer of the run's own trajectories (ExGRPO's experience pool); empty when there is none."""

    def to_json(self) -> dict[str, Any]:
        return {"version": _VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        version = data.get("version")
        if version is None and "step" in data:  # checkpoints written before the state had a version
            return cls(step=int(data["step"]), total_steps=int(data.get("total_steps", data["step"])))
        if version != _VERSION:
            raise ValueError(f"train state version {version!r} is not supported (this engine reads {_VERSION}); "
                             "resume it with the engine version that wrote it")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
