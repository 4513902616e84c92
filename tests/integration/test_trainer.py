"""The whole loop on the CPU: a short run, resume equivalence (1 and 2 ranks), non-finite steps, the CLI."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this file
from trainer_helpers import HERE, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("tests_on_path")

_COMPARED = ["loss/pg", "reward/mean", "entropy/mean", "optim/grad_norm", "pg/ppo_kl", "mismatch/logp_abs"]



def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(cfg, run_dir, resume=False):
    from npo_engine import Trainer

    trainer = Trainer(cfg, run_dir=run_dir, resume=resume)
    trainer.train()
    return trainer


def test_short_run_writes_the_run_directory(tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM

    trainer = _run(tiny_config(cache_dir, "run.steps=2"), tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert "acc/eval" in rows[0] and "acc/eval" in rows[1]  # before the first step, and at eval_every
    for key in ["reward/mean", "acc/train", "loss/pg", "pg/clipfrac", "entropy/mean", "time/rollout",
                "time/train", "time/sync", "throughput/tokens_per_s", "mismatch/logp_abs"]:
        assert key in rows[-1], key
    assert rows[0]["mismatch/logp_abs"] < 1e-4  # the engine samples from exactly the trainer's weights
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert trainer.checkpoints.latest().name == "step_000002"
    export = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "exports" / "step_000002")
    trained = trainer.policy.lm.state_dict()
    for name, tensor in export.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_weights_change_and_engine_follows(tmp_path, cache_dir):
    from npo_engine import Trainer
    from npo_engine.sync import fingerprint

    trainer = Trainer(tiny_config(cache_dir, "run.steps=1"), run_dir=tmp_path / "run")
    before = fingerprint(trainer.policy.lm.state_dict())
    trainer.step()
    after = fingerprint(trainer.policy.lm.state_dict())
    assert before != after
    assert fingerprint(trainer.engine.model.state_dict()) == pytest.approx(after, rel=1e-12)
    trainer.close()


def test_resume_gives_the_same_metrics(tmp_path, cache_dir):
    straight = tiny_config(cache_dir, "run.steps=6", "checkpoint.every=3")
    _run(straight, tmp_path / "straight")
    _run(tiny_config(cache_dir, "run.steps=3", "checkpoint.every=3"), tmp_path / "split")
    _run(straight, tmp_path / "split", resume=True)
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for row_a, row_b in zip(a, b):
        for key in _COMPARED:
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-6, abs=1e-7), (row_a["step"], key)
    assert any(r["optim/grad_norm"] > 0 for r in a[3:])  # the compared steps really trained


def test_activation_checkpointing_gives_the_same_step(tmp_path, cache_dir):
    from npo_engine import Trainer

    plain = Trainer(tiny_config(cache_dir, "run.steps=1"), run_dir=tmp_path / "plain")
    recomputed = Trainer(tiny_config(cache_dir, "run.steps=1", "model.activation_checkpointing=true"),
                         run_dir=tmp_path / "recomputed")
    a, b = plain.step(), recomputed.step()
    for key in _COMPARED:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    names = {k.replace("_checkpoint_wrapped_module.", "") for k in recomputed.policy.lm.state_dict()}
    assert names == set(plain.policy.lm.state_dict())  # exports and weight sync see Hugging Face names
    plain.close()
    recomputed.close()


def test_logits_cache_budget_reaches_the_lm_head_and_keeps_the_step(tmp_path, cache_dir):
    from npo_engine import Trainer

    default = Trainer(tiny_config(cache_dir, "run.steps=1"), run_dir=tmp_path / "default")
    none = Trainer(tiny_config(cache_dir, "run.steps=1", "kernels.logits_cache_mb=0"), run_dir=tmp_path / "none")
    assert default.policy.logits_cache_bytes is None and none.policy.logits_cache_bytes == 0
    a, b = default.step(), none.step()
    for key in _COMPARED:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    default.close()
    none.close()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, cache_dir):
    from npo_engine import Trainer

    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Trainer(tiny_config(cache_dir, "run.steps=1"), run_dir=tmp_path / "fresh", resume=True)


def test_nonfinite_loss_skips_the_step(tmp_path, cache_dir, monkeypatch):
    from npo_engine import Trainer
    from npo_engine.sync import fingerprint

    trainer = Trainer(tiny_config(cache_dir, "run.steps=2"), run_dir=tmp_path / "run")
    real_loss = trainer.policy_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    trainer.policy_loss = poisoned
    before = fingerprint(trainer.policy.lm.state_dict())
    metrics = trainer.step()
    updates = min(trainer.cfg.optim.mini_batches, trainer.cfg.data.prompts_per_step) * trainer.cfg.optim.epochs
    assert metrics["optim/skipped"] == updates  # every mini-batch update of the step was skipped
    assert fingerprint(trainer.policy.lm.state_dict()) == before
    assert fingerprint(trainer.engine.model.state_dict()) == pytest.approx(before, rel=1e-12)
    trainer.policy_loss = real_loss
    assert trainer.step()["optim/skipped"] == 0.0
    trainer.close()
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events] == ["nonfinite_step_skipped"] * updates


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cache_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    overrides = [a for a in tiny_config_overrides(cache_dir)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "npo_engine.train", *overrides, *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert result.returncode == 0, result.stderr[-4000:]


def tiny_config_overrides(cache_dir: Path) -> list[str]:
    from npo_engine.config import config_to_dict

    flat = []
    for section, values in config_to_dict(tiny_config(cache_dir)).items():
        for key, value in values.items():
            flat.append(f"{section}.{key}={json.dumps(value)}")
    return flat


@pytest.mark.dist
def test_two_rank_torchrun_resume_equivalence(tmp_path, cache_dir):
    _torchrun(["run.steps=4", "checkpoint.every=2", "--run-dir", str(tmp_path / "straight")], cache_dir)
    _torchrun(["run.steps=2", "checkpoint.every=2", "--run-dir", str(tmp_path / "split")], cache_dir)
    _torchrun(["run.steps=4", "checkpoint.every=2", "--resume", "--run-dir", str(tmp_path / "split")], cache_dir)
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a, b):
        for key in _COMPARED:
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-6, abs=1e-7), (row_a["step"], key)
    assert any(r["optim/grad_norm"] > 0 for r in a)


@pytest.mark.dist
def test_two_rank_skip_zero_advantage_keeps_the_update(tmp_path, cache_dir):
    """Ranks with different numbers of rows to train pad to the same forward/backward counts (else FSDP's
    collectives would hang), and the run matches one where every row runs its backward."""
    common = ["run.steps=2", "checkpoint.every=0", "reward.verifier=trainer_helpers:half_flat_reward",
              "optim.micro_batch_size=2", "optim.mini_batches=1"]
    for skip in ("true", "false"):
        _torchrun([*common, f"optim.skip_zero_advantage={skip}", "--run-dir", str(tmp_path / skip)], cache_dir)
    skipped, full = _metrics(tmp_path / "true"), _metrics(tmp_path / "false")
    assert any(0 < r["optim/rows_without_backward"] < 1 for r in skipped)
    assert all(r["optim/rows_without_backward"] == 0 for r in full)
    for row_s, row_f in zip(skipped, full):
        for key in _COMPARED:
            assert row_s[key] == pytest.approx(row_f[key], rel=1e-5, abs=1e-6), (row_s["step"], key)


def test_cli_short_run(tmp_path, cache_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "npo_engine.cli", "train", *tiny_config_overrides(cache_dir), "run.steps=1",
           "--run-dir", str(tmp_path / "cli")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(_metrics(tmp_path / "cli")) == 1
    plot = subprocess.run([sys.executable, "-m", "npo_engine.cli", "plot", str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert list((tmp_path / "cli" / "plots").glob("*.png"))
