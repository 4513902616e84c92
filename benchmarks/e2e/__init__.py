"""One GRPO step of this engine against TRL's `GRPOTrainer` on the same workload; see `__main__.py`."""
