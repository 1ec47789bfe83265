"""The `tuneq` console script and the operational endpoints, as an operator uses them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service_fixtures import api_client, auth, make_settings, run_cli


def test_migrate_then_team_and_key_work_against_the_api(tmp_path):
    home = tmp_path / "home"
    migrated = run_cli(home, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert run_cli(home, "migrate").returncode == 0  # running it again changes nothing

    team = run_cli(home, "admin", "create-team", "search")
    assert team.returncode == 0, team.stderr
    created = run_cli(home, "admin", "create-key", "--team", "search")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]  # the key alone on the last line
    assert key.startswith("tq_") and " " not in key

    with api_client(make_settings(home)) as client:
        assert client.get("/files", headers=auth(key)).status_code == 200
        assert client.get("/files", headers=auth(key + "x")).status_code == 401

    # the key itself is nowhere in the database, only its hash
    assert key.encode() not in (home / "tuneq.db").read_bytes()


def test_admin_errors_are_one_line_and_exit_2(tmp_path):
    home = tmp_path / "home"
    assert run_cli(home, "migrate").returncode == 0
    assert run_cli(home, "admin", "create-team", "search").returncode == 0
    again = run_cli(home, "admin", "create-team", "search")
    assert again.returncode == 2 and again.stderr.strip() == "error: team 'search' already exists"
    missing = run_cli(home, "admin", "create-key", "--team", "nobody")
    assert missing.returncode == 2 and missing.stderr.strip() == "error: no team named 'nobody'"


def test_health_readiness_and_prometheus(tmp_path):
    settings = make_settings(tmp_path / "home")
    assert run_cli(settings.home, "migrate").returncode == 0
    with api_client(settings) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}
        metrics = client.get("/metrics").text
        assert 'tuneq_jobs{state="queued"} 0.0' in metrics
        assert "tuneq_http_requests_total" in metrics

    # a broker nobody listens on: not ready, and the answer says which part failed
    broken = make_settings(tmp_path / "home", broker_url="redis://127.0.0.1:1/0")
    with api_client(broken) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["database"] == "ok" and checks["store"] == "ok"
        assert checks["broker"].startswith("error:")


def test_readme_lists_every_setting_with_its_default():
    from tuneq.settings import Settings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        default = "—" if field.default is None else f"`{field.default}`"
        row = f"| `TUNEQ_{name.upper()}` | {default} | {field.description} |"
        assert row in readme, f"README's configuration table lacks or misstates: {row}"


NO_TORCH_IN_API = r"""
import json, sys
from pathlib import Path
from tests.service_fixtures import (
    api_client, auth, chat_file, make_settings, migrate, new_team_key
)

home, registry = Path(sys.argv[1]), sys.argv[2]
settings = make_settings(home, model_registry=registry)
migrate(settings)
key = new_team_key(settings, "no-torch")
body = chat_file(8)
with api_client(settings) as client:
    uploaded = client.post("/files", headers=auth(key), files={"file": ("t.jsonl", body)})
    file_id = uploaded.json()["id"]
    spec = {"model": "tiny-llama", "training_file": file_id}
    assert client.post("/jobs?dry_run=true", headers=auth(key), json=spec).status_code == 200
    assert client.post("/jobs", headers=auth(key), json=spec).status_code == 201
    assert client.get("/models", headers=auth(key)).status_code == 200
heavy = ("torch", "transformers.modeling_utils", "peft")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def test_the_api_never_imports_torch(tmp_path, tiny_registry_file):
    # In a fresh interpreter: the test process itself has torch loaded by other tests.
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_IN_API, str(tmp_path / "home"), str(tiny_registry_file)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
