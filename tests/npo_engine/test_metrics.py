"""MetricsLogger, read_jsonl and plot_run: file contents line by line, crash and resume behaviour, plots."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from npo_engine.metrics import MetricsLogger, plot_run, read_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def strict_json_lines(path) -> list[dict]:
    """Parse every line, refusing the NaN/Infinity tokens that Python's json would otherwise accept."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_log_appends_one_flushed_line_per_call(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=10, progress=False)
    logger.log(0, {"reward/mean": torch.tensor(0.25), "guide/slots": 3, "loss/pg": -0.5})
    logger.log(1, {"reward/mean": 0.5})
    lines = strict_json_lines(tmp_path / "metrics.jsonl")  # read while the logger is still open
    logger.close()

    assert [line["step"] for line in lines] == [0, 1]
    assert lines[0]["reward/mean"] == 0.25 and isinstance(lines[0]["reward/mean"], float)
    assert lines[0]["guide/slots"] == 3 and lines[0]["loss/pg"] == -0.5
    assert all(abs(line["time"] - lines[0]["time"]) < 60 for line in lines)
    assert list(lines[0])[:2] == ["step", "time"]


def test_non_finite_values_are_null(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, progress=False) as logger:
        logger.log(0, {"loss/pg": math.nan, "a": math.inf, "b": torch.tensor(-math.inf), "c": 1.0})
        logger.event("nonfinite_loss", step=0, loss=torch.tensor(math.nan), values=[1.0, math.nan])
    (line,) = strict_json_lines(tmp_path / "metrics.jsonl")
    assert line["loss/pg"] is None and line["a"] is None and line["b"] is None and line["c"] == 1.0
    (event,) = strict_json_lines(tmp_path / "events.jsonl")
    assert event["loss"] is None and event["values"] == [1.0, None]


def test_bad_metric_values_name_the_metric(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, progress=False) as logger:
        with pytest.raises(ValueError, match="'reward/all'.*shape \\(4,\\)"):
            logger.log(0, {"reward/all": torch.zeros(4)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(0, {"step": 1})
        with pytest.raises(TypeError, match="'name'"):
            logger.log(0, {"name": "x"})


def test_read_jsonl_skips_only_a_truncated_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "rew')
    assert read_jsonl(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"step": 1, "rew\n{"step": 2}\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        read_jsonl(path)


def test_resume_drops_steps_at_and_after_start(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        for step in range(5):
            logger.log(step, {"reward/mean": step / 10})
        logger.event("rollback", step=4, delta=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rew')  # a crash in the middle of a line
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"kind": "gui')

    with MetricsLogger(tmp_path, total_steps=10, progress=False, start_step=3) as logger:
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]
        logger.log(3, {"reward/mean": 0.9})
        logger.event("resume", step=3)
    assert [r["reward/mean"] for r in strict_json_lines(tmp_path / "metrics.jsonl")] == [0.0, 0.1, 0.2, 0.9]
    assert [e["kind"] for e in strict_json_lines(tmp_path / "events.jsonl")] == ["rollback", "resume"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "metrics.jsonl"]


def test_events_are_written_and_printed(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=10) as logger:
        logger.event("guide_cache", step=7, prompts=12, coverage=torch.tensor(0.75), source=tmp_path / "g")
        logger.event("warning", message="vLLM not installed")
    events = strict_json_lines(tmp_path / "events.jsonl")
    assert events[0] | {"time": 0} == {
        "time": 0,
        "step": 7,
        "kind": "guide_cache",
        "prompts": 12,
        "coverage": 0.75,
        "source": str(tmp_path / "g"),
    }
    assert events[1]["step"] is None and events[1]["message"] == "vLLM not installed"
    out = capsys.readouterr().out
    assert "[guide_cache] step 7 prompts=12 coverage=0.75" in out and "[warning] message=vLLM" in out


def test_progress_bar_shows_reward_accuracy_and_step_time(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=4) as logger:
        logger.log(1, {"reward/mean": 0.5, "acc/train": 0.25, "acc/eval": 0.125, "time/step": 1.5})
        logger.log(2, {"reward/mean": 0.75, "acc/train": 0.5, "time/step": 1.25})
    final = [refresh for refresh in capsys.readouterr().err.split("\r") if "reward=0.750" in refresh][-1]
    assert "2/4" in final and "acc=0.500" in final and "s/step=1.25" in final
    assert "eval=0.125" in final  # acc/eval is logged at eval steps only; the bar keeps the last value


def test_non_main_rank_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, total_steps=3, is_main=False, tensorboard=True) as logger:
        logger.log(0, {"reward/mean": 1.0})
        logger.event("rollback", step=0)
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, total_steps=3, tensorboard=True, progress=False) as logger:
        logger.log(0, {"reward/mean": 0.5, "loss/pg": math.nan})
    event_files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1 and event_files[0].stat().st_size > 0


def test_tensorboard_missing_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install 'npo_engine\\[tensorboard\\]'"):
        MetricsLogger(tmp_path, total_steps=3, tensorboard=True, progress=False)


def synthetic_run(run_dir, steps: int = 20) -> None:
    with MetricsLogger(run_dir, total_steps=steps, progress=False) as logger:
        for step in range(steps):
            metrics = {
                "reward/mean": step / steps,
                "acc/train": step / (2 * steps),
                "entropy/mean": 1.0 - step / steps,
                "time/rollout": 1.0,
                "time/train": 0.5,
                "time/sync": 0.1,
                "time/step": 1.6,
                "loss/pg": math.nan if step == 3 else -0.1 * step,
            }
            if step % 5 == 4:
                metrics["acc/eval"] = step / steps
            logger.log(step, metrics)


def test_plot_run_writes_each_panel(tmp_path):
    synthetic_run(tmp_path)
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["reward.png", "accuracy.png", "entropy.png", "times.png", "loss.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path


def test_plot_run_skips_absent_panels(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, progress=False) as logger:
        for step in range(3):
            logger.log(step, {"reward/mean": 0.1 * step, "pg/clipfrac": 0.0})
    assert [p.name for p in plot_run(tmp_path)] == ["reward.png"]


def test_plot_run_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.jsonl")):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl holds no metric lines"):
        plot_run(tmp_path)
