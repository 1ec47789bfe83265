"""Progress output: a redrawn bar on a terminal, plain lines in a log."""

from __future__ import annotations

import io

from peft_engine.hooks import Event
from peft_engine.progress import ConsoleProgress, format_duration


def _step(step, total=4):
    return {
        "train_loss": 2.5 - step / 10,
        "learning_rate": 1e-4,
        "tokens_per_second": 120.0,
        "total_steps": total,
        "eta_seconds": 75.0 * (total - step),
        "grad_norm": 1.0,
    }


def test_terminal_gets_one_redrawn_bar_with_loss_rate_and_eta():
    stream = io.StringIO()
    progress = ConsoleProgress(stream, live=True)
    progress.on_metrics(1, _step(1))
    progress.on_metrics(2, _step(2))
    progress.on_event(Event("info", "eval (step 2): loss 2.1"))
    text = stream.getvalue()
    assert text.count("\r\033[K") == 3  # two bar draws, one erase before the event line
    assert "step 2/4 loss 2.3000" in text and "120 tok/s" in text and "ETA 2m30s" in text
    assert "50%" in text
    assert text.endswith("eval (step 2): loss 2.1\n")


def test_an_image_job_counts_its_rate_in_images():
    stream = io.StringIO()
    progress = ConsoleProgress(stream, live=False)
    progress.on_event(Event("info", "100 training examples (5 labels)", {"unit": "images"}))
    progress.on_metrics(1, _step(1))
    assert "120 img/s" in stream.getvalue() and "tok/s" not in stream.getvalue()


def test_log_gets_plain_lines_without_control_characters():
    stream = io.StringIO()
    progress = ConsoleProgress(stream, live=False)
    for step in range(1, 5):
        progress.on_metrics(step, _step(step))
    progress.on_event(Event("warning", "3 examples were truncated"))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\033" not in stream.getvalue()
    assert lines[0].startswith("step 1/4 loss") and lines[-2].startswith("step 4/4 loss")
    assert lines[-1] == "warning: 3 examples were truncated"


def test_eval_metrics_do_not_redraw_the_bar():
    stream = io.StringIO()
    ConsoleProgress(stream, live=True).on_metrics(3, {"eval_loss": 1.0})
    assert stream.getvalue() == ""


def test_durations_read_naturally():
    assert [format_duration(s) for s in (5, 75, 3600 + 120)] == ["5s", "1m15s", "1h02m"]
