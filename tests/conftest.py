"""Suite-wide settings: markers, the Triton interpreter on CPU, and a shared tiny demo model."""

import os

import torch

# Kernel tests run Triton kernels through the interpreter on CPU tensors; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
