"""Preference pairs for the DPO tests: a right and a wrong answer to small questions."""

from __future__ import annotations

from typing import Any


def preference(user: str, preferred: str, non_preferred: str) -> dict[str, Any]:
    """One line of OpenAI's preference format."""
    return {
        "input": {"messages": [{"role": "user", "content": user}]},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": non_preferred}],
    }


# The right sum preferred over a refusal, in words the tiny tokenizer knows.
PAIRS = [
    preference(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", "I do not know.")
    for i in range(16)
]
