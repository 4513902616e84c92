"""Causal LMs: loading a Hugging Face checkpoint from a local directory, and the built-in tiny demo model.

The demo model is a standard `Qwen2ForCausalLM` (head_dim 32, so vLLM can serve it) with a character-level
tokenizer saved in the Hugging Face format. It is built deterministically on first use by a seeded supervised
warm-up on the easy part of the synthetic task family, then cached; nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

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


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a Hugging Face causal LM from a local directory (never from a hub)."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)


def load_tokenizer(path: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # left padding needs some pad id; it is always masked
    return tokenizer
