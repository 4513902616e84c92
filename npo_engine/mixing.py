"""`mix.mode` -> its mixing rule: NPO and AutoNPO (`npo_engine.guides`), the baselines (`npo_engine.baselines`)."""

from __future__ import annotations

from npo_engine.baselines import ConvergedRunMixing, ExperienceMixing, TeacherMixing
from npo_engine.config import TrainConfig
from npo_engine.guides import AutoNPOMixing, GuideMixer, NoMixing, NPOMixing

MIXERS: dict[str, type] = {"none": NoMixing, "npo": NPOMixing, "autonpo": AutoNPOMixing, "luffy": TeacherMixing,
                           "exgrpo": ExperienceMixing, "rlep": ConvergedRunMixing}


def make_mixer(cfg: TrainConfig) -> GuideMixer:
    """The mixing component of `mix.mode`."""
    if cfg.mix.mode not in MIXERS:
        raise ValueError(f"mix.mode = {cfg.mix.mode!r} has no mixing rule; choose one of {sorted(MIXERS)}")
    cls = MIXERS[cfg.mix.mode]
    return cls() if cls is NoMixing else cls(cfg)
