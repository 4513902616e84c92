"""Prompt sets for a run, and the seeded, resumable order in which the trainer visits them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from npo_engine.config import DataConfig
from npo_engine.data.files import load_prompt_files
from npo_engine.data.records import PromptRecord
from npo_engine.data.synthetic import arithmetic_problems


@dataclass(frozen=True)
class PromptSets:
    train: list[PromptRecord]
    eval: list[PromptRecord]
    skipped_rows: int = 0


def build_prompt_sets(cfg: DataConfig, seed: int) -> PromptSets:
    """The training prompts and the held-out evaluation prompts the config describes."""
    if cfg.source == "arithmetic":
        train = arithmetic_problems("train", cfg.train_size, levels=cfg.levels, seed=seed)
        held_out = arithmetic_problems("eval", cfg.eval_size, levels=cfg.levels, seed=seed) if cfg.eval_size else []
        return PromptSets(train=train, eval=held_out)
    fields = dict(prompt_field=cfg.prompt_field, answer_field=cfg.answer_field, id_field=cfg.id_field,
                  on_error=cfg.on_error)
    train, train_report = load_prompt_files(list(cfg.train_files), **fields)
    held_out, skipped = [], train_report.skipped
    if cfg.eval_files:
        held_out, eval_report = load_prompt_files(list(cfg.eval_files), **fields)
        held_out = held_out[: cfg.eval_size] if cfg.eval_size else []
        skipped += eval_report.skipped
    return PromptSets(train=train, eval=held_out, skipped_rows=skipped)


class PromptSampler:
    """Batches of prompts in a seeded order that reshuffles every epoch; its position is its whole state.

    `batch(step)` is a pure function of (seed, step), so a resumed or rolled-back run sees exactly the prompts
    the original run saw at the same step.
    """

    def __init__(self, records: list[PromptRecord], batch_size: int, *, seed: int, shuffle: bool = True):
        if not records:
            raise ValueError("the training prompt set is empty; check data.source and data.train_files")
        self.records = records
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch_orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._epoch_orders:
            order = list(range(len(self.records)))
            if self.shuffle:
                random.Random(f"prompts/{self.seed}/{epoch}").shuffle(order)
            self._epoch_orders = {epoch: order}  # one epoch at a time is all a step ever needs
        return self._epoch_orders[epoch]

    def batch(self, step: int) -> list[PromptRecord]:
        """The `batch_size` prompts of optimizer step `step` (0-based), wrapping into new epochs as needed."""
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, index = divmod(position, len(self.records))
            out.append(self.records[self._order(epoch)[index]])
        return out
