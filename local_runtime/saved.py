"""Conversions and measurements saved once, so a model's second start skips them (cold start).

Loading a GGUF into torch converts it in Python: the tokenizer from its metadata (~20 s for a
151,936-token vocabulary) and every tensor dequantised (~50 s for the 0.5B model, minutes for the
1.5B on one core). Preparing it then measures things about this machine: whether its kernels are
batch-invariant (invariant.py), the activation ranges an int8 prefill is calibrated with. All of
it is saved under the cache (`cache_root()`), keyed by what it depends on:

    tokenizers/   the converted tokenizer       file identity, transformers version
    converted/    the model's tensors, mmap'd   file identity, dtype, torch and transformers versions
    facts/        a measured result             file identity, torch version, CPU capability, what

A file identity is the resolved path, size and modification time. A later start builds the
model's skeleton on the meta device and maps the saved tensors in: no conversion, no random
initialisation, no copy. A damaged or foreign file is ignored with one warning and rebuilt; a
cache that cannot be written costs time, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, TypeVar

from .packaged import cache_dir, cache_root

log = logging.getLogger("tandem.models")

T = TypeVar("T")
FORMAT = 1  # bumped when what a converted file holds changes


def file_key(source: Path, *parts: object) -> str:
    """A key for what was derived from `source` and depends on `parts` as well."""
    st = source.stat()
    text = "|".join([str(source.resolve()), str(st.st_size), str(st.st_mtime_ns), *map(str, parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def machine_parts() -> tuple[str, ...]:
    """What a measured fact or a converted tensor depends on besides its file."""
    import torch
    import transformers

    return torch.__version__, transformers.__version__, torch.backends.cpu.get_cpu_capability()


# -- tokenizers ------------------------------------------------------------------------------------


def hf_tokenizer(path: Path) -> Any:
    """transformers' tokenizer for a model directory or GGUF file (a GGUF's saved once)."""
    import transformers
    from transformers import AutoTokenizer

    if not path.is_file():
        return AutoTokenizer.from_pretrained(str(path))
    saved = cache_dir() / "tokenizers" / file_key(path, transformers.__version__)
    if saved.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(saved))
        except (OSError, ValueError) as exc:
            log.warning("ignoring the damaged tokenizer cache %s: %s", saved, exc)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _save_dir(tok, saved)
    return tok


def _save_dir(tok: Any, saved: Path) -> None:
    """Save into a temporary directory and rename it into place: readers never see half of one."""
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=saved.parent, prefix=saved.name + "."))
    except OSError as exc:
        log.warning("could not cache a tokenizer under %s: %s", saved.parent, exc)
        return
    try:
        tok.save_pretrained(str(tmp))
        shutil.rmtree(saved, ignore_errors=True)  # a damaged copy; a good one from a racing process is as good as ours
        os.replace(tmp, saved)
    except OSError as exc:
        log.warning("could not cache a tokenizer at %s: %s", saved, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- a model's tensors -------------------------------------------------------------------------------


def write_model(path: Path, model: Any, tensors: dict[str, Any], **extra: Any) -> None:
    """Save `model`'s config with `tensors` (name -> tensor) and `extra` in one torch file, atomically."""
    import torch

    payload = {"format": FORMAT, "config": model.config.to_json_string(use_diff=False),
               "generation_config": None if model.generation_config is None else model.generation_config.to_json_string(),
               "tensors": {n: t.detach() for n, t in tensors.items()}, **extra}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        need = sum(t.numel() * t.element_size() for t in payload["tensors"].values())
        if shutil.disk_usage(path.parent).free < 2 * need:
            raise OSError(f"{need / 2**30:.1f} GiB to write and less than twice that free")
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not save %s (the next start converts again): %s", path.name, exc)
    finally:
        tmp.unlink(missing_ok=True)


def read_payload(path: Path) -> dict:
    import torch

    payload = torch.load(path, mmap=True, weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"format {payload.get('format')}, expected {FORMAT}")
    return payload


def skeleton(payload: dict) -> Any:
    """The saved model's architecture on the meta device: no memory, no initialisation."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(payload["config"])
    cfg.pop("quantization_config", None)  # the GGUF's: the tensors saved are ours
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def assign(model: Any, name: str, tensor: Any) -> None:
    """Put `tensor` at parameter or buffer `name` of `model` (replacing a meta placeholder)."""
    import torch

    parent, _, attr = name.rpartition(".")
    module = model.get_submodule(parent)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def finish(model: Any, payload: dict) -> Any:
    """Check nothing was left on the meta device; the generation config; eval mode."""
    from transformers import GenerationConfig

    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"no saved value for {', '.join(left[:3])}")
    if payload["generation_config"] is not None:
        model.generation_config = GenerationConfig.from_dict(json.loads(payload["generation_config"]))
    return model.eval()


def all_tensors(model: Any) -> dict[str, Any]:
    return dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])


def converted_model(source: Path, dtype: str, convert: Callable[[], Any],
                    status: Callable[[str], ContextManager] = lambda _m: nullcontext()) -> Any:
    """The torch model a GGUF file converts to in `dtype`: read from the cache, or `convert()`ed
    and saved there. Tied weights stay tied (a tensor saved under two names is stored once)."""
    path = cache_root() / "converted" / f"{source.stem}-{dtype}-{file_key(source, dtype, FORMAT, *machine_parts()[:2])}.pt"
    if path.exists():
        try:
            with status(f"loading {source.stem} ({dtype}) from its converted copy ..."):
                payload = read_payload(path)
                model = skeleton(payload)
                for name, tensor in payload["tensors"].items():
                    assign(model, name, tensor)
                if getattr(model.config, "tie_word_embeddings", False):
                    model.tie_weights()
                return finish(model, payload)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring the converted copy %s (converting again): %s", path.name, exc)
    model = convert()
    write_model(path, model, all_tensors(model))
    return model


# -- measured facts -----------------------------------------------------------------------------------


def remembered(what: str, source: Path | None, compute: Callable[[], T], *parts: object) -> T:
    """`compute()`, measured once per file and machine: a later call with the same `what`,
    `source` and `parts` reads the saved result. None as `source` (a random model) never saves."""
    import torch

    if source is None or not source.is_file():
        return compute()
    path = cache_root() / "facts" / f"{what}-{file_key(source, what, *parts, *machine_parts())}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)["value"]
        except (OSError, RuntimeError, ValueError, KeyError, EOFError) as exc:
            log.warning("ignoring the saved %s %s (measuring again): %s", what, path.name, exc)
    value = compute()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"value": value}, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not save the %s measured for %s: %s", what, source.name, exc)
    finally:
        tmp.unlink(missing_ok=True)
    return value


__all__ = ["file_key", "machine_parts", "hf_tokenizer", "write_model", "read_payload", "skeleton", "assign", "finish",
           "all_tensors", "converted_model", "remembered", "FORMAT"]
