"""`tuneq admin build-image-model`: a pretrained image model built offline, registered, listed
by `GET /models`; and a running API reading a changed registry file without a restart."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from peft_engine.errors import SpecError
from peft_engine.models import load_registry
from peft_engine.models.registry import ReloadingRegistry, register_model
from tests.api_helpers import deployment
from tests.service_fixtures import TUNEQ_CLI, api_client, auth, cli_env, new_team_key
from tuneq.cli import main
from tuneq.image_model import load_digits, registry_fields

NAME = "digits-test"
OTHER = {"source": {"type": "local", "path": "elsewhere"}, "tasks": ["seq_classification"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The command as an operator runs it, into a registry file that holds another entry."""
    home = tmp_path_factory.mktemp("home")
    registry = home / "operator" / "models.yaml"
    registry.parent.mkdir()
    registry.write_text(yaml.safe_dump({"models": {"other-model": OTHER}}))
    out = home / "built" / NAME
    command = [*TUNEQ_CLI, "admin", "build-image-model", "--name", NAME, "--out", str(out)]
    command += ["--registry", str(registry), "--epochs", "1"]
    done = subprocess.run(
        command, env=cli_env(home), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return {"home": home, "registry": registry, "out": out, "stdout": done.stdout}


def test_the_model_is_a_safetensors_directory_with_a_card(built: dict[str, Any]) -> None:
    out = built["out"]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "samples/digits-5-9-train.zip",
        "samples/digits-5-9-validation.zip",
    }  # no pickled weights
    assert json.loads((out / "config.json").read_text())["model_type"] == "mobilenet_v2"
    card = (out / "README.md").read_text()
    assert "CC BY 4.0" in card and "Alpaydin" in card
    assert re.search(r"held-out images of digits 0-4: accuracy\s+[01]\.\d{3}", card)
    assert not list(out.parent.glob(f".{NAME}.*"))  # the staging directory was renamed


def test_the_command_says_what_it_wrote_and_what_to_run_next(built: dict[str, Any]) -> None:
    stdout = built["stdout"]
    assert f"model     {built['out']}" in stdout
    assert f"registry  {built['registry']}" in stdout
    assert re.search(r"accuracy  [01]\.\d{3} on 180 held-out images", stdout)
    assert "digits-5-9-train.zip" in stdout and "digits-5-9-validation.zip" in stdout
    assert f"tuneq jobs create --model {NAME} --task image_classification" in stdout


def test_the_registry_file_gains_the_entry_and_keeps_the_others(built: dict[str, Any]) -> None:
    written = yaml.safe_load(built["registry"].read_text())
    assert written["models"]["other-model"] == OTHER
    assert written["models"][NAME] == registry_fields(built["out"])
    entry = load_registry(built["registry"]).get(NAME)
    assert (entry.tasks, entry.family, entry.license) == (
        ("image_classification",),
        "mobilenet_v2",
        "CC-BY-4.0",
    )
    assert entry.source.path == built["out"]


def test_the_sample_archives_are_image_folders_of_digits_5_to_9(built: dict[str, Any]) -> None:
    samples = built["out"] / "samples"
    names = {}
    for split in ("train", "validation"):
        with zipfile.ZipFile(samples / f"digits-5-9-{split}.zip") as archive:
            names[split] = archive.namelist()
            first = Image.open(io.BytesIO(archive.read(names[split][0])))
        assert all(re.fullmatch(r"[5-9]/\d{4}\.png", name) for name in names[split])
        assert (first.size, first.mode) == ((32, 32), "L")
    labels = [name.split("/")[0] for name in names["train"]]
    assert {label: labels.count(label) for label in set(labels)} == dict.fromkeys("56789", 20)
    assert not set(names["train"]) & set(names["validation"])
    fives_to_nines = sum(1 for _, digit, _ in load_digits() if digit >= 5)
    assert len(names["train"]) + len(names["validation"]) == fives_to_nines


def test_models_lists_the_built_model_with_its_methods(
    built: dict[str, Any], tmp_path: Path
) -> None:
    with deployment("sqlite", tmp_path / "home", built["registry"]) as settings:
        key = new_team_key(settings, "team-a")
        with api_client(settings) as client:
            response = client.get(f"/models/{NAME}", headers=auth(key))
    assert response.status_code == 200, response.text
    model = response.json()
    assert model["tasks"] == ["image_classification"]
    assert {"head_only", "lora", "full"} <= set(model["support"]["image_classification"])
    assert model["available"] is True
    assert model["max_seq_length"] is None  # images have no context length
    assert model["parameters"] > 100_000


def test_a_running_api_reads_a_changed_registry_file(tmp_path: Path) -> None:
    """No TUNEQ_MODEL_REGISTRY: the file is home/models.yaml, written after the app started."""
    home = tmp_path / "home"
    with deployment("sqlite", home, home / "unused.yaml") as settings:
        settings = settings.model_copy(update={"model_registry": None})
        key = new_team_key(settings, "team-a")
        with api_client(settings) as client:

            def listed() -> set[str]:
                response = client.get("/models", headers=auth(key))
                assert response.status_code == 200, response.text
                return {model["id"] for model in response.json()["data"]}

            def in_job_spec() -> bool:  # the OpenAPI document's `model` enums
                schemas = client.get("/openapi.json").json()["components"]["schemas"]
                return f'"{NAME}"' in json.dumps(schemas)

            assert NAME not in listed() and not in_job_spec()
            register_model(home / "models.yaml", NAME, registry_fields(tmp_path / "model"))
            assert NAME in listed() and in_job_spec()  # the document is built again
            (home / "models.yaml").write_text("models: {Bad Name: {}}\n")  # invalid
            assert NAME in listed()  # the last good registry stays
            (home / "models.yaml").write_text(yaml.safe_dump({"models": {"other": OTHER}}))
            assert "other" in listed() and NAME not in listed()


def test_an_invalid_file_fails_at_start_and_is_only_warned_about_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models: {Bad Name: {}}\n")
    with pytest.raises(SpecError, match="Bad Name"):
        ReloadingRegistry(lambda: path)

    path.write_text(yaml.safe_dump({"models": {"other-model": OTHER}}))
    registry = ReloadingRegistry(lambda: path)
    path.write_text("models: [\n")
    with caplog.at_level(logging.WARNING, logger="peft_engine.models.registry"):
        assert "other-model" in registry
        assert registry.get("other-model").tasks == ("seq_classification",)
    assert len(caplog.records) == 1  # once per change, not once per access
    assert "keeping the models registered before" in caplog.text


def test_a_json_registry_file_stays_json(tmp_path: Path) -> None:
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": {"other-model": OTHER}}))

    register_model(registry, NAME, registry_fields(tmp_path / "model"))
    register_model(registry, NAME, registry_fields(tmp_path / "rebuilt"))  # replaces it

    written = json.loads(registry.read_text())
    assert list(written["models"]) == ["other-model", NAME]
    assert written["models"][NAME]["source"]["path"] == str(tmp_path / "rebuilt")


def test_a_broken_registry_file_stops_the_command_before_it_builds(tmp_path: Path) -> None:
    registry = tmp_path / "models.json"
    registry.write_text('{"models": []}')
    out = tmp_path / "model"

    code = main(["admin", "build-image-model", "--out", str(out), "--registry", str(registry)])

    assert code == 2
    assert not out.exists()
    assert registry.read_text() == '{"models": []}'
