"""A NUL character anywhere in a request (path, query, JSON body) on PostgreSQL, which can
neither store nor compare one: a 4xx naming the cause, never a 500, nothing written.

Found by schemathesis (tests/test_openapi_contract.py runs on SQLite, which takes NUL)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tests.api_helpers import TRAIN_ROWS, deployed_api, upload
from tests.service_fixtures import auth
from tuneq.models import ApiKey, AuditRecord, Job, WebhookEndpoint

NUL_REQUESTS = [
    ("GET", "/jobs?after=%00", {}),
    ("GET", "/jobs?status=%00", {}),
    ("GET", "/jobs?model=%00", {}),
    ("GET", "/jobs?metadata[a]=%00", {}),
    ("GET", "/jobs/%00", {}),
    ("GET", "/jobs/%00/events", {}),
    ("GET", "/files?after=%00", {}),
    ("GET", "/files/%00", {}),
    ("GET", "/webhooks/%00", {}),
    ("GET", "/keys?after=%00", {}),
    ("DELETE", "/keys/%00", {}),
    ("GET", "/openai/v1/fine_tuning/jobs/%00", {}),
    ("POST", "/jobs", {"json": {"model": "tiny-llama", "training_file": "file-\x00"}}),
    ("POST", "/keys", {"json": {"name": "a\x00"}}),
    (
        "POST",
        "/webhooks",
        {"json": {"url": "https://8.8.8.8/", "events": ["job.failed"], "description": "\x00"}},
    ),
]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_registry_file):
    home = tmp_path_factory.mktemp("nul")
    with deployed_api("postgresql", home, tiny_registry_file, "t") as api:
        upload(api.client, api.keys[0], TRAIN_ROWS)
        yield api


@pytest.mark.parametrize(("method", "url", "kwargs"), NUL_REQUESTS, ids=lambda v: str(v)[:40])
def test_a_nul_character_is_refused_not_a_server_error(deployed, method, url, kwargs):
    tables = (Job, ApiKey, WebhookEndpoint, AuditRecord)

    def counts():
        with deployed.engine.connect() as connection:
            return [connection.scalar(select(func.count()).select_from(t)) for t in tables]

    before = counts()
    response = deployed.client.request(method, url, headers=auth(deployed.keys[0]), **kwargs)
    assert 400 <= response.status_code < 500, response.text
    if not url.startswith("/openai/"):
        assert response.headers["content-type"].startswith("application/problem+json")
    assert counts() == before
