"""One step's samples as records: each completion with everything the later phases need to know about it.

The rollout phase builds `Groups`; the verifier fills `reward`; a guide-mixing rule may replace one sample of a
group with a guide trajectory (editing one record, nothing else); the trainer turns the records into tensors.
Defined below the trainer so that the guide code can build and edit them without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from npo_kernels import GUIDE, ON_POLICY  # policy_id values: 0 = current policy, 1 = guide (defined once)

__all__ = ["GUIDE", "ON_POLICY", "Groups", "LogpSource", "Sample"]

LogpSource = Literal["engine", "trainer", "guide", "teacher", "replay"]
"""Where `behavior_logp` came from: the rollout engine's sampling log-probs (also those recorded with a past
success that ExGRPO replays), the trainer's recomputation with the current weights, the trainer's forward of
the guide weights when the guide cache was built; "teacher": none, LUFFY takes the teacher's probabilities as 1
(zeros); "replay": none yet, the trainer recomputes them with the current weights (RLEP treats replayed
trajectories as on-policy)."""


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt_id: str
    """The prompt record's id: the guide-cache key."""
    group_id: int
    """Index of the prompt within the step's global batch; the samples of one prompt share it."""
    prompt: str
    answer: str
    prompt_ids: list[int]
    completion_ids: list[int]
    behavior_logp: torch.Tensor
    """[len(completion_ids)] fp32: log-prob of each completion token under the policy that produced it."""
    logp_source: LogpSource
    finish_reason: str
    policy_id: int = ON_POLICY
    source: str = "policy"
    """Who produced the completion: "policy" (this step's rollout), or the extra source that filled the slot:
    "guide" (NPO), "teacher" (LUFFY), "experience" (ExGRPO), "replay" (RLEP)."""
    reward: float = 0.0
    gate_acc: float | None = None
    """On-policy accuracy of this sample's group over all n samples, before any slot was replaced."""
    entropy: float | None = None
    """Mean per-token entropy of the completion under the policy that trained on it (set by the update)."""


@dataclass
class Groups:
    """One step's samples on this rank: `group_size` consecutive samples per prompt (prompt-major)."""

    samples: list[Sample]
    group_size: int
    step: int
    """The optimizer step these samples train (0-based position on the final trajectory)."""
    stats: dict[str, float] = field(default_factory=dict)
    """Per-step numbers of the phases that built the groups (e.g. verifier timeouts)."""

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def groups(self) -> list[list[Sample]]:
        """The samples of each prompt, in order; editing a returned record edits the step's sample."""
        n = self.group_size
        return [self.samples[i : i + n] for i in range(0, len(self.samples), n)]

    def replace(self, index: int, sample: Sample) -> None:
        """Put `sample` in slot `index` (it must belong to the same prompt)."""
        old = self.samples[index]
        if (sample.prompt_id, sample.group_id) != (old.prompt_id, old.group_id):
            raise ValueError(f"slot {index} holds prompt {old.prompt_id!r} (group {old.group_id}); "
                             f"cannot put a sample of prompt {sample.prompt_id!r} there")
        self.samples[index] = sample

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]
