"""`tuneq up` / `tuneq down`: the embedded stack in the background, as a user runs it."""

from __future__ import annotations

import json

import httpx

from tests.service_fixtures import auth, pid_alive, run_cli


def test_up_serves_the_api_until_down(tmp_path):
    home = tmp_path / "state"
    up = run_cli(home, "up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        lines = dict(
            line.split("=", 1) for line in up.stdout.splitlines() if line.startswith("TUNEQ_")
        )
        url, key = lines["TUNEQ_URL"], lines["TUNEQ_API_KEY"]
        assert url.startswith("http://127.0.0.1:") and key.startswith("tq_")
        assert f"{url}/docs" in up.stdout

        assert httpx.get(f"{url}/readyz").status_code == 200  # `up` returned once ready
        assert httpx.get(f"{url}/jobs", headers=auth(key)).json()["data"] == []
        pids = json.loads((home / "run" / "stack.json").read_text())["pids"]
        assert set(pids) == {"api", "worker", "beat"} and all(map(pid_alive, pids.values()))

        again = run_cli(home, "up")
        assert again.returncode == 2 and f"already runs at {url}" in again.stderr
    finally:
        down = run_cli(home, "down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert not any(map(pid_alive, pids.values()))
    assert (home / "tuneq.db").is_file() and not (home / "run" / "stack.json").exists()
    assert "no tuneq stack is running" in run_cli(home, "down").stdout
