"""Reading JSONL datasets: the format is detected, and every bad line is reported by number."""

from __future__ import annotations

import pytest

from peft_engine.data.examples import Example
from peft_engine.data.formats import DataFormat, read_examples
from peft_engine.errors import DataError
from peft_engine.prepare import _classes, split_validation
from tests.conftest import chat, write_jsonl


def test_reads_each_format(tmp_path):
    cases = {
        DataFormat.CHAT: [chat("hi", "hello")],
        DataFormat.PROMPT_COMPLETION: [{"prompt": "2+2=", "completion": " 4"}],
        DataFormat.TEXT: [{"text": "plain text"}],
    }
    for expected, rows in cases.items():
        examples = read_examples(write_jsonl(tmp_path / f"{expected}.jsonl", rows))
        assert [e.format for e in examples] == [expected]
        assert examples[0].line == 1


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b"), "", chat("c", "d")])
    assert [e.line for e in read_examples(path)] == [1, 3]


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "expected a JSON object, found a list"),
        ('{"id": 3}', None, "unknown format (keys: id)"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "messages", "no assistant message"),
        ('{"messages": "hi"}', "messages", "expected a list, found a string"),
        ('{"messages": []}', "messages", "the conversation is empty"),
        (
            '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
            "messages[0].content",
            "expected a string, found a number",
        ),
        (
            '{"messages": [{"role": "robot", "content": "x"}]}',
            "messages[0].role",
            "'robot' is not one of",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, '
            '{"role": "assistant", "content": " "}]}',
            "messages[1].content",
            "is empty",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, '
            '{"role": "assistant", "content": "a", "weight": 2}]}',
            "messages[1].weight",
            "must be 0 or 1",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, '
            '{"role": "assistant", "content": "a", "weight": 0}]}',
            "messages",
            "nothing to learn",
        ),
        ('{"prompt": "p"}', "completion", "missing"),
        ('{"prompt": 1, "completion": "c"}', "prompt", "expected a string, found a number"),
        ('{"text": ""}', "text", "is empty"),
    ],
)
def test_bad_line_is_named_with_its_number_and_field(tmp_path, line, field, message):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b"), line])
    with pytest.raises(DataError) as caught:
        read_examples(path)
    error = caught.value.errors[0]
    assert error.line == 2
    assert error.field == field
    assert message in error.message
    assert "line 2" in str(caught.value)


def test_invalid_utf8_is_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="line 2: not valid UTF-8"):
        read_examples(path)


def test_every_bad_line_is_counted_and_the_first_ones_listed(tmp_path):
    rows = [chat("a", "b")] + ["{oops"] * 30
    with pytest.raises(DataError) as caught:
        read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert caught.value.total_errors == 30
    assert [e.line for e in caught.value.errors][:3] == [2, 3, 4]
    assert "and 29 more" in str(caught.value)


def test_mixed_formats_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b"), {"text": "t"}])
    with pytest.raises(DataError, match="line 2: is in text format but the file started in chat"):
        read_examples(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_examples(path, param="validation_file")


def test_missing_file_names_the_parameter(tmp_path):
    with pytest.raises(DataError) as caught:
        read_examples(tmp_path / "nope.jsonl", param="validation_file")
    assert caught.value.param == "validation_file"
    assert caught.value.code == "invalid_validation_file"


def test_a_held_out_split_leaves_no_label_or_tag_unseen_in_training():
    # A rare label (one example of "neutral") or tag held out would score the model on a
    # class it was never given: such an example stays in training, whatever the seed.
    rows = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    rows.append({"text": "meh", "label": "neutral"})
    labelled = [Example(i + 1, DataFormat.CLASSIFICATION, r) for i, r in enumerate(rows)]
    tagged = [
        Example(i + 1, DataFormat.TOKEN_CLASSIFICATION, {"tokens": ["a", "b"], "tags": tags})
        for i, tags in enumerate([["O", "O"]] * 20 + [["B-PER", "O"]])
    ]
    for examples in (labelled, tagged):
        held_rare = 0
        for seed in range(40):
            train, validation = split_validation(examples, 0.25, seed=seed)
            assert len(train) + len(validation) == len(examples) and validation
            trained = {c for e in train for c in _classes(e)}
            assert all(_classes(e) <= trained for e in validation), seed
            held_rare += examples[-1] in train  # the rare one, always in training
        assert held_rare == 40
    # chat examples have no classes: the split is the plain seeded one
    chats = [Example(i + 1, DataFormat.CHAT, chat(f"q{i}", "a")) for i in range(20)]
    train, validation = split_validation(chats, 0.25, seed=1)
    assert (len(train), len(validation)) == (15, 5)
