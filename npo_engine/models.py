"""Causal LMs: loading a Hugging Face checkpoint from a local directory, and the built-in tiny demo model.

The demo model is a standard `Qwen2ForCausalLM` (head_dim 32, so vLLM can serve it) with a character-level
tokenizer saved in the Hugging Face format. It is built deterministically on first use by a seeded supervised
warm-up on the easy part of the synthetic task family, then cached; nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

from npo_engine.config import ModelConfig

# Every character the synthetic tasks use. The order fixes the token ids, so it is part of the model's identity:
# changing it must change DEMO_MODEL_VERSION.
DEMO_SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
DEMO_ALPHABET = "0123456789+-*=?() \n" + "abcdefghijklmnopqrstuvwxyz" + ",.:;"


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of DEMO_ALPHABET, plus pad, eos and unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*DEMO_SPECIAL_TOKENS, *DEMO_ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()  # join characters back without separators
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def demo_model_config(vocab_size: int) -> Qwen2Config:
    """The demo architecture: 4 layers, hidden 128, 4 query / 2 KV heads of dim 32, tied embeddings."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        torch_dtype="float32",
    )


# What a local Hugging Face model directory must hold, as (what, any one of these files).
_MODEL_DIR_PARTS = (
    ("the model config", ("config.json",)),
    ("the tokenizer", ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")),
    ("the weights", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")),
)


def check_model_dir(path: str | Path, key: str = "model.path") -> Path:
    """`path` if it is a local Hugging Face model directory (config, tokenizer, weights), else a `ConfigError`
    naming what is missing; run before any loading, whose own errors talk about hub repo ids or sentencepiece."""
    from npo_engine.config import ConfigError

    path = Path(path).expanduser()
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ConfigError(f"{key} = '{path}' {what}; give a local Hugging Face model directory (config.json, "
                          "tokenizer files, weights), or null for the built-in demo model")
    missing = [f"{what} ({' or '.join(names)})" for what, names in _MODEL_DIR_PARTS
               if not any((path / name).is_file() for name in names)]
    if missing:
        raise ConfigError(f"{key} = '{path}' is not a complete Hugging Face model directory; missing "
                          f"{'; '.join(missing)}. Save the model and its tokenizer there with save_pretrained(), "
                          "or point model.path at the directory that holds them")
    return path


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, *, attn_implementation: str = "auto",
                   device: torch.device | str = "cpu", half_precision: bool = False) -> torch.nn.Module:
    """Load a Hugging Face causal LM from a local directory (never from a hub), with the attention kernel
    `model.attn_implementation` picks for `device` (`resolve_attn_implementation`)."""
    check_model_dir(path)
    impl = resolve_attn_implementation(attn_implementation, device, half_precision=half_precision)
    kwargs = {"attn_implementation": impl} if impl else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True, **kwargs)


def resolve_attn_implementation(key: str, device: torch.device | str, *, half_precision: bool) -> str | None:
    """The transformers attention implementation for `model.attn_implementation = key` on `device`.

    auto: flash_attention_2 on CUDA where the flash-attn package is installed and the forward runs in bf16/fp16
    (`half_precision`: flash-attn has no fp32 kernels), else sdpa; on the CPU None, i.e. transformers' default
    (sdpa), so the CPU path is unchanged. An explicit flash_attention_2 without CUDA or flash-attn is a
    ConfigError naming the fix.
    """
    from npo_engine.config import ConfigError

    on_cuda = torch.device(device).type == "cuda"
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if key == "auto":
        if not on_cuda:
            return None
        return "flash_attention_2" if has_flash and half_precision else "sdpa"
    if key == "flash_attention_2" and not (on_cuda and has_flash):
        raise ConfigError("model.attn_implementation = 'flash_attention_2' needs a CUDA device and the flash-attn "
                          "package (pip install flash-attn); use auto or sdpa here")
    return key


def load_tokenizer(path: str | Path):
    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # left padding needs some pad id; it is always masked
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Building the demo model: a seeded supervised warm-up on the easy part of the arithmetic task family.

DEMO_MODEL_VERSION = 1
"""Bump when the recipe below changes, so cached models built by an older recipe are rebuilt."""
_SFT_LEVELS = (1, 2, 3)
_SFT_LEVEL_WEIGHTS = (0.4, 0.4, 0.2)  # mostly easy problems, a taste of level 3 so RL has something to sharpen
_SFT_BATCH = 128
_SFT_LR = 1e-3
_SFT_SEED = 1234


def demo_cache_root(cfg_dir: str | None = None) -> Path:
    """`model.demo_cache_dir`, else $NPO_CACHE_DIR, else ~/.cache/npo_engine."""
    if cfg_dir:
        return Path(cfg_dir).expanduser()
    if os.environ.get("NPO_CACHE_DIR"):
        return Path(os.environ["NPO_CACHE_DIR"]).expanduser()
    return Path.home() / ".cache" / "npo_engine"


def demo_model_key(sft_steps: int, levels: tuple[int, ...] = _SFT_LEVELS,
                   level_weights: tuple[float, ...] = _SFT_LEVEL_WEIGHTS) -> str:
    recipe = [DEMO_MODEL_VERSION, DEMO_ALPHABET, levels, level_weights, _SFT_BATCH, _SFT_LR, _SFT_SEED, sft_steps,
              demo_model_config(len(DEMO_SPECIAL_TOKENS) + len(DEMO_ALPHABET)).to_json_string(use_diff=False)]
    digest = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12]
    return f"demo-v{DEMO_MODEL_VERSION}-{digest}"


# The demo teacher (LUFFY's external teacher on the demo task): the same recipe on every level, mostly the hard
# ones, trained longer, so it solves much of what the demo model cannot yet.
TEACHER_LEVELS = (1, 2, 3, 4, 5)
TEACHER_LEVEL_WEIGHTS = (0.1, 0.1, 0.2, 0.3, 0.3)


def ensure_demo_model(cfg: ModelConfig, *, progress: bool = True) -> Path:
    """The cached demo model directory, built first if missing (atomically: a killed build leaves no cache)."""
    return _ensure_built(demo_cache_root(cfg.demo_cache_dir), cfg.demo_sft_steps, _SFT_LEVELS, _SFT_LEVEL_WEIGHTS,
                         what="the demo model", progress=progress)


def ensure_demo_teacher(cache_dir: str | None, sft_steps: int, *, progress: bool = True) -> Path:
    """The cached demo teacher directory (`TEACHER_LEVELS`, `sft_steps` supervised steps), built first if
    missing; deterministic like the demo model, and cached beside it."""
    return _ensure_built(demo_cache_root(cache_dir), sft_steps, TEACHER_LEVELS, TEACHER_LEVEL_WEIGHTS,
                         what="the demo teacher", progress=progress)


def _ensure_built(root: Path, sft_steps: int, levels: tuple[int, ...], level_weights: tuple[float, ...], *,
                  what: str, progress: bool) -> Path:
    target = root / demo_model_key(sft_steps, levels, level_weights)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer = build_demo_tokenizer()
        model = train_demo_model(tokenizer, sft_steps, levels=levels, level_weights=level_weights, what=what,
                                 progress=progress)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race: theirs is identical
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_demo_model(tokenizer: PreTrainedTokenizerFast, steps: int, *, levels: tuple[int, ...] = _SFT_LEVELS,
                     level_weights: tuple[float, ...] = _SFT_LEVEL_WEIGHTS, what: str = "the demo model",
                     progress: bool = True) -> torch.nn.Module:
    """Seeded supervised warm-up of a fresh demo model on `prompt + answer + <eos>` (loss on the answer only),
    with problems of `levels` drawn with `level_weights`.

    Deterministic on a given machine and torch build: fixed seeds, and the thread count pinned while it runs.
    """
    from tqdm import tqdm
    from transformers import Qwen2ForCausalLM

    from npo_engine.data.synthetic import arithmetic_problems

    threads = torch.get_num_threads()
    # One thread: the reduction order (hence the exact weights) depends on the thread count, and a model this
    # small gains nothing from more while losing a lot when other processes compete for the cores.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(_SFT_SEED)
        model = Qwen2ForCausalLM(demo_model_config(len(tokenizer)))
        problems = arithmetic_problems("train", 40_000, levels=levels, weights=level_weights, seed=_SFT_SEED)
        optimizer = torch.optim.AdamW(model.parameters(), lr=_SFT_LR, betas=(0.9, 0.98), weight_decay=0.01)
        warmup = 50
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / max(steps, 1)))
        order = random.Random(_SFT_SEED)
        bar = tqdm(range(steps), desc=f"building {what} (supervised warm-up)", disable=not progress)
        for _ in bar:
            batch = order.sample(problems, _SFT_BATCH)
            input_ids, loss_mask = _sft_tensors(tokenizer, [(p.prompt, p.answer) for p in batch])
            logits = model(input_ids=input_ids).logits[:, :-1].float()
            token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
            loss = (token_loss * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _sft_tensors(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids of prompt + answer + eos, and a [B, L] float mask over answer + eos tokens."""
    rows, masks = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        masks.append([0.0] * len(p) + [1.0] * len(a))
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length)
    for i, (row, m) in enumerate(zip(rows, masks)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(m)] = torch.tensor(m)
    return ids, mask

# ---------------------------------------------------------------------------------------------------------------
# The trainer's view of a causal LM: per-token log-probs of given targets, never the full [tokens, vocab] logits.


HeadLoss = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class LogprobModel(torch.nn.Module):
    """Wraps a Hugging Face causal LM so its forward returns the log-prob (and entropy) of each next token.

    The LM head runs inside this module's forward through `npo_kernels.fused_linear_logprob`, so under FSDP2
    (which shards this module at its root) the head's weight is unsharded exactly there, and a head tied to the
    input embeddings keeps working. No [tokens, vocab] tensor is ever materialized.
    """

    def __init__(self, lm: torch.nn.Module, *, kernel_backend: str = "auto",
                 logits_cache_bytes: int | None = None, head_gradient_in_forward: bool = False):
        """logits_cache_bytes: the LM head's `cache_bytes` (`npo_kernels.fused_linear_logprob`; None = |dW|).
        head_gradient_in_forward: with a `head_loss`, form the LM head's gradient in the forward where the
        chunked CPU path runs (`npo_kernels.fused_linear_logprob_grad_in_forward`)."""
        super().__init__()
        self.lm = lm
        self.kernel_backend = kernel_backend
        self.logits_cache_bytes = logits_cache_bytes
        self.head_gradient_in_forward = head_gradient_in_forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor, *,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                return_entropy: bool = False, head_loss: HeadLoss | None = None,
                fill: torch.Tensor | None = None) -> tuple:
        """Log-probs of the tokens of `input_ids` selected by `target_mask`, each given the tokens before it.

        Args:
            input_ids: [B, L] right-padded token ids.
            attention_mask: [B, L] 1 on real tokens.
            target_mask: [B, L] bool, the positions whose token is scored (never position 0).
            temperature: the sampling temperature; logits are divided by it.
            top_k, top_p: the sampling truncation; when on, log-probs (and entropy) are those of the truncated,
                renormalized distribution, as the rollout's behaviour log-probs are (`rollout/base.py`).

            head_loss: a loss of the log-probs that is a sum of per-token terms (each token's derivative
                depends on its own log-prob alone), logp [B, L] -> (loss, metrics). Given, the forward also
                returns that loss, differentiable, and its metrics; on the chunked CPU path with
                `head_gradient_in_forward` the LM head's gradient is formed in the forward (3 GEMMs per
                token instead of 4) and logp comes without gradient.
            fill: [B, L] finite log-probs that `head_loss` may be evaluated on where a token's own log-prob is
                not computed yet (the behaviour log-probs: ratio 1); required with `head_loss`.

        Returns:
            logp [B, L] fp32 (0 where not scored), entropy [B, L] fp32 of the predicting distribution or None;
            with `head_loss`, also its loss and metrics.
        """
        from npo_kernels import fused_linear_logprob

        # No KV cache: it is useless here, and activation checkpointing would append to it twice.
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False).last_hidden_state  # [B, L, H]
        # Position j is predicted from the hidden state at j - 1: score only the selected positions.
        scored = target_mask[:, 1:]
        rows = hidden[:, :-1][scored]  # [N, H]
        targets = input_ids[:, 1:][scored]  # [N]
        head = self.lm.get_output_embeddings()
        if head_loss is not None and fill is None:
            raise ValueError("LogprobModel: head_loss needs fill, the log-probs to evaluate it on elsewhere")
        if (head_loss is not None and self.head_gradient_in_forward and top_k == 0 and top_p >= 1.0
                and rows.device.type == "cpu" and self.kernel_backend == "auto" and torch.is_grad_enabled()):
            return self._loss_in_head(rows, head, targets, scored, head_loss, fill, temperature, return_entropy)
        if top_k > 0 or top_p < 1.0:
            logp_rows, entropy_rows = _truncated_logprobs(head(rows), targets, temperature, top_k, top_p)
        else:
            out = fused_linear_logprob(rows, head.weight, targets, bias=head.bias, temperature=temperature,
                                       return_entropy=return_entropy, backend=self.kernel_backend,
                                       cache_bytes=self.logits_cache_bytes)
            logp_rows, entropy_rows = out if return_entropy else (out, None)
        logp = _scatter_rows(logp_rows, scored)
        entropy = _scatter_rows(entropy_rows, scored) if return_entropy else None
        if head_loss is None:
            return logp, entropy
        return (logp, entropy, *head_loss(logp))

    def _loss_in_head(self, rows: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                      scored: torch.Tensor, head_loss: HeadLoss, fill: torch.Tensor, temperature: float,
                      return_entropy: bool) -> tuple:
        """`forward` with the LM head's gradient formed in its forward: rows [N, H] (the scored positions'
        hidden states), targets [N], scored [B, L - 1]. Each block of rows gets its derivative from
        `head_loss` evaluated on `fill` with the block's own log-probs put in (a separable loss: the other
        tokens' values do not change the block's derivative)."""
        from npo_kernels import fused_linear_logprob_grad_in_forward

        fill_rows = fill[:, 1:][scored].detach().float()  # [N], in the rows' order

        def token_grad(logp_block: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
            with torch.enable_grad():  # an autograd Function's forward runs without it
                block = logp_block.detach().float().requires_grad_(True)
                loss, _ = head_loss(_scatter_rows(torch.cat([fill_rows[:r0], block, fill_rows[r1:]]), scored))
                return torch.autograd.grad(loss, block)[0]

        logp_rows, entropy_rows, anchor = fused_linear_logprob_grad_in_forward(
            rows, head.weight, targets, token_grad, bias=head.bias, temperature=temperature,
            return_entropy=return_entropy)
        logp = _scatter_rows(logp_rows, scored)
        with torch.no_grad():
            loss, metrics = head_loss(logp)
        return (logp, _scatter_rows(entropy_rows, scored) if return_entropy else None,
                loss.detach() + anchor.to(loss.dtype), metrics)


def _truncated_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, top_k: int,
                        top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy of each target under the truncated sampling distribution: the rollout's kept set
    (`rollout.sampling.truncate`, the one definition) replayed on these logits, then renormalized over it.

    The kept set is a choice, not a function to differentiate: it is computed without gradient, and the
    gradient flows through the log-softmax over the kept tokens. The target always stays in the set: the
    engine's logits can differ from these by rounding, so a token it drew at the edge of its nucleus may fall
    just outside ours, and scoring it -inf would zero its ratio instead of measuring it. This path holds all
    [N, V] logits (the fused kernels cannot truncate), so truncated sampling costs memory at large vocabularies.

    Args:
        logits: [N, V] the head's output; targets: [N].
    Returns:
        logp [N] fp32, entropy [N] fp32.
    """
    from npo_engine.rollout.sampling import truncate

    scaled = logits.float() / temperature
    with torch.no_grad():
        kept = torch.isfinite(truncate(scaled.detach(), top_k=top_k, top_p=top_p))
        kept.scatter_(1, targets[:, None], True)
    logp_all = torch.log_softmax(scaled.masked_fill(~kept, float("-inf")), dim=-1)
    logp = logp_all.gather(1, targets[:, None])[:, 0]
    probs = logp_all.exp()
    entropy = -(probs * logp_all.masked_fill(~kept, 0.0)).sum(-1)
    return logp, entropy


def _scatter_rows(rows: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """[N] values at the True positions of `scored` [B, L - 1] -> [B, L] fp32, zeros elsewhere (and in column 0)."""
    full = torch.zeros(scored.shape, dtype=torch.float32, device=rows.device).masked_scatter(scored, rows.float())
    return torch.nn.functional.pad(full, (1, 0))
