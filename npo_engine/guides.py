"""Guide mixing: who fills rollout slots besides the current policy, chosen by `mix.mode`, and NPO's guides.

The trainer calls the mixing component twice a step and never branches on the algorithm:

    mixer.before_step(host)         # may carry out an intervention: train-ahead, cache building, rollback;
                                    # idempotent: a second call at the same state does nothing
    metrics = mixer.mix(groups, host)   # may replace one slot of gated groups with a guide trajectory

`NoMixing` (`mix.mode: none`) does nothing. `NPOMixing` (`mix.mode: npo`, npo_method.md §4-§10) runs each
intervention as a small state machine whose state lives in `TrainState.interventions`, so it survives
checkpoints, `--resume` and its own rollbacks:

    pending --(step == start: checkpoint `start`, pinned)--> ahead
    ahead   --(step == start + length: the current weights are the guide; build the verified guide cache for
               the window's prompts; drop the checkpoints of the discarded segment; restore `start`)--> replay
    replay  --(step == start + length)--> done

During `ahead` the trainer marks its metrics rows as discarded; during `replay` the gate injects guide slots.
The guide is a later checkpoint of the same run: the weights the trainer holds at the end of the train-ahead,
pushed into a guide engine through the same sync path as the policy's. Guide log-probs are the trainer's own
forward of those weights, so `guide_is: exact` has no train/inference mismatch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from npo_engine import algo
from npo_engine.algo import autonpo
from npo_engine.config import TrainConfig
from npo_engine.data.records import PromptRecord
from npo_engine.data.samples import GUIDE, Groups, Sample
from npo_engine.distributed import Dist, all_gather_objects, all_reduce_sum, barrier
from npo_engine.rewards import RewardRunner
from npo_engine.rollout.base import RolloutEngine, SamplingParams
from npo_engine.train_state import TrainState

# A sample counts as correct (for the gate, Q and cache verification) when its reward reaches this value: the
# built-in verifiers give 1 for a correct answer.
SUCCESS_REWARD = 1.0
_CACHE_FORMAT = 1


class GuideHost(Protocol):
    """What the guide code needs from the trainer (which implements it); keeps `guides` below the trainer."""

    cfg: TrainConfig
    dist: Dist
    run_dir: Path
    state: TrainState
    rewards: RewardRunner
    tokenizer: Any
    """The policy's tokenizer (a baseline's source model must share its vocabulary)."""
    engine: RolloutEngine
    """The policy engine (AutoNPO's confirmation probe samples from it)."""

    def prompts_of_step(self, step: int) -> list[PromptRecord]: ...
    def encode_prompt(self, prompt: str, prompt_id: str) -> list[int]: ...
    def decode_completion(self, token_ids: list[int]) -> str: ...
    def guide_engine(self, model: torch.nn.Module | None = None) -> RolloutEngine: ...
    def sync_guide_engine(self) -> dict[str, float]: ...
    def trainer_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]: ...
    def save_checkpoint(self, *, pin: bool = False) -> Path: ...
    def discard_checkpoints_after(self, step: int) -> None: ...
    def pin_checkpoint(self, step: int) -> None: ...
    def unpin_checkpoint(self, step: int) -> None: ...
    def checkpoint_steps(self) -> list[tuple[int, Path]]: ...
    def restore(self, step: int, *, rollback: bool) -> dict[str, float]: ...
    def model_identity(self) -> dict[str, Any]: ...
    def event(self, kind: str, **fields: Any) -> None: ...


# ------------------------------------------------------------------------------------------------ guide cache


@dataclass
class GuideEntry:
    """One verified guide trajectory of one prompt."""

    prompt_id: str
    token_ids: list[int]
    guide_logp: list[float]
    """Per-token log-probs of `token_ids` under the guide weights, from the trainer's forward (fp32)."""
    reward: float
    guide_step: int
    intervention: str


class GuideCache:
    """The guide trajectories of one intervention on this rank: prompt id -> `GuideEntry`.

    On disk, `dir/rank_{r}.jsonl` (one entry per line) for every rank and `dir/manifest.json` (written last, by
    rank 0): intervention, guide step, window, the run identity the entries belong to, per-rank prompt and
    entry counts, coverage, and the SHA-256 of every rank file. `load` verifies all of it.
    """

    def __init__(self, entries: dict[str, GuideEntry], manifest: dict[str, Any]):
        self.entries = entries
        self.manifest = manifest

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, prompt_id: str) -> GuideEntry | None:
        return self.entries.get(prompt_id)

    @staticmethod
    def rank_file(directory: Path, rank: int) -> Path:
        return directory / f"rank_{rank}.jsonl"

    @classmethod
    def load(cls, directory: Path, *, rank: int, world_size: int, identity: dict[str, Any]) -> GuideCache:
        """Read and verify this rank's entries; a cache of another run, model or world size is an error."""
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"guide cache {directory} has no manifest.json: it was never completed; "
                                    "delete the directory and the intervention rebuilds it")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != _CACHE_FORMAT:
            raise ValueError(f"guide cache {directory}: format {manifest.get('format')!r}, expected {_CACHE_FORMAT}")
        if manifest["identity"] != identity:
            raise ValueError(f"guide cache {directory} belongs to another run or model: it was built for "
                             f"{manifest['identity']}, this run is {identity}; point --run-dir at its own run or "
                             "delete the cache")
        if manifest["world_size"] != world_size:
            raise ValueError(f"guide cache {directory} was built by {manifest['world_size']} ranks, this job has "
                             f"{world_size}; resume with the same number of ranks")
        path = cls.rank_file(directory, rank)
        data = path.read_bytes()
        expected = manifest["files"][path.name]
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"guide cache file {path} does not match its manifest checksum: the file is damaged; "
                             "delete the cache directory and the intervention rebuilds it")
        entries = {}
        for line in data.decode().splitlines():
            entry = GuideEntry(**json.loads(line))
            if len(entry.token_ids) != len(entry.guide_logp) or not entry.token_ids:
                raise ValueError(f"guide cache {path}: entry {entry.prompt_id!r} has {len(entry.token_ids)} tokens "
                                 f"and {len(entry.guide_logp)} log-probs")
            entries[entry.prompt_id] = entry
        return cls(entries, manifest)

    def save(self, directory: Path, *, rank: int, dist_: Dist, manifest: dict[str, Any],
             rank_prompts: int) -> None:
        """Write this rank's file, then (rank 0) the manifest with every rank's checksum; collective."""
        directory.mkdir(parents=True, exist_ok=True)
        barrier()
        text = "".join(json.dumps(asdict(e)) + "\n" for e in self.entries.values()).encode()
        _write_atomic(self.rank_file(directory, rank), text)
        per_rank = all_gather_objects({"file": self.rank_file(directory, rank).name,
                                       "sha256": hashlib.sha256(text).hexdigest(),
                                       "prompts": rank_prompts, "entries": len(self.entries)})
        prompts = sum(r["prompts"] for r in per_rank)
        entries = sum(r["entries"] for r in per_rank)
        manifest = {**manifest, "format": _CACHE_FORMAT, "world_size": dist_.world_size, "prompts": prompts,
                    "entries": entries, "coverage": entries / max(prompts, 1),
                    "files": {r["file"]: r["sha256"] for r in per_rank}}
        if rank == 0:
            _write_atomic(directory / "manifest.json", json.dumps(manifest, indent=1).encode())
        barrier()
        self.manifest = manifest


def sample_verified(host: GuideHost, engine: RolloutEngine, prompts: list[PromptRecord], prompt_ids: list[list[int]],
                    *, samples: int, temperature: float, seed: int) -> tuple[list[list[list[int]]], list[float]]:
    """Sample `samples` completions of each prompt from `engine` and verify them with the training reward.

    Returns, per prompt, the completions that reached `SUCCESS_REWARD` (possibly none), in sampling order, and
    the reward of every sample (prompt-major), for the caller's statistics.
    """
    cfg = host.cfg
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, seed=seed)
    out = engine.generate([ids for ids in prompt_ids for _ in range(samples)], params)
    scored = host.rewards.score([r.prompt for r in prompts for _ in range(samples)],
                                [host.decode_completion(ids) for ids in out.token_ids],
                                [r.answer for r in prompts for _ in range(samples)])
    correct = [[list(out.token_ids[i * samples + j]) for j in range(samples)
                if scored.rewards[i * samples + j] >= SUCCESS_REWARD and out.token_ids[i * samples + j]]
               for i in range(len(prompts))]
    return correct, list(scored.rewards)


def build_guide_cache(host: GuideHost, name: str, prompts: list[PromptRecord], *, guide_step: int,
                      window: range) -> tuple[GuideCache, dict]:
    """Sample `npo.k_guide` guide responses for each of `prompts` (this rank's prompts of the replay `window`),
    verify them, keep one correct response per prompt chosen uniformly (none: no entry), and record its guide
    log-probs.

    The guide engine must hold the guide weights, and the trainer too (its forward gives the log-probs).
    Returns the cache (not yet saved) and numbers for the event.
    """
    cfg = host.cfg
    start = time.perf_counter()
    prompt_ids = [host.encode_prompt(r.prompt, r.id) for r in prompts]
    correct, _ = sample_verified(host, host.guide_engine(), prompts, prompt_ids, samples=cfg.npo.k_guide,
                                 temperature=cfg.npo.guide_temperature,
                                 seed=stream_seed(cfg.run.seed, f"guide/{name}", guide_step, host.dist.rank))
    choose = random.Random(stream_seed(cfg.run.seed, f"guide_pick/{name}", guide_step, host.dist.rank))
    kept = [(record, ids, choose.choice(found)) for record, ids, found in zip(prompts, prompt_ids, correct) if found]

    # Verification: the kept trajectories are re-scored by the training reward function, as the trainer will.
    verify = host.rewards.score([r.prompt for r, _, _ in kept], [host.decode_completion(c) for _, _, c in kept],
                                [r.answer for r, _, _ in kept])
    failed = [r.id for (r, _, _), reward in zip(kept, verify.rewards) if reward < SUCCESS_REWARD]
    if failed:
        raise RuntimeError(f"guide cache {name}: {len(failed)} kept trajectories fail verification on re-scoring "
                           f"(e.g. prompt {failed[0]!r}); the verifier is not deterministic")
    logps = host.trainer_logprobs([p for _, p, _ in kept], [c for _, _, c in kept])
    entries = {
        record.id: GuideEntry(prompt_id=record.id, token_ids=completion, guide_logp=logp.tolist(),
                              reward=reward, guide_step=guide_step, intervention=name)
        for (record, _, completion), logp, reward in zip(kept, logps, verify.rewards)
    }
    manifest = {"intervention": name, "guide_step": guide_step, "window": [window.start, window.stop],
                "k_guide": cfg.npo.k_guide, "identity": host.model_identity()}
    stats = {"prompts": len(prompts), "entries": len(entries), "seconds": time.perf_counter() - start}
    return GuideCache(entries, manifest), stats


# ------------------------------------------------------------------------------------------------ mixing rules


class GuideMixer(Protocol):
    def check(self, host: GuideHost) -> None: ...
    def select_prompts(self, host: GuideHost, step: int, records: list[PromptRecord]) -> list[PromptRecord]: ...
    def before_step(self, host: GuideHost) -> None: ...
    def mix(self, groups: Groups, host: GuideHost) -> dict[str, float]: ...
    def after_step(self, host: GuideHost, metrics: dict[str, float]) -> None: ...
    def discarding(self, host: GuideHost) -> bool: ...
    def rollout_stream(self, host: GuideHost) -> str: ...


class NoMixing:
    """`mix.mode: none`: every slot stays on-policy (plain GRPO)."""

    def before_step(self, host: GuideHost) -> None:
        pass

    def check(self, host: GuideHost) -> None:
        pass

    def select_prompts(self, host: GuideHost, step: int, records: list[PromptRecord]) -> list[PromptRecord]:
        """The prompts this rank rolls out at `step`: the sampler's (a replay rule may swap some)."""
        return records

    def after_step(self, host: GuideHost, metrics: dict[str, float]) -> None:
        pass

    def mix(self, groups: Groups, host: GuideHost) -> dict[str, float]:
        for group in groups.groups():
            acc = sum(s.reward >= SUCCESS_REWARD for s in group) / len(group)
            for sample in group:
                sample.gate_acc = acc
        return {}

    def discarding(self, host: GuideHost) -> bool:
        return False

    def rollout_stream(self, host: GuideHost) -> str:
        return "rollout"


class GuideSlots:
    """What NPO and AutoNPO share: guide caches per intervention, the replay windows, slot mixing, and carrying
    out one intervention (guide cache, then rollback). Subclasses decide when interventions happen."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._caches: dict[str, GuideCache] = {}

    def _build_and_roll_back(self, host: GuideHost, iv: dict[str, Any], prompts: list[PromptRecord]) -> None:
        """The trainer's current weights (at step `end`) become the guide; cache verified guide trajectories
        for `prompts` (this rank's), then roll back to `start` and open the replay window."""
        start, end = iv["start"], iv["start"] + iv["length"]
        began = time.perf_counter()
        sync = host.sync_guide_engine()
        cache, stats = build_guide_cache(host, iv["name"], prompts, guide_step=end, window=range(start, end))
        directory = self._cache_dir(host, iv)
        cache.save(directory, rank=host.dist.rank, dist_=host.dist, manifest=cache.manifest,
                   rank_prompts=stats["prompts"])
        self._caches[iv["name"]] = cache
        iv.update(guide_step=end, cache_dir=str(directory.relative_to(host.run_dir)),
                  coverage=cache.manifest["coverage"], cache_entries=cache.manifest["entries"],
                  cache_prompts=cache.manifest["prompts"])
        host.event("guide_cache", name=iv["name"], guide_step=end, window=[start, end],
                   prompts=cache.manifest["prompts"], entries=cache.manifest["entries"],
                   coverage=cache.manifest["coverage"], seconds=stats["seconds"],
                   sync_seconds=sync.get("time/sync"))

        # Roll back: the checkpoints of the discarded segment go first, so neither retention nor `--resume`
        # can pick them over the replay; then the state of `start` comes back and the replay is marked.
        host.discard_checkpoints_after(start)
        restore = host.restore(start, rollback=True)
        iv["phase"] = "replay"
        host.save_checkpoint(pin=True)  # `start` again, now with the intervention in replay
        # The metrics rows of steps start+1..end logged so far are superseded by the replay's rows of the same
        # steps: the final trajectory is the last row of each step (`npo plot` draws it so).
        host.event("rollback", name=iv["name"], to_step=start, from_step=end, total_steps=host.state.total_steps,
                   seconds=time.perf_counter() - began, restore_seconds=restore.get("time/restore"))

    def select_prompts(self, host: GuideHost, step: int, records: list[PromptRecord]) -> list[PromptRecord]:
        return records

    def _cache_dir(self, host: GuideHost, iv: dict[str, Any]) -> Path:
        return host.run_dir / "guides" / iv["name"]

    def _saved_cache(self, host: GuideHost, iv: dict[str, Any]) -> bool:
        """Whether a complete cache of this intervention's window is on disk; loads and verifies it if so."""
        directory = self._cache_dir(host, iv)
        manifest = directory / "manifest.json"
        if not manifest.is_file():
            return False
        if json.loads(manifest.read_text()).get("window") != [iv["start"], iv["start"] + iv["length"]]:
            return False
        self._caches[iv["name"]] = GuideCache.load(directory, rank=host.dist.rank, world_size=host.dist.world_size,
                                                   identity=host.model_identity())
        return True

    def check(self, host: GuideHost) -> None:
        """At start-up: the caches a resumed replay will read exist and belong to this run (fail now, not at
        the step that first needs them)."""
        for iv in host.state.interventions:
            if iv["phase"] == "replay" and not self._saved_cache(host, iv):
                raise FileNotFoundError(
                    f"intervention {iv['name']!r} is replaying steps {iv['start']}-{iv['start'] + iv['length']} "
                    f"but its guide cache {self._cache_dir(host, iv)} is missing or of another window; restore "
                    "the run directory's guides/ folder, or resume from a checkpoint before the intervention")

    def _active_cache(self, host: GuideHost) -> GuideCache | None:
        step = host.state.step
        for iv in host.state.interventions:
            if iv["phase"] == "replay" and iv["start"] <= step < iv["start"] + iv["length"]:
                if iv["name"] not in self._caches:  # after --resume: read and verify it from disk
                    self._caches[iv["name"]] = GuideCache.load(
                        self._cache_dir(host, iv), rank=host.dist.rank, world_size=host.dist.world_size,
                        identity=host.model_identity())
                return self._caches[iv["name"]]
        return None

    def discarding(self, host: GuideHost) -> bool:
        return any(iv["phase"] == "ahead" for iv in host.state.interventions)

    def rollout_stream(self, host: GuideHost) -> str:
        """A replayed step samples fresh rollouts (npo_method.md §15, item 10), not the ones the discarded
        segment drew from the same weights at the same step."""
        step = host.state.step
        for iv in host.state.interventions:
            if iv["phase"] == "replay" and iv["start"] <= step < iv["start"] + iv["length"]:
                return f"rollout/replay-{iv['name']}"
        return "rollout"

    # ---- slot mixing

    def _finish_replays(self, host: GuideHost) -> list[dict[str, Any]]:
        """Close the replay windows that end at the current step; returns the interventions closed."""
        closed = []
        for iv in host.state.interventions:
            end = iv["start"] + iv["length"]
            if iv["phase"] == "replay" and host.state.step == end:
                iv["phase"] = "done"
                host.unpin_checkpoint(iv["start"])
                self._caches.pop(iv["name"], None)
                host.event("intervention_done", name=iv["name"], window=[iv["start"], end],
                           total_steps=host.state.total_steps)
                closed.append(iv)
        return closed

    def _replaying(self, host: GuideHost) -> bool:
        step = host.state.step
        return any(iv["phase"] == "replay" and iv["start"] <= step < iv["start"] + iv["length"]
                   for iv in host.state.interventions)

    def after_step(self, host: GuideHost, metrics: dict[str, float]) -> None:
        pass

    def mix(self, groups: Groups, host: GuideHost) -> dict[str, float]:
        """Gate every group on its n on-policy samples; replace the last slot of gated groups whose prompt has
        a cache entry with the guide trajectory, its reward recomputed by the verifier (npo_method.md §5-§6)."""
        cache = self._active_cache(host)
        per_group = groups.groups()
        correct = torch.tensor([[s.reward >= SUCCESS_REWARD for s in g] for g in per_group], dtype=torch.bool)
        has_entry = torch.tensor([cache is not None and g[0].prompt_id in cache for g in per_group],
                                 dtype=torch.bool)
        p_hat, inject = algo.gate_groups(correct.reshape(len(per_group), groups.group_size), has_entry,
                                         self.cfg.mix.gate)
        slot = algo.guide_slot(groups.group_size)
        replaced: list[Sample] = []
        for g, group in enumerate(per_group):
            for sample in group:
                sample.gate_acc = float(p_hat[g])
            if inject[g]:
                entry = cache.get(group[0].prompt_id)
                replaced.append(put_in_slot(groups, g * groups.group_size + slot, entry.token_ids,
                                            torch.tensor(entry.guide_logp, dtype=torch.float32),
                                            policy_id=GUIDE, logp_source="guide", source="guide"))
        rescore(host, replaced)

        self._gated(groups, p_hat, host)
        gated = algo.passes_gate(p_hat, groups.group_size, self.cfg.mix.gate)
        local = torch.tensor([
            float(inject.sum()), float(gated.sum()), float((gated & has_entry).sum()), float(has_entry.sum()),
            float(len(per_group)), sum(s.reward for s in replaced), float((p_hat == 0).sum()),
            float(((p_hat == 0) & has_entry).sum()), float(cache is not None),
        ], dtype=torch.float64)
        s = all_reduce_sum(local).tolist()
        if s[8] == 0:  # no replay window is open on any rank: nothing to report
            return {"guide/slots": 0.0}
        return {"guide/slots": s[0], "guide/gated_groups": s[1],
                "guide/cache_coverage": s[3] / max(s[4], 1.0),
                "guide/reward_mean": s[5] / s[0] if s[0] else float("nan"),
                "npo/Q": s[2] / s[1] if s[1] else float("nan"),
                "npo/Q_strict": s[7] / s[6] if s[6] else float("nan")}


    def _gated(self, groups: Groups, p_hat: torch.Tensor, host: GuideHost) -> None:
        """Called by `mix` with each group's on-policy accuracy before replacement (AutoNPO's mistake pool)."""


class NPOMixing(GuideSlots):
    """`mix.mode: npo`: the manual interventions of the `npo` section (early bootstrap, late plateau); guide
    slots from a later checkpoint of the same run on gated prompts of each replay window."""

    def plan(self) -> list[dict[str, Any]]:
        """The interventions the config asks for, in order, all pending."""
        npo, out = self.cfg.npo, []
        if npo.early:
            out.append(_intervention("early", 0, npo.early_steps))
        if npo.late_start is not None:
            out.append(_intervention("late", npo.late_start, npo.late_steps))
        return out

    def before_step(self, host: GuideHost) -> None:
        state = host.state
        if not state.interventions:
            state.interventions = self.plan()
        self._finish_replays(host)
        for iv in state.interventions:
            end = iv["start"] + iv["length"]
            if iv["phase"] == "pending" and state.step == iv["start"]:
                iv["phase"] = "ahead"
                iv["started_total_steps"] = state.total_steps
                host.save_checkpoint(pin=True)  # the rollback target, with the intervention marked ahead
                host.event("intervention_start", name=iv["name"], start=iv["start"], length=iv["length"],
                           phase="ahead", total_steps=state.total_steps)
            elif iv["phase"] == "ahead" and state.step == iv["start"] and self._saved_cache(host, iv):
                # Resumed from the rollback target after a crash that came once the guide cache was complete
                # (it is verified on load): the replay begins without a second train-ahead.
                iv["phase"] = "replay"
                host.save_checkpoint(pin=True)
                host.event("intervention_resumed", name=iv["name"], phase="replay",
                           entries=self._caches[iv["name"]].manifest["entries"])
            elif iv["phase"] == "ahead" and state.step == end:
                prompts = _unique(record for step in range(iv["start"], end) for record in host.prompts_of_step(step))
                self._build_and_roll_back(host, iv, prompts)


class AutoNPOMixing(GuideSlots):
    """`mix.mode: autonpo` (npo_method.md §11): the controller in `algo.autonpo` watches reward and entropy;
    on a trigger the current policy is probed on the mistake pool, D* = argmax Q/V is chosen, the current
    weights become the guide for the mistakes recorded in [t - D*, t), and the run rolls back D* steps and
    replays them with guide slots on those prompts only. Every decision is an event with its inputs."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.params = autonpo.ControllerParams.from_config(cfg.autonpo)
        self._decision_metrics: dict[str, float] = {}

    # ---- signals

    def after_step(self, host: GuideHost, metrics: dict[str, float]) -> None:
        """Fold the step's on-policy reward and entropy into the controller's EMAs."""
        entropy = metrics.get("entropy/on_policy", metrics.get("entropy/mean"))
        state = autonpo.observe(self._controller(host), self.params, metrics["reward/mean"], entropy)
        host.state.controller = state.to_json()

    def _gated(self, groups: Groups, p_hat: torch.Tensor, host: GuideHost) -> None:
        """Record one failing rollout of each gated group in the mistake pool (not while replaying: those
        prompts are already in it), then keep only the entries the largest distance can reach."""
        if self._replaying(host):
            return
        step, new = host.state.step, []
        for g, group in enumerate(groups.groups()):
            if not algo.passes_gate(p_hat[g], groups.group_size, self.cfg.mix.gate):
                continue
            failing = next((s for s in group if s.reward < SUCCESS_REWARD and s.policy_id == 0), None)
            if failing is None:
                continue
            new.append({"prompt_id": failing.prompt_id, "prompt": failing.prompt, "answer": failing.answer,
                        "step": step, "rank": host.dist.rank, "token_ids": list(failing.completion_ids),
                        "logp": [round(float(x), 6) for x in failing.behavior_logp]})
        pool = host.state.mistake_pool + [e for part in all_gather_objects(new) for e in part]
        horizon = step - max(self.cfg.autonpo.distances)
        host.state.mistake_pool = [e for e in pool if e["step"] >= horizon]

    def mix(self, groups: Groups, host: GuideHost) -> dict[str, float]:
        out = super().mix(groups, host)
        out |= self._decision_metrics
        self._decision_metrics = {}
        return out

    # ---- decisions

    def before_step(self, host: GuideHost) -> None:
        for iv in self._finish_replays(host):
            host.state.controller = dataclasses.replace(self._controller(host), last_end=host.state.step).to_json()
        t = host.state.step
        every = self.cfg.checkpoint.every
        if t == 0 and not any(step == 0 for step, _ in host.checkpoint_steps()):
            host.save_checkpoint()  # the periodic checkpoints start at step 0: the farthest rollback target
        # Fire only where a checkpoint was just taken (t a multiple of the cadence), so every t - D is one too.
        if t == 0 or t % every or self._replaying(host):
            return
        controller = self._controller(host)
        fire, why = autonpo.should_probe(controller, self.params, t)
        if not fire:
            return
        host.event("autonpo_trigger", **why)
        self._probe_and_decide(host, controller, t)

    def _probe_and_decide(self, host: GuideHost, controller: autonpo.ControllerState, t: int) -> None:
        cfg, distances = self.cfg.autonpo, tuple(self.cfg.autonpo.distances)
        pool = [e for e in host.state.mistake_pool if t - max(distances) <= e["step"] < t]
        picks = autonpo.stratified_pick([e["step"] for e in pool], t, distances, cfg.probe_prompts)
        passed = self._probe(host, [pool[i] for i in picks], t)
        pooled = sum(passed) / len(passed) if passed else 0.0
        confirmed = bool(passed) and pooled >= self.params.probe_pass
        host.event("autonpo_probe", prompts=len(passed), pool=len(pool), pass_rate=pooled, confirmed=confirmed)
        if not confirmed:
            host.state.controller = dataclasses.replace(controller, last_probe=t).to_json()
            return

        kept = {s for s, _ in host.checkpoint_steps()}
        candidates = [d for d in sorted(distances) if t - d >= 0 and (t - d) in kept]
        probe_steps = [pool[i]["step"] for i in picks]
        q = {d: autonpo.q_hat(passed, probe_steps, t, d) for d in candidates}
        kl = self._kl_tokens(host, pool)
        v = {d: autonpo.v_hat(kl, [e["step"] for e in pool], t, d) for d in candidates}
        d_star, table = autonpo.choose_distance(q, v)
        host.event("autonpo_decision", candidates=table, d_star=d_star, probe_pass=pooled)
        if d_star is None:
            host.state.controller = dataclasses.replace(controller, last_probe=t).to_json()
            return
        self._decision_metrics = {"npo/Q": q[d_star], "npo/V": v[d_star], "npo/S": q[d_star] / v[d_star],
                                  "npo/d_star": float(d_star)}
        controller = dataclasses.replace(controller, interventions=controller.interventions + 1, last_probe=None)
        host.state.controller = controller.to_json()
        iv = {"name": f"auto{controller.interventions}", "start": t - d_star, "length": d_star, "phase": "ahead",
              "d_star": d_star, "trigger_step": t}
        host.state.interventions.append(iv)
        host.pin_checkpoint(t - d_star)
        mine = [e for e in pool if t - d_star <= e["step"] < t and e["rank"] == host.dist.rank]
        prompts = _unique(PromptRecord(id=e["prompt_id"], prompt=e["prompt"], answer=e["answer"]) for e in mine)
        self._build_and_roll_back(host, iv, prompts)

    def _probe(self, host: GuideHost, entries: list[dict[str, Any]], t: int) -> list[float]:
        """Pass rate of the current policy on each probed entry (`probe_samples` rollouts each), in order;
        the entries are split over the ranks and the results gathered."""
        k, rank, world = self.cfg.autonpo.probe_samples, host.dist.rank, host.dist.world_size
        mine = list(range(rank, len(entries), world))
        rates: dict[int, float] = {}
        if mine:
            prompt_ids = [host.encode_prompt(entries[i]["prompt"], entries[i]["prompt_id"]) for i in mine]
            params = SamplingParams(max_new_tokens=self.cfg.rollout.max_new_tokens,
                                    temperature=self.cfg.rollout.temperature, top_p=self.cfg.rollout.top_p,
                                    top_k=self.cfg.rollout.top_k, seed=stream_seed(self.cfg.run.seed, "probe", t, rank))
            out = host.engine.generate([ids for ids in prompt_ids for _ in range(k)], params)
            scored = host.rewards.score([entries[i]["prompt"] for i in mine for _ in range(k)],
                                        [host.decode_completion(ids) for ids in out.token_ids],
                                        [entries[i]["answer"] for i in mine for _ in range(k)])
            for j, i in enumerate(mine):
                rates[i] = sum(r >= SUCCESS_REWARD for r in scored.rewards[j * k : (j + 1) * k]) / k
        merged: dict[int, float] = {}
        for part in all_gather_objects(rates):
            merged |= part
        return [merged[i] for i in range(len(entries))]

    def _kl_tokens(self, host: GuideHost, pool: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Per-token k3 KL(π_then ‖ π_now) of every stored failing rollout: a forward pass of the current
        policy on them, against the behaviour log-probs stored when they were sampled (no generation)."""
        rank, world = host.dist.rank, host.dist.world_size
        mine = list(range(rank, len(pool), world))
        logps = host.trainer_logprobs([host.encode_prompt(pool[i]["prompt"], pool[i]["prompt_id"]) for i in mine],
                                      [pool[i]["token_ids"] for i in mine]) if mine or world > 1 else []
        local = {i: autonpo.k3_per_token(now, torch.tensor(pool[i]["logp"], dtype=torch.float64)).tolist()
                 for i, now in zip(mine, logps)}
        merged: dict[int, list[float]] = {}
        for part in all_gather_objects(local):
            merged |= part
        return [torch.tensor(merged[i], dtype=torch.float64) for i in range(len(pool))]

    def _controller(self, host: GuideHost) -> autonpo.ControllerState:
        return autonpo.ControllerState.from_json(host.state.controller)


# ------------------------------------------------------------------------------------------------ helpers


def put_in_slot(groups: Groups, index: int, completion_ids: list[int], behavior_logp: torch.Tensor, *,
                policy_id: int, logp_source: str, source: str) -> Sample:
    """Replace the sample in slot `index` with another trajectory of the same prompt; returns the new record
    (its reward still to be computed: see `rescore`). The group's on-policy accuracy stays on it."""
    old = groups.samples[index]
    sample = Sample(prompt_id=old.prompt_id, group_id=old.group_id, prompt=old.prompt, answer=old.answer,
                    prompt_ids=old.prompt_ids, completion_ids=list(completion_ids), behavior_logp=behavior_logp,
                    logp_source=logp_source, finish_reason=source, policy_id=policy_id, source=source,
                    gate_acc=old.gate_acc)
    groups.replace(index, sample)
    return sample


def rescore(host: GuideHost, samples: list[Sample]) -> None:
    """Recompute the reward of trajectories put into slots, as the verifier scores every sample: a recorded
    reward is never assumed (format rewards may be in play, the verifier may have changed)."""
    if samples:
        scored = host.rewards.score([s.prompt for s in samples],
                                    [host.decode_completion(s.completion_ids) for s in samples],
                                    [s.answer for s in samples])
        for sample, reward in zip(samples, scored.rewards):
            sample.reward = reward


def stream_seed(seed: int, stream: str, step: int, rank: int) -> int:
    """A seed for one random stream of one step on one rank, independent of how the run got there (resume,
    rollback): rollouts, guide sampling and guide picks each draw from their own stream."""
    digest = hashlib.sha256(f"{seed}/{stream}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _unique(records) -> list[PromptRecord]:
    """Prompt records in first-seen order, one per id."""
    out: dict[str, PromptRecord] = {}
    for record in records:
        out.setdefault(record.id, record)
    return list(out.values())


def _intervention(name: str, start: int, length: int) -> dict[str, Any]:
    return {"name": name, "start": start, "length": length, "phase": "pending"}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
