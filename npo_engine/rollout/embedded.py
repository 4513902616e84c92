"""The embedded rollout backend: a pure-PyTorch batched sampler with a KV cache over a Hugging Face causal LM.

No `model.generate`: a short loop around the model's own weights, in three parts beside this file:

- `decoder.py`, the forward: logits of each row's last position. Llama-family models run through a
  transcription of HF's modeling code without its per-module Python; any other causal LM through its own HF
  `forward`. Both agree with one unpadded HF forward to fp32 rounding (~1e-7).
- `kv_cache.py`, the preallocated KV cache `[B, H_kv, W + max_new_tokens, D]` (`W` the widest prompt),
  written in place.
- `sampling.py`, as pure functions: temperature, then top-k, then top-p on the renormalized top-k distribution
  (the order of HF and vLLM), then one uniform per row on the cumulative distribution of the kept set.
  Behaviour log-probs follow `base.py`: the log-prob under that tempered, truncated and renormalized
  distribution, in fp32; with `temperature == 0`, the argmax and the untempered log-probs.

This file is the engine, which drives them:

- **Left padding.** A batch's prompts are right-aligned in the cache. Each row's position ids count from its
  first real token and pad keys are masked, so a padded prompt sees the same logits as the unpadded one. The
  additive key mask is a buffer as wide as the cache, so a step's attention mask is a view, never rebuilt.
- **Bucketed, deduplicated prefill.** Distinct prompts are prefilled once each (a GRPO group of n copies costs
  one), in buckets of similar length so little compute goes to pads; each bucket's K/V land in its rows.
- **Compaction.** Rows that stopped on EOS leave the batch (with their cache rows) once enough have stopped.
- **No vocabulary-sized allocation per step.** One `generate` call allocates its `[B, V]` logits buffer (the LM
  head writes into it on the Llama-family path) and the sampler's `[B, V]` workspace once, reuses them at
  every decode step and batch chunk, and frees them when it returns, so they are not resident while the
  trainer trains; the KV cache's memory (`kv_cache.CacheStorage`, small) stays from call to call. On CPU a
  fresh block of that size is a fresh mmap, paid in page faults and zeroing: 78 MB per tensor at
  `128 × 151936`, once per call instead of once per step.

Limits: full-attention layers only (no sliding windows). Rows of one batch are sampled together, so a row's
draw depends on the seed and on the batch it was in.

Usage:
    engine = EmbeddedEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=32, temperature=1.0, seed=0))
    engine.update_weights(policy.state_dict().items())  # after each optimizer step
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from npo_engine.rollout.base import FinishReason, RolloutOutput, SamplingParams, WeightBucket
from npo_engine.rollout.decoder import ATTENTION_NAME, LlamaFamilyForward, register_attention
from npo_engine.rollout.kv_cache import CacheStorage, PreallocatedCache
from npo_engine.rollout.sampling import sample

# Compact the batch once this fraction of its rows has stopped: each compaction copies the whole KV cache, so
# doing it at every EOS would cost more than decoding a few dead rows.
_COMPACT_WHEN_STOPPED = 0.25

# The prefill runs prompts in buckets of similar length, so at most this much of a bucket is padding. Smaller
# buckets waste less compute on pads but each costs one more forward.
_BUCKET_FILL = 0.9


class EmbeddedEngine:
    """A `RolloutEngine` holding its own full copy of an HF causal LM, sampling on the model's device.

    Args:
        model: an HF causal LM (e.g. `Qwen2ForCausalLM`) that the engine owns: it is put in eval mode and, unless
            it is Llama-family, switched to the `npo_embedded_sdpa` attention; pass a copy if you keep the original.
        eos_token_id: token(s) that end a completion; the EOS token is kept in the output.
        pad_token_id: id fed at left-pad positions (always masked, so any valid id works).
        max_batch_size: larger batches are split into chunks of this many prompts; None never splits.
        seed: seeds the engine's generator, used when `SamplingParams.seed` is None.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_id: int | list[int],
        pad_token_id: int,
        max_batch_size: int | None = None,
        seed: int = 0,
    ):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None (no limit), got {max_batch_size}")
        config = model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        if set(layer_types) != {"full_attention"}:
            raise ValueError(
                f"EmbeddedEngine needs full-attention layers only, got layer types {sorted(set(layer_types))}; "
                "disable sliding-window attention in the model config or use the vLLM backend"
            )
        register_attention()
        self.model = model.eval()
        self._fast_forward = LlamaFamilyForward(model) if LlamaFamilyForward.supports(model) else None
        if self._fast_forward is None:
            model.set_attn_implementation(ATTENTION_NAME)
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.weights_version = 0
        """How many times `update_weights` has run."""
        self._num_layers = config.num_hidden_layers
        self._device = next(model.parameters()).device
        self._generator = torch.Generator(device=self._device).manual_seed(seed)
        self._eos = torch.tensor(self.eos_token_ids, device=self._device)
        # Memory reused across decode steps (module docstring): the KV cache's (kept from call to call), and the
        # logits and sampling workspace (kept for one `generate` call).
        self._cache_storage = CacheStorage()
        self._buffers: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------------------------------------- generation

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> RolloutOutput:
        """Sample one completion per prompt, in prompt order (see `base.RolloutEngine.generate`)."""
        if self._fast_forward is not None:
            self._fast_forward.refresh()
        for i, prompt in enumerate(prompt_token_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. a BOS)")
        if params.seed is None:
            generator = self._generator
        else:
            generator = torch.Generator(device=self._device).manual_seed(params.seed)

        start = time.perf_counter()
        chunk = self.max_batch_size or max(len(prompt_token_ids), 1)
        out = RolloutOutput(token_ids=[], logprobs=[], finish_reasons=[])
        with torch.inference_mode():
            for lo in range(0, len(prompt_token_ids), chunk):
                chunk_prompts = prompt_token_ids[lo : lo + chunk]
                tokens, logprobs, reasons = self._generate_batch(chunk_prompts, params, generator)
                out.token_ids += tokens
                out.logprobs += logprobs
                out.finish_reasons += reasons
        self._buffers.clear()  # [B, V] each: not resident between rollouts
        out.stats = {
            "tokens_generated": float(sum(len(t) for t in out.token_ids)),
            "seconds": time.perf_counter() - start,
        }
        return out

    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> tuple[list[list[int]], list[torch.Tensor], list[FinishReason]]:
        device, max_new = self._device, params.max_new_tokens
        batch = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
        width = int(lengths.max())
        # The cache is left-padded to the longest prompt: row i holds its prompt in columns [width - n_i, width)
        # and its completion from column `width` on; other columns are masked keys.
        cache = PreallocatedCache(self._num_layers, batch, width + max_new, storage=self._cache_storage)
        columns = torch.arange(width + max_new, device=device)
        key_bias = _mask_to_bias(columns[None, :] >= (width - lengths)[:, None], self.model.dtype)  # (B, cap)
        logits = self._prefill(prompts, width, cache)  # (B, V) fp32
        cache.start_decoding(width)

        workspace = self._buffer("sampling_workspace", batch, logits.shape[-1])
        out_tokens = torch.zeros(batch, max_new, dtype=torch.long, device=device)
        out_logp = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
        rows = torch.arange(batch, device=device)  # (B',) original index of each row still in the batch
        running = torch.ones(batch, dtype=torch.bool, device=device)  # (B',) no EOS yet
        next_position = lengths.clone()  # (B',) position id of the token fed next
        for step in range(max_new):
            token, logp = sample(logits, params, generator, workspace=workspace)
            out_tokens[rows, step] = token
            out_logp[rows, step] = logp
            running &= ~torch.isin(token, self._eos)
            num_running = int(running.sum())
            if num_running == 0 or step == max_new - 1:
                break
            if num_running <= (1 - _COMPACT_WHEN_STOPPED) * len(rows):
                keep = running.nonzero().squeeze(1)
                rows, token, running = rows[keep], token[keep], running[keep]
                next_position, key_bias = next_position[keep], key_bias[keep]
                cache.select_rows(keep)
            column = width + step  # the cache column the fed token lands in
            decode_mask = key_bias[:, None, None, : column + 1]  # (B', 1, 1, column + 1), a view
            logits = self._forward(token[:, None], decode_mask, next_position[:, None], cache, logits_out=True)
            next_position += 1

        # A row ends at its first EOS; stopped rows kept decoding until compaction, and those tokens are cut.
        is_eos = torch.isin(out_tokens, self._eos)  # (B, max_new)
        stopped = is_eos.any(dim=1)
        num_tokens = torch.where(stopped, is_eos.int().argmax(dim=1) + 1, max_new).tolist()
        out_tokens, out_logp = out_tokens.cpu(), out_logp.cpu()
        token_ids = [out_tokens[i, :n].tolist() for i, n in enumerate(num_tokens)]
        logprobs = [out_logp[i, :n].clone() for i, n in enumerate(num_tokens)]
        reasons: list[FinishReason] = ["stop" if s else "length" for s in stopped.tolist()]
        return token_ids, logprobs, reasons

    def _prefill(self, prompts: list[list[int]], width: int, cache: PreallocatedCache) -> torch.Tensor:
        """Run every distinct prompt once, in buckets of similar length, into the cache's rows.

        Repeated prompts (a GRPO group) are computed once and their K/V copied to each row. Returns the
        logits of each row's last prompt position, (B, V) fp32.
        """
        device = self._device
        rows_of: dict[tuple[int, ...], list[int]] = {}
        for row, prompt in enumerate(prompts):
            rows_of.setdefault(tuple(prompt), []).append(row)
        logits = None
        for bucket in _length_buckets(list(rows_of)):
            bucket_width = len(bucket[0])
            pads = [bucket_width - len(p) for p in bucket]
            padded = [[self.pad_token_id] * n + list(p) for n, p in zip(pads, bucket)]
            input_ids = torch.tensor(padded, device=device)  # (b, w)
            pad = torch.tensor(pads, device=device)  # (b,)
            src = torch.tensor([j for j, p in enumerate(bucket) for _ in rows_of[p]], device=device)
            dst = torch.tensor([row for p in bucket for row in rows_of[p]], device=device)
            cache.prefill_into(src, dst, column=width - bucket_width)
            columns = torch.arange(bucket_width, device=device)
            position_ids = (columns[None, :] - pad[:, None]).clamp(min=0)  # (b, w): 0 at the first real token
            mask = None  # no padding in this bucket: plain causal attention
            # HF's forward turns a missing mask into one of its own, from the cache's state, so it always gets one.
            if max(pads) > 0 or self._fast_forward is None:
                # Causal over real keys. A pad query also sees itself, so no row of the mask is all -inf
                # (sdpa would return NaN there).
                causal = torch.ones(bucket_width, bucket_width, dtype=torch.bool, device=device).tril()
                real_key = columns[None, :] >= pad[:, None]  # (b, w)
                eye = torch.eye(bucket_width, dtype=torch.bool, device=device)
                mask = _mask_to_bias(((causal & real_key[:, None, :]) | eye)[:, None], self.model.dtype)
            bucket_logits = self._forward(input_ids, mask, position_ids, cache)  # (b, V)
            if logits is None:
                logits = self._buffer("logits", len(prompts), bucket_logits.shape[-1])
            logits[dst] = bucket_logits.index_select(0, src)
        return logits

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: PreallocatedCache,
        *,
        logits_out: bool = False,
    ) -> torch.Tensor:
        """Logits of the last position, fp32: (B, V).

        Args:
            input_ids, position_ids: (B, Q).
            mask: additive (B, 1, Q, K), 0 = may attend, -inf = masked; None = causal over the Q positions.
            logits_out: write the logits into the engine's logits buffer (the Llama-family path; the result
                is then overwritten by the next such forward).
        """
        if self._fast_forward is not None:
            out = None
            if logits_out:
                out = self._buffer("logits", input_ids.shape[0], self.model.lm_head.weight.shape[0])
            return self._fast_forward(input_ids, mask, position_ids, cache, logits_out=out)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,  # a 4D mask is used as given
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def _buffer(self, name: str, rows: int, vocab: int) -> torch.Tensor:
        """The first `rows` rows of the engine's fp32 buffer `name` of width `vocab`, grown when too small."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != vocab:
            buffer = self._buffers[name] = torch.empty(rows, vocab, dtype=torch.float32, device=self._device)
        return buffer[:rows]

    # ----------------------------------------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full tensors, named as in `model.state_dict()`, into the engine's model in place.

        Tied weights may arrive under either name or both (they share storage, so either copy lands in both).
        Raises KeyError for an unknown name and ValueError for a shape mismatch; tensors copied before the bad
        one stay copied.
        """
        targets = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in targets:
                    raise KeyError(
                        f"update_weights: {name!r} is not a parameter or buffer of the engine's model "
                        f"({type(self.model).__name__}); names must match model.state_dict() keys"
                    )
                target = targets[name]
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the engine's model expects "
                        f"{tuple(target.shape)}; send full (unsharded) tensors"
                    )
                target.copy_(tensor)
        self.weights_version += 1

    # Bucketed sync (`base.RolloutEngine.load_buckets`): each bucket is copied into the parameters before the next
    # is asked for, so the sender may reuse one buffer for all of them.
    releases_buckets = True

    def load_buckets(self, buckets: Iterable[WeightBucket], *, verify: bool = True) -> list[int]:
        """Copy every entry of every bucket into the parameter of that name, in place (one kernel call per bucket,
        `npo_engine.sync.ops.unpack`). With `verify`, each bucket's fingerprint is computed from the parameters'
        own memory, read back after the copy at the entries' offsets: what this engine holds, in bucket layout.

        Raises KeyError for an unknown name and ValueError for a shape or dtype mismatch, before that bucket's
        copy; earlier buckets stay copied (the sync marks the engine stale)."""
        from npo_engine.sync import ops
        from npo_engine.sync.fingerprints import FingerprintBlocks

        kernels = ops.get()
        targets = self.model.state_dict(keep_vars=True)  # names resolved once per sync, not per tensor
        received: list[int] = []
        with torch.no_grad():
            for bucket in buckets:
                views, dsts = [], []
                for (name, view), entry in zip(bucket.views(), bucket.entries):
                    target = targets.get(name)
                    if target is None:
                        raise KeyError(f"load_buckets: {name!r} is not a parameter or buffer of the engine's model "
                                       f"({type(self.model).__name__}); names must match model.state_dict() keys")
                    if target.shape != view.shape or target.dtype != view.dtype:
                        raise ValueError(
                            f"load_buckets: {name!r} arrived as {tuple(view.shape)} {view.dtype}, the engine holds "
                            f"{tuple(target.shape)} {target.dtype}; send full tensors in the engine's dtype")
                    views.append(view)
                    dsts.append(target.data)
                sums = FingerprintBlocks(bucket.data.numel(), device=bucket.data.device) if verify else None
                kernels.unpack(bucket.data, views, dsts, sums.sums if sums else None)
                if sums:
                    received.append(sums.value())
        self.weights_version += 1
        return received

    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]], *,
              temperature: float = 1.0) -> list[torch.Tensor]:
        """fp32 log-probs of each completion's tokens after its prompt (`base.RolloutEngine.score`): one
        right-padded forward of the model the engine samples from."""
        if len(prompt_token_ids) != len(completion_token_ids):
            raise ValueError(f"score: {len(prompt_token_ids)} prompts for {len(completion_token_ids)} completions")
        rows = [list(p) + list(c) for p, c in zip(prompt_token_ids, completion_token_ids)]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = torch.tensor(row)
            attention_mask[b, : len(row)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(self._device),
                                attention_mask=attention_mask.to(self._device)).logits.float()
            logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)  # (B, L, V)
        out = []
        for b, (prompt, completion) in enumerate(zip(prompt_token_ids, completion_token_ids)):
            p, c = len(prompt), len(completion)
            targets = torch.tensor(list(completion), dtype=torch.long, device=logp.device)
            out.append(logp[b, p - 1 : p + c - 1].gather(1, targets[:, None]).squeeze(1).cpu())
        return out


def _mask_to_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = may attend) as an additive one: 0 or -inf, in the model's dtype.

    Additive because the decode attention adds it to the scores, and CPU sdpa takes a float mask as it is but
    converts a boolean one on every call.
    """
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, float("-inf"))


def _length_buckets(prompts: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """Group prompts, longest first, so that every prompt fills at least _BUCKET_FILL of its bucket's width."""
    buckets: list[list[tuple[int, ...]]] = []
    for prompt in sorted(prompts, key=len, reverse=True):
        if buckets and len(prompt) >= _BUCKET_FILL * len(buckets[-1][0]):
            buckets[-1].append(prompt)
        else:
            buckets.append([prompt])
    return buckets
