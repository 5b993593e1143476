"""Tiny random-initialised models for tests: a byte tokenizer and small Llama / Qwen2 modules
with fixed seeds (models.py names them: tiny-llama, tiny-qwen2, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .loaded import Tokenizer


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """UTF-8 bytes as ids 0..255, then <bos>=256 and <eos>=257; ids above decode to nothing."""
    if vocab_size < 258:
        raise ValueError("a byte tokenizer needs a vocabulary of at least 258")
    bos, eos = 256, 257

    def decode(ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    vocab = {f"<0x{i:02X}>": i for i in range(256)} | {"<bos>": bos, "<eos>": eos}
    vocab |= {f"<unused{i}>": i for i in range(258, vocab_size)}
    return Tokenizer(
        encode=lambda text: list(text.encode("utf-8")),
        decode=decode,
        vocab=vocab,
        eos_token_ids=[eos],
        bos_token_id=bos,
        special_ids=frozenset({bos, eos}),
    )


def tiny_llama(
    seed: int, hidden: int, layers: int, heads: int, vocab: int, init_range: float = 0.2, *, kv_heads: int | None = None
) -> Any:
    """A random-initialised Llama; the wide init makes its distributions peaked like a real LM's."""
    return tiny_model("llama", seed, hidden, layers, heads, vocab, init_range, kv_heads)


def tiny_qwen2(
    seed: int, hidden: int, layers: int, heads: int, vocab: int, init_range: float = 0.2, *, kv_heads: int | None = None
) -> Any:
    """A random-initialised Qwen2: Llama plus q/k/v projection biases, with tied input/output
    embeddings (as Qwen2.5-0.5B's own checkpoint has; the bundled GGUF stores its output layer
    apart). transformers initialises biases to zero, which would hide a backend that drops them,
    so they are drawn at the scale of the projection W x itself."""
    return tiny_model("qwen2", seed, hidden, layers, heads, vocab, init_range, kv_heads)


def tiny_model(arch: str, seed: int, hidden: int, layers: int, heads: int, vocab: int, init_range: float,
                kv_heads: int | None) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=4096,
        initializer_range=init_range,
        bos_token_id=256 if vocab >= 258 else None,
        eos_token_id=257 if vocab >= 258 else None,
        pad_token_id=None,
        tie_word_embeddings=arch == "qwen2",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        if arch == "qwen2":
            with torch.no_grad():
                for layer in model.model.layers:
                    attn = layer.self_attn
                    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                        # the spread of W x for a normalised x: init_range * sqrt(hidden)
                        proj.bias.normal_(0.0, init_range * hidden**0.5)
    return model.eval()


__all__ = ["byte_tokenizer", "tiny_llama", "tiny_qwen2"]
