"""The README's launch commands, run as a user runs them: from the repository root, as subprocesses.

    python -m npo_engine.train run.steps=1 ...
    torchrun --nproc_per_node=2 -m npo_engine.train run.steps=1 ...

`python -m` and torchrun's `-m` workers put the current directory first on sys.path, so from the repository
root a top-level folder that is importable as `kernels` would shadow Hugging Face's `kernels` package, which
transformers probes for at import time; these commands once failed that way. Each run is one step of the demo
task with small overrides; the demo model (20 warm-up steps) is built once per module into a temporary
$NPO_CACHE_DIR, as test_trainer.py does with its own cache.
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

REPO_ROOT = Path(__file__).resolve().parents[2]
SFT_STEPS = 20
OVERRIDES = [
    "run.steps=1", f"model.demo_sft_steps={SFT_STEPS}", "data.prompts_per_step=4", "data.train_size=64",
    "data.eval_size=4", "rollout.group_size=2", "rollout.max_new_tokens=4", "logging.progress=false",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A demo-model cache holding the 20-step demo model, built here once so the launches only read it."""
    from npo_engine.config import ModelConfig
    from npo_engine.models import ensure_demo_model

    cache = tmp_path_factory.mktemp("demo_cache")
    ensure_demo_model(ModelConfig(demo_sft_steps=SFT_STEPS, demo_cache_dir=str(cache)), progress=False)
    return cache


def _env(cache_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # only what a user has
    return env | {"NPO_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}


def _torchrun() -> list[str]:
    """The `torchrun` console script installed beside this Python, else its module form."""
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command: list[str], cache_dir: Path) -> None:
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(cache_dir), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-5000:]}"


def _assert_one_step_logged(runs_dir: Path) -> None:
    rows = [json.loads(line) for line in (runs_dir / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1]
    assert math.isfinite(rows[0]["loss/pg"]) and rows[0]["rollout/tokens"] > 0


def test_python_m_train_from_the_repository_root(tmp_path, cache_dir):
    runs = tmp_path / "runs"
    _launch([sys.executable, "-m", "npo_engine.train", *OVERRIDES, f"run.runs_dir={runs}"], cache_dir)
    _assert_one_step_logged(runs)


@pytest.mark.dist
def test_torchrun_two_ranks_from_the_repository_root(tmp_path, cache_dir):
    runs = tmp_path / "runs"
    _launch([*_torchrun(), "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "npo_engine.train",
             *OVERRIDES, f"run.runs_dir={runs}"], cache_dir)
    _assert_one_step_logged(runs)


def test_repository_root_does_not_shadow_hugging_face_kernels():
    """From the repository root, `kernels` is Hugging Face's package and `npo_kernels` is ours (kernels/)."""
    probe = ("import importlib.util as u; s = u.find_spec('kernels'); n = u.find_spec('npo_kernels'); "
             "print(s.origin if s else None); print(n.origin)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=_env(Path("unused-cache")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kernels_origin, npo_kernels_origin = result.stdout.split("\n")[:2]
    # The installed npo_kernels (this checkout's, or another editable checkout's on a shared machine).
    assert Path(npo_kernels_origin).parts[-3:] == ("kernels", "npo_kernels", "__init__.py"), npo_kernels_origin
    if kernels_origin == "None":
        pytest.skip("Hugging Face's kernels package is not installed; nothing here is importable as kernels")
    assert not Path(kernels_origin).is_relative_to(REPO_ROOT), f"`kernels` resolves to {kernels_origin}"
