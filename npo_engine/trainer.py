"""The training loop, top to bottom: rollout -> reward -> guide mixing -> advantages -> log-probs, loss, step ->
weight sync -> log and checkpoint.

    trainer = Trainer(TrainConfig())     # the built-in demo; load_config(...) for anything else
    trainer.train()                      # or trainer.step() one optimizer step at a time

Every rank of a torchrun job runs this same code on its shard of each step's prompts: the policy is sharded
with FSDP2, and each rank samples from its own colocated rollout engine holding full weights, refreshed after
every optimizer step. A single process runs the identical path with no process group.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from npo_engine import algo
from npo_engine.checkpoint import CheckpointManager
from npo_engine.config import TrainConfig, dump_config
from npo_engine.data.sampler import PromptSampler, build_prompt_sets
from npo_engine.distributed import (
    all_reduce_sum,
    apply_activation_checkpointing,
    barrier,
    broadcast_object,
    decoder_layers,
    init_distributed,
    shard_model,
)
from npo_engine.metrics import MetricsLogger
from npo_engine.models import LogprobModel, ensure_demo_model, load_causal_lm, load_tokenizer
from npo_engine.rewards import RewardRunner
from npo_engine.rollout.base import RolloutEngine, SamplingParams
from npo_engine.rollout.embedded import EmbeddedEngine
from npo_engine.sync import push_weights


@dataclass
class Groups:
    """One step's samples on this rank: `group_size` completions for each prompt, flattened prompt-major.

    Every list has one entry per sample; `group_ids` are global prompt indices of the step, so groups never
    straddle ranks. `policy_id` is 0 for on-policy samples and 1 for guide samples (NPO).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    behavior_logp: list[torch.Tensor]
    finish_reasons: list[str]
    prompts: list[str]
    answers: list[str]
    group_ids: list[int]
    policy_id: list[int]
    rewards: list[float] = field(default_factory=list)


@dataclass
class TrainBatch:
    """Groups as right-padded tensors: row b is prompt + completion of sample b.

    input_ids, attention_mask, completion_mask, behavior_logp: [B, L]; rewards, group_ids, policy_id,
    advantages: [B]. `completion_mask` marks the completion tokens (the ones the loss scores), and
    `behavior_logp[b, j]` is the behaviour log-prob of token j.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    behavior_logp: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    policy_id: torch.Tensor
    advantages: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> TrainBatch:
        return TrainBatch(**{name: None if value is None else value[start:stop] for name, value in vars(self).items()})


class Trainer:
    """GRPO-family RL training of a causal LM with verifiable rewards (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, *, run_dir: str | Path | None = None, resume: bool = False):
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = self.dist.device
        if self.device.type == "cpu" and cfg.run.cpu_threads:
            torch.set_num_threads(cfg.run.cpu_threads)
        if cfg.data.prompts_per_step % self.dist.world_size:
            raise ValueError(
                f"data.prompts_per_step = {cfg.data.prompts_per_step} must be a multiple of the number of ranks "
                f"({self.dist.world_size}) so every rank gets whole groups; change one of them"
            )
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.run.runs_dir) / cfg.run.name
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        torch.manual_seed(cfg.run.seed)

        # Model, tokenizer and the colocated rollout engine (its own full copy of the weights).
        model_dir = Path(cfg.model.path) if cfg.model.path else self._demo_model_dir()
        self.tokenizer = load_tokenizer(model_dir)
        use_bf16 = self.device.type == "cuda" and cfg.model.dtype in ("auto", "bfloat16")
        lm = load_causal_lm(model_dir, torch.float32).to(self.device)
        self.engine_dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.engine: RolloutEngine = EmbeddedEngine(
            copy.deepcopy(lm).to(self.engine_dtype), eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, max_batch_size=cfg.rollout.max_batch_size,
            seed=cfg.run.seed + self.dist.rank,
        )
        self.ref_policy = self._frozen_reference(lm) if cfg.algo.kl_coef > 0 else None
        if cfg.model.activation_checkpointing:
            apply_activation_checkpointing(lm)
        self.policy = shard_model(LogprobModel(lm, kernel_backend=cfg.kernels.backend), decoder_layers(lm),
                                  self.dist, param_dtype=torch.bfloat16 if use_bf16 else None)
        self.policy_loss = algo.get_policy_loss("ppo")

        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        warmup = cfg.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))

        # Prompts and verifier.
        prompt_sets = build_prompt_sets(cfg.data, cfg.run.seed)
        self.sampler = PromptSampler(prompt_sets.train, cfg.data.prompts_per_step, seed=cfg.run.seed,
                                     shuffle=cfg.data.shuffle)
        self.eval_records = prompt_sets.eval
        self.rewards = RewardRunner(cfg.reward.verifier, timeout_s=cfg.reward.timeout_s,
                                    num_workers=cfg.reward.num_workers)

        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                             rank=self.dist.rank, world_size=self.dist.world_size)
        self.step_index = 0
        """Optimizer steps taken (the next step to run)."""
        if resume:
            self._resume()
        self.metrics = MetricsLogger(self.run_dir, total_steps=cfg.run.steps, is_main=self.dist.is_main,
                                     tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                                     start_step=self.step_index + 1)  # metrics rows are numbered from 1
        if prompt_sets.skipped_rows:
            self.metrics.event("data_rows_skipped", count=prompt_sets.skipped_rows)
        self._sync_engine()

    # ------------------------------------------------------------------------------------------- the loop

    def train(self) -> None:
        """Run until `run.steps`; evaluate, checkpoint and export as configured."""
        try:
            while self.step_index < self.cfg.run.steps:
                self.step()
            if self.cfg.checkpoint.every == 0 or self.step_index % self.cfg.checkpoint.every:
                self.save_checkpoint()
            if self.cfg.checkpoint.export_final:
                self.export(self.step_index)
        finally:
            self.close()

    def step(self) -> dict[str, float]:
        """One optimizer step on one batch of prompts; returns the metrics it logged."""
        cfg, step = self.cfg, self.step_index
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        if step == 0 and self._evaluating:
            metrics.update(self.evaluate())  # the base model's score, logged with the first step

        groups = self.rollout(step)                                          # n completions per prompt
        metrics["time/rollout"] = time.perf_counter() - start
        self.score(groups)                                                   # verifier rewards
        groups = self.mix_guides(groups)                                     # NPO slot filling (hook)
        batch = self.make_batch(groups)
        batch.advantages = algo.compute_advantages(batch.rewards, batch.group_ids, cfg.algo,
                                                   policy_id=batch.policy_id, backend=cfg.kernels.backend)
        train_start = time.perf_counter()
        metrics |= self.update(batch)                                        # log-probs, loss, backward, AdamW
        metrics["time/train"] = time.perf_counter() - train_start
        metrics |= self._sync_engine()                                       # engine gets the new weights
        self.step_index += 1

        metrics |= self._group_metrics(groups)
        every = cfg.logging.eval_every
        if self._evaluating and ((every and self.step_index % every == 0) or self.step_index == cfg.run.steps):
            metrics.update(self.evaluate())
        metrics["time/step"] = time.perf_counter() - start
        metrics["throughput/tokens_per_s"] = metrics["rollout/tokens"] / max(metrics["time/rollout"], 1e-9)
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]
        self.metrics.log(self.step_index, metrics)
        if cfg.checkpoint.every and self.step_index % cfg.checkpoint.every == 0:
            self.save_checkpoint()
        if self.step_index in cfg.checkpoint.export_steps:
            self.export(self.step_index)
        return metrics

    # ----------------------------------------------------------------------------------------------- phases

    def rollout(self, step: int) -> Groups:
        """Sample `group_size` completions for each of this rank's prompts of `step` with the current policy."""
        cfg, n = self.cfg, self.cfg.rollout.group_size
        prompts = self.sampler.batch(step)
        per_rank = len(prompts) // self.dist.world_size
        first = self.dist.rank * per_rank
        records = prompts[first : first + per_rank]
        prompt_ids = [self.encode_prompt(r.prompt, r.id) for r in records]
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                                seed=_stream_seed(cfg.run.seed, "rollout", step, self.dist.rank))
        out = self.engine.generate([ids for ids in prompt_ids for _ in range(n)], params)
        return Groups(
            prompt_ids=[ids for ids in prompt_ids for _ in range(n)],
            completion_ids=out.token_ids,
            behavior_logp=out.logprobs,
            finish_reasons=list(out.finish_reasons),
            prompts=[r.prompt for r in records for _ in range(n)],
            answers=[r.answer for r in records for _ in range(n)],
            group_ids=[first + i for i in range(len(records)) for _ in range(n)],
            policy_id=[algo.ON_POLICY] * (len(records) * n),
        )

    def score(self, groups: Groups) -> dict[str, float]:
        """Verifier rewards for every sample (a failing or hanging verifier costs that sample's reward)."""
        completions = [self.decode_completion(ids) for ids in groups.completion_ids]
        result = self.rewards.score(groups.prompts, completions, groups.answers)
        groups.rewards = result.rewards
        self._reward_stats = result.stats
        return result.stats

    def mix_guides(self, groups: Groups) -> Groups:
        """Where NPO replaces one slot of hard groups with a cached guide trajectory; plain GRPO keeps all."""
        return groups

    def make_batch(self, groups: Groups) -> TrainBatch:
        """Right-pad prompt + completion of every sample into [B, L] tensors on the training device."""
        rows = [p + c for p, c in zip(groups.prompt_ids, groups.completion_ids)]
        length = max(len(r) for r in rows)
        size = (len(rows), length)
        input_ids = torch.full(size, self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(size, dtype=torch.long)
        completion_mask = torch.zeros(size, dtype=torch.bool)
        behavior_logp = torch.zeros(size, dtype=torch.float32)
        for b, (prompt, completion, logp) in enumerate(zip(groups.prompt_ids, groups.completion_ids,
                                                            groups.behavior_logp)):
            p, c = len(prompt), len(completion)
            input_ids[b, : p + c] = torch.tensor(prompt + completion)
            attention_mask[b, : p + c] = 1
            completion_mask[b, p : p + c] = True
            behavior_logp[b, p : p + c] = logp.float().cpu()
        to = self.device
        return TrainBatch(input_ids=input_ids.to(to), attention_mask=attention_mask.to(to),
                          completion_mask=completion_mask.to(to), behavior_logp=behavior_logp.to(to),
                          rewards=torch.tensor(groups.rewards, dtype=torch.float32, device=to),
                          group_ids=torch.tensor(groups.group_ids, device=to),
                          policy_id=torch.tensor(groups.policy_id, device=to))

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """Fix the behaviour log-probs, then take `optim.epochs` passes of `optim.mini_batches` AdamW updates.

        With one update per step (the default) the ratio is exactly 1 and the loss is a plain policy gradient;
        with several, later updates are slightly off-policy and the PPO clip bounds them.
        """
        cfg = self.cfg
        engine_logp = batch.behavior_logp
        if cfg.rollout.behavior_logp == "recompute":
            with torch.no_grad():
                batch.behavior_logp = self._logprobs(batch, cfg.rollout.temperature)
        mismatch = (engine_logp - batch.behavior_logp).abs()[batch.completion_mask]

        updates = [self._optimizer_update(mini) for _ in range(cfg.optim.epochs)
                   for mini in self._mini_batches(batch)]
        out = {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]}
        out["optim/skipped"] = sum(u["optim/skipped"] for u in updates)
        self.scheduler.step()
        n_mismatch = all_reduce_sum(torch.tensor([mismatch.sum().item(), mismatch.numel()], dtype=torch.float64))
        out["mismatch/logp_abs"] = n_mismatch[0].item() / max(n_mismatch[1].item(), 1.0)
        return out

    def _optimizer_update(self, batch: TrainBatch) -> dict[str, float]:
        """One AdamW update on `batch`, accumulated over micro-batches; skipped if the loss or gradient is
        non-finite (the weights are never touched then)."""
        cfg = self.cfg
        # Each micro-batch's loss is weighted by its share of the global normalizer (sequences or tokens,
        # summed over ranks), so the accumulated gradient equals that of the whole batch at once.
        units = self._loss_units(batch)
        global_units = all_reduce_sum(units.sum().reshape(1)).clamp_min(1)[0]
        totals: dict[str, torch.Tensor] = {}
        self.optimizer.zero_grad(set_to_none=True)
        micro = cfg.optim.micro_batch_size
        for lo in range(0, batch.input_ids.shape[0], micro):
            mb = batch.rows(lo, lo + micro)
            logp, entropy = self.policy(mb.input_ids, mb.attention_mask, mb.completion_mask,
                                        temperature=cfg.rollout.temperature, return_entropy=True)
            loss, pg_metrics = self.policy_loss(logp, mb.behavior_logp, mb.advantages, mb.completion_mask,
                                                cfg.algo, policy_id=mb.policy_id,
                                                norm_length=cfg.rollout.max_new_tokens, backend=cfg.kernels.backend)
            if self.ref_policy is not None:
                loss = loss + cfg.algo.kl_coef * self._kl_term(mb, logp)
            weight = units[lo : lo + micro].sum() / global_units * self.dist.world_size
            (loss * weight).backward()
            share = mb.completion_mask.sum()
            _accumulate(totals, {"loss/pg": loss.detach() * weight / self.dist.world_size,
                                 "entropy/sum": (entropy.detach() * mb.completion_mask).sum(),
                                 "tokens": share.float()})
            _accumulate(totals, {k: v * share for k, v in pg_metrics.items()})  # token-weighted means

        grad_norm = self._clip_gradients()
        finite = torch.isfinite(grad_norm) & torch.isfinite(totals["loss/pg"])
        finite = bool(all_reduce_sum(finite.float().reshape(1)).item() == self.dist.world_size)
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.metrics.event("nonfinite_step_skipped", step=self.step_index + 1,
                               grad_norm=float(grad_norm), loss=float(totals["loss/pg"]))

        summed = all_reduce_sum(torch.stack([totals[k] for k in sorted(totals)]).double())
        reduced = dict(zip(sorted(totals), summed.tolist()))
        tokens = max(reduced.pop("tokens"), 1.0)
        out = {"loss/pg": reduced.pop("loss/pg"), "entropy/mean": reduced.pop("entropy/sum") / tokens}
        out |= {k: v / tokens for k, v in reduced.items()}
        out["optim/grad_norm"] = float(grad_norm)
        out["optim/skipped"] = float(not finite)
        return out

    def _mini_batches(self, batch: TrainBatch) -> list[TrainBatch]:
        """`optim.mini_batches` slices of whole groups (rows are prompt-major, `group_size` per prompt)."""
        n = self.cfg.rollout.group_size
        groups = batch.input_ids.shape[0] // n
        count = min(self.cfg.optim.mini_batches, groups)
        bounds = [round(i * groups / count) * n for i in range(count + 1)]
        return [batch.rows(lo, hi) for lo, hi in zip(bounds, bounds[1:])]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy on the held-out prompts (split over ranks), as `acc/eval`."""
        records = self.eval_records[self.dist.rank :: self.dist.world_size]
        start = time.perf_counter()
        correct = 0.0
        if records:
            params = SamplingParams(max_new_tokens=self.cfg.rollout.max_new_tokens, temperature=0.0)
            out = self.engine.generate([self.encode_prompt(r.prompt, r.id) for r in records], params)
            completions = [self.decode_completion(ids) for ids in out.token_ids]
            result = self.rewards.score([r.prompt for r in records], completions, [r.answer for r in records])
            correct = sum(1.0 for r in result.rewards if r >= 1.0)
        totals = all_reduce_sum(torch.tensor([correct, float(len(records))], dtype=torch.float64))
        return {"acc/eval": totals[0].item() / max(totals[1].item(), 1.0), "time/eval": time.perf_counter() - start}

    # -------------------------------------------------------------------------------------- state and I/O

    def save_checkpoint(self) -> Path:
        """Full state of the current step: weights, optimizer, scheduler, step (which fixes the data position)."""
        return self.checkpoints.save(self.step_index, self.policy, self.optimizer, scheduler=self.scheduler,
                                     extra={"step": self.step_index, "seed": self.cfg.run.seed})

    def export(self, step: int) -> Path:
        """The policy as a Hugging Face directory under exports/ (loadable by transformers, vLLM, guides)."""
        return self.checkpoints.export_hf(step, self.policy.lm, self.run_dir / "exports" / f"step_{step:06d}",
                                          tokenizer=self.tokenizer)

    def close(self) -> None:
        self.rewards.close()
        self.metrics.close()

    def _resume(self) -> None:
        latest = self.checkpoints.latest()
        if latest is None:
            raise FileNotFoundError(
                f"--resume: no complete checkpoint under {self.checkpoints.root}; "
                "start without --resume or point --run-dir at the run to continue"
            )
        extra = self.checkpoints.load(latest, self.policy, self.optimizer, scheduler=self.scheduler,
                                      seed=self.cfg.run.seed)
        self.step_index = int(extra["step"])

    def _demo_model_dir(self) -> Path:
        # Rank 0 builds the demo model if it is not cached yet; the others wait and then read it.
        path = ensure_demo_model(self.cfg.model) if self.dist.is_main else None
        barrier()
        return Path(broadcast_object(str(path) if path else None)) if self.dist.enabled else path

    def _sync_engine(self) -> dict[str, float]:
        return push_weights(self.policy.lm, self.engine, dtype=self.engine_dtype)

    def _frozen_reference(self, lm: torch.nn.Module) -> LogprobModel:
        ref = LogprobModel(copy.deepcopy(lm), kernel_backend=self.cfg.kernels.backend).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _kl_term(self, mb: TrainBatch, logp: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref_logp, _ = self.ref_policy(mb.input_ids, mb.attention_mask, mb.completion_mask,
                                          temperature=self.cfg.rollout.temperature)
        kl = algo.kl_penalty(logp, ref_logp, mb.completion_mask, self.cfg.algo.kl_estimator)
        return algo.masked_mean(kl, mb.completion_mask)

    @torch.no_grad()
    def _logprobs(self, batch: TrainBatch, temperature: float) -> torch.Tensor:
        parts = []
        for lo in range(0, batch.input_ids.shape[0], self.cfg.optim.micro_batch_size):
            mb = batch.rows(lo, lo + self.cfg.optim.micro_batch_size)
            parts.append(self.policy(mb.input_ids, mb.attention_mask, mb.completion_mask,
                                     temperature=temperature)[0])
        return torch.cat(parts)

    def _loss_units(self, batch: TrainBatch) -> torch.Tensor:
        """[B] weight of each sample in the loss normalizer of `algo.loss_agg`."""
        tokens = batch.completion_mask.sum(1).float()
        if self.cfg.algo.loss_agg == "token-mean":
            return tokens
        if self.cfg.algo.loss_agg == "seq-mean-token-sum-norm":
            return torch.ones_like(tokens)
        return (tokens > 0).float()  # the seq-mean modes average over sequences with at least one token

    def _clip_gradients(self) -> torch.Tensor:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm.detach().float()

    def _group_metrics(self, groups: Groups) -> dict[str, float]:
        rewards = torch.tensor(groups.rewards, dtype=torch.float64)
        lengths = torch.tensor([len(c) for c in groups.completion_ids], dtype=torch.float64)
        truncated = torch.tensor([r == "length" for r in groups.finish_reasons], dtype=torch.float64)
        n = self.cfg.rollout.group_size
        per_group = (rewards >= 1.0).reshape(-1, n).float().mean(1)
        local = torch.stack([
            rewards.sum(), (rewards >= 1.0).sum(), lengths.sum(), truncated.sum(), torch.tensor(len(rewards)),
            (per_group == 0).sum(), (per_group == 1).sum(), torch.tensor(len(per_group)),
            torch.tensor(self._reward_stats.get("reward/verifier_errors", 0.0)),
            torch.tensor(self._reward_stats.get("reward/verifier_timeouts", 0.0)),
        ]).double()
        s = all_reduce_sum(local).tolist()
        count, group_count = max(s[4], 1.0), max(s[7], 1.0)
        return {"reward/mean": s[0] / count, "acc/train": s[1] / count, "rollout/length_mean": s[2] / count,
                "rollout/truncated_frac": s[3] / count, "rollout/tokens": s[2],
                "groups/all_wrong_frac": s[5] / group_count, "groups/all_right_frac": s[6] / group_count,
                "reward/verifier_errors": s[8], "reward/verifier_timeouts": s[9]}

    @property
    def _evaluating(self) -> bool:
        return bool(self.eval_records)

    def encode_prompt(self, prompt: str, prompt_id: str) -> list[int]:
        cfg = self.cfg.data
        if cfg.apply_chat_template:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
        else:
            ids = self.tokenizer(cfg.prompt_template.format(prompt=prompt), add_special_tokens=True)["input_ids"]
        if len(ids) > cfg.max_prompt_tokens:
            raise ValueError(f"prompt {prompt_id} has {len(ids)} tokens, more than data.max_prompt_tokens = "
                             f"{cfg.max_prompt_tokens}; raise the limit or shorten the prompt")
        return list(ids)

    def decode_completion(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _stream_seed(seed: int, stream: str, step: int, rank: int) -> int:
    """A seed for one random stream of one step on one rank, independent of how the run got there (resume)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _accumulate(totals: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    for key, value in values.items():
        value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        totals[key] = totals[key] + value if key in totals else value
