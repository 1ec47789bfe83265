"""The OpenAI-compatible facade: `/openai/v1` for the official `openai` client.

`files` and `fine_tuning/jobs` (with events, checkpoints, cancel, pause, resume) on the
same use cases as the native API (api.openai.routes), OpenAI's objects built from the
native documents (api.openai.objects), OpenAI's create body translated into a job spec
(api.openai.requests), and errors in OpenAI's shape (api.openai.errors).
"""

from __future__ import annotations

from fastapi import FastAPI

from api import problems
from api.openai.errors import openai_error
from api.openai.routes import PREFIX, router


def install(app: FastAPI) -> None:
    """Mount the facade on the app, its errors (FastAPI's own too) in OpenAI's shape."""
    app.include_router(router)
    problems.add_style(app, PREFIX, openai_error)
