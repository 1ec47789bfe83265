"""The dashboard as the API serves it: the page, its files, their headers, and what the
page may load (its own files only: no CDN, no build step). The page's behaviour in a browser
is tests/test_dashboard_browser.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from api.dashboard import STATIC
from tests.service_fixtures import api_client, make_settings, migrate, new_team_key

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(STATIC.rglob("*.js"))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("dashboard"))
    migrate(settings)
    with api_client(settings) as api:
        api.key = new_team_key(settings, "ui")
        yield api


def test_the_page_is_served_at_the_root_with_a_strict_content_policy(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="/ui/app.js">' in page.text
    assert "<script>" not in page.text  # nothing inline: the policy would refuse it

    script = client.get("/ui/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.headers["content-security-policy"] == policy
    assert client.get("/ui/pages/job.js").status_code == 200
    assert client.get("/ui/no-such.js").status_code == 404
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/"


def test_the_page_needs_no_key_to_load_but_the_api_still_does(client):
    assert client.get("/").status_code == 200
    assert client.get("/jobs").status_code == 401
    assert client.get("/jobs", headers={"Authorization": f"Bearer {client.key}"}).status_code == 200


def test_the_page_is_not_part_of_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/ui") for p in paths)


def test_every_module_the_page_imports_is_one_of_its_files():
    for script in SCRIPTS:
        for target in re.findall(r'from\s+"(\.{1,2}/[^"]+)"', script.read_text()):
            assert (script.parent / target).resolve().is_file(), f"{script.name} imports {target}"


def test_the_page_loads_nothing_from_another_origin():
    # The only absolute URL allowed is SVG's namespace name, which is never fetched.
    allowed = {"http://www.w3.org/2000/svg"}
    for path in STATIC.rglob("*"):
        if path.is_file():
            urls = set(re.findall(r"https?://[^\s\"')]+", path.read_text())) - allowed
            assert not urls, f"{path.name} names {urls}"


def test_the_page_never_writes_html_from_strings():
    # Text from jobs and files goes in as text: no innerHTML, outerHTML, insertAdjacentHTML,
    # document.write or eval anywhere in the page's code.
    for script in SCRIPTS:
        code = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in code, f"{script.name} uses {sink}"


def test_every_file_of_the_page_is_in_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["api.dashboard"]
    for path in STATIC.rglob("*"):
        if path.is_file():
            name = path.relative_to(STATIC.parent).as_posix()
            assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} is not packaged"
