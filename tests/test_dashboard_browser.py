"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a real
embedded deployment (tests/dashboard_stack.py): what a user sees and does, by keyboard too.

Screenshots of each page are saved under TUNEQ_SCREENSHOTS (default: the test's temporary
directory) for a person to look at.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard_stack import (
    CHATS,
    HOSTILE_LABEL,
    HOSTILE_NAME,
    HOSTILE_NOTE,
    DashboardStack,
    seed_jobs,
    start,
    upload,
)

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = playwright_api.expect


def chromium_path() -> str | None:
    """The browser: TUNEQ_TEST_CHROMIUM, or Chromium/Chrome on PATH."""
    named = os.environ.get("TUNEQ_TEST_CHROMIUM")
    if named:
        return named
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        message = "Chromium not found (apt-get install chromium, or set TUNEQ_TEST_CHROMIUM)"
        if os.environ.get("TUNEQ_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    with playwright_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[DashboardStack]:
    deployment = start(tmp_path_factory.mktemp("dashboard"))
    try:
        deployment.jobs = seed_jobs(deployment)  # type: ignore[attr-defined]
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    named = os.environ.get("TUNEQ_SCREENSHOTS")
    directory = Path(named) if named else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def page(browser, stack) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    tab = context.new_page()
    tab.problems = []  # type: ignore[attr-defined]
    tab.on("pageerror", lambda error: tab.problems.append(str(error)))
    yield tab
    problems = tab.problems
    context.close()
    assert not problems, problems  # no script error on any page


def sign_in(page: Any, stack: DashboardStack, where: str = "") -> None:
    page.goto(f"{stack.url}/{where}")
    page.get_by_label("API key").fill(stack.key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("link", name="Jobs", exact=True)).to_be_visible()


def test_the_key_is_kept_for_the_tab_only_and_forgotten_on_sign_out(page, stack, shots):
    page.goto(f"{stack.url}/")
    page.screenshot(path=shots / "sign-in.png")
    page.get_by_label("API key").fill("tq_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("Key refused")

    sign_in(page, stack)
    expect(page.get_by_role("link", name=stack.jobs["causal_lm"])).to_be_visible()
    assert stack.key not in page.url
    assert page.evaluate("sessionStorage.getItem('tuneq.key')") == stack.key
    assert page.evaluate("Object.keys(localStorage).length") == 0
    assert "tuneq.key" not in page.context.cookies().__repr__()

    other_tab = page.context.new_page()  # sessionStorage is per tab
    other_tab.goto(f"{stack.url}/")
    expect(other_tab.get_by_label("API key")).to_be_visible()
    other_tab.close()

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('tuneq.key')") is None


def test_jobs_list_filters_and_pages(page, stack, shots):
    with stack.api() as api:
        every_job = [job["id"] for job in api.get("/jobs", params={"limit": 100}).json()["data"]]
        llama_jobs = api.get("/jobs", params={"model": "tiny-llama", "status": "succeeded"})
    sign_in(page, stack)
    rows = page.locator("table.jobs tbody tr")
    expect(rows).to_have_count(len(every_job))
    page.screenshot(path=shots / "jobs.png", full_page=True)
    seeded = rows.filter(has_text=stack.jobs["causal_lm"])
    expect(seeded).to_contain_text("succeeded")
    expect(seeded).to_contain_text("100%")
    expect(seeded).to_contain_text("colours")  # its suffix

    page.get_by_label("Model").select_option("tiny-llama")
    page.get_by_label("Status").select_option("succeeded")
    expect(rows).to_have_count(len(llama_jobs.json()["data"]))
    expect(rows.filter(has_text=stack.jobs["causal_lm"])).to_have_count(1)
    page.get_by_label("Status").select_option("failed")
    expect(rows.first).to_contain_text("No jobs match these filters.")
    assert "status=failed" in page.url and "model=tiny-llama" in page.url

    page.goto(f"{stack.url}/#/jobs?limit=2")  # two a page: every job once, newest first
    seen: list[str] = []
    for number in range(1, 100):
        expect(page.get_by_text(f"page {number}")).to_be_visible()
        seen += rows.locator("td a").all_inner_texts()
        if page.get_by_role("button", name="Next").is_disabled():
            break
        page.get_by_role("button", name="Next").click()
    assert seen == every_job
    page.get_by_role("button", name="Previous").click()
    expect(page.get_by_text(f"page {number - 1}")).to_be_visible()


def test_a_finished_jobs_page(page, stack, shots):
    job_id = stack.jobs["seq_classification"]
    with stack.api() as api:
        job = api.get(f"/jobs/{job_id}").json()
        adapter = next(
            a for a in api.get(f"/jobs/{job_id}/artifacts").json()["data"]
            if a["name"] == "adapter.tar.gz"
        )  # fmt: skip
    sign_in(page, stack, f"#/jobs/{job_id}")
    expect(page.get_by_role("heading", name=job_id)).to_be_visible()
    expect(page.locator(".badge").first).to_have_text("succeeded")
    for title in ("Loss", "Learning rate", "Evaluation scores"):  # a drawn line of points
        line = page.locator("figure.chart", has_text=title).locator("path.series").first
        expect(line).to_have_attribute("d", re.compile(r"^M[\d.]+,[\d.]+(L[\d.]+,[\d.]+)+$"))
    expect(page.locator("figure.chart", has_text="Loss")).to_contain_text(
        f"best (step {job['result']['best_step']})"
    )
    expect(page.get_by_role("log")).to_contain_text("job succeeded")
    settings = page.locator("section", has_text="Settings, as resolved")
    expect(settings).to_contain_text(f"{job['hyperparameters']['learning_rate']}")
    estimate = page.locator("section", has_text="Estimate and actual")
    expect(estimate.locator("tr", has_text="steps")).to_contain_text(str(job["result"]["steps"]))
    page.screenshot(path=shots / "job.png", full_page=True)

    with page.expect_download() as downloading:
        page.get_by_role("button", name="Download adapter.tar.gz").click()
    saved = Path(downloading.value.path())
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == adapter["sha256"]
    assert downloading.value.suggested_filename == f"{job_id}-adapter.tar.gz"
    with page.expect_download() as downloading:
        page.get_by_role("button", name="Download step 6").click()
    assert downloading.value.suggested_filename == f"{job_id}-checkpoint-6.tar.gz"


def test_a_finished_jobs_results_per_class_and_confusion_matrix(page, stack, shots):
    job_id = stack.jobs["seq_classification"]
    with stack.api() as api:
        outcome = api.get(f"/jobs/{job_id}/metrics").json()
        validation_examples = api.get(f"/jobs/{job_id}").json()["result"]["validation_examples"]
    labels = outcome["report"]["labels"]  # one is HOSTILE_LABEL: shown as text
    sign_in(page, stack, f"#/jobs/{job_id}")
    results = page.get_by_role("region", name="Results")
    expect(results).to_be_visible()
    kept = outcome["kept"]  # the figures of the weights the adapter holds
    figures = {"Accuracy": f"{kept['accuracy']:.4g}", "Macro-F1": f"{kept['macro_f1']:.4g}",
               "Weights of step": str(outcome["best_step"])}  # fmt: skip
    for term, value in figures.items():
        dt = page.locator("dt", has_text=re.compile(f"^{term}$"))
        expect(results.locator(".kept div", has=dt).locator("dd")).to_have_text(value)

    per_class = results.get_by_role("table", name="Scores per class")
    expect(per_class.locator("tbody tr")).to_have_count(len(labels))
    for label, row in zip(labels, per_class.locator("tbody tr").all(), strict=True):
        expect(row.locator("th")).to_have_text(label)
        expect(row.locator("td").last).to_have_text(
            str(outcome["report"]["per_class"][label]["support"])
        )

    matrix = results.get_by_role("table", name=re.compile("^Confusion matrix"))
    expect(matrix.locator("caption")).to_contain_text("Rows are the true labels, columns the")
    expect(matrix.locator("thead tr").last.locator("th")).to_have_text(["True label", *labels])
    rows = matrix.locator("tbody tr")
    expect(rows.locator("th")).to_have_text(labels)
    counts = [[int(text) for text in row.locator("td").all_inner_texts()] for row in rows.all()]
    assert counts == outcome["report"]["confusion_matrix"]
    assert sum(map(sum, counts)) == validation_examples  # every validation example, once
    for i, row in enumerate(rows.all()):  # the diagonal marked, and only it
        marked = row.locator("td").evaluate_all("cells => cells.map(c => c.matches('.diagonal'))")
        assert marked == [j == i for j in range(len(labels))]
    page.locator(".slot-results").screenshot(path=shots / "job-results.png")

    ner_id = stack.jobs["token_classification"]  # NER: scores per entity type
    with stack.api() as api:
        types = list(api.get(f"/jobs/{ner_id}/metrics").json()["report"]["per_type"])
    page.goto(f"{stack.url}/#/jobs/{ner_id}")
    per_type = page.get_by_role("table", name=re.compile("^Scores per entity type"))
    expect(per_type.locator("tbody th")).to_have_text(types)
    expect(page.locator("table.confusion")).to_have_count(0)
    page.goto(f"{stack.url}/#/jobs/{stack.jobs['causal_lm']}")  # a causal LM: its figures alone
    kept = page.get_by_role("region", name="Results").locator(".kept")
    expect(kept).to_contain_text("Perplexity")
    expect(page.locator("section.results table")).to_have_count(0)


def test_a_failed_jobs_page_shows_its_error_and_code_and_it_can_be_deleted(page, stack):
    sign_in(page, stack, f"#/jobs/{stack.jobs['failed']}")
    expect(page.locator(".slot-head .badge")).to_have_text("failed")
    error = page.locator(".slot-error").get_by_role("alert")
    expect(error).to_contain_text("internal_error")
    expect(error).to_contain_text("RuntimeError: injected fault at step 1")
    expect(error).to_contain_text("attempt 1 of 1, the last, ended")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.locator(".slot-tryit")).to_contain_text("no adapter or checkpoint")
    expect(page.locator("section.results")).to_have_count(0)  # no result, nothing to show
    page.goto(f"{stack.url}/#/jobs?status=failed")
    expect(page.locator("table.jobs tbody tr")).to_have_count(1)

    page.get_by_role("link", name=stack.jobs["failed"]).click()  # a finished job can go
    page.once("dialog", lambda dialog: dialog.accept())  # "Delete ...? cannot be undone"
    page.get_by_role("button", name="Delete").click()
    expect(page.locator("table.jobs")).to_be_visible()
    expect(page.get_by_role("link", name=stack.jobs["failed"])).to_have_count(0)
    with stack.api() as api:
        assert api.get(f"/jobs/{stack.jobs['failed']}").status_code == 404


def test_a_running_job_appears_moves_and_is_cancelled_from_its_page(page, stack, shots):
    sign_in(page, stack)  # the list is open before the job exists
    with stack.api() as api:
        # 144 chats to train on, 100 epochs of batch 1: 14,400 steps, far more than the test
        # lasts on any machine, so the job is still running when it is cancelled.
        training_file = upload(api, "many-chats.jsonl", CHATS * 8)
        created = api.post("/jobs", json={
            "model": "tiny-llama", "task": "causal_lm", "training_file": training_file,
            "validation_split": 0.25, "suffix": "long-one",
            "hyperparameters": {"n_epochs": 100, "batch_size": 1, "eval_every_steps": 100,
                                "checkpoint_every_steps": 5000},
        })  # fmt: skip
        created.raise_for_status()
        job_id = created.json()["id"]
    row = page.locator("table.jobs tbody tr", has_text=job_id)
    expect(row).to_be_visible(timeout=30_000)  # it appears, with no reload
    expect(row).to_contain_text("running", timeout=120_000)
    expect(row).to_contain_text("ETA", timeout=60_000)
    percent = row.locator(".progress-cell .muted")
    seen = percent.inner_text()
    expect(percent).not_to_have_text(seen, timeout=60_000)  # its progress moves

    row.get_by_role("link", name=job_id).click()
    badge = page.locator(".slot-head .badge")
    expect(badge).to_have_text("running")
    step = page.locator(".facts div", has_text="Step").locator("dd")
    expect(step).not_to_have_text("–", timeout=60_000)
    seen = step.inner_text()
    expect(step).not_to_have_text(seen, timeout=60_000)  # moved on, with no reload
    loss = page.locator("figure.chart", has_text="Loss").locator("path.series").first
    expect(loss).to_have_attribute("d", re.compile(r"L"))
    drawn = loss.get_attribute("d")
    expect(loss).not_to_have_attribute("d", drawn, timeout=60_000)  # the curve gains points
    expect(page.locator("section.results")).to_have_count(0)  # results come when it has finished
    page.screenshot(path=shots / "job-running.png", full_page=True)

    page.get_by_role("button", name="Pause").click()  # kept as a checkpoint, then resumed
    expect(badge).to_have_text("paused", timeout=60_000)
    expect(page.get_by_role("button", name="Pause")).to_have_count(0)
    page.get_by_role("button", name="Resume").click()
    expect(badge).to_have_text("running", timeout=120_000)
    page.get_by_role("button", name="Cancel").click()
    expect(badge).to_have_text("cancelled", timeout=60_000)
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)


def test_without_the_event_stream_the_page_polls(page, stack):
    # A proxy that drops Server-Sent Events: the stream answers 404, the page reads the
    # events page by page instead.
    page.route("**/events/stream*", lambda route: route.fulfill(
        status=404, content_type="application/problem+json",
        body='{"title": "Not Found", "status": 404, "code": "not_found", "detail": "no stream"}',
    ))  # fmt: skip
    sign_in(page, stack, f"#/jobs/{stack.jobs['causal_lm']}")
    log = page.get_by_role("log")
    expect(log).to_contain_text("job succeeded")
    expect(log).to_contain_text("eval (base model)")


def test_compare_overlays_the_picked_jobs_curves(page, stack, shots):
    sign_in(page, stack)
    for task in ("causal_lm", "token_classification"):
        page.get_by_label(f"select {stack.jobs[task]} to compare").check()
    page.get_by_role("link", name="Compare selected (2)").click()
    chart = page.locator(".compare-chart figure.chart")
    expect(chart.locator("path.series")).to_have_count(2)
    for task in ("causal_lm", "token_classification"):
        expect(chart.locator(".legend")).to_contain_text(stack.jobs[task])
    page.get_by_label("Curve").select_option("train_loss")
    expect(chart.locator("figcaption")).to_have_text("train loss")
    page.screenshot(path=shots / "compare.png", full_page=True)


def test_an_upload_is_refused_with_its_line_numbers_or_listed(page, stack, tmp_path, shots):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": \n{"text": "x"}\n')
    good = tmp_path / "more-reviews.jsonl"
    good.write_text('{"text": "good", "label": "positive"}\n{"text": "bad", "label": "negative"}\n')
    sign_in(page, stack, "#/files")
    page.get_by_label("File").set_input_files(bad)
    page.get_by_role("button", name="Upload").click()
    refusal = page.get_by_role("alert")
    expect(refusal).to_contain_text("broken.jsonl was refused")
    expect(refusal).to_contain_text("line 2")
    page.screenshot(path=shots / "files-refused.png", full_page=True)

    page.get_by_label("File").set_input_files(good)
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_role("status")).to_contain_text("more-reviews.jsonl accepted")
    expect(page.locator("table tbody tr").first).to_contain_text("more-reviews.jsonl")


def test_a_new_job_is_estimated_then_started_from_the_form(page, stack, shots):
    sign_in(page, stack, "#/new")
    page.get_by_label("Model").select_option("tiny-bert")
    page.get_by_label("Task").select_option("seq_classification")
    expect(page.get_by_label("Method", exact=True)).to_have_value("lora")
    option = page.locator("#job-training-file option", has_text=re.compile(r"^reviews\.jsonl"))
    page.get_by_label("Training file").select_option(option.get_attribute("value"))
    page.get_by_label("Epochs").fill("2")
    page.get_by_role("button", name="Estimate (dry run)").click()
    estimate = page.get_by_role("region", name="Estimate")
    expect(estimate).to_contain_text("Steps")
    expect(estimate.locator("div", has_text="Epochs").locator("dd").first).to_have_text("2")
    page.screenshot(path=shots / "new-job.png", full_page=True)

    page.get_by_label("Learning rate").fill("-1")
    page.get_by_role("button", name="Start job").click()
    expect(page.get_by_role("alert")).to_contain_text("learning_rate")  # the field at fault

    page.get_by_label("Learning rate").fill("auto")
    page.get_by_role("button", name="Start job").click()
    badge = page.locator(".slot-head .badge")
    expect(badge).to_have_text(re.compile("succeeded|failed"), timeout=180_000)
    assert badge.inner_text() == "succeeded", page.locator(".slot-error").inner_text()
    assert "#/jobs/job-" in page.url


@pytest.mark.parametrize(
    ("task", "typed", "button", "answer"),
    [
        ("seq_classification", "the film was great", "Classify", ".answer .label"),
        ("token_classification", "alice visited paris", "Tag", ".answer .tags li"),
        ("causal_lm", "say red", "Send", ".chat-assistant"),
        ("prompted", "say red:", "Continue", ".answer .continued strong"),  # no chat template
    ],
)
def test_try_it_asks_a_worker(page, stack, shots, task, typed, button, answer):
    sign_in(page, stack, f"#/jobs/{stack.jobs[task]}")
    page.locator("#try-input").fill(typed)
    page.get_by_role("button", name=button, exact=True).click()
    expect(page.locator(answer).first).to_be_visible(timeout=120_000)
    if task == "token_classification":
        expect(page.locator(".answer .tags li")).to_have_count(3)
    if task == "causal_lm":
        expect(page.locator(".chat-user")).to_contain_text(typed)
    page.locator(".slot-tryit").screenshot(path=shots / f"try-{task}.png")


def test_text_from_files_and_jobs_is_shown_as_text_never_run(page, stack):
    sign_in(page, stack, "#/files")
    expect(page.locator("table tbody th", has_text=HOSTILE_NAME)).to_be_visible()  # a name
    reviews = page.get_by_role("row", name=re.compile(r"^reviews\.jsonl"))
    reviews.get_by_text("report").click()
    expect(reviews.locator(".report")).to_contain_text(HOSTILE_LABEL)  # a label, from content
    page.goto(f"{stack.url}/#/new")
    expect(page.locator("#job-training-file")).to_contain_text(HOSTILE_NAME)

    page.goto(f"{stack.url}/#/jobs/{stack.jobs['token_classification']}")
    expect(page.locator(".facts")).to_contain_text(f"note: {HOSTILE_NOTE}")  # metadata
    page.goto(f"{stack.url}/#/jobs/{stack.jobs['seq_classification']}")
    page.locator("#try-input").fill("the plot was awful")
    page.get_by_role("button", name="Classify", exact=True).click()
    expect(page.locator(".answer .scores")).to_contain_text(HOSTILE_LABEL)  # the model's label

    assert page.evaluate("window.__xss") is None
    assert page.locator("img, script:not([src])").count() == 0  # none was made an element


def test_another_teams_key_sees_none_of_it(page, stack):
    other = stack.other_team_key("someone-else")
    page.goto(f"{stack.url}/")
    page.get_by_label("API key").fill(other)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("table.jobs tbody")).to_contain_text("No jobs yet.")
    page.goto(f"{stack.url}/#/files")
    expect(page.locator("table tbody")).to_contain_text("No files yet.")
    page.goto(f"{stack.url}/#/new")
    expect(page.get_by_text("Upload a training file first")).to_be_visible()
    page.goto(f"{stack.url}/#/jobs/{stack.jobs['causal_lm']}")  # the address of another's job
    expect(page.get_by_role("alert")).to_contain_text("not found", ignore_case=True)
    expect(page.get_by_role("heading", name=stack.jobs["causal_lm"])).to_have_count(0)


def tab_to(page: Any, target: Any, most: int = 40) -> None:
    """Press Tab until `target` has the focus, as a keyboard user does."""
    for _ in range(most):
        page.keyboard.press("Tab")
        if target.evaluate("element => element === document.activeElement"):
            return
    raise AssertionError(f"{target} never took the focus in {most} presses of Tab")


def test_it_works_without_a_mouse(page, stack):
    page.goto(f"{stack.url}/")
    expect(page.get_by_label("API key")).to_be_focused()  # the sign-in form takes the focus
    page.keyboard.type(stack.key)
    page.keyboard.press("Enter")
    link = page.get_by_role("link", name=stack.jobs["causal_lm"])
    expect(link).to_be_visible()
    expect(page.locator("main")).to_be_focused()  # the new page's content has the focus
    tab_to(page, link)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name=stack.jobs["causal_lm"])).to_be_visible()
    tab_to(page, page.get_by_role("button", name="Send"))  # the try-it box, by keyboard

    page.reload()  # a fresh page: the skip link comes first, and leads past the navigation
    page.keyboard.press("Tab")
    expect(page.locator(".skip")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()


def test_readable_on_a_phone(browser, stack, shots):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    try:
        sign_in(page, stack)
        expect(page.get_by_role("link", name=stack.jobs["causal_lm"])).to_be_visible()
        page.screenshot(path=shots / "phone-jobs.png", full_page=True)
        page.goto(f"{stack.url}/#/jobs/{stack.jobs['causal_lm']}")
        expect(page.locator("figure.chart").first).to_be_visible()
        page.screenshot(path=shots / "phone-job.png", full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.goto(f"{stack.url}/#/jobs/{stack.jobs['seq_classification']}")
        expect(page.locator("table.confusion")).to_be_visible()  # wide tables scroll in place
        page.locator(".slot-results").screenshot(path=shots / "phone-job-results.png")
        # nothing wider than the screen: no sideways scrolling of the page itself
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()
