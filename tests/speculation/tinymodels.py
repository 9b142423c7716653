"""Tiny random-initialised Llama models built from a config with a fixed seed (no hub)."""

from __future__ import annotations

import functools

import torch


class TinyTokenizer:
    """Enough of a tokenizer for the engine: ids <-> characters, EOS id 2."""

    eos_token_id = 2
    pad_token_id = 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x4E00 + i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))

    def get_vocab(self) -> dict[str, int]:
        return {chr(0x4E00 + i): i for i in range(self.vocab_size)}


@functools.lru_cache(maxsize=None)
def tiny_llama(seed: int = 0, vocab_size: int = 96, hidden: int = 64, layers: int = 2, heads: int = 4,
               eos_boost: float = 1.3):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights: peaky distributions, so fewer near-ties in greedy tests
        for p in model.parameters():
            p.mul_(4.0 if p.dim() == 2 else 1.0)
        model.lm_head.weight[2] *= eos_boost  # EOS now and then, so it lands inside drafts too
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model
