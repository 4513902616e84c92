"""The mixed-policy baselines (mix.mode luffy, exgrpo, rlep) in short real runs of the demo setup: their extra
trajectories reach the loss, and bad sources are refused at start."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from npo_engine.config import ConfigError, ModelConfig
from npo_engine.data.records import PromptRecord
from npo_engine.train_state import TrainState

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this file
from trainer_helpers import rows, tiny_config, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("tests_on_path")

# A correct sample is a completion of digits only (trainer_helpers.digit_reward reaches 1.0).
TEACHER = ["mix.mode=luffy", "teacher.demo_sft_steps=20", "teacher.samples=8", "algo.clip_on_policy=false"]


def extra_rows(run: Path, source: str) -> list[dict]:
    """The dumped samples of the run that came from `source`."""
    out = []
    for path in sorted((run / "rollouts").glob("step_*.jsonl")):
        out += [row for row in rows(path.parent, path.name) if row["source"] == source]
    return out


def test_luffy_teacher_traces_fill_one_slot_and_reach_the_loss(tmp_path, cache_dir):
    run = tmp_path / "luffy"
    train(tiny_config(cache_dir, *TEACHER, "run.steps=3", "logging.dump_rollouts=true"), run).close()
    teacher = extra_rows(run, "teacher")
    assert teacher, "the teacher solved nothing in 3 steps x 4 prompts x 8 tries"
    assert all(r["policy_id"] == 1 and r["reward"] == 1.0 for r in teacher)  # verified, marked off-policy
    assert all(len([t for t in teacher if (t["step"], t["group_id"]) == (r["step"], r["group_id"])]) == 1
               for r in teacher)  # one slot per group
    metrics = rows(run)
    with_slots = [m for m in metrics if m["guide/slots"] > 0]
    assert len(with_slots) == len({r["step"] for r in teacher})
    # Their tokens are in the loss: guide-token share, the luffy transform never clips.
    assert all(m["pg/guide_token_frac"] > 0 and m["pg/clipfrac_guide"] == 0 for m in with_slots)
    assert all(m["pg/clipfrac"] == 0 for m in metrics)  # clip_on_policy = false
    assert any(e["kind"] == "teacher_loaded" for e in rows(run, "events.jsonl"))


def test_luffy_refuses_a_teacher_of_another_vocabulary(tmp_path, cache_dir):
    from npo_engine import Trainer
    from npo_engine.models import ensure_demo_model, load_tokenizer

    demo = ensure_demo_model(ModelConfig(demo_sft_steps=20, demo_cache_dir=str(cache_dir)), progress=False)
    teacher = tmp_path / "teacher"
    shutil.copytree(demo, teacher)
    tokenizer = load_tokenizer(teacher)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(teacher)
    cfg = tiny_config(cache_dir, *TEACHER, f"teacher.path={teacher}")
    with pytest.raises(ConfigError, match=r"teacher.path = .* has another tokenizer vocabulary than the policy"):
        Trainer(cfg, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"teacher.path = .* does not exist"):
        Trainer(tiny_config(cache_dir, *TEACHER, f"teacher.path={tmp_path / 'nope'}"), run_dir=tmp_path / "run2")


def test_exgrpo_replays_the_runs_own_successes_and_keeps_the_pool(tmp_path, cache_dir):
    from npo_engine import Trainer

    run = tmp_path / "exgrpo"
    cfg = tiny_config(cache_dir, "mix.mode=exgrpo", "exgrpo.start_solve_rate=0", "run.steps=5",
                      "checkpoint.every=5", "logging.dump_rollouts=true")
    trainer = train(cfg, run)
    trainer.close()
    events = rows(run, "events.jsonl")
    started = next(e for e in events if e["kind"] == "experience_replay_started")
    replayed = extra_rows(run, "experience")
    assert replayed and all(r["policy_id"] == 1 and r["step"] > started["step"] for r in replayed)
    # Each replayed trajectory is one the policy itself sampled for that prompt at an earlier step.
    policy = extra_rows(run, "policy")
    for r in replayed:
        assert any(p["prompt_id"] == r["prompt_id"] and p["completion"] == r["completion"] and p["step"] < r["step"]
                   and p["reward"] == 1.0 for p in policy)
    metrics = rows(run)
    assert all(m["pg/guide_token_frac"] > 0 for m in metrics if m["guide/slots"] > 0)
    # The pool lives in the trainer state: a resume gets it back exactly.
    pool = trainer.state.experience["pool"]
    assert pool
    resumed = Trainer(cfg, run_dir=run, resume=True)
    try:
        assert resumed.state.experience == json.loads(json.dumps(trainer.state.experience))
    finally:
        resumed.close()


def test_exgrpo_with_an_empty_pool_says_so_once_and_trains_plain_grpo(tmp_path):
    from npo_engine.baselines import ExperienceMixing
    from npo_engine.config import load_config

    events = []
    host = SimpleNamespace(state=TrainState(experience={"started": True, "pool": {}}),
                           dist=SimpleNamespace(rank=0, world_size=1),
                           event=lambda kind, **fields: events.append(kind))
    mixer = ExperienceMixing(load_config(None, ["mix.mode=exgrpo"]))
    records = [PromptRecord(id=f"p{i}", prompt=f"{i}+1=", answer=str(i + 1)) for i in range(4)]
    assert mixer.select_prompts(host, 3, records) == records
    assert mixer.select_prompts(host, 4, records) == records
    assert events == ["experience_pool_empty"]
    # Once the pool has a prompt, half of the batch would be experience, but the pool holds only one.
    host.state.experience["pool"]["old"] = {"record": {"id": "old", "prompt": "9+9=", "answer": "18"},
                                            "tokens": [5, 6], "logp": [-0.1, -0.2], "entropy": 0.3, "acc": 0.5,
                                            "step": 1}
    swapped = mixer.select_prompts(host, 5, records)
    assert [r.id for r in swapped] == ["p0", "p1", "p2", "old"]


def test_rlep_replays_a_converged_runs_successes_as_on_policy(tmp_path, cache_dir):
    converged = tmp_path / "phase1"
    train(tiny_config(cache_dir, "run.steps=1", "checkpoint.every=0"), converged).close()
    run = tmp_path / "rlep"
    train(tiny_config(cache_dir, "mix.mode=rlep", f"rlep.converged_run={converged}", "rlep.replay=2",
                      "rlep.samples=8", "run.steps=2", "logging.dump_rollouts=true"), run).close()
    replayed = extra_rows(run, "replay")
    assert replayed, "the converged policy solved nothing in 2 steps x 4 prompts x 8 tries"
    assert all(r["policy_id"] == 0 and r["reward"] == 1.0 for r in replayed)  # treated as on-policy, verified
    per_group = {}
    for r in replayed:
        per_group[(r["step"], r["group_id"])] = per_group.get((r["step"], r["group_id"]), 0) + 1
    assert max(per_group.values()) <= 2
    metrics = rows(run)
    assert sum(m["guide/slots"] for m in metrics) == len(replayed)
    loaded = next(e for e in rows(run, "events.jsonl") if e["kind"] == "converged_run_loaded")
    assert loaded["path"].endswith("exports/step_000001")


def test_rlep_refuses_a_missing_or_unfinished_run(tmp_path, cache_dir):
    from npo_engine import Trainer

    with pytest.raises(ConfigError, match=r"rlep.converged_run = .*nope' does not exist"):
        Trainer(tiny_config(cache_dir, "mix.mode=rlep", f"rlep.converged_run={tmp_path / 'nope'}"),
                run_dir=tmp_path / "a")
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"has no export under exports/"):
        Trainer(tiny_config(cache_dir, "mix.mode=rlep", f"rlep.converged_run={tmp_path / 'unfinished'}"),
                run_dir=tmp_path / "b")
