"""CheckpointManager: bitwise resume, retention, crash safety (raised and SIGKILLed saves), Hugging Face
export, and a 2-rank FSDP2 save/load under torchrun (gloo).

References: an uninterrupted run for resume, the saved step's weights for crash safety, the in-memory model's
logits for the export, and the pre-save full state dict for the sharded round trip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

import npo_engine.checkpoint as checkpoint
from npo_engine.checkpoint import CheckpointManager
from npo_engine.models import build_demo_tokenizer, demo_model_config

HERE = Path(__file__).parent
VOCAB = 52
# The models here are tiny: with more than one intra-op thread, kernels this small spend their time in thread
# hand-offs, which on a busy 2-core machine made a training step 100x slower. torchrun sets it for workers.
_WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Run:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: torch.Generator


def make_run(seed: int, *, tie: bool = True) -> Run:
    torch.manual_seed(seed)
    config = demo_model_config(VOCAB)
    config.tie_word_embeddings = tie
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return Run(model, optimizer, scheduler, torch.Generator().manual_seed(seed + 100))


def train_step(run: Run) -> float:
    # Dropout-free model, but the step still draws from the global RNG so resumed RNG state matters.
    tokens = torch.randint(0, VOCAB, (2, 10), generator=run.data)
    noise = torch.rand(()) * 1e-3
    loss = run.model(tokens, labels=tokens).loss + noise
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad()
    run.scheduler.step()
    return loss.item()


def draw_all_rngs(run: Run) -> tuple:
    return (
        torch.rand(3).tolist(),
        random.random(),
        np.random.rand(),
        torch.randint(0, 1000, (3,), generator=run.data).tolist(),
    )


def tiny_linear() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 4)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def assert_state_equal(expected: dict, actual: dict) -> None:
    # A tied lm_head is the embedding under a second name; some state dicts list it, some do not.
    expected, actual = ({k: v for k, v in sd.items() if k != "lm_head.weight"} for sd in (expected, actual))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs"


def test_resume_continues_bitwise(tmp_path):
    """Save after 3 steps, then take 2 more; a fresh run loaded from the save must replay them bit for bit."""
    original = make_run(seed=0)
    for _ in range(3):
        train_step(original)
    manager = CheckpointManager(tmp_path)
    path = manager.save(
        3,
        original.model,
        original.optimizer,
        scheduler=original.scheduler,
        extra={"step": 3, "data_position": 6},
        generators={"data": original.data},
    )
    draws = draw_all_rngs(original)
    losses = [train_step(original) for _ in range(2)]

    resumed = make_run(seed=1)
    extra = manager.load(
        path, resumed.model, resumed.optimizer, scheduler=resumed.scheduler, generators={"data": resumed.data}
    )

    assert extra == {"step": 3, "data_position": 6}
    assert draw_all_rngs(resumed) == draws
    assert [train_step(resumed) for _ in range(2)] == losses
    assert_state_equal(original.model.state_dict(), resumed.model.state_dict())
    assert resumed.scheduler.get_last_lr() == original.scheduler.get_last_lr()
    rng = torch.load(path / "rng_rank0.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "torch_cpu", "generators"}


def test_list_latest_and_retention(tmp_path):
    model, optimizer = tiny_linear()
    manager = CheckpointManager(tmp_path, keep_last=2, pinned_steps={1})
    assert manager.latest() is None and manager.list() == []
    for step in range(1, 6):
        if step == 3:
            manager.pin(3)
        manager.save(step, model, optimizer)
    assert [step for step, _ in manager.list()] == [1, 3, 4, 5]
    assert manager.latest() == manager.path_for(5) == tmp_path / "step_000005"

    manager.unpin(1)
    manager.save(5, model, optimizer, extra={"again": True})  # re-saving a step replaces it
    assert [step for step, _ in manager.list()] == [3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004", "step_000005"]
    assert manager.load(manager.latest(), model, optimizer) == {"again": True}
    manifest = json.loads((manager.latest() / "COMPLETE").read_text())
    assert manifest["step"] == 5 and manifest["world_size"] == 1 and "dcp/.metadata" in manifest["files"]


@pytest.mark.parametrize("crash_point", ["after_dcp_files", "before_rename"])
def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch, crash_point):
    model, optimizer = tiny_linear()
    manager = CheckpointManager(tmp_path)
    manager.save(1, model, optimizer, extra={"step": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    # after_dcp_files: model/optimizer shards are on disk, nothing else. before_rename: every file and the
    # COMPLETE marker are written inside the .tmp directory, which is not renamed yet.
    target = "_capture_rng" if crash_point == "after_dcp_files" else "_fsync_dir"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, target, crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            manager.save(2, model, optimizer, extra={"step": 2})
    assert (tmp_path / "step_000002.tmp" / "dcp").is_dir()

    assert manager.latest() == manager.path_for(1)
    fresh, fresh_optimizer = tiny_linear()
    assert manager.load(manager.latest(), fresh, fresh_optimizer) == {"step": 1}
    assert_state_equal(saved, fresh.state_dict())

    manager.save(3, model, optimizer, extra={"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000003"]


def test_sigkill_during_save(tmp_path):
    """A process saving in a loop is SIGKILLed at a random moment, most likely inside a save."""
    worker = subprocess.Popen(
        [sys.executable, str(HERE / "checkpoint_kill_worker.py"), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_WORKER_ENV,
    )
    try:
        line = ""
        while line != "saving 4":
            line = worker.stdout.readline().strip()
            if not line and worker.poll() is not None:
                pytest.fail(f"worker exited early: {worker.stderr.read()}")
        delay = random.uniform(0.0, 0.3)
        time.sleep(delay)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    manager = CheckpointManager(tmp_path, keep_last=2)
    latest = manager.latest()
    assert latest is not None, f"no complete checkpoint after a kill {delay:.3f}s into step 4's save"
    step = int(latest.name.removeprefix("step_"))
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert manager.load(latest, model, optimizer) == {"step": step}
    assert all(torch.all(p == step) for p in model.parameters()), f"step {step} holds weights of another step"

    manager.save(100, model, optimizer, extra={"step": 100})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[-1] == "step_000100" and len(names) == 2 and not any("." in n for n in names), names


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_hf_loads_with_identical_logits(tmp_path, tie):
    run = make_run(seed=0, tie=tie)
    train_step(run)  # untied: lm_head and the embedding now differ
    out = CheckpointManager(tmp_path / "ckpt").export_hf(
        1, run.model, tmp_path / "export", tokenizer=build_demo_tokenizer()
    )

    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    probe = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(probe).logits, run.model(probe).logits)
    assert loaded.config.tie_word_embeddings == tie
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).decode([3, 4]) == "01"
    assert not (tmp_path / "export.tmp").exists()


def test_export_hf_dtype_and_replace(tmp_path):
    run = make_run(seed=0)
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.export_hf(1, run.model, tmp_path / "export")
    out = manager.export_hf(2, run.model, tmp_path / "export", dtype=torch.bfloat16)  # replaces the first

    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["step"] == "2"
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_load_refuses_incomplete_or_damaged(tmp_path):
    model, optimizer = tiny_linear()
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, model, optimizer)
    (path / "COMPLETE").rename(tmp_path / "manifest.json")
    with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
        manager.load(path, model, optimizer)
    (tmp_path / "manifest.json").rename(path / "COMPLETE")
    with open(path / "extra.json", "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match="extra.json is missing or not"):
        manager.load(path, model, optimizer)


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="no process group"):
        CheckpointManager(tmp_path, rank=0, world_size=2)
    model, optimizer = tiny_linear()
    with pytest.raises(TypeError, match="JSON-able"):
        CheckpointManager(tmp_path).save(1, model, optimizer, extra={"loss": torch.tensor(1.0)})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_fsdp2_two_ranks(tmp_path):
    """Sharded save/load on 2 ranks (checks in the worker), then resharding 2 -> 1 here and 1 -> 2 there."""
    single_run = make_run(seed=5)
    train_step(single_run)
    CheckpointManager(tmp_path / "single").save(1, single_run.model, single_run.optimizer, extra={"step": 1})

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(free_port()),
        str(HERE / "checkpoint_dist_worker.py"),
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=_WORKER_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    assert_state_equal(single_run.model.state_dict(), reference["from_single"])

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    with torch.no_grad():
        assert torch.equal(exported(reference["probe"]).logits, reference["logits"])

    # 2 -> 1: the sharded checkpoint loads into a plain model; RNG does not reshard, which is warned about.
    run = make_run(seed=9)
    manager = CheckpointManager(tmp_path / "ckpt")
    with pytest.warns(RuntimeWarning, match="saved by 2 ranks"):
        assert manager.load(manager.latest(), run.model, run.optimizer) == {"step": 2}
    assert_state_equal(reference["step2_model"], run.model.state_dict())


# ---- integrity: content hashes, full disks, untrusted files -------------------------------------------------


def test_same_size_corruption_is_refused_before_loading(tmp_path):
    """A flipped byte keeps every size: the manifest's SHA-256 catches it, and nothing is loaded."""
    model, optimizer = tiny_linear()
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, model, optimizer)
    manifest = json.loads((path / "COMPLETE").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"])
    shard = next(name for name in manifest["files"] if name.endswith(".distcp"))
    data = bytearray((path / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / shard).write_bytes(bytes(data))

    fresh, fresh_optimizer = tiny_linear()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=f"{shard} does not match the SHA-256"):  # a CheckpointError
        manager.load(path, fresh, fresh_optimizer)
    assert_state_equal(before, fresh.state_dict())


def test_tampered_metadata_is_refused_before_it_is_unpickled(tmp_path):
    """DCP unpickles dcp/.metadata. A same-size replacement that runs code when unpickled is refused by its hash
    before DCP reads it (which is damage detection, not security: see the module docstring on trust)."""
    model, optimizer = tiny_linear()
    path = CheckpointManager(tmp_path).save(1, model, optimizer)
    marker = tmp_path / "code_ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    metadata = path / "dcp" / ".metadata"
    payload = __import__("pickle").dumps(RunsCode())
    size = metadata.stat().st_size
    assert len(payload) < size
    metadata.write_bytes(payload + b"\0" * (size - len(payload)))  # pickle stops reading at its STOP opcode
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        CheckpointManager(tmp_path).load(path, model, optimizer)
    assert not marker.exists()


def _fail_writing_extra(real):
    def write(path, data):
        if path.name == "extra.json":
            with open(path, "wb") as f:
                f.write(data[:10])
            raise OSError(28, os.strerror(28), str(path))
        return real(path, data)

    return write


def _short_write_in_dcp(real):
    def save(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")

    return save


@pytest.mark.parametrize("how", ["enospc", "short_write"])
def test_full_disk_says_so_and_leaves_nothing_behind(tmp_path, monkeypatch, how):
    model, optimizer = tiny_linear()
    manager = CheckpointManager(tmp_path)
    manager.save(1, model, optimizer, extra={"step": 1})
    with monkeypatch.context() as patch:
        if how == "enospc":
            patch.setattr(checkpoint, "_write_durable", _fail_writing_extra(checkpoint._write_durable))
        else:
            patch.setattr(checkpoint.dcp, "save", _short_write_in_dcp(checkpoint.dcp.save))
        with pytest.raises(OSError, match=f"into {tmp_path}: the disk is full") as e:
            manager.save(2, model, optimizer, extra={"step": 2})
    assert type(e.value).__name__ == "CheckpointWriteError" and "GiB are free there" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]  # the partial save is gone
    assert manager.load(manager.latest(), model, optimizer) == {"step": 1}
    manager.save(2, model, optimizer, extra={"step": 2})
    assert [step for step, _ in manager.list()] == [1, 2]


def test_nonfinite_weights_names_the_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    assert checkpoint.nonfinite_weights(model) == []
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    assert checkpoint.nonfinite_weights(model) == ["1.bias"]
