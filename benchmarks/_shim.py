"""A stand-in for pytest-benchmark, for machines without the plugin or without pytest (the GPU image may lack
either; benchmarks/gpu/run.sh picks what is there).

- With pytest but not the plugin: loaded as `pytest -p benchmarks._shim`. It provides the `benchmark` fixture
  with what these suites use, `pedantic(...)` and `extra_info`, accepts the plugin's `--benchmark-enable`,
  `--benchmark-disable` and `--benchmark-json` options, and writes the plugin's JSON layout (machine_info,
  benchmarks[].stats/params/extra_info), so `python -m benchmarks.report` reads it.
- Without pytest: `python -m benchmarks._shim OP OUT.json` runs the same (mode, provider) grid of
  `_cases.SUITES[OP]` directly and writes the same JSON.
Timing is wall clock with time.perf_counter, as in pytest-benchmark; the suites synchronize CUDA themselves.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time

try:
    import pytest
except ImportError:     # the direct runner below needs no pytest
    pytest = None

_RESULTS: list[dict] = []


class BenchmarkShim:
    def __init__(self, name: str, params: dict):
        self.name = name
        self.params = params
        self.extra_info: dict = {}
        self.stats: dict | None = None

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        def one():
            a, k = (setup() if setup else (args, kwargs or {}))
            start = time.perf_counter()
            for _ in range(iterations):
                target(*a, **k)
            return (time.perf_counter() - start) / iterations

        for _ in range(warmup_rounds):
            one()
        times = [one() for _ in range(rounds)]
        self.stats = {"min": min(times), "max": max(times), "mean": statistics.fmean(times),
                      "median": statistics.median(times), "rounds": rounds, "iterations": iterations,
                      "stddev": statistics.stdev(times) if len(times) > 1 else 0.0, "data": times}

    def __call__(self, fn, *args, **kwargs):
        self.pedantic(fn, args=args, kwargs=kwargs, rounds=5, warmup_rounds=1)


def pytest_addoption(parser):
    group = parser.getgroup("benchmark (shim)")
    group.addoption("--benchmark-enable", action="store_true", default=False)
    group.addoption("--benchmark-disable", action="store_true", default=False)
    group.addoption("--benchmark-json", default=None)


def _record(shim: BenchmarkShim, fullname: str) -> None:
    if shim.stats is not None:
        _RESULTS.append({"name": shim.name, "fullname": fullname, "group": None,
                         "params": {k: str(v) for k, v in shim.params.items()},
                         "extra_info": shim.extra_info, "stats": shim.stats})


if pytest is not None:
    @pytest.fixture
    def benchmark(request):
        callspec = getattr(request.node, "callspec", None)
        shim = BenchmarkShim(request.node.name, dict(callspec.params) if callspec else {})
        yield shim
        _record(shim, request.node.nodeid)


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--benchmark-json")
    if path:
        _write(path)


def _write(path: str) -> None:
    machine_info = {"node": platform.node(), "machine": platform.machine(),
                    "python_version": platform.python_version(), "benchmark_shim": True}
    try:   # the suites' conftest adds device and versions through the plugin's hook function
        from benchmarks import conftest
        conftest.pytest_benchmark_update_machine_info(None, machine_info)
    except Exception:  # noqa: BLE001 - without pytest the conftest does not import; name the basics here
        import torch
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
        machine_info.update(torch=torch.__version__, cuda=torch.version.cuda, device=device)
    with open(path, "w") as f:
        json.dump({"machine_info": machine_info, "commit_info": {}, "benchmarks": _RESULTS,
                   "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "version": "shim"}, f, indent=2)


def main(argv: list[str]) -> int:
    """`python -m benchmarks._shim OP OUT.json`: OP's suite without pytest; returns the number of failures."""
    from benchmarks._cases import MODES, SUITES, Unavailable, run_suite_case

    op, path = argv
    skipped = (Unavailable,) + ((pytest.skip.Exception,) if pytest is not None else ())
    failures = 0
    for mode in MODES:
        for provider in SUITES[op]["providers"]:
            shim = BenchmarkShim(f"test_{op}[{mode}-{provider}]", {"mode": mode, "provider": provider})
            try:
                run_suite_case(shim, op, mode, provider)
                print(f"ok      {shim.name}: median {shim.stats['median'] * 1e3:.3f} ms", flush=True)
            except skipped as exc:
                print(f"skipped {shim.name}: {exc}", flush=True)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next case
                failures += 1
                print(f"FAILED  {shim.name}: {type(exc).__name__}: {exc}", flush=True)
            _record(shim, shim.name)
    _write(path)
    return failures


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:]) else 0)
