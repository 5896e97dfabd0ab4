"""Tiny random LLaMA-family models and a byte-level tokenizer for fast CPU tests."""
from __future__ import annotations

import os

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def tiny_config(family: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    kw = dict(TINY)
    kw.update(overrides)
    return cls(**kw)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialized tiny causal LM in eval mode (float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    return model.eval()


def byte_tokenizer(model_max_length: int = 1_000_000):
    """A byte-level tokenizer with no merges: 256 ids, one per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=b2u[0],
                                   model_max_length=model_max_length)


def save_tiny_checkpoint(path, family: str = "llama", seed: int = 0):
    """Save a tiny model (vocab 256) and the byte tokenizer as a HF directory."""
    model = tiny_model(family, seed=seed, vocab_size=256)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model
