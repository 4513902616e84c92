"""A run directory nothing can corrupt, end to end on the CPU: one test per way a demanding user broke it.

1. a new run in a used run directory is refused (or moves the old run aside with --overwrite), never mixed in;
2. a run directory has one owner (a lock naming pid and host; a dead owner's lock is taken over);
3. --resume refuses config changes outside the resumable fields and writes config.yaml only once it succeeded;
4. SIGINT / SIGTERM stop after the current step with a checkpoint and one line (also under 2-rank torchrun);
   checkpoint.every = 0 writes no checkpoint at all;
5. damage is stopped: non-finite weights after an update stop the run before they are synced or saved, a
   damaged or non-finite latest checkpoint makes --resume fall back to the newest good one, and consecutive
   non-finite steps stop the run with a non-zero exit;
6. what can be checked at start is: every prompt's length (with its file and line), the model directory;
7. a huge reward is clipped and counted instead of overflowing the advantages (the time budget of a hanging
   verifier is tested with the reward runner, tests/npo_engine/rewards);
8. the README says which files are trusted input (the hash check before DCP unpickles is in test_checkpoint).

Full-disk saves and same-size corruption are tested at the checkpoint level (tests/npo_engine/test_checkpoint.py),
the lock races and resume rules without a trainer (tests/npo_engine/test_run_dir.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this file
from trainer_helpers import HERE, tiny_config  # noqa: E402
from trainer_helpers import rows as _rows, train as _run  # noqa: E402

pytestmark = pytest.mark.usefixtures("tests_on_path")
REPO_ROOT = HERE.parents[1]




def _checkpoints(run_dir: Path) -> list[int]:
    from npo_engine.checkpoint import CheckpointManager

    return [step for step, _ in CheckpointManager(run_dir / "checkpoints").list()]



def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def _wait_for_rows(run_dir: Path, proc: subprocess.Popen, count: int = 1, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while not (path.is_file() and len(path.read_text().splitlines()) >= count):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "the run logged no step in time"
        time.sleep(0.2)


# ---- 1. a new run never replaces an old one ------------------------------------------------------------------


def test_new_run_in_a_used_run_directory_is_refused_and_overwrite_moves_it_aside(tmp_path, cache_dir):
    from npo_engine import Trainer

    run = tmp_path / "R"
    _run(tiny_config(cache_dir, "run.steps=2", "checkpoint.every=1"), run)
    rows = _rows(run)
    second = tiny_config(cache_dir, "run.steps=1", "checkpoint.every=1", "run.seed=7")
    with pytest.raises(RuntimeError, match="already holds a run .*--resume.*--overwrite"):  # a RunDirError
        Trainer(second, run_dir=run)
    assert _rows(run) == rows and _checkpoints(run) == [1, 2]  # the old run is untouched

    _run(second, run, overwrite=True)
    (old,) = tmp_path.glob("R.old-*")
    assert _rows(old) == rows and _checkpoints(old) == [1, 2]
    assert [r["step"] for r in _rows(run)] == [1] and _checkpoints(run) == [1]
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["seed"] == 7
    assert [e["kind"] for e in _rows(run, "events.jsonl")] == ["old_run_moved"]


# ---- 2. one owner --------------------------------------------------------------------------------------------

_HOLD_LOCK = """
import sys, time
from pathlib import Path
from npo_engine.run_dir import RunLock
lock = RunLock(Path(sys.argv[1]))  # released when collected: keep it
lock.acquire()
print("held", flush=True)
time.sleep(300)
"""


def test_a_run_directory_in_use_is_refused_and_a_dead_owners_lock_taken_over(tmp_path, cache_dir):
    from npo_engine import Trainer

    run = tmp_path / "R"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"in use by pid {holder.pid} on host {socket.gethostname()}"):
            Trainer(tiny_config(cache_dir, "run.steps=1"), run_dir=run)
    finally:
        holder.kill()
        holder.wait()
    trainer = Trainer(tiny_config(cache_dir, "run.steps=1"), run_dir=run)  # the dead holder's lock is stale
    with pytest.raises(RuntimeError, match="this process already has a Trainer on it"):
        Trainer(tiny_config(cache_dir, "run.steps=1"), run_dir=run, resume=True)
    trainer.train()
    assert not (run / ".lock").exists()
    assert [r["step"] for r in _rows(run)] == [1]


# ---- 3. resume semantics -------------------------------------------------------------------------------------


def test_resume_refuses_a_changed_config_and_config_yaml_keeps_describing_the_run(tmp_path, cache_dir):
    from npo_engine import Trainer
    from npo_engine.config import ConfigError

    run = tmp_path / "R"
    _run(tiny_config(cache_dir, "run.steps=1"), run)
    stored = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"these fields differ .*optim\.lr: 0\.001 -> 0\.002"):
        Trainer(tiny_config(cache_dir, "run.steps=2", "optim.lr=2e-3"), run_dir=run, resume=True)
    assert (run / "config.yaml").read_text() == stored

    shutil.move(run / "checkpoints", tmp_path / "kept")  # a resume that fails after the config check
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Trainer(tiny_config(cache_dir, "run.steps=2"), run_dir=run, resume=True)
    assert (run / "config.yaml").read_text() == stored
    shutil.move(tmp_path / "kept", run / "checkpoints")

    _run(tiny_config(cache_dir, "run.steps=2", "logging.eval_every=1"), run, resume=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["run"]["steps"] == 2 and config["logging"]["eval_every"] == 1
    (changed,) = [e for e in _rows(run, "events.jsonl") if e["kind"] == "config_changed"]
    assert changed["fields"] == {"logging.eval_every": [2, 1], "run.steps": [1, 2]}
    assert [r["step"] for r in _rows(run)] == [1, 2]


# ---- 4. graceful stop ----------------------------------------------------------------------------------------


def test_sigint_stops_after_the_step_with_a_checkpoint_and_one_line(tmp_path, cache_dir):
    from test_trainer import tiny_config_overrides

    run = tmp_path / "R"
    cmd = [sys.executable, "-m", "npo_engine.cli", "train", *tiny_config_overrides(cache_dir), "run.steps=500",
           "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        _wait_for_rows(run, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-4000:]
    assert "Traceback" not in stderr
    step = _checkpoints(run)[-1]
    assert f"npo train: stopped by SIGINT after step {step} of 500; checkpoint {run / 'checkpoints'}" in stderr
    assert [r["step"] for r in _rows(run)] == list(range(1, step + 1))
    assert not (run / ".lock").exists()
    # The stopped run continues where it stopped.
    _run(tiny_config(cache_dir, f"run.steps={step + 1}"), run, resume=True)
    assert [r["step"] for r in _rows(run)] == list(range(1, step + 2))


@pytest.mark.dist
def test_two_rank_torchrun_sigterm_saves_and_resumes(tmp_path, cache_dir):
    from test_trainer import _free_port, _torchrun, tiny_config_overrides

    run = tmp_path / "R"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "npo_engine.train", *tiny_config_overrides(cache_dir), "run.steps=500", "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    try:
        _wait_for_rows(run, proc)
        proc.send_signal(signal.SIGTERM)  # as a scheduler preempting the job: torchrun forwards it to each rank
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    step = _checkpoints(run)[-1]
    assert f"stopped by SIGTERM after step {step} of 500; checkpoint" in stderr, stderr[-4000:]
    assert stderr.count("stopped by SIGTERM after step") == 1  # rank 0 says it once
    assert [r["step"] for r in _rows(run)] == list(range(1, step + 1))
    _torchrun([f"run.steps={step + 1}", "--resume", "--run-dir", str(run)], cache_dir)
    assert [r["step"] for r in _rows(run)] == list(range(1, step + 2))


def test_checkpoint_every_zero_writes_no_checkpoint(tmp_path, cache_dir):
    _run(tiny_config(cache_dir, "run.steps=1", "checkpoint.every=0", "checkpoint.export_final=false"),
         tmp_path / "R")
    assert _checkpoints(tmp_path / "R") == [] and not (tmp_path / "R" / "exports").exists()


# ---- 5. damage gets stopped ----------------------------------------------------------------------------------


def test_nonfinite_weights_after_an_update_stop_the_run_before_sync_and_save(tmp_path, cache_dir):
    from npo_engine import Trainer
    from npo_engine.sync import fingerprint

    trainer = Trainer(tiny_config(cache_dir, "run.steps=2", "checkpoint.every=1"), run_dir=tmp_path / "R")
    engine_before = fingerprint(trainer.engine.model.state_dict())
    for group in trainer.optimizer.param_groups:
        group["lr"] = float("inf")  # what optim.lr=inf did before the config refused it
    with pytest.raises(RuntimeError, match="weights hold NaN or infinity after the optimizer update of step 1"):
        trainer.step()
    trainer.close()
    assert fingerprint(trainer.engine.model.state_dict()) == engine_before  # never synced
    assert _checkpoints(tmp_path / "R") == []


def test_damaged_or_nonfinite_latest_checkpoints_make_resume_fall_back(tmp_path, cache_dir):
    from npo_engine import Trainer

    run = tmp_path / "R"
    cfg = tiny_config(cache_dir, "run.steps=3", "checkpoint.every=1", "checkpoint.keep_last=3")
    trainer = Trainer(cfg, run_dir=run)
    for _ in range(3):
        trainer.step()
    with torch.no_grad():  # step 3 saved again with NaN weights: its hashes are valid, its weights are not
        next(trainer.policy.parameters()).view(-1)[0] = float("nan")
    trainer.save_checkpoint()
    trainer.close()
    manifest = json.loads((run / "checkpoints" / "step_000002" / "COMPLETE").read_text())
    shard = run / "checkpoints" / "step_000002" / next(n for n in manifest["files"] if n.endswith(".distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash sees it
    shard.write_bytes(bytes(data))
    (run / "checkpoints" / "step_000009.tmp").mkdir()  # an interrupted save's leftovers

    resumed = Trainer(cfg, run_dir=run, resume=True)
    assert resumed.state.step == 1
    assert not (run / "checkpoints" / "step_000009.tmp").exists()
    events = _rows(run, "events.jsonl")
    damaged = [e for e in events if e["kind"] == "checkpoint_damaged"]
    assert [e["checkpoint"] for e in damaged] == ["step_000003", "step_000002"]
    assert "non-finite weights" in damaged[0]["error"] and "does not match the SHA-256" in damaged[1]["error"]
    assert events[-1]["kind"] == "resumed_from_older_checkpoint" and events[-1]["checkpoint"] == "step_000001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000001", "step_000002.damaged", "step_000003.damaged"]
    resumed.train()
    assert [r["step"] for r in _rows(run)] == [1, 2, 3] and _checkpoints(run) == [1, 2, 3]


def test_consecutive_nonfinite_steps_stop_the_run_with_a_nonzero_exit(tmp_path, cache_dir, monkeypatch, capsys):
    from test_trainer import tiny_config_overrides

    from npo_engine import algo
    from npo_engine.cli import train_main

    real = algo.get_policy_loss

    def poisoned(name):
        loss = real(name)
        return lambda *args, **kwargs: (lambda out: (out[0] * float("nan"), out[1]))(loss(*args, **kwargs))

    monkeypatch.setattr(algo, "get_policy_loss", poisoned)
    run = tmp_path / "R"
    code = train_main([*tiny_config_overrides(cache_dir), "run.steps=5", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 1  # optim.max_bad_steps = 3 by default
    assert "npo train: error: steps 1-3 all skipped updates with a non-finite loss or gradient" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "npo train" in line]) == 1
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]
    assert _rows(run, "events.jsonl")[-1]["kind"] == "training_diverged"


# ---- 6. checked at start -------------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_limit_fails_at_start_with_its_file_and_line(tmp_path, cache_dir):
    from npo_engine import Trainer
    from npo_engine.config import ConfigError

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    rows[5]["prompt"] = "1+" * 40 + "1="
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(cache_dir, "data.source=files", f"data.train_files=[{prompts}]", "data.id_field=null",
                      "data.max_prompt_tokens=20", "run.steps=1")
    with pytest.raises(ConfigError, match=r"data.max_prompt_tokens = 20 .* 1 prompt\(s\) are longer, e\.g\. "
                                          r"'prompts:6' \(82 tokens, prompts.jsonl:6\)"):
        Trainer(cfg, run_dir=tmp_path / "R")
    assert not (tmp_path / "R" / "config.yaml").exists()


def test_model_directory_problems_are_named_in_one_line(tmp_path, cache_dir):
    from npo_engine import Trainer
    from npo_engine.config import ConfigError

    with pytest.raises(ConfigError, match=f"model.path = '{tmp_path / 'nowhere'}' does not exist"):
        Trainer(tiny_config(cache_dir, f"model.path={tmp_path / 'nowhere'}"), run_dir=tmp_path / "R1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"missing the model config \(config.json\); the tokenizer \(tokenizer"
                                          r".json or .*\); the weights \(model.safetensors or"):
        Trainer(tiny_config(cache_dir, f"model.path={tmp_path / 'empty'}"), run_dir=tmp_path / "R2")
    result = subprocess.run([sys.executable, "-m", "npo_engine.cli", "train", f"model.path={tmp_path / 'nowhere'}",
                             "--run-dir", str(tmp_path / "R3")], env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("npo train: error: model.path = ")


# ---- 7. rewards out of range ---------------------------------------------------------------------------------


def test_a_huge_reward_is_clipped_and_counted_and_the_update_happens(tmp_path, cache_dir):
    from npo_engine import Trainer

    trainer = Trainer(tiny_config(cache_dir, "run.steps=1", "reward.verifier=run_safety_helpers:huge_reward",
                                  "logging.eval_every=0", "data.eval_size=0"), run_dir=tmp_path / "R")
    metrics = trainer.step()
    trainer.close()
    assert metrics["optim/skipped"] == 0.0 and metrics["optim/grad_norm"] > 0  # unclipped, every update skipped
    assert metrics["reward/clipped"] > 0 and metrics["reward/mean"] <= 10.0


# ---- 8. trusted files ----------------------------------------------------------------------------------------


def test_readme_says_which_files_are_trusted_input():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### Trusted files"):]
    section = section[: section.index("\n#", 1)]
    for needed in ("pickle", "checkpoints/", "safetensors", "trust"):
        assert needed in section, needed
