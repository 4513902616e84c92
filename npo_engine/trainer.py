"""The training loop, top to bottom: (interventions) -> rollout -> reward -> guide mixing -> advantages ->
log-probs, loss, step -> weight sync -> log and checkpoint.

    trainer = Trainer(TrainConfig())     # the built-in demo; load_config(...) for anything else
    trainer.train()                      # or trainer.step() one optimizer step at a time

Every rank of a torchrun job runs this same code on its shard of each step's prompts: the policy is sharded
with FSDP2, and each rank samples from its own colocated rollout engine holding full weights, refreshed after
every optimizer step. A single process runs the identical path with no process group.

Guide mixing (`mix.mode`) is a component from `npo_engine.guides`: before each step it may carry out an
intervention (train ahead, build a verified guide cache, roll back with `restore`), and after scoring it may
replace one slot of gated groups with a guide trajectory. The loop never branches on the algorithm. Metrics
rows carry `step` (position on the final trajectory) and `total_steps` (every optimizer step spent); rows of a
segment a rollback undoes are marked `discarded`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from npo_engine import algo
from npo_engine.checkpoint import CheckpointError, CheckpointManager, NoCheckpointError, nonfinite_weights
from npo_engine.config import ConfigError, TrainConfig, config_to_dict
from npo_engine.data.records import PromptRecord
from npo_engine.data.sampler import PromptSampler, build_prompt_sets, check_prompt_lengths
from npo_engine.data.samples import GUIDE, ON_POLICY, Groups, Sample
from npo_engine.distributed import (
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    apply_activation_checkpointing,
    barrier,
    broadcast_object,
    decoder_layers,
    init_distributed,
    shard_model,
)
from npo_engine.guides import SUCCESS_REWARD, stream_seed
from npo_engine.mixing import make_mixer
from npo_engine.metrics import MetricsLogger
from npo_engine.models import LogprobModel, ensure_demo_model, load_causal_lm, load_tokenizer
from npo_engine.rewards import RewardRunner
from npo_engine.rollout.base import RolloutEngine, SamplingParams
from npo_engine.rollout.factory import make_engine
from npo_engine.run_dir import open_run_dir
from npo_engine.stopping import GracefulStop, TrainingDiverged, TrainingStopped, signal_name
from npo_engine.sync import WeightSync, policy_logprob_fn
from npo_engine.train_state import TrainState


@dataclass
class TrainBatch:
    """Groups as right-padded tensors: row b is prompt + completion of sample b.

    input_ids, attention_mask, completion_mask, behavior_logp: [B, L]; rewards, group_ids, policy_id,
    replayed, advantages, row_entropy: [B] (advantages may become [B, L] when a guide IS weight is folded in).
    `completion_mask` marks the completion tokens (the ones the loss scores), and `behavior_logp[b, j]` is the
    behaviour log-prob of token j under the policy that produced row b (the engine's, or the guide's recorded
    one); rows with `replayed` set have none yet (RLEP): the update recomputes them with the current weights.
    `row_entropy` is filled by the update: each row's mean token entropy under the policy that trained on it.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    behavior_logp: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    policy_id: torch.Tensor
    replayed: torch.Tensor
    advantages: torch.Tensor | None = None
    row_entropy: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> TrainBatch:
        """Rows [start, stop) as views (writes to `row_entropy` reach this batch)."""
        return self._index(slice(start, stop))

    def select(self, index: torch.Tensor) -> TrainBatch:
        """The rows of `index` ([n] int64) as copies."""
        return self._index(index)

    def _index(self, key: slice | torch.Tensor) -> TrainBatch:
        return TrainBatch(**{name: None if value is None else value[key] for name, value in vars(self).items()})


class Trainer:
    """GRPO-family RL training of a causal LM with verifiable rewards, with guide mixing (see the module
    docstring). Implements `npo_engine.guides.GuideHost`, the seam through which interventions act on it."""

    def __init__(self, cfg: TrainConfig, *, run_dir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False):
        """`run_dir` defaults to run.runs_dir/run.name; it must be empty for a new run (`overwrite` moves an old
        run aside), or hold the run to continue with `resume` (see `npo_engine.run_dir`)."""
        try:
            self._init(cfg, run_dir, resume=resume, overwrite=overwrite)
        except BaseException:
            if getattr(self, "_run", None) is not None:
                self._run.release()  # a failed start leaves the run directory to the next attempt
            raise

    def _init(self, cfg: TrainConfig, run_dir: str | Path | None, *, resume: bool, overwrite: bool) -> None:
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = self.dist.device
        if self.device.type == "cpu" and cfg.run.cpu_threads:
            torch.set_num_threads(cfg.run.cpu_threads)
        if cfg.data.prompts_per_step % self.dist.world_size:
            raise ConfigError(
                f"data.prompts_per_step = {cfg.data.prompts_per_step} must be a multiple of the number of ranks "
                f"({self.dist.world_size}) so every rank gets whole groups; change one of them"
            )
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.run.runs_dir) / cfg.run.name
        # Own the run directory (lock), and apply the rules of a new run, --resume and --overwrite before any work.
        self._run = open_run_dir(self.run_dir, cfg, resume=resume, overwrite=overwrite, is_main=self.dist.is_main)
        torch.manual_seed(cfg.run.seed)

        # Model, tokenizer and the colocated policy engine (its own full copy of the weights).
        self.model_dir = Path(cfg.model.path) if cfg.model.path else self._demo_model_dir()
        self.tokenizer = load_tokenizer(self.model_dir)
        use_bf16 = self.device.type == "cuda" and cfg.model.dtype in ("auto", "bfloat16")
        lm = load_causal_lm(self.model_dir, torch.float32, attn_implementation=cfg.model.attn_implementation,
                            device=self.device, half_precision=use_bf16 and self.dist.world_size > 1).to(self.device)
        self.engine_dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.engine: RolloutEngine = self._make_engine("policy", lm)
        self._guide_engine: RolloutEngine | None = None  # built when the first guide cache is
        self.ref_policy = self._frozen_reference(lm) if cfg.algo.kl_coef > 0 else None
        if cfg.model.activation_checkpointing:
            apply_activation_checkpointing(lm)
        cache_mb = cfg.kernels.logits_cache_mb
        # A KL term needs the log-probs' own gradient, which the head's gradient formed in the forward does not give.
        grad_in_forward = cfg.kernels.head_gradient_in_forward and self.ref_policy is None
        policy = LogprobModel(lm, kernel_backend=cfg.kernels.backend,
                              logits_cache_bytes=None if cache_mb is None else int(cache_mb * 2**20),
                              head_gradient_in_forward=grad_in_forward)
        self.policy = shard_model(policy, decoder_layers(lm),
                                  self.dist, param_dtype=torch.bfloat16 if use_bf16 else None)
        self.policy_loss = algo.get_policy_loss("ppo")

        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                           fused=cfg.optim.fused or None)
        warmup = cfg.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))

        # Prompts, verifier, guide mixing.
        prompt_sets = build_prompt_sets(cfg.data, cfg.run.seed)
        check_prompt_lengths(prompt_sets, self.tokenizer, cfg.data, rank=self.dist.rank,
                             world_size=self.dist.world_size)  # now, not at the step that first samples one
        self.sampler = PromptSampler(prompt_sets.train, cfg.data.prompts_per_step, seed=cfg.run.seed,
                                     shuffle=cfg.data.shuffle)
        self.eval_records = prompt_sets.eval
        self.rewards = RewardRunner(cfg.reward.verifier, timeout_s=cfg.reward.timeout_s,
                                    num_workers=cfg.reward.num_workers, step_timeout_s=cfg.reward.step_timeout_s,
                                    clip_range=cfg.reward.clip_range)
        self.mixer = make_mixer(cfg)

        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                             rank=self.dist.rank, world_size=self.dist.world_size)
        self.checkpoints.clear_stale()  # an interrupted save's leftovers would only take disk space
        self.state = TrainState()
        self._bad_steps = 0  # consecutive steps with a skipped update (optim.max_bad_steps)
        startup_events = self._resume() if resume else []
        self.metrics = MetricsLogger(self.run_dir, total_steps=cfg.run.steps, is_main=self.dist.is_main,
                                     tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                                     start_step=self.state.total_steps + 1)  # rows are numbered from 1
        if self._run.moved_to is not None:
            startup_events.append(("old_run_moved", {"to": str(self._run.moved_to)}))
        if self._run.config_changes:
            startup_events.append(("config_changed", {"fields": self._run.config_changes}))
        for kind, fields in startup_events:
            self.event(kind, **fields)
        if prompt_sets.skipped_rows:
            self.metrics.event("data_rows_skipped", count=prompt_sets.skipped_rows)
        self.mixer.check(self)  # e.g. the guide caches a resumed replay needs: present and of this run
        self._sync_engine()
        self._run.write_config(cfg)  # the run has started (or resumed): config.yaml describes it from now on

    @property
    def step_index(self) -> int:
        """Optimizer steps on the final trajectory so far (the next step to run)."""
        return self.state.step

    # ------------------------------------------------------------------------------------------- the loop

    def train(self) -> None:
        """Run until `run.steps`; evaluate, checkpoint and export as configured.

        SIGINT or SIGTERM stops the run after the current step, on every rank, with a checkpoint, and raises
        `TrainingStopped`; a second signal exits at once (see `npo_engine.stopping`)."""
        try:
            with GracefulStop(on_exit_now=self._run.release) as stop:
                while True:
                    self.mixer.before_step(self)  # an intervention may roll back from the last step, so ask first
                    if self.state.step >= self.cfg.run.steps:
                        break
                    self.step()
                    if self.state.step < self.cfg.run.steps and (signum := stop.agreed()) is not None:
                        self._stop(signum)
                every = self.cfg.checkpoint.every
                if every and self.state.step % every:
                    self.save_checkpoint()
                if self.cfg.checkpoint.export_final:
                    self.export(self.state.step)
        finally:
            self.close()

    def _stop(self, signum: int) -> None:
        """The run was asked to stop: save the current step (unless checkpoint.every = 0), then raise."""
        step, saved = self.state.step, None
        if self.cfg.checkpoint.every:
            done = (step, self.checkpoints.path_for(step)) in self.checkpoints.list()
            saved = self.checkpoints.path_for(step) if done else self.save_checkpoint()
        self.event("stopped", signal=signal_name(signum), checkpoint=str(saved) if saved else None)
        where = (f"checkpoint {saved}; continue with --resume --run-dir {self.run_dir}" if saved
                 else "no checkpoint (checkpoint.every = 0)")
        raise TrainingStopped(f"stopped by {signal_name(signum)} after step {step} of {self.cfg.run.steps}; {where}",
                              signum, str(saved) if saved else None)

    def step(self) -> dict[str, float]:
        """One optimizer step on one batch of prompts; returns the metrics it logged."""
        self.mixer.before_step(self)                                         # interventions (NPO); idempotent
        cfg, step = self.cfg, self.state.step
        metrics: dict[str, float] = {}
        if self.state.total_steps == 0 and self._evaluating:
            metrics.update(self.evaluate())  # the base model's score, logged with the first step
        discarded = self.mixer.discarding(self)  # this step belongs to a segment a rollback will undo
        start = time.perf_counter()

        groups = self.rollout(step)                                          # n completions per prompt
        metrics["time/rollout"] = time.perf_counter() - start
        self.score(groups)                                                   # verifier rewards
        metrics |= self._group_metrics(groups)                               # on-policy only, before mixing
        metrics |= self.mixer.mix(groups, self)                              # guide slots (NPO)
        batch = self.make_batch(groups)
        batch.advantages = algo.compute_advantages(batch.rewards, batch.group_ids, cfg.algo,
                                                   policy_id=batch.policy_id, backend=cfg.kernels.backend)
        train_start = time.perf_counter()
        self._release_engine_memory()                                        # vLLM on CUDA: engines sleep
        metrics |= self.update(batch)                                        # log-probs, loss, backward, AdamW
        for sample, entropy in zip(groups, batch.row_entropy.tolist()):
            sample.entropy = entropy                                         # ExGRPO keeps the lowest-entropy
        metrics["time/train"] = time.perf_counter() - train_start
        metrics |= self._sync_engine()                                       # engine gets the new weights
        self.state.step += 1
        self.state.total_steps += 1

        if cfg.logging.dump_rollouts:
            self._dump_rollouts(groups, batch)
        every = cfg.logging.eval_every
        if self._evaluating and ((every and self.state.step % every == 0) or self.state.step == cfg.run.steps):
            metrics.update(self.evaluate())
        metrics["time/step"] = time.perf_counter() - start
        metrics["throughput/tokens_per_s"] = metrics["rollout/tokens"] / max(metrics["time/rollout"], 1e-9)
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]
        metrics["total_steps"] = self.state.total_steps
        metrics["discarded"] = float(discarded)
        self.mixer.after_step(self, metrics)                                 # signals for a controller
        self.metrics.log(self.state.step, metrics)
        self._count_bad_step(metrics["optim/skipped"] > 0)
        if cfg.checkpoint.every and self.state.step % cfg.checkpoint.every == 0:
            self.save_checkpoint()
        if self.state.step in cfg.checkpoint.export_steps and not discarded:
            self.export(self.state.step)
        return metrics

    # ----------------------------------------------------------------------------------------------- phases

    def rollout(self, step: int) -> Groups:
        """Sample `group_size` completions for each of this rank's prompts of `step` with the current policy."""
        cfg, n = self.cfg, self.cfg.rollout.group_size
        records = self.mixer.select_prompts(self, step, self.prompts_of_step(step))  # ExGRPO replays some
        first = self.dist.rank * len(records)
        prompt_ids = [self.encode_prompt(r.prompt, r.id) for r in records]
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                                seed=stream_seed(cfg.run.seed, self.mixer.rollout_stream(self), step, self.dist.rank))
        out = self.engine.generate([ids for ids in prompt_ids for _ in range(n)], params)
        samples = [
            Sample(prompt_id=record.id, group_id=first + g, prompt=record.prompt, answer=record.answer,
                   prompt_ids=prompt_ids[g], completion_ids=list(out.token_ids[g * n + i]),
                   behavior_logp=out.logprobs[g * n + i], logp_source="engine",
                   finish_reason=out.finish_reasons[g * n + i])
            for g, record in enumerate(records) for i in range(n)
        ]
        return Groups(samples=samples, group_size=n, step=step)

    def score(self, groups: Groups) -> dict[str, float]:
        """Verifier rewards for every sample (a failing or hanging verifier costs that sample's reward)."""
        completions = [self.decode_completion(s.completion_ids) for s in groups]
        result = self.rewards.score([s.prompt for s in groups], completions, [s.answer for s in groups])
        for sample, reward in zip(groups, result.rewards):
            sample.reward = reward
        groups.stats = dict(result.stats)
        return result.stats

    def make_batch(self, groups: Groups) -> TrainBatch:
        """Right-pad prompt + completion of every sample into [B, L] tensors on the training device."""
        input_ids, attention_mask, completion_mask, behavior_logp = self._pad(
            [s.prompt_ids for s in groups], [s.completion_ids for s in groups], [s.behavior_logp for s in groups])
        to = self.device
        return TrainBatch(input_ids=input_ids.to(to), attention_mask=attention_mask.to(to),
                          completion_mask=completion_mask.to(to), behavior_logp=behavior_logp.to(to),
                          rewards=torch.tensor(groups.rewards, dtype=torch.float32, device=to),
                          group_ids=torch.tensor([s.group_id for s in groups], device=to),
                          policy_id=torch.tensor([s.policy_id for s in groups], device=to),
                          replayed=torch.tensor([s.logp_source == "replay" for s in groups], device=to))

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """Fix each row's behaviour log-probs by its source, then take `optim.epochs` passes of
        `optim.mini_batches` AdamW updates.

        On-policy rows: the engine's log-probs, or the trainer's recomputation (`rollout.behavior_logp`).
        Guide rows: the guide's recorded log-probs (`mix.guide_is: exact`, and `exgrpo`, whose weight is
        π_θ / π_recorded), zeros for a teacher (`luffy`: π_φ ≡ 1), or π_old recomputed on their tokens (`none`),
        times the truncated weight min(π_old / π_guide, C) folded into per-token advantages (`decoupled`).
        Replayed rows (RLEP) are recomputed like on-policy ones. The first update of a step has ratio 1 on
        recomputed rows; later mini-batches are slightly off-policy and the PPO clip bounds them.

        π_old, the trainer's log-probs before the step's first update, costs a forward without gradient over
        the whole batch only where a later update needs it; with one update per step, or where no row needs it
        (the mismatch metrics still do), the first update's own forward gives it, before any weight moves.
        """
        cfg = self.cfg
        updates_per_step = cfg.optim.epochs * len(self._mini_batches(batch))
        mismatch = algo.mismatch_sums_empty()
        # A config choice (RLEP's mode always has replayed rows), so every rank takes the same path.
        old_in_first_update = updates_per_step == 1 or not self._rows_need_old_logp()
        if not old_in_first_update:
            self._apply_old_logp(batch, self._logprobs(batch), mismatch)
        batch.row_entropy = torch.zeros(batch.input_ids.shape[0], device=batch.input_ids.device)
        minis = [mini for _ in range(cfg.optim.epochs) for mini in self._mini_batches(batch)]
        updates = [self._optimizer_update(mini, mismatch if index == 0 and old_in_first_update else None)
                   for index, mini in enumerate(minis)]
        out = _mismatch_metrics(mismatch)
        for key in updates[0]:  # mean over updates; a guide metric over those that had guide tokens
            values = [u[key] for u in updates if not math.isnan(u[key])]
            out[key] = sum(values) / len(values) if values else math.nan
        out["optim/skipped"] = sum(u["optim/skipped"] for u in updates)
        self.scheduler.step()
        return out

    def _rows_need_old_logp(self) -> bool:
        """Whether some row's behaviour log-prob or weight comes from π_old (see `update`)."""
        cfg = self.cfg
        return cfg.rollout.behavior_logp == "recompute" or cfg.mix.mode == "rlep" or self._guides_need_old_logp()

    def _guides_need_old_logp(self) -> bool:
        """Whether the guide rows' ratio or weight needs π_old (mode none has no guide rows)."""
        return self.cfg.mix.mode != "none" and algo.needs_old_logp(self.cfg.mix.guide_weighting)

    def _apply_old_logp(self, batch: TrainBatch, old_logp: torch.Tensor, mismatch: dict[str, float]) -> None:
        """Set `batch`'s behaviour log-probs and per-token advantages from π_old ([B, L], no gradient) by each
        row's source (`update`), and add the engine-vs-trainer sums of its on-policy rows to `mismatch`."""
        cfg = self.cfg
        guide_is = cfg.mix.guide_weighting
        engine_logp = batch.behavior_logp
        on_policy = (batch.policy_id == ON_POLICY)[:, None]
        replayed = batch.replayed[:, None]
        rows = ((on_policy & (cfg.rollout.behavior_logp == "recompute")) | (~on_policy & self._guides_need_old_logp())
                | replayed)
        batch.behavior_logp = torch.where(rows, old_logp, engine_logp)
        token_weights = torch.ones_like(old_logp)
        if guide_is == "decoupled":
            weights = algo.decoupled_weights(old_logp, engine_logp, batch.completion_mask & ~on_policy,
                                             cfg.mix.decoupled_cap)
            token_weights = torch.where(~on_policy, weights, token_weights)
        # The policy engine's log-probs of its own tokens against the trainer's (replayed rows have none).
        weights, sums = algo.mismatch_weights(old_logp, engine_logp, batch.completion_mask & on_policy & ~replayed,
                                              cfg.algo.mismatch_correction, cfg.algo.mismatch_threshold)
        token_weights = token_weights * weights
        if guide_is == "decoupled" or cfg.algo.mismatch_correction != "none":
            batch.advantages = batch.advantages[:, None] * token_weights
        algo.add_mismatch_sums(mismatch, sums)

    def _optimizer_update(self, batch: TrainBatch, mismatch: dict[str, float] | None = None) -> dict[str, float]:
        """One AdamW update on `batch`, accumulated over micro-batches; skipped if the loss or gradient is
        non-finite (the weights are never touched then). With `mismatch` (the step's first update, when no
        forward recomputed π_old), each micro-batch takes π_old from its own forward (`_apply_old_logp`).

        The one normalizer: each micro-batch's loss (the kernel's aggregation over its own rows) is scaled by
        its units over U, the units of the whole mini-batch summed over ranks (`algo.loss_units`); summed over
        micro-batches and ranks that is the loss of the whole mini-batch at once, whatever the micro-batch size
        and the number of ranks. (FSDP averages gradients over ranks, hence the × world_size below.)

        Rows with zero advantage everywhere are scored without gradient (`optim.skip_zero_advantage`,
        `algo.micro_batches`): the same loss, gradient and metrics, without their backward.
        """
        cfg = self.cfg
        units = algo.loss_units(batch.completion_mask, cfg.algo.loss_agg)
        total_units = all_reduce_sum(units.sum().reshape(1)).clamp_min(1)[0]
        totals: dict[str, torch.Tensor] = {}
        self.optimizer.zero_grad(set_to_none=True)
        skipped_rows = 0
        # The loss goes into the policy's forward, which may form the LM head's gradient there. Where that forward
        # also supplies π_old, the loss takes it from the log-probs it is given: π_old of a token is its own
        # log-prob, so the loss stays a sum of per-token terms.
        head_loss = self._policy_loss if mismatch is None else self._policy_loss_at_old_logp
        for micro_batch in self._plan_micro_batches(batch):
            mb = batch.select(micro_batch.rows)
            # Padding rows add their tokens to no sum.
            mismatch_sums = (None if mismatch is None else mismatch if micro_batch.counted
                             else algo.mismatch_sums_empty())
            with torch.set_grad_enabled(micro_batch.grad):
                logp, entropy, pg_loss, pg_metrics = self.policy(
                    mb.input_ids, mb.attention_mask, mb.completion_mask, **self._sampling_support,
                    return_entropy=True, head_loss=functools.partial(head_loss, mb), fill=mb.behavior_logp)
                if mismatch_sums is not None:
                    self._apply_old_logp(mb, logp.detach(), mismatch_sums)
                # FSDP averages gradients over ranks; × world_size turns that mean back into the sum the global
                # normalizer needs (a single process has world_size 1). Padding micro-batches weigh 0.
                weight = units[micro_batch.rows].sum() / total_units * self.dist.world_size * micro_batch.counted
                weight = weight.to(pg_loss.dtype)
                loss = pg_loss
                if self.ref_policy is not None:
                    kl = cfg.algo.kl_coef * self._kl_term(mb, logp)
                    loss = loss + kl
                    _accumulate(totals, {"loss/kl": kl.detach() * weight / self.dist.world_size})
                if micro_batch.grad:
                    (loss * weight).backward()
            if not micro_batch.counted:
                continue
            skipped_rows += 0 if micro_batch.grad else len(micro_batch.rows)
            mask = mb.completion_mask
            if batch.row_entropy is not None:  # a view into the step batch's (set by `update`)
                batch.row_entropy[micro_batch.rows] = (entropy.detach() * mask).sum(1) / mask.sum(1).clamp_min(1)
            guide_rows = (mb.policy_id != ON_POLICY)[:, None] & mask
            tokens, guide_tokens = mask.sum(), guide_rows.sum()
            share = weight / self.dist.world_size  # this micro-batch's share of the loss of the whole batch
            _accumulate(totals, {"loss/pg": pg_loss.detach() * share,
                                 "entropy/sum": (entropy.detach() * mask).sum(),
                                 "entropy/guide_sum": (entropy.detach() * guide_rows).sum(),
                                 "tokens": tokens.float(), "guide_tokens": guide_tokens.float()})
            # Token-weighted means; the guide-only metrics are weighted by guide tokens.
            _accumulate(totals, {k: v * (guide_tokens if k.endswith("_guide") else tokens)
                                 for k, v in pg_metrics.items()})

        grad_norm = self._clip_gradients()
        finite = torch.isfinite(grad_norm) & torch.isfinite(totals["loss/pg"])
        finite = bool(all_reduce_sum(finite.float().reshape(1)).item() == self.dist.world_size)
        if finite:
            self.optimizer.step()
            self._check_weights(f"the optimizer update of step {self.state.step + 1}")
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.metrics.event("nonfinite_step_skipped", step=self.state.step + 1,
                               grad_norm=float(grad_norm), loss=float(totals["loss/pg"]))

        summed = all_reduce_sum(torch.stack([totals[k] for k in sorted(totals)]).double())
        reduced = dict(zip(sorted(totals), summed.tolist()))
        tokens, guide_tokens = max(reduced.pop("tokens"), 1.0), reduced.pop("guide_tokens")
        entropy_sum, entropy_guide = reduced.pop("entropy/sum"), reduced.pop("entropy/guide_sum")
        out = {"loss/pg": reduced.pop("loss/pg"), "entropy/mean": entropy_sum / tokens,
               "entropy/on_policy": (entropy_sum - entropy_guide) / max(tokens - guide_tokens, 1.0),
               "entropy/guide": entropy_guide / guide_tokens if guide_tokens else float("nan")}
        if "loss/kl" in reduced:
            out["loss/kl"] = reduced.pop("loss/kl")
        for key, value in reduced.items():
            if key.endswith("_guide"):
                out[key] = value / guide_tokens if guide_tokens else float("nan")
            else:
                out[key] = value / tokens
        out["optim/grad_norm"] = float(grad_norm)
        out["optim/skipped"] = float(not finite)
        skipped = torch.tensor([float(skipped_rows)], device=units.device)  # the collective's device (NCCL: CUDA)
        out["optim/rows_without_backward"] = float(all_reduce_sum(skipped)[0]) / (batch.input_ids.shape[0]
                                                                                  * self.dist.world_size)
        return out

    def _policy_loss(self, mb: TrainBatch, logp: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The policy-gradient loss of micro-batch `mb` given its log-probs [B, L] (a sum of per-token terms)."""
        cfg = self.cfg
        return self.policy_loss(logp, mb.behavior_logp, mb.advantages, mb.completion_mask, cfg.algo,
                                policy_id=mb.policy_id, norm_length=cfg.rollout.max_new_tokens,
                                guide_transform=algo.guide_transform(cfg.mix.guide_weighting),
                                shaping_gamma=cfg.mix.shaping_gamma, backend=cfg.kernels.backend)

    def _policy_loss_at_old_logp(self, mb: TrainBatch, logp: torch.Tensor
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`_policy_loss` with π_old = `logp` (detached): the step's first update, whose own forward supplies
        it. Behaviour log-probs and per-token weights are set on a copy of `mb` (`_apply_old_logp`)."""
        at_old = copy.copy(mb)
        self._apply_old_logp(at_old, logp.detach(), algo.mismatch_sums_empty())
        return self._policy_loss(at_old, logp)

    def _plan_micro_batches(self, batch: TrainBatch) -> list[algo.MicroBatch]:
        """The micro-batches of one optimizer update (`algo.plan_micro_batches`), with as many forwards with and
        without gradient on every rank."""
        micro = self.cfg.optim.micro_batch_size
        trainable = torch.ones(batch.input_ids.shape[0], dtype=torch.bool, device=batch.input_ids.device)
        if self.cfg.optim.skip_zero_advantage and self.ref_policy is None:  # a KL term has a gradient everywhere
            trainable = algo.rows_with_gradient(batch.advantages, batch.completion_mask)
        counts = torch.tensor(algo.count_micro_batches(trainable, micro), dtype=torch.float64,
                              device=trainable.device)
        grad_batches, free_batches = (int(c) for c in all_reduce_max(counts))
        # At least one backward: every parameter then has a gradient (zero if no row has one), so AdamW moves the
        # weights exactly as it would after a backward over all rows.
        return algo.plan_micro_batches(trainable, micro, grad_batches=max(grad_batches, 1),
                                       free_batches=free_batches)

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
            correct = sum(1.0 for r in result.rewards if r >= SUCCESS_REWARD)
        totals = all_reduce_sum(torch.tensor([correct, float(len(records))], dtype=torch.float64))
        return {"acc/eval": totals[0].item() / max(totals[1].item(), 1.0), "time/eval": time.perf_counter() - start}

    # -------------------------------------------------------------------------------------- state and I/O

    def save_checkpoint(self, *, pin: bool = False) -> Path:
        """Full state of the current step: weights, optimizer, scheduler, RNG and the `TrainState`.

        `pin` exempts it from retention (a rollback target); pins are restored from the state on resume."""
        if pin:
            self.checkpoints.pin(self.state.step)
        return self.checkpoints.save(self.state.step, self.policy, self.optimizer, scheduler=self.scheduler,
                                     extra={"train_state": self.state.to_json(), "seed": self.cfg.run.seed})

    def restore(self, step: int, *, rollback: bool = False) -> dict[str, float]:
        """Go back to the checkpoint of `step`: weights, optimizer, scheduler, RNG, data position and trainer
        state, then re-sync the rollout engine. The one way back, used by `--resume` and every rollback.

        With `rollback`, what happened since is not undone: `total_steps`, the intervention log, the controller
        state and the mistake pool keep their live values.
        """
        start = time.perf_counter()
        path = self.checkpoints.path_for(step)
        if (step, path) not in self.checkpoints.list():
            raise FileNotFoundError(f"no complete checkpoint of step {step} under {self.checkpoints.root} to "
                                    "restore; checkpoints kept: "
                                    f"{[s for s, _ in self.checkpoints.list()] or 'none'}")
        extra = self.checkpoints.load(path, self.policy, self.optimizer, scheduler=self.scheduler,
                                      seed=self.cfg.run.seed)
        if bad := nonfinite_weights(self.policy):
            raise CheckpointError(f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])}); it was saved "
                                  "from a diverged run or damaged in a way its hashes cannot see")
        restored = TrainState.from_json(extra.get("train_state", extra))
        if rollback:
            live = self.state
            restored.total_steps = live.total_steps
            restored.interventions = live.interventions
            restored.controller = live.controller
            restored.mistake_pool = live.mistake_pool
        self.state = restored
        sync = self._sync_engine()
        return {"time/restore": time.perf_counter() - start, "time/sync": sync["time/sync"]}

    def discard_checkpoints_after(self, step: int) -> None:
        """Delete the checkpoints of steps after `step`: a rollback to `step` discards that segment."""
        self.checkpoints.discard_after(step)

    def pin_checkpoint(self, step: int) -> None:
        self.checkpoints.pin(step)

    def unpin_checkpoint(self, step: int) -> None:
        self.checkpoints.unpin(step)

    def checkpoint_steps(self) -> list[tuple[int, Path]]:
        """The complete checkpoints kept, as (step, path), oldest first."""
        return self.checkpoints.list()

    def export(self, step: int) -> Path:
        """The policy as a Hugging Face directory under exports/ (loadable by transformers, vLLM, guides)."""
        return self.checkpoints.export_hf(step, self.policy.lm, self.run_dir / "exports" / f"step_{step:06d}",
                                          tokenizer=self.tokenizer)

    def event(self, kind: str, **fields: Any) -> None:
        self.metrics.event(kind, step=self.state.step, **fields)

    def close(self) -> None:
        """Stop the reward workers, flush the logs and give up the run directory; idempotent."""
        self.rewards.close()
        self.metrics.close()
        self._run.release()

    def _resume(self) -> list[tuple[str, dict[str, Any]]]:
        """Restore the newest checkpoint that verifies; damaged newer ones are set aside (`step_X.damaged`) and
        reported. Returns the events to log once the logger exists."""
        events: list[tuple[str, dict[str, Any]]] = []
        for step, path in reversed(self.checkpoints.list()):
            try:
                self.restore(step)
                break
            except CheckpointError as e:
                aside = self.checkpoints.set_aside(path)
                events.append(("checkpoint_damaged", {"checkpoint": path.name, "set_aside_as": aside.name,
                                                      "error": str(e)}))
        else:
            damaged = f" ({len(events)} damaged, set aside as step_*.damaged)" if events else ""
            raise NoCheckpointError(
                f"--resume: no complete checkpoint under {self.checkpoints.root}{damaged}; start without "
                "--resume (with --overwrite to move this run aside) or point --run-dir at the run to continue"
            )
        if events:
            events.append(("resumed_from_older_checkpoint", {"checkpoint": path.name}))
        for iv in self.state.interventions:  # rollback targets stay exempt from retention
            if iv["phase"] in ("ahead", "replay"):
                self.checkpoints.pin(iv["start"])
        return events

    def _count_bad_step(self, bad: bool) -> None:
        """Stop the run once `optim.max_bad_steps` consecutive steps skipped an update (non-finite loss or
        gradient): a run that keeps skipping learns nothing, and must not end as if it had succeeded."""
        self._bad_steps = self._bad_steps + 1 if bad else 0
        limit = self.cfg.optim.max_bad_steps
        if self._bad_steps >= limit:
            last = self.state.step
            self.event("training_diverged", bad_steps=self._bad_steps)
            raise TrainingDiverged(
                f"steps {last - limit + 1}-{last} all skipped updates with a non-finite loss or gradient "
                f"(optim.max_bad_steps = {limit}; see events.jsonl); check the rewards (reward/clipped) and the "
                "data, lower optim.lr, then --resume from the last checkpoint")

    def _check_weights(self, after: str) -> None:
        """The weights must be finite after every update. An exact undo would need a copy of the weights and the
        optimizer state at each update, so damaged weights stop the run at once: before they reach the
        rollout engine or a checkpoint."""
        if bad := nonfinite_weights(self.policy):
            raise TrainingDiverged(
                f"the weights hold NaN or infinity after {after} ({len(bad)} tensors, e.g. {bad[0]}) although the "
                "loss and gradient were finite; nothing was saved from them. Lower optim.lr (or raise optim.eps), "
                "then --resume from the last checkpoint")

    # --------------------------------------------------------------------------- what the guide code uses

    def prompts_of_step(self, step: int) -> list[PromptRecord]:
        """This rank's share of the prompts of `step` (a pure function of the seed and the step)."""
        prompts = self.sampler.batch(step)
        per_rank = len(prompts) // self.dist.world_size
        return prompts[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]

    def guide_engine(self, model: torch.nn.Module | None = None) -> RolloutEngine:
        """The guide engine: a second engine of the same backend, alive from its first use to the end.

        It holds a copy of the policy (NPO's guides are synced into it), or, when the first call gives `model`,
        that model (a baseline's teacher or converged policy); a run has at most these two engines."""
        if self._guide_engine is None:
            if model is None:  # the policy engine's model (vLLM's engine keeps a weightless skeleton of it)
                model = getattr(self.engine, "skeleton", None) or self.engine.model
            self._guide_engine = self._make_engine("guide", model)
        elif model is not None:
            raise RuntimeError("the guide engine already exists; a model for it can only be given on its first use")
        return self._guide_engine

    def sync_guide_engine(self) -> dict[str, float]:
        """The trainer's current weights into the guide engine, through the same sync path as the policy's."""
        return self._weight_sync("guide", self.guide_engine()).push(self.policy.lm, step=self.state.step)

    @torch.no_grad()
    def trainer_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        """Per-token log-probs of each completion under the trainer's current weights (fp32, on the CPU).

        Collective under FSDP: every rank runs as many forward passes as the busiest one, so ranks with fewer
        rows run a one-row pass whose result is dropped."""
        micro = self.cfg.optim.micro_batch_size
        passes = max(all_gather_objects(math.ceil(len(prompt_ids) / micro)))
        out: list[torch.Tensor] = []
        for k in range(passes):
            lo, hi = k * micro, (k + 1) * micro
            rows_p, rows_c = prompt_ids[lo:hi], completion_ids[lo:hi]
            idle = not rows_p
            if idle:
                rows_p, rows_c = [[self.tokenizer.pad_token_id]], [[self.tokenizer.pad_token_id]]
            input_ids, attention_mask, completion_mask, _ = self._pad(rows_p, rows_c)
            to = self.device
            logp, _ = self.policy(input_ids.to(to), attention_mask.to(to), completion_mask.to(to),
                                  **self._sampling_support)
            if not idle:
                out += [row[m].float().cpu() for row, m in zip(logp, completion_mask.to(to))]
        return out

    def model_identity(self) -> dict[str, Any]:
        """What a guide cache must agree with to be used by this run: seed, model, vocabulary, data."""
        data = json.dumps(config_to_dict(self.cfg.data), sort_keys=True)
        return {"seed": self.cfg.run.seed, "model": str(self.model_dir.resolve()),
                "vocab_size": int(self.policy.lm.config.vocab_size),
                "data": hashlib.sha256(data.encode()).hexdigest()[:16]}

    # ------------------------------------------------------------------------------------------- helpers

    def _make_engine(self, role: str, model: torch.nn.Module) -> RolloutEngine:
        return make_engine(self.cfg.rollout, role, copy.deepcopy(model).to(self.engine_dtype),
                           eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                           seed=stream_seed(self.cfg.run.seed, f"engine/{role}", 0, self.dist.rank),
                           vllm=self.cfg.vllm)

    def _release_engine_memory(self) -> None:
        """Engines that can free their accelerator memory while the trainer trains (vLLM's sleep mode on CUDA,
        `vllm.sleep_level`) do so; each wakes at its next sync or rollout."""
        for engine in (self.engine, self._guide_engine):
            if engine is not None and callable(getattr(engine, "sleep", None)):
                engine.sleep()

    def _pad(self, prompts: list[list[int]], completions: list[list[int]],
             logps: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """[B, L] input ids, attention mask, completion mask and behaviour log-probs (zeros without `logps`)
        of right-padded prompt + completion rows."""
        length = max(len(p) + len(c) for p, c in zip(prompts, completions))
        size = (len(prompts), length)
        input_ids = torch.full(size, self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(size, dtype=torch.long)
        completion_mask = torch.zeros(size, dtype=torch.bool)
        behavior_logp = torch.zeros(size, dtype=torch.float32)
        for b, (prompt, completion) in enumerate(zip(prompts, completions)):
            p, c = len(prompt), len(completion)
            input_ids[b, : p + c] = torch.tensor(prompt + completion)
            attention_mask[b, : p + c] = 1
            completion_mask[b, p : p + c] = True
            if logps is not None:
                behavior_logp[b, p : p + c] = logps[b].float().cpu()
        return input_ids, attention_mask, completion_mask, behavior_logp

    def _demo_model_dir(self) -> Path:
        # Rank 0 builds the demo model if it is not cached yet; the others wait and then read it.
        path = ensure_demo_model(self.cfg.model) if self.dist.is_main else None
        barrier()
        return Path(broadcast_object(str(path) if path else None)) if self.dist.enabled else path

    def _sync_engine(self) -> dict[str, float]:
        return self._weight_sync("policy", self.engine).push(self.policy.lm, step=self.state.step)

    def _weight_sync(self, role: str, engine: RolloutEngine) -> WeightSync:
        """The verified sync of one engine (`npo_engine.sync`); its plan and probe live as long as the engine."""
        syncs = self.__dict__.setdefault("_weight_syncs", {})
        if role not in syncs:
            temperature = self.cfg.rollout.temperature
            probe = policy_logprob_fn(self.policy, device=self.device, pad_token_id=self.tokenizer.pad_token_id,
                                      temperature=temperature)
            syncs[role] = WeightSync(engine, role, dtype=self.engine_dtype, config=self.cfg.sync,
                                     trainer_logprobs=probe, temperature=temperature, seed=self.cfg.run.seed)
        return syncs[role]

    def _frozen_reference(self, lm: torch.nn.Module) -> LogprobModel:
        ref = LogprobModel(copy.deepcopy(lm), kernel_backend=self.cfg.kernels.backend).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _kl_term(self, mb: TrainBatch, logp: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref_logp, _ = self.ref_policy(mb.input_ids, mb.attention_mask, mb.completion_mask,
                                          **self._sampling_support)
        kl = algo.kl_penalty(logp, ref_logp, mb.completion_mask, self.cfg.algo.kl_estimator)
        return algo.masked_mean(kl, mb.completion_mask)

    @property
    def _sampling_support(self) -> dict[str, Any]:
        """The distribution the rollouts sample from (temperature, top-k, top-p): the trainer scores its
        log-probs on the same support, so its ratios compare like with like (`rollout/base.py`)."""
        r = self.cfg.rollout
        return {"temperature": r.temperature, "top_k": r.top_k, "top_p": r.top_p}

    @torch.no_grad()
    def _logprobs(self, batch: TrainBatch) -> torch.Tensor:
        parts = []
        for lo in range(0, batch.input_ids.shape[0], self.cfg.optim.micro_batch_size):
            mb = batch.rows(lo, lo + self.cfg.optim.micro_batch_size)
            parts.append(self.policy(mb.input_ids, mb.attention_mask, mb.completion_mask,
                                     **self._sampling_support)[0])
        return torch.cat(parts)

    def _clip_gradients(self) -> torch.Tensor:
        # The optimizer's parameters, not `self.policy.parameters()`: FSDP2 swaps the root module's registered
        # parameters for their unsharded (gradient-less) copies between a forward and its backward.
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm.detach().float()

    def _group_metrics(self, groups: Groups) -> dict[str, float]:
        """Reward, accuracy and length of the on-policy samples (taken before any slot is replaced)."""
        rewards = torch.tensor(groups.rewards, dtype=torch.float64)
        lengths = torch.tensor([len(s.completion_ids) for s in groups], dtype=torch.float64)
        truncated = torch.tensor([s.finish_reason == "length" for s in groups], dtype=torch.float64)
        per_group = (rewards >= SUCCESS_REWARD).reshape(-1, groups.group_size).float().mean(1)
        local = torch.stack([
            rewards.sum(), (rewards >= SUCCESS_REWARD).sum(), lengths.sum(), truncated.sum(),
            torch.tensor(len(rewards)), (per_group == 0).sum(), (per_group == 1).sum(), torch.tensor(len(per_group)),
            torch.tensor(groups.stats.get("reward/verifier_errors", 0.0)),
            torch.tensor(groups.stats.get("reward/verifier_timeouts", 0.0)),
            torch.tensor(groups.stats.get("reward/verifier_skipped", 0.0)),
            torch.tensor(groups.stats.get("reward/clipped", 0.0)),
        ]).double()
        s = all_reduce_sum(local).tolist()
        count, group_count = max(s[4], 1.0), max(s[7], 1.0)
        return {"reward/mean": s[0] / count, "acc/train": s[1] / count, "rollout/length_mean": s[2] / count,
                "rollout/truncated_frac": s[3] / count, "rollout/tokens": s[2],
                "groups/all_wrong_frac": s[5] / group_count, "groups/all_right_frac": s[6] / group_count,
                "reward/verifier_errors": s[8], "reward/verifier_timeouts": s[9],
                "reward/verifier_skipped": s[10], "reward/clipped": s[11]}

    def _dump_rollouts(self, groups: Groups, batch: TrainBatch) -> None:
        """Append every trained sample of the step to rollouts/step_XXXXXX.jsonl (rank 0 gathers)."""
        advantages = batch.advantages if batch.advantages.dim() == 1 else batch.advantages[:, -1]
        rows = [{"step": groups.step + 1, "total_steps": self.state.total_steps, "prompt_id": s.prompt_id,
                 "group_id": s.group_id, "policy_id": s.policy_id, "source": s.source, "reward": s.reward,
                 "advantage": float(a), "gate_acc": s.gate_acc, "num_tokens": len(s.completion_ids),
                 "completion": self.decode_completion(s.completion_ids)}
                for s, a in zip(groups, advantages.tolist())]
        gathered = all_gather_objects(rows)
        if self.dist.is_main:
            directory = self.run_dir / "rollouts"
            directory.mkdir(exist_ok=True)
            with open(directory / f"step_{groups.step + 1:06d}.jsonl", "a", encoding="utf-8") as handle:
                for part in gathered:
                    for row in part:
                        handle.write(json.dumps(row) + "\n")

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


def _mismatch_metrics(sums: dict[str, float]) -> dict[str, float]:
    """`algo.mismatch_sums` of every rank -> mean |log ρ|, max ρ and the share of corrected tokens."""
    summed = all_reduce_sum(torch.tensor([sums["tokens"], sums["abs_log_ratio"], sums["corrected"]],
                                         dtype=torch.float64)).tolist()
    largest = all_gather_objects(sums["max_log_ratio"])
    tokens = max(summed[0], 1.0)
    return {"mismatch/logp_abs": summed[1] / tokens, "mismatch/corrected_frac": summed[2] / tokens,
            "mismatch/ratio_max": math.exp(max(largest)) if max(largest) > -math.inf else float("nan")}


def _accumulate(totals: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    for key, value in values.items():
        value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        totals[key] = totals[key] + value if key in totals else value
