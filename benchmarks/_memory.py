"""Peak extra memory of one benchmark case: the most memory the timed call holds beyond what was live before.

CUDA: in-process, `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the memory
allocated just before the call (inputs, weights and, for "bwd", the saved graph are all excluded).

CPU: torch has no CPU peak tracker, so each case runs in a fresh subprocess (`python -m benchmarks._memory`):
    1. torch and the kernels warm up on a tiny shape (thread pools, BLAS buffers, Triton/ATen lazy init);
    2. the inputs are built at the real shape (and touched), then for "bwd" the forward graph;
    3. the kernel's high-water mark VmHWM is reset (`echo 5 > /proc/self/clear_refs`, Linux ≥ 4.0) and the
       resident size VmRSS read;
    4. the call runs once; peak extra = VmHWM - VmRSS(before).
This counts what the process really touched: glibc returns large blocks (mmap'd, ≥ 32 MB) on free and commits
`torch.empty` pages only when written, so lazily filled outputs count as they fill. It also counts allocator
slack and anything else the call touched, so it is an upper bound on the tensors' own bytes. If clear_refs
is unavailable, VmHWM cannot be reset and the value is None rather than a misleading number.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024   # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure_in_process(op: str, provider: str, mode: str, shape) -> int | None:
    from benchmarks._cases import runner

    fn, setup = runner(op, provider, shape)[mode]
    args = setup()[0] if setup else ()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn(*args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not _reset_high_water_mark():
        return None
    before = _status_bytes("VmRSS")
    fn(*args)
    return _status_bytes("VmHWM") - before


def peak_extra_bytes(op: str, provider: str, mode: str, shape) -> int | None:
    """Peak extra bytes of one call of `runner(op, provider, shape)[mode]` (see the module docstring)."""
    if torch.cuda.is_available():
        return _measure_in_process(op, provider, mode, shape)
    spec = json.dumps({"op": op, "provider": provider, "mode": mode, "shape": shape.__dict__})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "benchmarks._memory", spec], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {op}/{provider}/{mode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def main(argv: list[str]) -> None:
    from benchmarks._cases import Shape, runner

    torch.set_num_threads(min(2, torch.get_num_threads()))
    spec = json.loads(argv[0])
    shape = Shape(**spec["shape"])
    tiny = Shape(num_rows=shape.seq_len if shape.seq_len <= 64 else 64, n_cols=512,
                 hidden_size=32 if shape.hidden_size else 0,
                 seq_len=shape.seq_len if shape.seq_len <= 64 else 64, dtype=shape.dtype)
    for mode in ("fwd", "fwd+bwd"):              # warm-up at a tiny shape: lazy inits are not the op's memory
        fn, _ = runner(spec["op"], spec["provider"], tiny)[mode]
        fn()
    peak = _measure_in_process(spec["op"], spec["provider"], spec["mode"], shape)
    print(json.dumps({"peak_extra_bytes": peak}))


if __name__ == "__main__":
    main(sys.argv[1:])
