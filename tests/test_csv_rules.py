"""The CSV rules live once (`peft_engine.data.csv_rows`): the engine reading a file and the
API reading an upload as it streams in give every CSV file the same verdict, in the same
words, on the same lines."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from peft_engine.data.formats import DataFormat, read_examples
from peft_engine.errors import DataError
from tests.service_fixtures import make_settings
from tuneq.errors import InvalidFile
from tuneq.files.ingest import ingest_upload

HEADER_PROBLEM = (
    "does not start with '{' so the file is read as CSV, and a CSV file needs a header row "
    "with the columns text,label or text_a,text_b,label; found "
)

# (name, file, verdict): ("valid", examples, label counts) or ("invalid", [(line, message,
# field)]) or ("empty",).
CASES: list[tuple[str, bytes, tuple[Any, ...]]] = [
    ("good", b"text,label\nhello,pos\nbye,neg\nhi,pos\n", ("valid", 3, {"neg": 1, "pos": 2})),
    ("no final newline", b"text,label\nhello,pos\nbye,neg", ("valid", 2, {"neg": 1, "pos": 1})),
    ("pairs, columns in any order", b"id,label,text_b,text_a\n1,y,b,a\n", ("valid", 1, {"y": 1})),
    ("byte order mark", b"\xef\xbb\xbftext,label\nhi,a\n", ("valid", 1, {"a": 1})),
    ("blanks around header names", b" text , label \nhi,a\n", ("valid", 1, {"a": 1})),
    ("CRLF", b"text,label\r\nhi,a\r\nyo,b\r\n", ("valid", 2, {"a": 1, "b": 1})),
    (
        "blank lines and blank rows",
        b"\n\ntext,label\n\nhi,a\n ,  \nyo,b\n\n",
        ("valid", 2, {"a": 1, "b": 1}),
    ),
    (
        "quoted newline",
        b'text,label\n"two\nlines, and a comma",a\n"she said ""no""",b\n',
        ("valid", 2, {"a": 1, "b": 1}),
    ),
    (
        "bad header",
        b"sentence,class\nhello,greeting\n",
        ("invalid", [(1, HEADER_PROBLEM + "sentence,class", None)]),
    ),
    (
        "bad header after blank lines",
        b"\n \ntext\nhi\n",
        ("invalid", [(3, HEADER_PROBLEM + "text", None)]),
    ),
    (
        "wrong field count",
        b"text,label\nok,a\none,two,three\nalone\nfine,b\n",
        (
            "invalid",
            [
                (3, "has 3 fields but the header has 2", None),
                (4, "has 1 fields but the header has 2", None),
            ],
        ),
    ),
    (
        "wrong field count after a multi-line row",
        b'text,label\n"spans\ntwo lines",a\nx,y,z\n"starts on 5\nends on 6",\n',
        (
            "invalid",
            [(4, "has 3 fields but the header has 2", None), (5, "is empty", "label")],
        ),
    ),
    (
        "quote never closed",
        b'text,label\nok,yes\n"never closed,no\nmore\n',
        (
            "invalid",
            [
                (
                    4,
                    "not valid CSV (unexpected end of data): the quoted field of the row "
                    "that starts on line 3 is never closed",
                    None,
                )
            ],
        ),
    ),
    (
        "text after a closing quote",
        b'text,label\n"closed" then more,a\nok,b\n',
        ("invalid", [(2, "not valid CSV (',' expected after '\"')", None)]),
    ),
    (
        "not UTF-8",
        b"text,label\nbad \xff here,a\nok,b\n\xc3,c\n",
        ("invalid", [(2, "not valid UTF-8 (byte 5)", None), (4, "not valid UTF-8 (byte 1)", None)]),
    ),
    (
        "empty label and text",
        b"text,label\n,a\nhi, \n",
        ("invalid", [(2, "is empty", "text"), (3, "is empty", "label")]),
    ),
    ("header only", b"text,label\n", ("empty",)),
]


def _engine(data: bytes, tmp_path: Path) -> tuple[Any, ...]:
    path = tmp_path / "train.csv"
    path.write_bytes(data)
    try:
        examples = read_examples(path)
    except DataError as exc:
        if not exc.errors:
            assert "has no examples" in exc.message
            return ("empty",)
        return ("invalid", [(e.line, e.message, e.field) for e in exc.errors])
    assert {e.format for e in examples} == {DataFormat.CLASSIFICATION}
    labels = Counter(str(e.record["label"]) for e in examples)
    return ("valid", len(examples), dict(sorted(labels.items())))


def _upload(chunks: list[bytes], tmp_path: Path) -> tuple[Any, ...]:
    settings = make_settings(tmp_path)
    try:
        with ingest_upload(chunks=chunks, settings=settings) as upload:
            assert upload.format is DataFormat.CLASSIFICATION
            assert upload.report["syntax"] == "csv"
            return ("valid", upload.examples, upload.report["label_counts"])
    except InvalidFile as exc:
        if exc.detail == "the file has no examples":
            return ("empty",)
        return ("invalid", [(e.line, e.message, e.field) for e in exc.errors])


@pytest.mark.parametrize("data, verdict", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_engine_and_upload_give_the_same_verdict(
    data: bytes, verdict: tuple[Any, ...], tmp_path: Path
) -> None:
    engine = _engine(data, tmp_path)
    whole = _upload([data], tmp_path)
    in_bits = _upload([data[i : i + 3] for i in range(0, len(data), 3)], tmp_path)

    assert engine == whole == in_bits
    assert engine == verdict
