"""Weight sync: trainer (FSDP2 shards or a plain module) -> full tensors -> a rollout engine.

After every optimizer step each rank's colocated engine must hold exactly the trainer's weights. `push_weights`
gathers one parameter at a time (`DTensor.full_tensor()`, the same order on every rank, so the collectives
match), casts it to the engine's dtype and hands it over in buckets of bounded size.
"""

from npo_engine.sync.weights import fingerprint, iter_full_weights, push_weights

__all__ = ["fingerprint", "iter_full_weights", "push_weights"]
