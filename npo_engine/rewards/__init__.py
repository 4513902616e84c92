"""Rewards: verifiers that score a completion against its reference answer, and the runner that calls them
with a per-call timeout in worker processes so that a broken verifier never stops training."""

from npo_engine.rewards.runner import RewardResult, RewardRunner
from npo_engine.rewards.verifiers import VERIFIERS, Verifier, exact_match, math_verify, resolve_verifier

__all__ = [
    "VERIFIERS",
    "RewardResult",
    "RewardRunner",
    "Verifier",
    "exact_match",
    "math_verify",
    "resolve_verifier",
]
