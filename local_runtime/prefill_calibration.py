"""Sample text for calibrating activation ranges (W8A8 prefill), and turning it into token ids.

A few short conversations of the kinds a device model sees (questions, instructions, code, maths,
a foreign language, a summary), rendered with the model's own chat template so the template's
control tokens, whose activations are among the largest, are covered. Written for this purpose;
deliberately not taken from any benchmark the backends are measured on.
"""

from __future__ import annotations

from typing import Any

CALIBRATION_CONVERSATIONS: list[tuple[str, str]] = [
    (
        "Why do leaves change colour in autumn?",
        "In autumn the days get shorter and cooler, so trees stop making chlorophyll, the green "
        "pigment that captures sunlight. As the chlorophyll breaks down, yellow and orange "
        "carotenoids that were there all along become visible, and some trees also make red "
        "anthocyanins from sugars trapped in the leaves.",
    ),
    (
        "Write a Python function that returns the n-th Fibonacci number.",
        "```python\ndef fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
        "    return a\n```\nIt runs in O(n) time and constant memory; fib(10) == 55.",
    ),
    (
        "A train leaves at 9:40 and arrives at 13:05. How long is the journey, and what is its "
        "average speed over 273 km?",
        "From 9:40 to 13:05 is 3 hours 25 minutes, or 3.4167 hours. The average speed is "
        "273 / 3.4167 = 79.9 km/h, so about 80 km/h.",
    ),
    (
        "Übersetze ins Englische: Morgen früh fahren wir mit dem Fahrrad zum Markt.",
        "Tomorrow morning we are cycling to the market.",
    ),
    (
        "Summarize: The committee reviewed three proposals for the new library. The first was "
        "cheapest but smallest; the second offered a café and longer hours; the third reused the "
        "old post office. After two hours of debate, members chose the third, citing cost and history.",
        "The committee compared three library proposals and picked the one that reuses the old post "
        "office, for its lower cost and historic value.",
    ),
    (
        "Give me three tips for a job interview.",
        "1. Research the company and the role before you go.\n2. Prepare short stories that show "
        "your skills, using the situation-task-action-result pattern.\n3. Ask thoughtful questions "
        "at the end; it shows genuine interest.",
    ),
    (
        "What is the difference between TCP and UDP?",
        "TCP is connection-oriented: it guarantees ordered, reliable delivery with retransmission "
        "and congestion control. UDP sends independent datagrams with no delivery guarantee, which "
        "makes it lighter and lower-latency, good for games, voice and DNS.",
    ),
    (
        "Based on the passage, who founded the city? Passage: Legend says that in 753 BC the twins "
        "Romulus and Remus, raised by a she-wolf, chose the site on the Palatine Hill; Romulus killed "
        "his brother in a quarrel and named the new city after himself.",
        "According to the passage, Romulus founded the city (Rome), after killing his twin brother Remus.",
    ),
]


def calibration_samples(tokenizer: Any, max_tokens: int = 2048) -> list[list[int]]:
    """Token id lists for the calibration conversations, at most `max_tokens` ids in all."""
    out: list[list[int]] = []
    total = 0
    for user, answer in CALIBRATION_CONVERSATIONS:
        ids = tokenizer.prompt_tokens(user) + tokenizer.encode(answer)
        ids = ids[: max_tokens - total]
        if not ids:
            break
        out.append(ids)
        total += len(ids)
    return out


__all__ = ["CALIBRATION_CONVERSATIONS", "calibration_samples"]
