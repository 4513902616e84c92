"""Prompt sets for a run, and the seeded, resumable order in which the trainer visits them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from npo_engine.config import ConfigError, DataConfig
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


# Prompts named in the error when some are too long: enough to see the pattern.
_MAX_REPORTED_PROMPTS = 3


def prompt_token_lengths(tokenizer, cfg: DataConfig, prompts: list[str]) -> list[int]:
    """Tokens of each prompt as the trainer encodes it (the template or the chat template, special tokens
    included), tokenized as one batch."""
    if cfg.apply_chat_template:
        return [len(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=True)) for p in prompts]
    texts = [cfg.prompt_template.format(prompt=p) for p in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def check_prompt_lengths(sets: PromptSets, tokenizer, cfg: DataConfig, *, rank: int = 0,
                         world_size: int = 1) -> None:
    """Every training and evaluation prompt fits `data.max_prompt_tokens`, checked before the first step (not at
    the step that first samples a long one); collective under torchrun, each rank checking a share.

    Raises a `ConfigError` naming the longest offenders with their id and source (file and line)."""
    from npo_engine.distributed import all_gather_objects

    records = [*sets.train, *sets.eval][rank::world_size]
    lengths = prompt_token_lengths(tokenizer, cfg, [r.prompt for r in records])
    too_long = [(n, r.id, r.meta.get("source")) for n, r in zip(lengths, records) if n > cfg.max_prompt_tokens]
    found = sorted((item for part in all_gather_objects(too_long) for item in part), key=lambda t: (-t[0], t[1]))
    if found:
        named = ", ".join(f"{pid!r} ({n} tokens{f', {src}' if src else ''})"
                          for n, pid, src in found[:_MAX_REPORTED_PROMPTS])
        raise ConfigError(
            f"data.max_prompt_tokens = {cfg.max_prompt_tokens} is invalid for this data: {len(found)} prompt(s) "
            f"are longer, e.g. {named}; raise the limit, or shorten or drop those prompts")


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
