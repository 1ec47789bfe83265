"""A file's report: the statistics an upload gathers as it is validated, as the API shows
them (counts, label and tag sets, the longest example, the images' formats and sizes).

An image dataset uploaded as an archive gets its report from `archive_scan`, with the same
image fields."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from peft_engine.data.examples import DataFormat, Example
from peft_engine.data.formats import PREFERENCE_OUTPUTS
from tuneq.files.images import ImageStats

Syntax = Literal["jsonl", "csv"]


def entity_types(tags: Sequence[str]) -> Iterator[str]:
    """The type of each entity in a sentence's IOB2 tags, in order.

    A `B-X` starts an entity of type X; an `I-X` continues the entity before it when that
    one is also an X, and otherwise (after `O` or another type) starts one.
    """
    current: str | None = None
    for tag in tags:
        prefix, _, kind = tag.partition("-")
        if prefix == "B" or (prefix == "I" and kind != current):
            yield kind
        current = kind if prefix in ("B", "I") else None


@dataclass
class FileStats:
    """The counts kept in a file's report; each format adds its own (see `as_report`)."""

    lines: int = 0
    examples: int = 0
    max_example_chars: int = 0
    role_sequences: Counter[tuple[str, ...]] = field(default_factory=Counter)  # chat
    label_counts: Counter[str] = field(default_factory=Counter)  # labels as strings
    pair_examples: int = 0  # classification examples given as text_a/text_b
    tag_counts: Counter[str] = field(default_factory=Counter)
    entity_counts: Counter[str] = field(default_factory=Counter)
    max_tokens: int = 0  # the most words in one token-classification example
    images: ImageStats = field(default_factory=ImageStats)  # image lines' inline images

    def add(self, example: Example) -> None:
        """Count one valid example."""
        if example.format is DataFormat.CHAT:
            messages = example.record["messages"]
            roles = tuple(m["role"] for m in messages)
            self.add_chat(roles, sum(len(m["content"]) for m in messages))
            return
        self.examples += 1
        chars = self._add_record(example.format, example.record)
        self.max_example_chars = max(self.max_example_chars, chars)

    def add_chat(self, roles: tuple[str, ...], chars: int) -> None:
        """Count one valid chat example from its messages' roles and characters of content.

        Roles are counted by conversation shape (a few distinct ones per file), then summed
        for the report: cheaper than counting every message of a million-line upload.
        """
        self.examples += 1
        self.role_sequences[roles] += 1
        if chars > self.max_example_chars:
            self.max_example_chars = chars

    def add_chats(self, shapes: list[tuple[str, ...]], most_chars: int) -> None:
        """Count valid chat examples at once: their roles (a tuple each), and the most
        characters of content in one of them."""
        self.examples += len(shapes)
        self.role_sequences.update(shapes)
        if most_chars > self.max_example_chars:
            self.max_example_chars = most_chars

    def _add_record(self, data_format: DataFormat, record: dict[str, Any]) -> int:
        """Count what the record holds; returns its length in characters of text."""
        if data_format is DataFormat.PROMPT_COMPLETION:
            return len(record["prompt"]) + len(record["completion"])
        if data_format is DataFormat.CLASSIFICATION:
            self.label_counts[str(record["label"])] += 1
            if "text_a" in record:
                self.pair_examples += 1
                return len(record["text_a"]) + len(record["text_b"])
            return len(record["text"])
        if data_format is DataFormat.TOKEN_CLASSIFICATION:
            self.tag_counts.update(record["tags"])
            self.entity_counts.update(entity_types(record["tags"]))
            self.max_tokens = max(self.max_tokens, len(record["tokens"]))
            return len(" ".join(record["tokens"]))  # the text the tokenizer sees
        if data_format is DataFormat.IMAGE_CLASSIFICATION:
            self.label_counts[str(record["label"])] += 1
            return 0  # an image has no text; its report leaves max_example_chars out
        if data_format is DataFormat.PREFERENCE:  # the prompt and both outputs
            messages = [*record["input"]["messages"], *(record[k][0] for k in PREFERENCE_OUTPUTS)]
            return sum(len(m["content"]) for m in messages)
        return len(record["text"])

    def as_report(self, data_format: DataFormat, syntax: Syntax) -> dict[str, Any]:
        """The report stored with the file and shown by the API."""
        report: dict[str, Any] = {"syntax": syntax, "lines": self.lines, "examples": self.examples}
        if data_format is not DataFormat.IMAGE_CLASSIFICATION:
            report["max_example_chars"] = self.max_example_chars
        if data_format is DataFormat.CHAT:
            by_role: Counter[str] = Counter()
            for roles, conversations in self.role_sequences.items():
                for role in roles:
                    by_role[role] += conversations
            report["messages_by_role"] = dict(sorted(by_role.items()))
        elif data_format is DataFormat.CLASSIFICATION:
            report["label_counts"] = dict(sorted(self.label_counts.items()))
            report["pairs"] = self.pair_examples > 0
        elif data_format is DataFormat.TOKEN_CLASSIFICATION:
            report["tag_counts"] = dict(sorted(self.tag_counts.items()))
            report["entity_counts"] = dict(sorted(self.entity_counts.items()))
            report["max_tokens"] = self.max_tokens
        elif data_format is DataFormat.IMAGE_CLASSIFICATION:
            report["label_counts"] = dict(sorted(self.label_counts.items()))
            report |= self.images.as_report()
        return report
