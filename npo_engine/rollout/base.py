"""The rollout contract: every backend (embedded, vLLM) takes token-id prompts and returns completions with
their behaviour log-probs, and accepts new weights after each optimizer step.

Behaviour log-probs are fp32 and come from the temperature-scaled distribution the token was sampled from,
`log_softmax(logits / temperature)[token]`, before any top-k / top-p truncation, so they are directly
comparable to the trainer's recomputed `logp` (which never truncates). With greedy decoding
(`temperature == 0`) they are the log-probs of the untempered distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one batch of completions."""

    max_new_tokens: int
    """Upper bound on generated tokens per completion (the EOS token counts)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    seed: int | None = None
    """Seed of the sampling generator for this call; None draws from the engine's own generator."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class RolloutOutput:
    """Completions for a batch of prompts, in the order of the prompts given.

    `token_ids[i]` excludes the prompt and includes the EOS token when generation stopped on it.
    `logprobs[i]` is a fp32 tensor of shape [len(token_ids[i])].
    """

    token_ids: list[list[int]]
    logprobs: list[torch.Tensor]
    finish_reasons: list[FinishReason]
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    """A generator holding a full copy of some policy's weights (the policy itself or an NPO guide)."""

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> RolloutOutput:
        """Sample one completion per prompt (repeat a prompt n times for a group of n)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) tensors named as in the HF checkpoint; later calls to `generate` use them."""
        ...
