"""The sync's kernels behind one interface, from csrc/ when it builds, else in PyTorch; both give the same bits.

    ops.get().pack(srcs, views, bucket, sums)       # cast+copy srcs[i] into views[i] (of bucket), zero the rest
    ops.get().unpack(bucket, views, dsts, sums)     # views[i] -> dsts[i]; fingerprint sums of the dsts after
    ops.get().block_sums_add(sums, tensor, offset)  # a tensor's fingerprint sums at a bucket offset

`sums` (optional) is the [nblocks] int64 array of `fingerprints.FingerprintBlocks`; the kernels add the per-block
sums of the bytes they wrote (pack) or of the destinations read back (unpack), in the same pass.

**Building.** csrc/ is compiled on first use with `torch.utils.cpp_extension.load` into
`$NPO_CACHE_DIR/csrc` (default `~/.cache/npo_engine/csrc`), one directory per torch and Python version and
sources, so `pip install -e .` needs no compiler and no flags. The CPU part needs a C++ compiler and `ninja`; the
CUDA part also needs CUDA torch and `nvcc` (`CUDA_HOME`). When a part cannot be built the PyTorch fallback runs, and the reason is
logged once. `NPO_SYNC_EXT=0` skips the build (fallback only); `python -m npo_engine.sync.ops` builds and
reports. The first build takes about a minute on a 2-core machine; later runs load the cached library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from npo_engine.sync import fingerprints as fp

log = logging.getLogger(__name__)

Backend = Literal["auto", "csrc", "torch"]
_MASK64 = (1 << 64) - 1
CSRC = Path(__file__).resolve().parents[2] / "csrc"
"""The extension's sources (a checkout's csrc/; absent from a non-editable install, which then uses the
fallback)."""


class SyncOps(Protocol):
    name: str

    def pack(self, srcs: Sequence[torch.Tensor], views: Sequence[torch.Tensor], bucket: torch.Tensor,
             sums: torch.Tensor | None) -> None: ...

    def unpack(self, bucket: torch.Tensor, views: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor],
               sums: torch.Tensor | None) -> None: ...

    def block_sums_add(self, sums: torch.Tensor, data: torch.Tensor, byte_offset: int) -> None: ...

    def combine(self, sums: torch.Tensor) -> int: ...


# ------------------------------------------------------------------------------------------ PyTorch fallback


class TorchOps:
    """The reference: `Tensor.copy_` for copies and casts, `fingerprints.block_sums_add_ref` for the sums."""

    name = "torch"

    def pack(self, srcs, views, bucket, sums):
        bucket.zero_()
        for src, view in zip(srcs, views, strict=True):
            view.copy_(src.reshape(view.shape))
        if sums is not None:
            self.block_sums_add(sums, bucket, 0)

    def unpack(self, bucket, views, dsts, sums):
        for view, dst in zip(views, dsts, strict=True):
            dst.copy_(view.view(dst.shape))
        if sums is not None:
            for view, dst in zip(views, dsts):
                self.block_sums_add(sums, dst, view.data_ptr() - bucket.data_ptr())

    def block_sums_add(self, sums, data, byte_offset):
        if sums.device.type == "cpu":
            fp.block_sums_add_ref(sums, data, byte_offset)
        else:
            host = sums.cpu()
            fp.block_sums_add_ref(host, data, byte_offset)
            sums.copy_(host)

    def combine(self, sums):
        return fp.combine(sums)


# ------------------------------------------------------------------------------------------------ csrc/


class ExtensionOps:
    """csrc/ on CPU tensors (sync_cpu.cpp) and, where built, CUDA tensors (sync_cuda.cu)."""

    name = "csrc"

    def __init__(self, cpu: Any, cuda: Any | None):
        self._cpu, self._cuda = cpu, cuda
        self._fallback = TorchOps()

    def _impl(self, tensor: torch.Tensor) -> Any | None:
        if tensor.device.type == "cpu":
            return self._cpu
        if tensor.device.type == "cuda":
            return self._cuda
        return None

    def pack(self, srcs, views, bucket, sums):
        impl = self._impl(bucket)
        if impl is None:
            return self._fallback.pack(srcs, views, bucket, sums)
        # Sources may be strided (a transposed weight, a slice): the kernels read contiguous memory.
        srcs = [s.contiguous() for s in srcs]
        if impl is self._cuda:
            keys = fp.keys_on(bucket.device)[0]
            return impl.pack(srcs, list(views), bucket, sums, keys)
        impl.pack(srcs, list(views), bucket, sums, fp.KEYS)

    def unpack(self, bucket, views, dsts, sums):
        impl = self._impl(bucket)
        if impl is None or any(not d.is_contiguous() for d in dsts):
            return self._fallback.unpack(bucket, views, dsts, sums)
        keys = fp.keys_on(bucket.device)[0]
        impl.unpack(bucket, list(views), list(dsts), sums, keys)

    def block_sums_add(self, sums, data, byte_offset):
        impl = self._impl(data)
        if impl is None or sums.device != data.device:
            return self._fallback.block_sums_add(sums, data, byte_offset)
        impl.block_sums_add(sums, data.contiguous(), byte_offset, fp.keys_on(data.device)[0])

    def combine(self, sums):
        impl = self._impl(sums)
        if impl is None:
            return fp.combine(sums)
        return impl.combine(sums) & _MASK64  # the kernels return the uint64's bits as an int64


_lock = threading.Lock()
_loaded: dict[str, SyncOps] = {}
_build_notes: list[str] = []


def _cache_dir() -> Path:
    root = Path(os.environ.get("NPO_CACHE_DIR") or Path.home() / ".cache" / "npo_engine") / "csrc"
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}"
    return root / tag.replace("+", "_")


def _sources_tag(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _build(name: str, sources: list[Path], *, cuda: bool) -> Any:
    from torch.utils import cpp_extension

    # A header the sources include changes the build too (sync_cuda.h).
    build_dir = _cache_dir() / f"{name}_{_sources_tag(sources + sorted(CSRC.glob('*.h')))}"
    build_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"extra_cflags": ["-O3", "-fopenmp"], "extra_ldflags": ["-fopenmp"]}
    if cuda:
        kwargs = {"extra_cflags": ["-O3"], "extra_cuda_cflags": ["-O3", "--use_fast_math"]}
    return cpp_extension.load(name=f"npo_{name}", sources=[str(s) for s in sources], build_directory=str(build_dir),
                              verbose=False, **kwargs)


def _load_extension() -> SyncOps:
    """Build or load csrc/; on any failure, note why and return the fallback."""
    if os.environ.get("NPO_SYNC_EXT", "1") == "0":
        _build_notes.append("NPO_SYNC_EXT=0")
        return TorchOps()
    if not (CSRC / "sync_cpu.cpp").exists():
        _build_notes.append(f"no sources at {CSRC} (not an editable checkout)")
        return TorchOps()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _build_notes.append(f"no C++ compiler ({compiler!r} not on PATH)")
        return TorchOps()
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        _build_notes.append("no ninja (torch builds extensions with it: `pip install ninja`)")
        return TorchOps()
    try:
        cpu = _build("sync_cpu", [CSRC / "sync_cpu.cpp"], cuda=False)
    except Exception as exc:  # a failed build must never stop a run: the fallback gives the same results
        _build_notes.append(f"the CPU build failed: {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}")
        return TorchOps()
    cuda = None
    if torch.cuda.is_available():
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None or shutil.which("nvcc") is None and not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            _build_notes.append("CUDA part not built: no nvcc (CUDA_HOME unset); CUDA tensors use the fallback")
        else:
            try:
                cuda = _build("sync_cuda", [CSRC / "sync_cuda_binding.cpp", CSRC / "sync_cuda.cu"], cuda=True)
            except Exception as exc:
                _build_notes.append(f"CUDA part not built ({str(exc).splitlines()[-1] if str(exc) else exc!r}); "
                                    "CUDA tensors use the fallback")
    return ExtensionOps(cpu, cuda)


def get(backend: Backend | str | None = None) -> SyncOps:
    """The ops for `backend`: `csrc` (build if needed; raises if it cannot), `torch`, or `auto`/None (csrc when
    it builds, else torch, said once in the log)."""
    backend = backend or "auto"
    if backend == "torch":
        return _loaded.setdefault("torch", TorchOps())
    with _lock:
        if "auto" not in _loaded:
            ops = _load_extension()
            _loaded["auto"] = ops
            if _build_notes:
                log.warning("npo_engine.sync: %s; using the PyTorch fallback where csrc/ is missing (same results, "
                            "slower)", "; ".join(_build_notes))
    ops = _loaded["auto"]
    if backend == "csrc" and ops.name != "csrc":
        raise RuntimeError(f"sync backend 'csrc' requested but csrc/ is not available: {'; '.join(_build_notes)}")
    if backend not in ("auto", "csrc"):
        raise ValueError(f"sync backend {backend!r} is not one of ['auto', 'csrc', 'torch']")
    return ops


def has_cuda_kernels() -> bool:
    ops = get("auto")
    return isinstance(ops, ExtensionOps) and ops._cuda is not None


def build_notes() -> list[str]:
    get("auto")
    return list(_build_notes)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    ops = get("auto")
    print(f"npo_engine.sync ops: {ops.name}; cuda kernels: {has_cuda_kernels()}; cache: {_cache_dir()}")
    for note in _build_notes:
        print("note:", note)
