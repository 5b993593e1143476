"""The prompts the benchmarks run: Spec-Bench's (from ../shared/data when the repository sits
beside it), or one built-in prompt per Spec-Bench category."""

from __future__ import annotations

import json
from pathlib import Path

# Where the Spec-Bench prompts live when the repository sits beside `shared/`.
DEFAULT_PROMPTS = Path("../shared/data/specbench/question.jsonl")

# Used when no prompt file is given and none is found: one per Spec-Bench category.
BUILTIN_PROMPTS = [
    "Translate German to English: Das Wetter ist heute schön, und wir gehen in den Park.",
    "Summarize in two sentences: The city council met on Tuesday to discuss the new park. "
    "Residents spoke for and against the plan, which would replace a parking lot with trees and benches.",
    "What is the capital of Australia, and why was it chosen?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a short poem about the sea.",
    "Explain how a hash table works.",
]


def load_prompts(path: str | Path | None, limit: int | None) -> list[str]:
    """First user turns of a Spec-Bench style JSONL file, spread evenly over the file (so a
    small limit still samples every category)."""
    if path is None and DEFAULT_PROMPTS.exists():
        path = DEFAULT_PROMPTS
    if path is None:
        prompts = list(BUILTIN_PROMPTS)
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"prompt file not found: {p}")
        prompts = []
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(row["turns"][0] if "turns" in row else row["prompt"])
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                raise ValueError(f"{p}:{lineno}: expected a JSON object with 'turns' (or 'prompt'): {exc}") from exc
    if limit is not None and 0 < limit < len(prompts):
        step = len(prompts) / limit
        prompts = [prompts[int(i * step)] for i in range(limit)]
    return prompts


__all__ = ["load_prompts", "DEFAULT_PROMPTS", "BUILTIN_PROMPTS"]
