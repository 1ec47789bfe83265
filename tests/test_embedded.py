"""`tuneq up` / `tuneq down`: the embedded stack in the background, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from tests.service_fixtures import auth


def _tuneq(home, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEQ_")}
    env |= {"TUNEQ_HOME": str(home)}
    if "TUNEQ_CACHE_DIR" in os.environ:
        env["TUNEQ_CACHE_DIR"] = os.environ["TUNEQ_CACHE_DIR"]
    return subprocess.run(
        [sys.executable, "-m", "tuneq.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_serves_the_api_until_down(tmp_path):
    home = tmp_path / "state"
    up = _tuneq(home, "up")
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
        assert set(pids) == {"api", "worker", "beat"} and all(map(_alive, pids.values()))

        again = _tuneq(home, "up")
        assert again.returncode == 2 and f"already runs at {url}" in again.stderr
    finally:
        down = _tuneq(home, "down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert not any(map(_alive, pids.values()))
    assert (home / "tuneq.db").is_file() and not (home / "run" / "stack.json").exists()
    assert "no tuneq stack is running" in _tuneq(home, "down").stdout
