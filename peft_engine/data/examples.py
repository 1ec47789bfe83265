"""What every reader of a dataset shares: the formats, one example, the words for bad bytes.

Its own module so the readers (`formats` for JSONL, `csv_rows` for CSV, `images` for image
folders) import it and none of them needs another at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class DataFormat(StrEnum):
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    TEXT = "text"
    CLASSIFICATION = "classification"
    TOKEN_CLASSIFICATION = "token_classification"
    IMAGE_CLASSIFICATION = "image_classification"
    PREFERENCE = "preference"  # a prompt with a preferred and a non-preferred answer (DPO)


@dataclass(frozen=True)
class Example:
    line: int
    format: DataFormat
    record: dict[str, Any]


def not_utf8(exc: UnicodeDecodeError) -> str:
    """The problem with a line that is not UTF-8, naming the first bad byte (1-based)."""
    return f"not valid UTF-8 (byte {exc.start + 1})"
