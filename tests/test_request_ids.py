"""Every response names its request in `X-Request-ID` (successes, problem+json errors,
404s, a 500), a sane incoming id is kept and a hostile one replaced, and the log lines
written while a request is handled carry its id: in the route's worker thread, and in a
real `tuneq api` process's access log."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api_helpers import assert_problem
from tests.service_fixtures import api_client, auth, make_settings, migrate, new_team_key
from tests.test_api_jobs import REPO, _free_port, _server_env, _wait_healthy
from tuneq.logs import RequestIdFilter

log = logging.getLogger("tests.request_ids")


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[tuple[TestClient, str]]:
    settings = make_settings(tmp_path_factory.mktemp("request-ids"))
    migrate(settings)
    key = new_team_key(settings, "search")
    with api_client(settings) as client:
        yield client, key


def _boom() -> None:
    raise RuntimeError("a bug")


def _logs_a_line() -> dict[str, str]:
    log.warning("inside the route")  # a plain def: FastAPI runs it in a worker thread
    return {}


@pytest.fixture(scope="module")
def app_with_test_routes(tmp_path_factory) -> Iterator[TestClient]:
    """The real app plus two routes of the test's own: one that fails, one that logs."""
    from api.app import create_app

    settings = make_settings(tmp_path_factory.mktemp("request-ids-routes"))
    migrate(settings)
    app = create_app(settings)
    app.add_api_route("/test/boom", _boom)
    app.add_api_route("/test/log", _logs_a_line)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _made_here(request_id: str) -> bool:
    return request_id.startswith("req-") and len(request_id) == 30


def test_every_kind_of_response_names_its_request(client, app_with_test_routes):
    http, key = client
    answers = {
        "success": http.get("/files", headers=auth(key)),
        "problem": http.get("/files/file-missing", headers=auth(key)),
        "unauthorized": http.get("/files"),
        "invalid": http.get("/files", headers=auth(key), params={"limit": 0}),
        "no route": http.get("/no/such/route"),
        "wrong method": http.put("/files", headers=auth(key)),
        "server error": app_with_test_routes.get("/test/boom"),
    }

    assert answers["success"].status_code == 200
    for name, status in [("problem", 404), ("unauthorized", 401), ("invalid", 422)]:
        assert_problem(answers[name], status)
    assert (answers["no route"].status_code, answers["wrong method"].status_code) == (404, 405)
    assert answers["server error"].status_code == 500
    ids = [response.headers.get("x-request-id", "") for response in answers.values()]
    assert all(map(_made_here, ids)), dict(zip(answers, ids, strict=True))
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    "incoming",
    ["trace-7f3a", "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0", "Root=1-5e1b:a/b+c_d.e", "x" * 64],
)
def test_a_sane_incoming_id_is_echoed(client, incoming):
    http, key = client
    response = http.get("/files", headers=auth(key) | {"X-Request-ID": incoming})

    assert response.headers["x-request-id"] == incoming


@pytest.mark.parametrize(
    "hostile",
    ["x" * 65, "a\nb", "a\r\nSet-Cookie: s=1", "two words", "<script>", "", "naïve"],
)
def test_a_hostile_incoming_id_is_replaced(client, hostile):
    http, key = client
    headers = {**auth(key), "X-Request-ID": hostile.encode()}  # the bytes as sent
    response = http.get("/files", headers=headers)

    assert _made_here(response.headers["x-request-id"])
    assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]
    assert "set-cookie" not in response.headers


def test_a_line_logged_in_the_routes_thread_names_its_request(app_with_test_routes, caplog):
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.WARNING, logger=log.name):
        response = app_with_test_routes.get("/test/log", headers={"X-Request-ID": "trace-42"})
        log.warning("outside any request")

    assert response.headers["x-request-id"] == "trace-42"
    ids = {r.getMessage(): r.request_id for r in caplog.records if r.name == log.name}
    assert ids == {"inside the route": "trace-42", "outside any request": "-"}


def test_a_real_api_process_logs_the_request_id_on_each_line(tmp_path: Path):
    settings = make_settings(tmp_path / "home")
    migrate(settings)
    key = new_team_key(settings, "search")
    port, log_path = _free_port(), tmp_path / "api.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tuneq.cli", "api", "--port", str(port)],
            cwd=REPO,
            env=_server_env(settings),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url)
        kept = httpx.get(f"{url}/files", headers=auth(key) | {"X-Request-ID": "trace-77"})
        made = httpx.get(f"{url}/no/such/route")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)

    lines = log_path.read_text().splitlines()
    assert kept.headers["x-request-id"] == "trace-77"
    for request_id, request_line in [
        ("trace-77", '"GET /files HTTP/1.1" 200'),
        (made.headers["x-request-id"], '"GET /no/such/route HTTP/1.1" 404'),
    ]:
        assert any(f"[{request_id}]" in line and request_line in line for line in lines), lines
    assert key not in log_path.read_text()
