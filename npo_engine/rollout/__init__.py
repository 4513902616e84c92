"""Rollout backends behind one contract (`base.RolloutEngine`)."""

from npo_engine.rollout.base import RolloutEngine, RolloutOutput, SamplingParams
from npo_engine.rollout.embedded import EmbeddedEngine

__all__ = ["EmbeddedEngine", "RolloutEngine", "RolloutOutput", "SamplingParams"]
