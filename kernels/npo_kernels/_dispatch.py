"""Argument checks and backend choice shared by the public ops."""

from __future__ import annotations

import os

import torch

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def check_choice(op: str, name: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
    """Raise a ValueError naming the op, the argument, the value seen and the valid choices."""
    if value not in choices:
        raise ValueError(f"{op}: {name}={value!r} is not valid; choose one of {list(choices)}")


def triton_interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter (any value but empty or "0", as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(op: str, backend: str, device: torch.device) -> bool:
    """True to run the Triton kernels: "auto" on CUDA tensors, "triton" anywhere the kernels can run.

    CPU tensors only work under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported).
    """
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda"
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (set before "
                         f"importing triton) for CPU tensors; got device {device}")
    return True
