"""Which token positions carry loss, for each data format."""

from __future__ import annotations

import pytest

from peft_engine.data.formats import DataFormat, Example
from peft_engine.data.tokenize import IGNORE, token_ids_and_mask, tokenize_dataset
from peft_engine.errors import DataError


def _example(record: dict, fmt: DataFormat = DataFormat.CHAT) -> Example:
    return Example(line=7, format=fmt, record=record)


def _trained_text(tokenizer, record, fmt=DataFormat.CHAT, **kw) -> str:
    ids, mask = token_ids_and_mask(_example(record, fmt), tokenizer, train_on_inputs=False, **kw)
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])


TWO_TURNS = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
}


def test_chat_trains_on_every_assistant_turn_and_its_end_of_turn_token(tiny_tokenizer):
    assert _trained_text(tiny_tokenizer, TWO_TURNS) == "Paris.<|im_end|>Rome.<|im_end|>"


def test_chat_masks_headers_system_and_user_tokens(tiny_tokenizer):
    ids, mask = token_ids_and_mask(_example(TWO_TURNS), tiny_tokenizer, train_on_inputs=False)
    rendered = tiny_tokenizer.apply_chat_template(TWO_TURNS["messages"], tokenize=False)
    assert tiny_tokenizer.decode(ids) == rendered  # the template's own text, tokenized once
    masked = tiny_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    for hidden in ("Be brief.", "Capital of France?", "And of Italy?", "<|im_start|>assistant\n"):
        assert hidden in masked
    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_eot = [m for i, m in zip(ids, mask, strict=True) if i == end_of_turn]
    assert trained_eot == [False, False, True, False, True]  # system, user, asst, user, asst


def test_message_weight_overrides_the_default(tiny_tokenizer):
    record = {
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Lyon.", "weight": 0},
            {"role": "user", "content": "Wrong.", "weight": 1},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    assert _trained_text(tiny_tokenizer, record) == (
        "<|im_start|>user\nWrong.<|im_end|>Paris.<|im_end|>"
    )


def test_train_on_inputs_trains_on_everything(tiny_tokenizer):
    ids, mask = token_ids_and_mask(_example(TWO_TURNS), tiny_tokenizer, train_on_inputs=True)
    assert all(mask)


def test_prompt_completion_trains_on_completion_and_eos(tiny_tokenizer):
    record = {"prompt": "Capital of France?", "completion": " Paris."}
    fmt = DataFormat.PROMPT_COMPLETION
    assert _trained_text(tiny_tokenizer, record, fmt) == " Paris.<|im_end|>"
    ids, mask = token_ids_and_mask(_example(record, fmt), tiny_tokenizer, train_on_inputs=True)
    assert all(mask)


def test_text_trains_on_every_token_then_eos(tiny_tokenizer):
    ids, mask = token_ids_and_mask(
        _example({"text": "Hello world."}, DataFormat.TEXT), tiny_tokenizer, train_on_inputs=False
    )
    assert all(mask)
    assert ids[-1] == tiny_tokenizer.eos_token_id


def test_targets_are_the_next_token_where_it_carries_loss(tiny_tokenizer):
    dataset = tokenize_dataset(
        [_example(TWO_TURNS)], tiny_tokenizer, max_seq_length=512, train_on_inputs=False
    )
    example = dataset.examples[0]
    ids, mask = token_ids_and_mask(_example(TWO_TURNS), tiny_tokenizer, train_on_inputs=False)
    assert example.input_ids == ids
    for i in range(len(ids) - 1):
        assert example.targets[i] == (ids[i + 1] if mask[i + 1] else IGNORE)
    assert example.targets[-1] == IGNORE


def test_long_examples_are_truncated_and_counted(tiny_tokenizer):
    long = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "fox " * 200},
        ]
    }
    unreachable = {
        "messages": [
            {"role": "user", "content": "dog " * 200},
            {"role": "assistant", "content": "ok"},
        ]
    }
    dataset = tokenize_dataset(
        [_example(TWO_TURNS), _example(long), _example(unreachable)],
        tiny_tokenizer,
        max_seq_length=64,
        train_on_inputs=False,
    )
    assert dataset.truncated == 2
    assert dataset.dropped == 1  # its assistant turn lies beyond the limit: nothing to learn
    assert [len(e.input_ids) <= 64 for e in dataset.examples] == [True, True]
    assert dataset.longest > 200


def test_no_learnable_token_at_all_is_a_data_error(tiny_tokenizer):
    unreachable = {
        "messages": [
            {"role": "user", "content": "dog " * 200},
            {"role": "assistant", "content": "ok"},
        ]
    }
    with pytest.raises(DataError, match="no example has a token to learn from"):
        tokenize_dataset(
            [_example(unreachable)], tiny_tokenizer, max_seq_length=32, train_on_inputs=False
        )


def test_tokenizer_without_chat_template_is_a_clear_error(tiny_tokenizer):
    import copy

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="needs a chat template"):
        token_ids_and_mask(_example(TWO_TURNS), plain, train_on_inputs=False)
