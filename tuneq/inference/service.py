"""Trying a job's trained weights: `POST /jobs/{id}/generate`, answered by a worker.

The API never loads a model. It checks the request against the job (the team's, with an
adapter or the checkpoint asked for, an input its task takes and within the limits), sends
it to the job's inference queue (tuneq.queue) and waits for the answer without holding a
thread: first for a worker to take the request (`generate_wait_seconds`: all busy, or none
listening, is a 503), then for its answer (`generate_timeout_seconds`). A request not taken
in time expires in the queue, so a worker freed later never answers a client that left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery, states
from celery.backends.base import Backend
from celery.result import AsyncResult
from sqlalchemy.orm import Session, sessionmaker

from tuneq.errors import (
    AdapterNotReady,
    ErrorItem,
    InferenceUnavailable,
    InvalidRequest,
    TuneqError,
    field_error,
)
from tuneq.inference.schemas import (
    GENERATION,
    INPUT_MEMBERS,
    TASK_INPUTS,
    GenerateRequest,
    InferenceReply,
    InferenceRequest,
)
from tuneq.jobs.models import Job, JobArtifact
from tuneq.jobs.schemas import ADAPTER_ARTIFACT, checkpoint_artifact_name
from tuneq.jobs.service import get_job, list_checkpoints, newest_artifact
from tuneq.jobs.states import TERMINAL
from tuneq.queue import inference_queue, send_generate
from tuneq.settings import Settings
from tuneq.teams.models import Team

log = logging.getLogger(__name__)

_FIRST_POLL_SECONDS, _MAX_POLL_SECONDS = 0.02, 0.25


@dataclass(frozen=True)
class PlannedGeneration:
    """A request checked against its job: where it goes and what the worker is asked."""

    job_id: str
    checkpoint: int | None
    queue: str
    request: InferenceRequest


async def generate(
    *,
    sessions: sessionmaker[Session],
    broker: Celery,
    results: Backend,
    settings: Settings,
    team: Team,
    job_id: str,
    body: GenerateRequest,
) -> Any:
    """The job's answer to `body` (a tuneq.inference.schemas.Generation), from a worker."""

    def plan() -> PlannedGeneration:
        with sessions() as db:
            return plan_generation(db=db, settings=settings, team=team, job_id=job_id, body=body)

    planned = await asyncio.to_thread(plan)
    result = await asyncio.to_thread(
        send_generate,
        broker,
        results,
        planned.request.model_dump(mode="json"),
        queue=planned.queue,
        expires=settings.generate_wait_seconds,
    )
    try:
        reply = await wait_for_reply(result, settings=settings, queue=planned.queue)
    finally:
        await asyncio.to_thread(_forget, result)
    if reply.error is not None:
        error = reply.error
        items = [ErrorItem(error.message, field=error.param)] if error.param else []
        detail = f"{error.param}: {error.message}" if error.param else error.message
        raise InvalidRequest(detail, errors=items, param=error.param)
    envelope = {"job_id": planned.job_id, "checkpoint": planned.checkpoint}
    return GENERATION.validate_python({**envelope, **(reply.answer or {})})


def plan_generation(
    *, db: Session, settings: Settings, team: Team, job_id: str, body: GenerateRequest
) -> PlannedGeneration:
    """The request checked against the team's job: its trained weights, then its input."""
    job = get_job(db=db, team=team, job_id=job_id)
    artifact = _artifact(db, job, body.checkpoint)
    inputs = _inputs(job.task, body, settings)
    request = InferenceRequest(
        job_id=job.id,
        artifact=artifact.name,
        max_new_tokens=body.max_new_tokens or settings.generate_max_new_tokens,
        max_input_tokens=settings.generate_max_input_tokens,
        **inputs,
    )
    return PlannedGeneration(job.id, body.checkpoint, inference_queue(job.queue), request)


def _artifact(db: Session, job: Job, checkpoint: int | None) -> JobArtifact:
    """The job's adapter, or the checkpoint asked for: 409 before there is an adapter, 422
    for a step the job has no checkpoint of."""
    name = ADAPTER_ARTIFACT if checkpoint is None else checkpoint_artifact_name(checkpoint)
    artifact = newest_artifact(db=db, job=job, name=name)
    if artifact is not None:
        return artifact
    steps = sorted({c.step for c in list_checkpoints(db=db, job=job)})
    have = f"its checkpoints are of steps {', '.join(map(str, steps))}" if steps else ""
    if checkpoint is not None:
        raise field_error(
            "checkpoint",
            f"job {job.id} has no checkpoint of step {checkpoint} ({have or 'it has none yet'})",
        )
    when = "" if job.state in TERMINAL else "; it has one once it has succeeded"
    also = f" ({have}: send one as `checkpoint`)" if steps else ""
    raise AdapterNotReady(
        f"job {job.id} is {job.state} and has no adapter{when}{also}", param="job_id"
    )


def _inputs(task: str, body: GenerateRequest, settings: Settings) -> dict[str, Any]:
    """The members of the request the job's task takes, checked: 422 naming the field."""
    takes = TASK_INPUTS.get(task)
    if takes is None:
        supported = ", ".join(TASK_INPUTS)
        raise InvalidRequest(
            f"generate answers {supported} jobs; this job is {task}", param="job_id"
        )
    for member in INPUT_MEMBERS:
        if getattr(body, member) is not None and member not in takes:
            raise field_error(member, f"a {task} job takes {' or '.join(takes)}, not {member}")
    if task == "causal_lm":
        return _chat_inputs(body, settings)
    if task == "seq_classification":
        if body.text is None:
            raise field_error("text", "a seq_classification job labels a text: send `text`")
        _within(settings, ("text", body.text), ("text_pair", body.text_pair or ""))
        return {"text": body.text, "text_pair": body.text_pair}
    return {"tokens": _words(body, settings)}


def _chat_inputs(body: GenerateRequest, settings: Settings) -> dict[str, Any]:
    """A conversation (`messages`, rendered by the chat template) or a `prompt` to continue
    as it stands, not both."""
    if (body.messages is None) == (body.prompt is None):
        raise field_error(
            "messages", "a causal_lm job answers a conversation (`messages`) or continues a "
            "`prompt`: send one of them",
        )  # fmt: skip
    if body.messages is not None and not body.messages:
        raise field_error("messages", "a causal_lm job answers a conversation: send `messages`")
    if body.prompt is not None and not body.prompt.strip():
        raise field_error("prompt", "an empty prompt")
    limit = settings.generate_max_new_tokens
    if body.max_new_tokens is not None and body.max_new_tokens > limit:
        raise field_error("max_new_tokens", f"at most {limit} (TUNEQ_GENERATE_MAX_NEW_TOKENS)")
    if body.prompt is not None:
        _within(settings, ("prompt", body.prompt))
        return {"prompt": body.prompt}
    assert body.messages is not None
    _within(settings, *((f"messages[{i}].content", m.content) for i, m in enumerate(body.messages)))
    return {"messages": body.messages}


def _words(body: GenerateRequest, settings: Settings) -> list[str]:
    """A token_classification job's words: `tokens`, or `text` split on whitespace."""
    if (body.tokens is None) == (body.text is None):
        raise field_error("tokens", "a token_classification job tags words: `tokens` or `text`")
    if body.tokens is None:
        assert body.text is not None
        words = body.text.split()
        if not words:
            raise field_error("text", "no words to tag")
        _within(settings, ("text", body.text))
        return words
    if not body.tokens:
        raise field_error("tokens", "no words to tag")
    for i, word in enumerate(body.tokens):
        if not word or any(c.isspace() for c in word):
            raise field_error(f"tokens[{i}]", "a word is one or more characters, none a space")
    _within(settings, *((f"tokens[{i}]", word + " ") for i, word in enumerate(body.tokens)))
    return body.tokens


def _within(settings: Settings, *parts: tuple[str, str]) -> None:
    """The input's characters within the limit, or 422 naming the part that goes over it."""
    limit, total = settings.generate_max_input_chars, 0
    for field, text in parts:
        total += len(text)
        if total > limit:
            raise field_error(
                field,
                f"the input is over {limit} characters (TUNEQ_GENERATE_MAX_INPUT_CHARS) here",
            )


def _forget(result: AsyncResult) -> None:
    """Delete the stored answer, read or never to be read (the filesystem backend raises
    for one never stored)."""
    try:
        result.forget()
    except Exception:  # noqa: BLE001 - Redis expires what is left; beat's reaper cleans files
        log.debug("the answer to generate request %s was not deleted", result.id, exc_info=True)


async def wait_for_reply(result: AsyncResult, *, settings: Settings, queue: str) -> InferenceReply:
    """The worker's reply: a worker must take the request within `generate_wait_seconds`
    and answer within `generate_timeout_seconds` of taking it (503 otherwise)."""
    taken_by = time.monotonic() + settings.generate_wait_seconds
    answered_by: float | None = None
    pause = _FIRST_POLL_SECONDS
    while True:
        state = await asyncio.to_thread(lambda: result.state)
        now = time.monotonic()
        if state == states.SUCCESS:
            return InferenceReply.model_validate(result.result)
        if state == states.FAILURE:
            failure = result.result
            raise TuneqError(f"the worker failed to answer: {type(failure).__name__}: {failure}")
        if state == states.STARTED and answered_by is None:
            answered_by = now + settings.generate_timeout_seconds
        if state in (states.PENDING, states.REVOKED) and now > taken_by:
            raise InferenceUnavailable(
                f"no worker took the request within {settings.generate_wait_seconds:g} s: every "
                f"worker listening on the inference queue '{queue}' is busy (a worker answers "
                "between training jobs), or none listens on it (`tuneq worker` does); try again "
                "later"
            )
        if answered_by is not None and now > answered_by:
            raise InferenceUnavailable(
                f"the worker did not answer within {settings.generate_timeout_seconds:g} s "
                "(TUNEQ_GENERATE_TIMEOUT_SECONDS); try a shorter input or fewer max_new_tokens"
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, _MAX_POLL_SECONDS)
