"""Typed, frozen run configuration: one dataclass per component, a docstring under every field, validation in
`__post_init__`, YAML files plus dotted `key.sub=value` overrides.

    cfg = load_config("configs/demo.yaml", ["algo.clip_high=0.28", "train.steps=50"])

Unknown keys are errors that name the closest valid key; bad values name the field, the value and the fix.
Each default lives here and only here.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message says which and how to fix it."""


def _check(condition: bool, key: str, value: Any, fix: str) -> None:
    if not condition:
        raise ConfigError(f"{key} = {value!r} is invalid: {fix}")


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
    """Shuffle the training prompts each epoch (seeded by train.seed)."""

    def __post_init__(self) -> None:
        _check(len(self.levels) > 0 and all(1 <= lv <= 5 for lv in self.levels), "data.levels", self.levels,
               "give a non-empty list of levels in 1..5")
        _check(self.train_size >= 1, "data.train_size", self.train_size, "use a count >= 1")
        _check(self.eval_size >= 0, "data.eval_size", self.eval_size, "use a count >= 0 (0 disables evaluation)")
        _check(self.prompts_per_step >= 1, "data.prompts_per_step", self.prompts_per_step, "use a count >= 1")
        _check(self.max_prompt_tokens >= 1, "data.max_prompt_tokens", self.max_prompt_tokens, "use a count >= 1")
        _check("{prompt}" in self.prompt_template, "data.prompt_template", self.prompt_template,
               "the template must contain {prompt}")
        if self.source == "files":
            _check(len(self.train_files) > 0, "data.train_files", self.train_files,
                   "list at least one JSONL or Parquet file when data.source = files")


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Generation of the on-policy groups."""

    backend: Literal["embedded"] = "embedded"
    """Rollout engine: embedded = batched PyTorch sampler with a KV cache, colocated on each rank."""
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
    """Behaviour log-probs for the ratio: recomputed by the trainer before the update, or the engine's own."""

    def __post_init__(self) -> None:
        _check(self.group_size >= 2, "rollout.group_size", self.group_size,
               "group-relative advantages need at least 2 completions per prompt; set it >= 2")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "use a count >= 1")
        _check(self.temperature > 0, "rollout.temperature", self.temperature,
               "training rollouts must sample; use a temperature > 0 (greedy is for evaluation)")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "use a value in (0, 1]")
        _check(self.top_k >= 0, "rollout.top_k", self.top_k, "use 0 (off) or a positive count")
        _check(self.max_batch_size >= 1, "rollout.max_batch_size", self.max_batch_size, "use a count >= 1")


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """The verifier that scores each completion against its reference answer."""

    verifier: str = "exact_match"
    """Built-in name (exact_match, math) or a user function as package.module:function."""
    timeout_s: float = 5.0
    """Per-call limit; a verifier that runs longer gives reward 0 for that sample and is counted."""
    num_workers: int = 1
    """Worker processes for verifiers other than exact_match."""

    def __post_init__(self) -> None:
        _check(self.timeout_s > 0, "reward.timeout_s", self.timeout_s, "use a positive number of seconds")
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

    def __post_init__(self) -> None:
        _check(self.adv_eps >= 0, "algo.adv_eps", self.adv_eps, "use a value >= 0")
        _check(0 <= self.clip_low < 1, "algo.clip_low", self.clip_low, "use a value in [0, 1)")
        _check(self.clip_high >= 0, "algo.clip_high", self.clip_high, "use a value >= 0")
        _check(self.dual_clip is None or self.dual_clip > 1, "algo.dual_clip", self.dual_clip,
               "use null (off) or a constant > 1, e.g. 3")
        _check(self.norm_length is None or self.norm_length >= 1, "algo.norm_length", self.norm_length,
               "use null or a length >= 1")
        _check(self.kl_coef >= 0, "algo.kl_coef", self.kl_coef, "use a value >= 0 (0 disables the KL term)")


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
    warmup_steps: int = 5
    """Linear warmup from 0 to lr over this many optimizer steps, then constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward on each rank; gradients accumulate across micro-batches."""
    mini_batches: int = 4
    """AdamW updates per step: the step's groups are split into this many mini-batches (PPO style; verl's
    ppo_mini_batch_size). Updates after the first are slightly off-policy, and the clip bounds them."""
    epochs: int = 1
    """Passes over the step's mini-batches (PPO epochs)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "use a positive learning rate, e.g. 1e-6 for billion-scale models")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use a value >= 0")
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

    every: int = 0
    """Save the full training state every k steps (0 = only at the end)."""
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

    def __post_init__(self) -> None:
        _check(self.eval_every >= 0, "logging.eval_every", self.eval_every, "use a count >= 0")


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Which implementation of the log-prob, loss and advantage ops runs."""

    backend: Literal["auto", "triton", "torch"] = "auto"
    """auto = Triton on CUDA, memory-efficient PyTorch on CPU; torch = the readable references."""


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


# ---------------------------------------------------------------------------------------------------------------
# Building a config from nested dicts (YAML) and dotted overrides


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of its fields, got {value!r}")
        return _build(annotation, value, key + ".")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r} is invalid: choose one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]  # `levels=3` or `train_files=a.jsonl` from the command line
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} entries, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} is invalid: use true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} is invalid: use an integer")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads `1e-6` (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} is invalid: use a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} is invalid: use a string")
        return str(value)
    return value


def _unknown_key_error(cls: type, name: str, prefix: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(prefix + v for v in valid)}"
    return ConfigError(f"unknown config key {prefix}{name}; {hint}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    types = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in types:
            raise _unknown_key_error(cls, name, prefix)
        kwargs[name] = _coerce(value, types[name], prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`algo.clip_high=0.28` -> (["algo", "clip_high"], 0.28); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. algo.clip_high=0.28")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part; write section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _merge(base: dict[str, Any], path: list[str], value: Any, cls: type) -> None:
    """Set base[path] = value, checking each key against the dataclass tree so typos fail early."""
    node, node_cls, prefix = base, cls, ""
    for part in path[:-1]:
        types = _field_types(node_cls)
        if part not in types or not dataclasses.is_dataclass(types[part]):
            if part not in types:
                raise _unknown_key_error(node_cls, part, prefix)
            raise ConfigError(f"{prefix}{part} is a value, not a section; write {prefix}{part}=...")
        node = node.setdefault(part, {})
        node_cls, prefix = types[part], prefix + part + "."
    if path[-1] not in _field_types(node_cls):
        raise _unknown_key_error(node_cls, path[-1], prefix)
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from an optional YAML file, then `key.sub=value` overrides applied in order."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        for section, body in (loaded or {}).items():
            if not isinstance(body, dict):
                _merge(values, [section], body, TrainConfig)  # fails with a clear message
            for key, value in body.items():
                _merge(values, [section, key], value, TrainConfig)
    for text in overrides:
        keys, value = parse_override(text)
        _merge(values, keys, value, TrainConfig)
    return _build(TrainConfig, values)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def describe_fields(cfg_cls: type = TrainConfig) -> str:
    """Every config key with its default and docstring, for `--help`."""
    lines = []
    defaults = cfg_cls()
    for section in dataclasses.fields(cfg_cls):
        section_cls = _field_types(cfg_cls)[section.name]
        lines.append(f"{section.name}: {section_cls.__doc__.strip().splitlines()[0]}")
        docs = field_docs(section_cls)
        for f in dataclasses.fields(section_cls):
            default = config_to_dict(getattr(getattr(defaults, section.name), f.name))
            lines.append(f"  {section.name}.{f.name} (default {default!r})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)
