"""Cheap, domain-free features of a prompt's surface: what makes a question hard for a weak model
whatever its subject (how much there is to read, how many quantities to combine, whether the
answer options are long statements or a negated or combined choice).

    log_chars      log(1 + characters)
    log_words      log(1 + words)
    numbers        log(1 + count of numbers)            quantities to combine
    distinct_nums  log(1 + count of distinct numbers)
    math_symbols   log(1 + count of = + - * / ^ % $)
    lines          log(1 + lines)
    option_chars   log(1 + mean characters of the lines that start "A." .. "D.")   0 without options
    question_frac  characters before the first option / all characters        1 without options
    negation       the prompt says NOT / EXCEPT / LEAST / FALSE (in capitals, as exams mark it)
    roman          options combine numbered statements (I, II, III ...)
    two_scenarios  the prompt contrasts numbered scenarios or statements ("Statement 1", "Scenario 1")
    sentences      log(1 + sentences; an option letter "A." ends none) steps of a word problem
    fractions      log(1 + fractions and ratio words: 3/4, half, third, quarter, twice, double, triple)
    commas         log(1 + commas)                                 clauses to keep apart
    names          log(1 + capitalised words)                      people and things to track

All are pure functions of the text; the same prompt always gives the same vector.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TEXT_FEATURES = (
    "log_chars", "log_words", "numbers", "distinct_nums", "math_symbols", "lines", "option_chars",
    "question_frac", "negation", "roman", "two_scenarios", "sentences", "fractions", "commas", "names",
)

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_OPTION = re.compile(r"^\s*[A-D][.)]\s*(.*)$", re.MULTILINE)
_NEGATION = re.compile(r"\b(NOT|EXCEPT|LEAST|FALSE|INCORRECT)\b")
_ROMAN = re.compile(r"\b(I{1,3}|IV)\b(?:,| and| only)")
_TWO = re.compile(r"\b(Statement|Scenario)\s*[12]\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<!\b[A-Z])[.!?](?:\s|$)")  # not an option letter ("A. ")
_FRACTION = re.compile(r"\d/\d|\b(?:half|halves|third|thirds|quarter|quarters|twice|double|triple)\b", re.IGNORECASE)
_NAME = re.compile(r"\b[A-Z][a-z]+")


def text_features(prompt: str) -> np.ndarray:
    """The TEXT_FEATURES vector of one prompt (float32)."""
    numbers = _NUMBER.findall(prompt)
    options = _OPTION.findall(prompt)
    first = _OPTION.search(prompt)
    return np.array(
        [
            np.log1p(len(prompt)),
            np.log1p(len(prompt.split())),
            np.log1p(len(numbers)),
            np.log1p(len(set(numbers))),
            np.log1p(sum(prompt.count(c) for c in "=+-*/^%$")),
            np.log1p(prompt.count("\n") + 1),
            np.log1p(np.mean([len(o) for o in options])) if options else 0.0,
            first.start() / max(1, len(prompt)) if first else 1.0,
            float(bool(_NEGATION.search(prompt))),
            float(bool(_ROMAN.search(prompt))),
            float(bool(_TWO.search(prompt))),
            np.log1p(len(_SENTENCE_END.findall(prompt))),
            np.log1p(len(_FRACTION.findall(prompt))),
            np.log1p(prompt.count(",")),
            np.log1p(len(_NAME.findall(prompt))),
        ],
        dtype=np.float32,
    )


def text_features_many(prompts: Sequence[str]) -> np.ndarray:
    """(len(prompts), len(TEXT_FEATURES))."""
    if len(prompts) == 0:
        return np.zeros((0, len(TEXT_FEATURES)), np.float32)
    return np.stack([text_features(p) for p in prompts])


__all__ = ["TEXT_FEATURES", "text_features", "text_features_many"]
