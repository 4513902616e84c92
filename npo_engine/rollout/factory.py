"""One factory for every rollout engine of a run: backend (`rollout.backend`) × role (`policy` | `guide`).

The policy engine samples the training groups after every weight sync; a guide engine holds a later
checkpoint's weights and samples guide trajectories when a guide cache is built. Both are alive for the whole
run, so a backend that keeps process-global state (vLLM) is never torn down mid-run (`vllm_engine.py` keeps
every engine it builds for the life of the process).
"""

from __future__ import annotations

from typing import Literal

import torch

from npo_engine.config import RolloutConfig, VLLMConfig
from npo_engine.rollout.base import RolloutEngine

Role = Literal["policy", "guide"]
ROLES: tuple[str, ...] = ("policy", "guide")


def make_engine(cfg: RolloutConfig, role: Role, model: torch.nn.Module, *, eos_token_id: int, pad_token_id: int,
                seed: int, vllm: VLLMConfig | None = None) -> RolloutEngine:
    """A rollout engine of `cfg.backend` for `role`, holding `model` (its own copy of the weights, in the
    engine's dtype); the trainer keeps it current through `npo_engine.sync`. `vllm` is the vLLM backend's
    settings (the config's `vllm` section; None = its defaults)."""
    if role not in ROLES:
        raise ValueError(f"engine role {role!r} is not one of {list(ROLES)}")
    if cfg.backend == "embedded":
        from npo_engine.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(model, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              max_batch_size=cfg.max_batch_size, seed=seed)
    if cfg.backend == "vllm":
        from npo_engine.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model, eos_token_id=eos_token_id, pad_token_id=pad_token_id, settings=vllm,
                          max_batch_size=cfg.max_batch_size, seed=seed)
    raise ValueError(f"rollout.backend = {cfg.backend!r} has no engine; choose one of ['embedded', 'vllm']")
