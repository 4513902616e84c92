"""Benchmark-suite settings: thread count on CPU and the machine description stored in the JSON.

Run with `pytest benchmarks/... --benchmark-enable --benchmark-json=<file>` (pyproject disables benchmarks
for the test suite), then `python -m benchmarks.report <file>`.
"""

from __future__ import annotations

import os

import pytest
import torch
from benchmarks._machine import cpu_name

if not torch.cuda.is_available():
    # The project's CPU machines have 2 cores shared with other jobs; more threads only add contention.
    torch.set_num_threads(min(2, torch.get_num_threads()))




@pytest.hookimpl(optionalhook=True)   # optional: the plugin may be absent (benchmarks/_shim.py stands in)
def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the device and the software in the JSON header (report.py prints it above the table)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info.update(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        cpu_model=cpu_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton_version,
        torch_threads=torch.get_num_threads(),
        load_average=list(os.getloadavg()),
        smoke=os.environ.get("NPO_GPU_SMOKE", "0"),
    )
