"""Rollout backends behind one contract (`base.RolloutEngine`)."""

from npo_engine.rollout.base import RolloutEngine, RolloutOutput, SamplingParams

__all__ = ["RolloutEngine", "RolloutOutput", "SamplingParams"]
