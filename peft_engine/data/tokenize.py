"""Turning validated examples into token ids and next-token targets.

Each example becomes `input_ids` and `targets`, where `targets[i]` is the token the model
must predict after reading `input_ids[:i + 1]`, or IGNORE where that prediction carries no
loss. Shifting here, inside the example, means packing examples side by side can never ask
one example's last token to predict the next example's first.

Which tokens carry loss:
- chat: the assistant messages' content and their end-of-turn token (every assistant turn,
  not only the last), rendered with the tokenizer's own chat template; a message's
  `"weight": 0|1` overrides; `train_on_inputs` trains on every token.
- prompt/completion: the completion and the EOS token.
- text: every token, then EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peft_engine.data.formats import DataFormat, Example
from peft_engine.errors import DataError, LineError

IGNORE = -100


@dataclass(frozen=True)
class TokenizedExample:
    line: int
    input_ids: list[int]
    targets: list[int]
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass(frozen=True)
class TokenizedDataset:
    examples: list[TokenizedExample]
    truncated: int  # examples cut to max_seq_length (still trained on)
    dropped: int  # examples left with no loss token after truncation (not trained on)
    longest: int  # longest example in tokens, before truncation

    @property
    def n_tokens(self) -> int:
        return sum(e.n_tokens for e in self.examples)

    @property
    def n_loss_tokens(self) -> int:
        return sum(e.n_loss_tokens for e in self.examples)


def tokenize_dataset(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_seq_length: int,
    train_on_inputs: bool,
    param: str = "training_file",
) -> TokenizedDataset:
    kept: list[TokenizedExample] = []
    truncated = dropped = longest = 0
    for example in examples:
        ids, mask = token_ids_and_mask(
            example, tokenizer, train_on_inputs=train_on_inputs, param=param
        )
        longest = max(longest, len(ids))
        tokenized = truncate_and_shift(example.line, ids, mask, max_seq_length)
        truncated += tokenized.truncated
        if tokenized.n_loss_tokens == 0:
            dropped += 1
            continue
        kept.append(tokenized)
    if not kept:
        raise DataError(
            f"no example has a token to learn from within max_seq_length={max_seq_length}",
            param=param,
        )
    return TokenizedDataset(kept, truncated=truncated, dropped=dropped, longest=longest)


def token_ids_and_mask(
    example: Example, tokenizer: Any, *, train_on_inputs: bool, param: str = "training_file"
) -> tuple[list[int], list[bool]]:
    """The example's token ids and, per token, whether predicting it carries loss."""
    if example.format is DataFormat.CHAT:
        return _chat(example, tokenizer, train_on_inputs, param)
    if example.format is DataFormat.PROMPT_COMPLETION:
        prompt = tokenizer(example.record["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(example.record["completion"], add_special_tokens=False)["input_ids"]
        completion = [*completion, tokenizer.eos_token_id]
        return prompt + completion, [train_on_inputs] * len(prompt) + [True] * len(completion)
    ids = [
        *tokenizer(example.record["text"], add_special_tokens=True)["input_ids"],
        tokenizer.eos_token_id,
    ]
    return ids, [True] * len(ids)


def _chat(
    example: Example, tokenizer: Any, train_on_inputs: bool, param: str
) -> tuple[list[int], list[bool]]:
    messages = example.record["messages"]
    text, regions = chat_loss_regions(messages, tokenizer, train_on_inputs, example.line, param)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(lo <= start < hi for lo, hi in regions) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def chat_loss_regions(
    messages: list[dict[str, Any]], tokenizer: Any, train_on_inputs: bool, line: int, param: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss.

    Message i's span is what rendering messages[:i + 1] adds to rendering messages[:i]. For
    an assistant message the header (what `add_generation_prompt` adds) is left out, so the
    span is its content and end-of-turn token; whitespace after that token is left out too.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "chat data needs a chat template, and this model's tokenizer has none; "
            "use prompt/completion or text data",
            param=param,
        )
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render(tokenizer, plain, line, param)
    if train_on_inputs and not any("weight" in m for m in messages):
        return full, [(0, len(full))]
    regions: list[tuple[int, int]] = []
    before = _render(tokenizer, plain[:0], line, param) if plain else ""
    for i, message in enumerate(messages):
        after = _render(tokenizer, plain[: i + 1], line, param)
        if not after.startswith(before) or not full.startswith(after):
            raise DataError(
                "the chat template does not render conversations prefix by prefix, so the "
                "assistant tokens cannot be located",
                param=param,
                errors=[LineError(line, "cannot mask this conversation", "messages")],
            )
        default = 1 if (train_on_inputs or message["role"] == "assistant") else 0
        if message.get("weight", default) == 1:
            start = len(before)
            if message["role"] == "assistant":
                header = _render(tokenizer, plain[:i], line, param, generation_prompt=True)
                if after.startswith(header):
                    start = len(header)
            end = len(after.rstrip())
            regions.append((start, end))
        before = after
    return full, regions


def _render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    line: int,
    param: str,
    *,
    generation_prompt: bool = False,
) -> str:
    if not messages and not generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja raises its own errors, e.g. for a role it rejects
        raise DataError(
            "the model's chat template rejected a conversation",
            param=param,
            errors=[LineError(line, str(exc), "messages")],
        ) from None


def truncate_and_shift(
    line: int, ids: list[int], mask: list[bool], max_seq_length: int
) -> TokenizedExample:
    truncated = len(ids) > max_seq_length
    ids, mask = ids[:max_seq_length], mask[:max_seq_length]
    targets = [nxt if keep else IGNORE for nxt, keep in zip(ids[1:], mask[1:], strict=True)]
    return TokenizedExample(line, ids, [*targets, IGNORE], truncated)
