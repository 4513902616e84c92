"""The unit of training data: one prompt with the reference answer its completions are verified against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptRecord:
    """One prompt and its reference answer.

    `meta` holds everything else about the record, e.g. `{"difficulty": 3, "source": "train.jsonl:12"}`;
    `npo_engine.data.files` documents the keys it sets. The record is frozen so it can be shared between
    the rollout groups of a step; treat `meta` as read-only too.
    """

    id: str
    """Unique within a run; keys the NPO guide cache."""
    prompt: str
    """The user turn, as plain text (chat prompts keep the full message list in `meta["messages"]`)."""
    answer: str
    """Reference answer handed to the verifier."""
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    """Left out of the hash (a dict is unhashable), so records can still go into sets and dict keys."""
