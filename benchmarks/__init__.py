"""Benchmarks (pytest-benchmark suites and `python -m benchmarks.report`); not installed with the packages."""
