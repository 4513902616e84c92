"""Verifiers for tests/integration/test_run_safety.py, importable by the reward worker processes."""


def huge_reward(prompt: str, completion: str, answer: str) -> float:
    """1e308 for a completion with a digit, else 0: unclipped, the group statistics overflow to inf / NaN."""
    return 1e308 if any(c.isdigit() for c in completion) else 0.0
