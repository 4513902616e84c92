"""The e2e benchmark's workload, built locally and identically for both engines (nothing is downloaded).

- **Model:** a random-init `Qwen2ForCausalLM` (seed 0): 4 layers, hidden 256, intermediate 768, 4 query heads
  of dim 64, 2 KV heads, tied embeddings, fp32. Two shapes: vocabulary 50 (a character tokenizer, 3.2M
  parameters) and vocabulary 151936 (Qwen's, same layers: 42M parameters, most of them the embedding).
- **Tokenizer:** one token per character (`<pad>` and 49 characters); at vocabulary 151936, placeholder tokens
  fill the rest. The EOS token's id is the vocabulary size, one past the model's last logit, so it is never
  sampled and every completion has exactly `max_new_tokens` tokens on both sides.
- **Task:** prompts `"{a}+{b}="` with a, b in 10..99, answer `a + b`, reward `exact_match` (1 if the completion
  is the answer). A random model scores 0, so the advantages are 0; both engines still run the whole loss,
  backward and optimizer step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SHAPES = {"vocab50": 50, "vocab151936": 151936}
"""Shape name -> vocabulary size."""

CHARACTERS = "0123456789+-*/=()., :;!?" + "abcdefghijklmnopqrstuvwxy"  # 49 characters: with <pad>, 50 tokens
PAD = "<pad>"
EOS = "<eos>"


def model_config(vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=vocab_size,  # outside the logits: never sampled
        bos_token_id=None,
    )


def build_tokenizer(vocab_size: int):
    """Character tokenizer with `vocab_size` model tokens and an EOS id of `vocab_size` (never sampled)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [PAD, *CHARACTERS]
    assert len(tokens) == 50 and vocab_size >= len(tokens)
    tokens += [f"<x{i}>" for i in range(vocab_size - len(tokens))]
    tokens.append(EOS)  # id == vocab_size
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS)


def problems(count: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """`count` rows {"id", "prompt": "a+b=", "answer": str(a + b)}, a and b in 10..99."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"id": f"p{i}", "prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def build(shape: str, root: Path) -> Path:
    """Model directory (config, seeded weights, tokenizer) and prompts.jsonl for `shape` under `root`."""
    vocab = SHAPES[shape]
    directory = root / shape
    if (directory / "model.safetensors").is_file() and (directory / "prompts.jsonl").is_file():
        return directory
    from transformers import Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(model_config(vocab)).float()
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer(vocab).save_pretrained(directory)
    with open(directory / "prompts.jsonl", "w") as f:
        for row in problems():
            f.write(json.dumps(row) + "\n")
    return directory


def read_problems(directory: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in open(directory / "prompts.jsonl")]
