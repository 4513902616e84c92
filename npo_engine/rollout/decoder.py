"""The embedded engine's forward passes over an HF causal LM: logits of each row's last position, from the
model's own weights and the engine's KV cache (`kv_cache.PreallocatedCache`).

- **Two forward paths, same logits.** Llama-family models (`model_type` qwen2 or llama) run through
  `LlamaFamilyForward`, HF's modeling code written out without its per-module Python, which at decode batch
  sizes costs about as much as the math; it fuses q/k/v and gate/up into one GEMM each (the modules' weights
  become views of the fused tensors, so there is still one copy). Any other causal LM runs through its own HF
  `forward`, with its attention switched to `grouped_sdpa_attention`. Nothing is approximated: both agree with
  one unpadded HF forward to fp32 rounding (~1e-7).
- **Grouped K/V heads stay grouped.** HF's `sdpa` path copies every K/V head once per query head whenever a
  mask is given (`repeat_kv`): the whole cache, in every layer, at every step. Here each K/V head serves its
  query heads in place (`enable_gqa=True` in the prefill, a grouped matmul at decode).
- **Last-position logits.** The LM head (and, in a prefill, the last layer past its K/V) runs on one position
  per row.

Importing this module changes nothing in transformers: `register_attention` registers the attention function
under `ATTENTION_NAME`, and the engine calls it when it is built.

`LlamaFamilyForward` transcribes HF's modeling code, so a transformers upgrade can break it silently; the
alarm is `test_fast_forward_equals_hf_forward` (and `tests/npo_engine/rollout/test_decoder.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from npo_engine.rollout.kv_cache import PreallocatedCache

# Model types whose HF modeling code `LlamaFamilyForward` transcribes (checked against transformers 5.19).
_LLAMA_FAMILY = ("qwen2", "llama")

ATTENTION_NAME = "npo_embedded_sdpa"
"""The name under which `grouped_sdpa_attention` is registered with HF, for models on the HF-forward path."""


def register_attention() -> None:
    """Register `grouped_sdpa_attention` (and HF's sdpa mask builder) with transformers as `ATTENTION_NAME`.

    Idempotent. The engine calls it when it is built, before switching a model to `ATTENTION_NAME`.
    """
    AttentionInterface.register(ATTENTION_NAME, grouped_sdpa_attention)
    # The mask builder too, so plain forwards of the engine's model still work.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def grouped_sdpa_attention(
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

    Registered with HF as `ATTENTION_NAME` (by `register_attention`) for models that run through their own
    forward; the Llama-family path calls it for prefills.

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


class LlamaFamilyForward:
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
        cache: PreallocatedCache,
        *,
        logits_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the last position, fp32: (B, V).

        Args:
            input_ids, position_ids: (B, Q).
            mask: additive (B, 1, Q, K), 0 = may attend, -inf = masked; None = causal over the Q positions.
            cache: receives this forward's K/V and returns those attention reads (see `kv_cache`).
            logits_out: optional (B, V) fp32 buffer the LM head writes into (used when the model is fp32, so
                no vocabulary-sized tensor is allocated); the result is then this buffer.
        """
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
                out, _ = grouped_sdpa_attention(attn, q, k, v, mask, scaling=attn.scaling)  # (B, Q, H_q, D)
            hidden = hidden + _linear(out.reshape(batch, q.shape[2], -1), attn.o_proj)
            x = _rms_norm(hidden, layer.post_attention_layernorm)
            gate, up = F.linear(x, *fused["gate_up"]).chunk(2, dim=-1)
            hidden = hidden + _linear(mlp.act_fn(gate) * up, mlp.down_proj)
        return _lm_head(_rms_norm(hidden[:, -1], base.norm), self.model.lm_head, logits_out)

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


def _lm_head(x: torch.Tensor, head: torch.nn.Linear, out: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits (B, V) of the final hidden states x (B, H), into `out` when it has the same dtype as x."""
    if out is None or out.dtype != x.dtype:
        return _linear(x, head).float()
    if head.bias is None:
        return torch.mm(x, head.weight.t(), out=out)
    return torch.addmm(head.bias, x, head.weight.t(), out=out)


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
