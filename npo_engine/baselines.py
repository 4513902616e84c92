"""The mixed-policy baselines in the same loop as NPO (npo_method.md §13), each a mixing rule of `mix.mode`:

    luffy   a `teacher` source: one slot of every group holds a verified trace of an external teacher; its
            tokens are weighted p / (p + γ) with π_teacher taken as 1 (LUFFY)
    exgrpo  a `replay` source: a share of each batch's prompts comes from the run's own experience pool (the
            lowest-entropy success of partly solved prompts, with its behaviour log-probs); the last slot of
            those groups replays it, weighted w / (w + γ), w = π_θ / π_recorded (ExGRPO)
    rlep    a `converged_run` source: the last M slots of each group hold verified trajectories of a finished
            earlier run's policy, treated as on-policy (log-probs recomputed) (RLEP)

They share the slot mechanics of NPO (`guides.put_in_slot`, `guides.rescore`), the second engine (`guide`
role: a baseline has no NPO guide, so it holds the teacher or the converged policy), and the verifier. The
choices themselves are pure functions in `algo.experience`. A teacher's and a converged run's trajectories of
a step are sampled with that step's seed, so a resume or a rollback sees the same ones.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from npo_engine.algo import experience
from npo_engine.algo.npo import guide_slot
from npo_engine.config import ConfigError, TrainConfig
from npo_engine.data.records import PromptRecord
from npo_engine.data.samples import GUIDE, ON_POLICY, Groups, Sample
from npo_engine.distributed import all_gather_objects, all_reduce_sum, barrier
from npo_engine.guides import (SUCCESS_REWARD, GuideHost, NoMixing, put_in_slot, rescore, sample_verified,
                               stream_seed)
from npo_engine.models import check_model_dir, ensure_demo_teacher, load_causal_lm, load_tokenizer


def load_source_model(host: GuideHost, path: Path, key: str) -> torch.nn.Module:
    """The model of a baseline's trajectory source, after checking that it speaks the policy's vocabulary (its
    token ids go into the policy's loss as they are)."""
    check_model_dir(path, key)
    theirs, ours = load_tokenizer(path).get_vocab(), host.tokenizer.get_vocab()
    if theirs != ours:
        differ = sorted(set(theirs.items()) ^ set(ours.items()))[:3]
        raise ConfigError(f"{key} = '{path}' has another tokenizer vocabulary than the policy ({len(theirs)} vs "
                          f"{len(ours)} tokens; e.g. {differ}): its trajectories are token ids of its own "
                          "vocabulary; use a model trained with the policy's tokenizer")
    return load_causal_lm(path, torch.float32)


def fill_from_source(host: GuideHost, groups: Groups, *, samples: int, temperature: float, stream: str,
                     count: int, policy_id: int, logp_source: str, source: str) -> tuple[list[Sample], list[int],
                                                                                         list[float]]:
    """Sample `samples` completions of each group's prompt from the guide engine (a teacher or a converged
    policy), and put up to `count` verified ones, chosen uniformly, into the group's last `count` slots, with
    zero behaviour log-probs (none exist: π_teacher ≡ 1, or recomputed later), their rewards recomputed.

    Seeds come from (run seed, `stream`, step, rank), so a resume or rollback sees the same trajectories.
    Returns the samples placed, the number of successes per group, and every sampled reward (prompt-major).
    """
    cfg, n = host.cfg, groups.group_size
    firsts = [group[0] for group in groups.groups()]
    successes, rewards = sample_verified(
        host, host.guide_engine(), firsts, [s.prompt_ids for s in firsts], samples=samples, temperature=temperature,
        seed=stream_seed(cfg.run.seed, stream, groups.step, host.dist.rank))
    pick = random.Random(stream_seed(cfg.run.seed, f"{stream}_pick", groups.step, host.dist.rank))
    placed = [
        put_in_slot(groups, g * n + n - count + j, trace, torch.zeros(len(trace)), policy_id=policy_id,
                    logp_source=logp_source, source=source)
        for g, found in enumerate(successes)
        for j, trace in enumerate(experience.pick_successes(found, count, pick))
    ]
    rescore(host, placed)
    return placed, [len(found) for found in successes], rewards


class TeacherMixing(NoMixing):
    """`mix.mode: luffy`: one slot of every group (no gate) holds a verified teacher trace when the teacher
    solved the prompt in `teacher.samples` tries; the run's loss takes π_teacher as 1 (`mix.guide_is: luffy`)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def check(self, host: GuideHost) -> None:
        """Build or load the teacher (a clear error for a missing directory or another vocabulary) and put it
        into the guide engine, at start-up rather than at the first step."""
        cfg = self.cfg.teacher
        if cfg.path:
            path, key = Path(cfg.path).expanduser(), "teacher.path"
        else:
            def build() -> Path:
                return ensure_demo_teacher(self.cfg.model.demo_cache_dir, cfg.demo_sft_steps,
                                           progress=self.cfg.logging.progress and host.dist.is_main)

            if host.dist.is_main:  # one rank builds it; the others then find it in the cache
                build()
            barrier()
            path, key = build(), "teacher"
        host.guide_engine(load_source_model(host, path, key))
        host.event("teacher_loaded", path=str(path))

    def mix(self, groups: Groups, host: GuideHost) -> dict[str, float]:
        super().mix(groups, host)  # each group's on-policy accuracy, before the teacher's slot
        cfg, started = self.cfg.teacher, time.perf_counter()
        # One slot, the last one: the slot an NPO guide takes (`algo.npo.guide_slot`).
        placed, found, rewards = fill_from_source(host, groups, samples=cfg.samples, temperature=cfg.temperature,
                                                  stream="teacher", count=1, policy_id=GUIDE,
                                                  logp_source="teacher", source="teacher")
        totals = all_reduce_sum(torch.tensor([
            len(placed), len(found), sum(s.reward for s in placed),
            sum(r >= SUCCESS_REWARD for r in rewards), len(rewards)], dtype=torch.float64)).tolist()
        return {"guide/slots": totals[0], "guide/coverage": totals[0] / max(totals[1], 1.0),
                "guide/reward_mean": totals[2] / totals[0] if totals[0] else float("nan"),
                "teacher/pass_rate": totals[3] / max(totals[4], 1.0),
                "time/teacher": time.perf_counter() - started}


class ExperienceMixing(NoMixing):
    """`mix.mode: exgrpo`: the run's own verified successes replayed (ExGRPO). The pool lives in
    `TrainState.experience` (it survives resume and rollback) and is the same on every rank:

        pool[prompt id] = {record, tokens, logp, entropy, acc, step}   the lowest-entropy success of the
                                                                       prompt's latest partly solved group
    A prompt whose group is all correct leaves the pool (nothing left to learn); replay starts once a step's
    on-policy solve rate passes `exgrpo.start_solve_rate` and stays on."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._replays: dict[int, dict[str, Any]] = {}  # this step: group index -> the pool entry it replays
        self._groups: Groups | None = None

    @staticmethod
    def _state(host: GuideHost) -> dict[str, Any]:
        state = host.state.experience
        state.setdefault("pool", {})
        state.setdefault("started", False)
        state.setdefault("empty_reported", False)
        return state

    def select_prompts(self, host: GuideHost, step: int, records: list[PromptRecord]) -> list[PromptRecord]:
        """Once replay has started, the last `experience_share` of this rank's prompts are swapped for pool
        prompts, drawn by `algo.experience.sample_experience` with one seed for all ranks (each takes its own
        slice of the draw, so no prompt is replayed twice in a step)."""
        self._replays = {}
        state = self._state(host)
        share = experience.experience_share(len(records), self.cfg.exgrpo.experience_ratio)
        if not state["started"] or share == 0:
            return records
        in_batch = {pid for ids in all_gather_objects([r.id for r in records]) for pid in ids}
        rank, world = host.dist.rank, host.dist.world_size
        drawn = experience.sample_experience(
            {pid: entry["acc"] for pid, entry in state["pool"].items()}, share * world, self.cfg.exgrpo.bucket_sigma,
            random.Random(stream_seed(self.cfg.run.seed, "exgrpo", step, 0)), exclude=in_batch)
        if not drawn:
            if not state["empty_reported"]:  # plain GRPO until the pool fills, said once
                host.event("experience_pool_empty", solve_rate_started=True)
                state["empty_reported"] = True
            return records
        state["empty_reported"] = False
        mine = drawn[rank * share : (rank + 1) * share]
        records = list(records)
        for offset, prompt_id in enumerate(mine):
            index = len(records) - len(mine) + offset
            entry = state["pool"][prompt_id]
            records[index] = PromptRecord(**entry["record"])
            self._replays[index] = entry
        return records

    def mix(self, groups: Groups, host: GuideHost) -> dict[str, float]:
        super().mix(groups, host)
        n = groups.group_size
        placed = [put_in_slot(groups, g * n + guide_slot(n), entry["tokens"],
                              torch.tensor(entry["logp"], dtype=torch.float32), policy_id=GUIDE,
                              logp_source="engine", source="experience")
                  for g, entry in sorted(self._replays.items())]
        rescore(host, placed)
        self._groups = groups
        state = self._state(host)
        totals = all_reduce_sum(torch.tensor([len(placed), sum(s.reward for s in placed)],
                                             dtype=torch.float64)).tolist()
        return {"guide/slots": totals[0], "guide/reward_mean": totals[1] / totals[0] if totals[0] else float("nan"),
                "exgrpo/pool_size": float(len(state["pool"])), "exgrpo/started": float(state["started"])}

    def after_step(self, host: GuideHost, metrics: dict[str, float]) -> None:
        """Fold this step's on-policy groups into the pool (every rank applies every rank's groups in rank
        order, so the pools stay identical), and start replay once the solve rate passes the threshold."""
        groups, self._groups = self._groups, None
        if groups is None:
            return
        mine = []
        for group in groups.groups():
            fresh = [s for s in group if s.policy_id == ON_POLICY]
            correct = [s.reward >= SUCCESS_REWARD for s in fresh]
            keep = experience.experience_candidate(correct, [s.entropy for s in fresh])
            best = fresh[keep] if keep is not None else None
            mine.append({
                "record": {"id": group[0].prompt_id, "prompt": group[0].prompt, "answer": group[0].answer},
                "correct": sum(correct), "n": len(fresh),
                "best": None if best is None else {"tokens": best.completion_ids,
                                                    "logp": best.behavior_logp.tolist(), "entropy": best.entropy},
            })
        state = self._state(host)
        solved = total = 0
        for update in (u for rank_updates in all_gather_objects(mine) for u in rank_updates):
            prompt_id, acc = update["record"]["id"], update["correct"] / max(update["n"], 1)
            solved, total = solved + update["correct"], total + update["n"]
            if update["correct"] == update["n"]:
                state["pool"].pop(prompt_id, None)
            elif update["best"] is not None:
                state["pool"][prompt_id] = {"record": update["record"], **update["best"], "acc": acc,
                                            "step": groups.step}
            elif prompt_id in state["pool"]:
                state["pool"][prompt_id]["acc"] = acc
        solve_rate = solved / max(total, 1)
        if not state["started"] and solve_rate > self.cfg.exgrpo.start_solve_rate:
            state["started"] = True
            host.event("experience_replay_started", solve_rate=solve_rate, pool_size=len(state["pool"]))


class ConvergedRunMixing(NoMixing):
    """`mix.mode: rlep`: the last `rlep.replay` slots of each group hold verified successes of a finished run's
    policy (its newest export), decoded `rlep.samples` times per prompt; replayed rows are treated as on-policy
    (the update recomputes their log-probs; `mix.guide_is: none`). A prompt with fewer successes keeps fresh
    samples in the remaining slots."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def check(self, host: GuideHost) -> None:
        export = converged_export(Path(self.cfg.rlep.converged_run).expanduser())
        host.guide_engine(load_source_model(host, export, "rlep.converged_run"))
        host.event("converged_run_loaded", path=str(export))

    def mix(self, groups: Groups, host: GuideHost) -> dict[str, float]:
        super().mix(groups, host)
        cfg, started = self.cfg.rlep, time.perf_counter()
        placed, found, rewards = fill_from_source(host, groups, samples=cfg.samples, temperature=cfg.temperature,
                                                  stream="rlep", count=cfg.replay, policy_id=ON_POLICY,
                                                  logp_source="replay", source="replay")
        totals = all_reduce_sum(torch.tensor([
            len(placed), sum(k > 0 for k in found), len(found), sum(s.reward for s in placed),
            sum(r >= SUCCESS_REWARD for r in rewards), len(rewards)], dtype=torch.float64)).tolist()
        return {"guide/slots": totals[0], "guide/coverage": totals[1] / max(totals[2], 1.0),
                "guide/reward_mean": totals[3] / totals[0] if totals[0] else float("nan"),
                "rlep/pass_rate": totals[4] / max(totals[5], 1.0), "time/rlep": time.perf_counter() - started}


def converged_export(run_dir: Path) -> Path:
    """The newest Hugging Face export of a finished run (`<run_dir>/exports/step_XXXXXX`), or a clear error."""
    if not run_dir.is_dir():
        raise ConfigError(f"rlep.converged_run = '{run_dir}' does not exist; give the run directory of a finished "
                          "vanilla run (e.g. runs/demo, which `npo train --config configs/demo.yaml` produces)")
    exports = sorted(p for p in (run_dir / "exports").glob("step_*") if (p / "config.json").is_file())
    if not exports:
        raise ConfigError(f"rlep.converged_run = '{run_dir}' has no export under exports/: finish that run with "
                          "checkpoint.export_final = true (the default), or export a step with "
                          "checkpoint.export_steps")
    return exports[-1]
