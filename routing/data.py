"""Routing tables (RouteLLM's evaluation format) and the fixed train / held-out split.

A routing table is a CSV with a `prompt` column and one True/False column per model saying
whether that model answered the prompt correctly (RouteLLM's `routellm/evals` files; GSM8K's also
carry `<model>_response` columns, ignored here). The first two correctness columns are taken as
(weak, strong), the order RouteLLM writes them in; `weak=` / `strong=` name others. A folder is
the concatenation of its `*.csv` files in name order; each row remembers its file's stem
(`gsm8k`, `mmlu_anatomy`, ...) as its `source`.

The held-out split never changes with the files' order or contents:

- GSM8K-style files: a prompt is held out when the first 8 hex digits of
  sha256(HOLDOUT_SALT + prompt), read as a number, fall in the lowest GSM8K_HOLDOUT_FRACTION
  of their range (about 30% of the prompts).
- MMLU: whole domains are held out, every third one in alphabetical order of the 38 domain
  files shipped in ../shared/data/routing/mmlu (HELDOUT_MMLU_DOMAINS, 13 domains, about 29% of
  the prompts), so a router is measured on subjects it never saw.

The prefill router is trained on the rest only; the learned routers read every row and are
judged by grouped cross-validation instead (see `routing/train.py`).
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HOLDOUT_SALT = "tandem-routing-holdout-v1:"
GSM8K_HOLDOUT_FRACTION = 0.3

# every third of the 38 domain files in ../shared/data/routing/mmlu, in alphabetical order
HELDOUT_MMLU_DOMAINS: frozenset[str] = frozenset(
    {
        "business_ethics",
        "college_computer_science",
        "conceptual_physics",
        "formal_logic",
        "high_school_european_history",
        "high_school_mathematics",
        "high_school_psychology",
        "human_sexuality",
        "machine_learning",
        "moral_disputes",
        "philosophy",
        "professional_medicine",
        "virology",
    }
)


def default_data_dir() -> Path:
    """$TANDEM_ROUTING_DATA when set, else ../shared/data/routing relative to the repository root
    (where the shared data lives)."""
    env = os.environ.get("TANDEM_ROUTING_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "routing"


@dataclass
class RoutingTable:
    prompts: list[str]
    weak: np.ndarray  # bool, one per prompt
    strong: np.ndarray  # bool
    sources: list[str]  # file stem per prompt
    weak_model: str = "weak"
    strong_model: str = "strong"

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, mask: np.ndarray) -> "RoutingTable":
        idx = np.nonzero(np.asarray(mask, dtype=bool))[0]
        return RoutingTable(
            prompts=[self.prompts[i] for i in idx],
            weak=self.weak[idx],
            strong=self.strong[idx],
            sources=[self.sources[i] for i in idx],
            weak_model=self.weak_model,
            strong_model=self.strong_model,
        )

    @staticmethod
    def concat(tables: list["RoutingTable"]) -> "RoutingTable":
        if not tables:
            raise ValueError("no routing tables to concatenate")
        return RoutingTable(
            prompts=[p for t in tables for p in t.prompts],
            weak=np.concatenate([t.weak for t in tables]),
            strong=np.concatenate([t.strong for t in tables]),
            sources=[s for t in tables for s in t.sources],
            weak_model=tables[0].weak_model,
            strong_model=tables[0].strong_model,
        )


_BOOL = {"true": True, "false": False, "1": True, "0": False}


def _parse_bool(value: str, path: Path, line: int, column: str) -> bool:
    try:
        return _BOOL[value.strip().lower()]
    except KeyError:
        raise ValueError(f"{path}:{line}: column '{column}' must be True/False, got {value!r}") from None


def read_csv(path: str | Path, *, weak: str | None = None, strong: str | None = None) -> RoutingTable:
    """One RouteLLM-format CSV."""
    path = Path(path)
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        rows = list(reader)
    if "prompt" not in header:
        raise ValueError(f"{path}: no 'prompt' column (columns: {', '.join(header)})")
    if not rows:
        raise ValueError(f"{path}: no rows")
    candidates = [c for c in header if c != "prompt" and not c.endswith("_response")]
    correctness = [c for c in candidates if all(r[c].strip().lower() in _BOOL for r in rows[:50])]
    weak = weak or (correctness[0] if len(correctness) > 0 else None)
    strong = strong or (correctness[1] if len(correctness) > 1 else None)
    if weak is None or strong is None or weak not in header or strong not in header:
        raise ValueError(
            f"{path}: need two True/False correctness columns (weak, strong); found {correctness or 'none'}"
        )
    # line numbers: the header is line 1; multi-line prompts make this approximate, which is
    # fine for an error message that also names the column and the value
    w = np.array([_parse_bool(r[weak], path, i + 2, weak) for i, r in enumerate(rows)])
    s = np.array([_parse_bool(r[strong], path, i + 2, strong) for i, r in enumerate(rows)])
    return RoutingTable(
        prompts=[r["prompt"] for r in rows], weak=w, strong=s, sources=[path.stem] * len(rows),
        weak_model=weak, strong_model=strong,
    )


def load_table(path: str | Path, *, weak: str | None = None, strong: str | None = None) -> RoutingTable:
    """A CSV, or every `*.csv` in a folder (name order), as one table."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise FileNotFoundError(f"no *.csv files in {path}")
        return RoutingTable.concat([read_csv(f, weak=weak, strong=strong) for f in files])
    if not path.exists():
        raise FileNotFoundError(f"no routing data at {path}")
    return read_csv(path, weak=weak, strong=strong)


def prompt_hash(prompt: str) -> int:
    """A stable 64-bit id of a prompt (training prompts are recorded by it, not by text)."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")


def _holdout_bucket(prompt: str) -> float:
    digest = hashlib.sha256((HOLDOUT_SALT + prompt).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 16**8


def mmlu_domain(source: str) -> str | None:
    return source[len("mmlu_"):] if source.startswith("mmlu_") else None


def is_heldout(prompt: str, source: str) -> bool:
    """Whether a row belongs to the held-out part of the split described in the module docstring."""
    domain = mmlu_domain(source)
    if domain is not None:
        return domain in HELDOUT_MMLU_DOMAINS
    return _holdout_bucket(prompt) < GSM8K_HOLDOUT_FRACTION


def split(table: RoutingTable) -> tuple[RoutingTable, RoutingTable]:
    """(train, held-out) parts of a table."""
    mask = np.array([is_heldout(p, s) for p, s in zip(table.prompts, table.sources)], dtype=bool)
    return table.subset(~mask), table.subset(mask)


def load_shared(data_dir: str | Path | None = None) -> dict[str, RoutingTable]:
    """The shared tables by name: {'gsm8k': ..., 'mmlu': ...}."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    return {"gsm8k": load_table(root / "gsm8k.csv"), "mmlu": load_table(root / "mmlu")}


__all__ = [
    "RoutingTable",
    "read_csv",
    "load_table",
    "load_shared",
    "split",
    "is_heldout",
    "prompt_hash",
    "default_data_dir",
    "HELDOUT_MMLU_DOMAINS",
    "GSM8K_HOLDOUT_FRACTION",
]
