"""The control plane: `create_app(settings)` builds the FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import (
    dashboard,
    limits,
    metrics,
    openai,
    openapi_docs,
    problems,
    ratelimit,
    request_ids,
)
from api.deps import Reads
from api.job_reads import open_job_reads
from api.routes import audit, files, health, job_events, jobs, keys, models, quota, webhooks
from peft_engine.models.registry import ReloadingRegistry
from tuneq import __version__, faults
from tuneq.db import make_engine, make_sessionmaker
from tuneq.queue import inference_results, make_celery
from tuneq.settings import Settings
from tuneq.storage import open_store
from tuneq.teams.service import VerifiedKeys


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.faults is not None:  # the fault tests' hooks (tuneq/faults.py)
            faults.arm(settings.faults)
        engine = make_engine(settings.resolved_database_url)
        app.state.settings = settings
        app.state.sessions = make_sessionmaker(engine)
        app.state.reads = Reads.for_engine(engine)
        app.state.job_reads = open_job_reads(
            engine,
            read_connections=settings.database_read_connections,
            statement_cache_size=settings.database_statement_cache,
        )
        app.state.verified_keys = VerifiedKeys(settings.api_key_cache_seconds)
        app.state.store = open_store(settings)
        # read again when the operator changes the file: no restart to offer a new model
        app.state.registry = ReloadingRegistry(lambda: settings.resolved_model_registry)
        app.state.celery = make_celery(settings)
        app.state.inference_results = inference_results(app.state.celery, settings)
        try:
            yield
        finally:
            await app.state.job_reads.close()
            engine.dispose()

    app = FastAPI(
        title="tuneq",
        version=__version__,
        summary="Fine-tuning jobs on your own GPUs: upload data, train adapters, download them.",
        lifespan=lifespan,
    )
    problems.install(app)
    request_ids.install(app)  # around everything: every response (a 500 too) names its id
    openapi_docs.install(app, settings)  # the document's errors and the statuses of every layer
    limits.install(app, settings)  # a body over the cap: 413 before it is read whole
    ratelimit.install(app, settings)  # a token bucket per API key: 429 past it
    metrics.install(app)
    # Routes are matched in order: the jobs routes, which clients poll, are tried first.
    for module in (jobs, job_events, files, models, webhooks, keys, audit, quota, health):
        app.include_router(module.router)
    openai.install(app)  # the OpenAI-compatible facade, under /openai/v1
    dashboard.install(app)  # the page at /, its files under /ui/
    return app
