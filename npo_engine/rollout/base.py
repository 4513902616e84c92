"""The rollout contract: every backend (embedded, vLLM) takes token-id prompts and returns completions with
their behaviour log-probs, and accepts new weights after each optimizer step.

The behaviour log-prob of a token (fp32) is its log-prob under the distribution it was actually sampled from:
the logits divided by the temperature, then truncated to the top-k tokens, then to the top-p nucleus of the
renormalized rest (the order of HF and vLLM), then renormalized over the kept set:

    behaviour_logp = log_softmax(truncate(logits / temperature, top_k, top_p))[token]

Tokens outside the kept set are never sampled. With no truncation (`top_k == 0`, `top_p == 1`) this is the plain
tempered `log_softmax(logits / temperature)[token]`; with greedy decoding (`temperature == 0`) it is the
log-prob under the untempered full distribution, `log_softmax(logits)[token]`, and top-k / top-p do not apply.
The embedded engine computes it in `sampling.py`; the vLLM engine takes vLLM's processed log-probs, which follow
the same definition. A trainer comparing it with its own recomputed log-probs must score them on the same
support (the same truncation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]

# Every entry of a weight bucket starts at a multiple of this many bytes: enough for any dtype's alignment and
# for vector loads in the pack kernels (csrc/), small next to a norm weight (896 bf16 = 1792 bytes).
BUCKET_ALIGN = 64


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

    def load_buckets(self, buckets: Iterable[WeightBucket], *, verify: bool = True) -> list[int]:
        """Load every tensor of every bucket (the trainer's weights, cast to the engine's dtype) in one sync.

        Buckets arrive lazily, in order. Memory: an engine that sets `releases_buckets = True` promises to
        hold no reference into a bucket's `data` once it asks the iterator for the next bucket (the embedded
        engine copies in place), and the sender may then reuse that memory for the next bucket; otherwise
        every bucket stays valid until `load_buckets` returns.

        With `verify`, returns one 64-bit fingerprint per bucket, in order, computed on the receiving side
        with `npo_engine.sync.bucket_fingerprint` (or its per-tensor form, `FingerprintBlocks`): of the
        engine's own weights laid out as the bucket says, read back after the copy, where the engine holds
        them one to one (embedded); else of the bytes it received. Without `verify`, returns []. The caller
        compares them with `WeightBucket.fingerprint`.

        If it raises, the engine may hold a mix of old and new weights; the caller marks it stale.
        """
        ...

    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]], *,
              temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token fp32 log-probs of each given completion after its prompt, under the current weights.

        `log_softmax(logits / temperature)[token]` over the full vocabulary (no top-k / top-p),
        `temperature == 0` meaning 1 as in `generate`; row i has shape [len(completion_token_ids[i])]. The
        weight sync's parity probe compares these with the trainer's log-probs of the same tokens.
        """
        ...


# ----------------------------------------------------------------------------------------------- weight sync


@dataclass(frozen=True)
class BucketEntry:
    """One full (unsharded) tensor inside a `WeightBucket`, under the engine's name for it."""

    name: str
    """The engine's name (HF checkpoint names for every backend here: what `load_weights` expects)."""
    offset: int
    """Byte offset of the tensor's first element in `WeightBucket.data`, a multiple of `BUCKET_ALIGN`."""
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class WeightBucket:
    """Many full tensors packed into one flat byte buffer: the unit a weight sync hands to an engine.

    `data[e.offset : e.offset + e.nbytes]` holds entry `e`'s tensor, contiguous, row-major, in `e.dtype`; the
    bytes between entries and after the last one are zero. A tensor larger than a bucket's target size is sent
    alone in a bucket of its own size (never split: every receiver needs whole tensors anyway). The layout is
    computed once per model (`npo_engine.sync.plan`), so bucket `index` has the same entries at every sync.
    """

    data: torch.Tensor
    """1-D uint8, contiguous, on the trainer's device; its length is a multiple of `BUCKET_ALIGN`."""
    entries: tuple[BucketEntry, ...]
    fingerprint: int | None
    """The sender's 64-bit fingerprint of `data` (`npo_engine.sync.bucket_fingerprint`), in [0, 2**64); None
    when the sync runs without verification."""
    index: int
    """Position of this bucket in its sync, from 0."""
    count: int
    """How many buckets this sync sends."""

    def views(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every entry: views into `data`, no copies. Valid while the bucket's memory is
        (see `RolloutEngine.load_buckets`)."""
        for e in self.entries:
            yield e.name, self.data[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
