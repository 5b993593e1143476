"""Write a transformers Llama-family model (Llama, Mistral, Qwen2) to a float32 GGUF file that
llama.cpp loads.

For models that exist only in torch (tests' tiny random models, a fine-tuned drafter) so they can
draft on the llama.cpp backend. The vocabulary written is the model's tokenizer's (as a
SentencePiece-style token list): llama.cpp only ever sees token ids from tandem, so the list
matters for loading, not for tokenising.

Conversion details:
- transformers rotates query/key pairs (i, i + d/2) ("rotate half"). llama.cpp's Llama graph
  rotates adjacent pairs (2i, 2i + 1), so the rows of the q and k projections (and their biases)
  are permuted to map one onto the other, as llama.cpp's own converter does. Its Qwen2 graph
  rotates halves like transformers, so Qwen2 is written unpermuted, under the `qwen2` architecture.
- Projection biases (Qwen2's q/k/v) are written beside their weights; tied embeddings write no
  `output.weight`, and llama.cpp then reads the output layer from `token_embd.weight`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .base import missing_extra

if TYPE_CHECKING:
    from ..loaded import LoadedModel


def _permute_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection from rotate-half order to interleaved-pair order, per head."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# transformers model type -> llama.cpp architecture, and whether its graph rotates halves (NeoX)
_ARCHES = {"llama": ("llama", False), "mistral": ("llama", False), "qwen2": ("qwen2", True)}


def rotates_halves(model_type: str) -> bool:
    """Whether llama.cpp's graph for a transformers model type rotates halves, as transformers
    does (else adjacent pairs, and a GGUF's q/k rows are permuted to match)."""
    if model_type not in _ARCHES:
        raise ValueError(f"no llama.cpp architecture known for model type '{model_type}'")
    return _ARCHES[model_type][1]


def write_llama_gguf(lm: "LoadedModel", path: str | Path) -> Path:
    """Write `lm` (a Llama-family transformers model) as a float32 GGUF at `path`."""
    try:
        import gguf  # noqa: PLC0415
    except ImportError as exc:
        raise missing_extra("gguf", "models", "writing GGUF files") from exc
    from ..prefill import llama_layout

    lay = llama_layout(lm.model)
    cfg = lm.model.config
    arch, rotates_halves = _ARCHES[cfg.model_type]
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(lm.name)
    w.add_context_length(int(getattr(cfg, "max_position_embeddings", 4096)))
    w.add_embedding_length(lay.hidden)
    w.add_block_count(lay.n_layers)
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(lay.n_heads)
    w.add_head_count_kv(lay.n_kv_heads)
    w.add_layer_norm_rms_eps(lay.eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_rope_dimension_count(lay.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tok = lm.tokenizer
    by_id = {i: s for s, i in tok.vocab.items()}
    n_vocab = lay.vocab
    tokens, types = [], []
    for i in range(n_vocab):
        piece = by_id.get(i, f"<unused{i}>")
        tokens.append(piece)
        if i in tok.special_ids:
            types.append(gguf.TokenType.CONTROL)
        elif piece.startswith("<0x") and len(piece) == 6:
            types.append(gguf.TokenType.BYTE)
        elif piece.startswith("<unused"):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_ids:
        w.add_eos_token_id(tok.eos_token_ids[0])
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)

    def f32(t) -> np.ndarray:
        return t.detach().float().numpy().astype(np.float32)

    def linear(prefix: str, module, rope_heads: int | None = None) -> None:
        """A projection's weight and bias; rows permuted for llama.cpp's pairwise rope if needed."""
        for kind, t in (("weight", module.weight), ("bias", module.bias)):
            if t is None:
                continue
            data = f32(t)
            if rope_heads is not None and not rotates_halves:
                data = _permute_for_rope(data, rope_heads)
            w.add_tensor(f"{prefix}.{kind}", data)

    w.add_tensor("token_embd.weight", f32(lay.embed))
    for i, layer in enumerate(lay.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(layer["ln1"]))
        linear(f"blk.{i}.attn_q", layer["q"], lay.n_heads)
        linear(f"blk.{i}.attn_k", layer["k"], lay.n_kv_heads)
        linear(f"blk.{i}.attn_v", layer["v"])
        linear(f"blk.{i}.attn_output", layer["o"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(layer["ln2"]))
        linear(f"blk.{i}.ffn_gate", layer["gate"])
        linear(f"blk.{i}.ffn_up", layer["up"])
        linear(f"blk.{i}.ffn_down", layer["down"])
    w.add_tensor("output_norm.weight", f32(lay.final_norm))
    if lay.lm_head.data_ptr() != lay.embed.data_ptr():
        w.add_tensor("output.weight", f32(lay.lm_head))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


__all__ = ["write_llama_gguf", "rotates_halves"]
