"""The embedded rollout backend: a pure-PyTorch batched sampler with a KV cache over a Hugging Face causal LM.

No `model.generate`: a short loop around the model's own weights. What it does differently, and why:

- **Two forward paths, same logits.** Llama-family models (`model_type` qwen2 or llama) run through
  `_LlamaFamilyForward`, HF's modeling code written out without its per-module Python, which at decode batch
  sizes costs about as much as the math; it fuses q/k/v and gate/up into one GEMM each (the modules' weights
  become views of the fused tensors, so there is still one copy). Any other causal LM runs through its own HF
  `forward`. Nothing is approximated: both agree with one unpadded HF forward to fp32 rounding (~1e-7).
- **Left padding.** A batch's prompts are right-aligned in the cache. Each row's position ids count from its
  first real token and pad keys are masked, so a padded prompt sees the same logits as the unpadded one.
- **Bucketed, deduplicated prefill.** Distinct prompts are prefilled once each (a GRPO group of n copies costs
  one), in buckets of similar length so little compute goes to pads; each bucket's K/V land in its rows.
- **Preallocated KV cache.** `_PreallocatedCache` holds K/V buffers `[B, H_kv, W + max_new_tokens, D]`
  (`W` the widest prompt), written in place; a step attends over the filled prefix only. The additive key mask
  is a buffer of the same width, so a step's attention mask is a view, never rebuilt.
- **Grouped K/V heads stay grouped.** HF's `sdpa` path copies every K/V head once per query head whenever a
  mask is given (`repeat_kv`): the whole cache, in every layer, at every step. Here each K/V head serves its
  query heads in place (`enable_gqa=True` in the prefill, a grouped matmul at decode).
- **Last-position logits.** The LM head (and, in a prefill, the last layer past its K/V) runs on one position
  per row.
- **Compaction.** Rows that stopped on EOS leave the batch (with their cache rows) once enough have stopped.
- **Sampling.** Temperature, then top-k, then top-p on the renormalized top-k distribution (the order of HF and
  vLLM), then one exponential race per row. Behaviour log-probs follow `base.py`: `log_softmax(logits / T)` in
  fp32, before truncation; with `temperature == 0`, the argmax and the untempered log-probs.

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
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from npo_engine.rollout.base import FinishReason, RolloutOutput, SamplingParams

# Compact the batch once this fraction of its rows has stopped: each compaction copies the whole KV cache, so
# doing it at every EOS would cost more than decoding a few dead rows.
_COMPACT_WHEN_STOPPED = 0.25

# Model types whose HF modeling code `_LlamaFamilyForward` transcribes (checked against transformers 5.19).
_LLAMA_FAMILY = ("qwen2", "llama")

# The prefill runs prompts in buckets of similar length, so at most this much of a bucket is padding. Smaller
# buckets waste less compute on pads but each costs one more forward.
_BUCKET_FILL = 0.9

# The name under which `_grouped_sdpa_attention` is registered with HF, for models on the HF-forward path.
_ATTENTION = "npo_embedded_sdpa"


def _grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF's `sdpa` attention without `repeat_kv`: SDPA reads the grouped K/V heads itself.

    Registered with HF as `npo_embedded_sdpa` for models that run through their own forward; the Llama-family
    path calls it for prefills.

    Args:
        query: [B, H_q, Q, D]; key, value: [B, H_kv, K, D]; attention_mask: [B, 1, Q, K], additive or
            boolean (True = attend), or None for causal attention.
    Returns:
        the attention output [B, Q, H_q, D] (HF's layout) and no weights.
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=attention_mask is None and query.shape[2] > 1,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(_ATTENTION, _grouped_sdpa_attention)
AttentionMaskInterface.register(_ATTENTION, sdpa_mask)  # so plain forwards of the engine's model still work


class _PreallocatedLayer(CacheLayerMixin):
    """One layer's K/V in fixed buffers `[B, H_kv, capacity, D]`, written in place.

    Prefill (`prefill_target` set): the forward's rows `src` land in cache rows `dst` at columns
    `column : column + Q`, and attention sees only the forward's own K/V. Decoding: one column per step, and
    `update` returns views of the filled prefix, so nothing is concatenated or reallocated per step.
    """

    is_sliding = False

    def __init__(self, batch: int, capacity: int):
        super().__init__()
        self.batch, self.capacity = batch, capacity
        self.length = 0
        self.prefill_target: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Zeros, not empty: columns left of a short prefill bucket are never written, and a masked key whose
        # value is NaN still poisons the attention output (0 * NaN).
        heads = key_states.shape[1]
        self.keys = key_states.new_zeros(self.batch, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(self.batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.prefill_target is not None:
            src, dst, column = self.prefill_target
            end = column + key_states.shape[-2]
            self.keys[dst, :, column:end] = key_states.index_select(0, src)
            self.values[dst, :, column:end] = value_states.index_select(0, src)
            return key_states, value_states
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # an internal invariant: _generate_batch sizes the buffers
            raise RuntimeError(f"KV cache overflow: {end} positions > capacity {self.capacity}")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` ([B'] int64), in that order."""
        if self.is_initialized:
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)


class _PreallocatedCache(Cache):
    """A `Cache` of `_PreallocatedLayer`s, one per decoder layer: B rows, `capacity` columns."""

    def __init__(self, num_layers: int, batch: int, capacity: int):
        super().__init__(layers=[_PreallocatedLayer(batch, capacity) for _ in range(num_layers)])

    def prefill_into(self, src: torch.Tensor, dst: torch.Tensor, column: int) -> None:
        """Route the next forward's K/V rows `src` ([N] int64) to cache rows `dst` ([N]) from `column` on."""
        for layer in self.layers:
            layer.prefill_target = (src, dst, column)

    def start_decoding(self, filled: int) -> None:
        """End the prefill: columns `[0, filled)` hold the prompts; each forward now appends one column."""
        for layer in self.layers:
            layer.prefill_target, layer.length = None, filled

    def select_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(rows)


class _LlamaFamilyForward:
    """A forward pass over an HF Llama-family causal LM (Qwen2, Llama), reading the model's own weights.

    HF's modeling code written out, minus the per-module Python of `nn.Module.__call__`, HF's output wrappers
    and its mask building, with these changes, all exact in fp32 arithmetic (results agree with HF's forward
    to rounding, ~1e-7):

    - q/k/v (and gate/up) run as one GEMM each: the modules' weights become row views of one fused tensor
      (`_fuse_rows`), so there is no second copy and in-place weight updates land in the fused tensor;
    - rotary cos/sin come from a table built once by the model's own rotary module, and q and k rotate together;
    - at decode, attention is a grouped eager product (`_decode_attention`): with one query per row, SDPA's
      blocked kernel costs more than the math;
    - in the last layer of a prefill, only the last position goes past the K/V projection.
    """

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        base = getattr(model, "model", None)
        rotary = getattr(base, "rotary_emb", None)
        if (
            model.config.model_type not in _LLAMA_FAMILY
            or not hasattr(model, "lm_head")
            or not all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm"))
            # dynamic and long-context RoPE change their frequencies with the sequence length
            or getattr(rotary, "rope_type", None) in (None, "dynamic", "longrope")
        ):
            return False
        return all(  # fusing needs all biases of a group or none
            len({lin.bias is None for lin in linears}) == 1
            for layer in base.layers
            for linears in _fused_groups(layer).values()
        )

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # Per layer: group name ("qkv", "gate_up") -> (W, b) of the fused linear.
        self._fused: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = []
        self._cos = self._sin = None  # (P, D): rotary table for positions [0, P)
        self.refresh()

    def refresh(self) -> None:
        """(Re)build the fused weights unless every module's parameters still view them (`model.to`, a
        replaced parameter or `load_state_dict(assign=True)` swap in new storage)."""
        layers = self.model.model.layers
        intact = len(self._fused) == len(layers) and all(
            _views(lin.weight, fused[name][0]) and (lin.bias is None or _views(lin.bias, fused[name][1]))
            for layer, fused in zip(layers, self._fused)
            for name, linears in _fused_groups(layer).items()
            for lin in linears
        )
        if intact:
            return
        self._fused = [
            {name: _fuse_rows(linears) for name, linears in _fused_groups(layer).items()} for layer in layers
        ]
        self._cos = self._sin = None  # the device or dtype may have changed too

    def __call__(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: _PreallocatedCache,
    ) -> torch.Tensor:
        """Logits of the last position, fp32: (B, V). Arguments as in `EmbeddedEngine._forward`."""
        base = self.model.model
        batch, q_len = input_ids.shape
        last_layer = len(base.layers) - 1
        hidden = F.embedding(input_ids, base.embed_tokens.weight)  # (B, Q, H)
        cos, sin = self._rotary(position_ids, hidden.dtype)  # (B, 1, Q, D)
        for i, (layer, fused) in enumerate(zip(base.layers, self._fused)):
            attn, mlp = layer.self_attn, layer.mlp
            heads_q = attn.q_proj.weight.shape[0] // attn.head_dim
            heads_qk = heads_q + attn.k_proj.weight.shape[0] // attn.head_dim
            x = _rms_norm(hidden, layer.input_layernorm)
            qkv = F.linear(x, *fused["qkv"]).view(batch, q_len, -1, attn.head_dim).transpose(1, 2)
            qk = qkv[:, :heads_qk]  # (B, H_q + H_kv, Q, D)
            qk = (qk * cos) + (_rotate_half(qk) * sin)
            q, (k, v) = qk[:, :heads_q], cache.update(qk[:, heads_q:], qkv[:, heads_qk:], i)
            if i == last_layer and q_len > 1:
                # Past the last layer's K/V, only the last position feeds the logits: drop the others.
                q, hidden = q[:, :, -1:], hidden[:, -1:]
                mask = None if mask is None else mask[:, :, -1:]  # one query: no causal masking left to do
            if q.shape[2] == 1:
                out = _decode_attention(q, k, v, mask, attn.scaling)  # (B, 1, H_q, D)
            else:
                out, _ = _grouped_sdpa_attention(attn, q, k, v, mask, scaling=attn.scaling)  # (B, Q, H_q, D)
            hidden = hidden + _linear(out.reshape(batch, q.shape[2], -1), attn.o_proj)
            x = _rms_norm(hidden, layer.post_attention_layernorm)
            gate, up = F.linear(x, *fused["gate_up"]).chunk(2, dim=-1)
            hidden = hidden + _linear(mlp.act_fn(gate) * up, mlp.down_proj)
        return _linear(_rms_norm(hidden[:, -1], base.norm), self.model.lm_head).float()

    def _rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `position_ids` (B, Q), as HF's rotary module computes them: (B, 1, Q, D) each."""
        needed = int(position_ids.max()) + 1
        if self._cos is None or self._cos.shape[0] < needed or self._cos.dtype != dtype:
            size = max(needed, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            positions = torch.arange(size, device=position_ids.device)[None]
            probe = torch.empty(0, dtype=dtype, device=position_ids.device)  # HF reads only its dtype/device
            cos, sin = self.model.model.rotary_emb(probe, positions)
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[position_ids].unsqueeze(1), self._sin[position_ids].unsqueeze(1)


def _fused_groups(layer: torch.nn.Module) -> dict[str, list[torch.nn.Linear]]:
    """The linears of a decoder layer that read the same input, in the order their outputs are split."""
    attn, mlp = layer.self_attn, layer.mlp
    return {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "gate_up": [mlp.gate_proj, mlp.up_proj]}


def _fuse_rows(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weights (and biases) of linears that share an input into one tensor each, and make every
    module's parameters views of their rows: (W [sum N_i, K], b [sum N_i] or None)."""
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        row = 0
        for lin in linears:
            rows = slice(row, row + lin.weight.shape[0])
            lin.weight.data = weight[rows]
            if bias is not None:
                lin.bias.data = bias[rows]
            row = rows.stop
    return weight, bias


def _views(param: torch.Tensor, fused: torch.Tensor | None) -> bool:
    """Whether `param` still lives in `fused`'s storage."""
    return fused is not None and param.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def _decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention of one query per row, each K/V head serving its group of G = H_q / H_kv query heads in place.

    Args:
        q: [B, H_q, 1, D]; k, v: [B, H_kv, K, D]; mask: additive [B, 1, 1, K] or None.
    Returns:
        [B, 1, H_q, D] (HF's layout).
    """
    batch, heads_q, _, dim = q.shape
    heads_kv = k.shape[1]
    scores = torch.matmul(q.reshape(batch, heads_kv, heads_q // heads_kv, dim), k.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores + mask  # (B, H_kv, G, K) + (B, 1, 1, K)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # fp32 softmax, as HF's eager path
    return torch.matmul(probs, v).view(batch, 1, heads_q, dim)


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """HF's Llama/Qwen2 RMSNorm, op for op (fp32 statistics, weight applied in the input dtype)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
        self.model = model.eval()
        self._fast_forward = _LlamaFamilyForward(model) if _LlamaFamilyForward.supports(model) else None
        if self._fast_forward is None:
            model.set_attn_implementation(_ATTENTION)
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.weights_version = 0
        """How many times `update_weights` has run."""
        self._num_layers = config.num_hidden_layers
        self._device = next(model.parameters()).device
        self._generator = torch.Generator(device=self._device).manual_seed(seed)
        self._eos = torch.tensor(self.eos_token_ids, device=self._device)

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
        cache = _PreallocatedCache(self._num_layers, batch, width + max_new)
        columns = torch.arange(width + max_new, device=device)
        key_bias = _mask_to_bias(columns[None, :] >= (width - lengths)[:, None], self.model.dtype)  # (B, cap)
        logits = self._prefill(prompts, width, cache)  # (B, V) fp32
        cache.start_decoding(width)

        out_tokens = torch.zeros(batch, max_new, dtype=torch.long, device=device)
        out_logp = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
        rows = torch.arange(batch, device=device)  # (B',) original index of each row still in the batch
        running = torch.ones(batch, dtype=torch.bool, device=device)  # (B',) no EOS yet
        next_position = lengths.clone()  # (B',) position id of the token fed next
        for step in range(max_new):
            token, logp = _sample(logits, params, generator)
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
            logits = self._forward(token[:, None], decode_mask, next_position[:, None], cache)
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

    def _prefill(self, prompts: list[list[int]], width: int, cache: _PreallocatedCache) -> torch.Tensor:
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
                logits = bucket_logits.new_empty(len(prompts), bucket_logits.shape[-1])
            logits[dst] = bucket_logits.index_select(0, src)
        return logits

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: _PreallocatedCache,
    ) -> torch.Tensor:
        """Logits of the last position, fp32: (B, V).

        Args:
            input_ids, position_ids: (B, Q).
            mask: additive (B, 1, Q, K), 0 = may attend, -inf = masked; None = causal over the Q positions.
        """
        if self._fast_forward is not None:
            return self._fast_forward(input_ids, mask, position_ids, cache)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,  # a 4D mask is used as given
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

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


def _sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return it and its behaviour log-prob.

    Args:
        logits: [B, V] fp32.
    Returns:
        token [B] int64 and logp [B] fp32, `log_softmax(logits / T)[token]` (T = 1 when greedy).
    """
    if params.temperature == 0:
        logp_all = torch.log_softmax(logits, dim=-1)
        token = logits.argmax(dim=-1)
    else:
        logp_all = torch.log_softmax(logits / params.temperature, dim=-1)
        kept = _truncate(logp_all, top_k=params.top_k, top_p=params.top_p)
        probs = torch.softmax(kept, dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p, without torch.multinomial's
        # device synchronization on CUDA.
        race = torch.empty_like(probs).exponential_(1.0, generator=generator)
        token = (probs / race).argmax(dim=-1)
    return token, logp_all.gather(1, token[:, None]).squeeze(1)


def _truncate(logp: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the top-k, then outside the top-p nucleus of the renormalized rest.

    Args:
        logp: [B, V] fp32 log-probs.
    """
    if 0 < top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logp, dim=-1)
        # Drop a token once the strictly more likely tokens already cover top_p; the most likely always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp
