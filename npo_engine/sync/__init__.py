"""Weight sync: trainer (FSDP2 shards or a plain module) -> per-block gather -> buckets -> a rollout engine.

After every optimizer step each rank's colocated engines (policy, guide) must hold exactly the trainer's weights.
`WeightSync` (weights.py) does it with a plan cached per model (plan.py), pack and fingerprint kernels from csrc/
or their PyTorch fallback (ops.py, fingerprints.py), a fingerprint of every bucket checked on both sides and a
log-prob parity probe every few syncs. `push_weights` is the one-call form.
"""

from npo_engine.sync.fingerprints import FingerprintBlocks, bucket_fingerprint
from npo_engine.sync.plan import SyncPlan, build_plan
from npo_engine.sync.weights import (
                                     SyncError,
                                     SyncSettings,
                                     WeightSync,
                                     fingerprint,
                                     iter_full_weights,
                                     policy_logprob_fn,
                                     push_weights,
)

__all__ = ["FingerprintBlocks", "SyncError", "SyncPlan", "SyncSettings", "WeightSync", "bucket_fingerprint",
           "build_plan", "fingerprint", "iter_full_weights", "policy_logprob_fn", "push_weights"]
