"""Kernel tests: the CPU thread count, one setting for every file here.

NPO_TEST_THREADS=n sets it; otherwise min(2, torch's default), and torch's default follows OMP_NUM_THREADS.
The error budgets (npo_kernels.testing) hold for any thread count: they bound sums in any order.
"""

import torch

from npo_kernels.testing import num_test_threads

torch.set_num_threads(num_test_threads())


def pytest_report_header(config):
    return f"kernel tests: torch CPU threads = {torch.get_num_threads()} (NPO_TEST_THREADS / OMP_NUM_THREADS)"
