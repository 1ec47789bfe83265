"""Generate requests (`POST /jobs/{id}/generate`), answered on the inference queue.

A request names a job and one of its artifacts (the adapter, or a checkpoint's). The worker
re-reads both from the database, fetches the artifact from the store the job's outputs
went to (checking its digest), and loads it on the base model this process keeps in memory
between jobs (`ResidentModels`: an adapter whose method freezes the base shares those very
weights). The last few loaded models are kept, by the artifact's digest, so a
conversation's next request answers at once; the download is scratch, gone once loaded.
A training job drops them before it starts: the memory is the job's.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import tarfile
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from peft_engine.errors import UserError
from peft_engine.models import ModelRegistry, model_dir
from peft_engine.models.resident import ResidentModels
from peft_engine.progress import quiet_library_output
from tuneq.inference.schemas import InferenceError, InferenceReply, InferenceRequest
from tuneq.jobs.models import Job, JobArtifact
from tuneq.jobs.service import newest_artifact
from tuneq.settings import Settings
from tuneq.storage import ObjectStore

if TYPE_CHECKING:  # torch loads with the first request, not in beat (no torch in its image)
    from peft_engine.generate import TrainedModel

log = logging.getLogger(__name__)


@dataclass
class Answerers:
    """What one worker process keeps for generate requests: the trained models it loaded."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore
    registry: ModelRegistry
    resident: ResidentModels
    _loaded: OrderedDict[tuple[str, str], TrainedModel] = field(default_factory=OrderedDict)

    def answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The reply to one request (an InferenceRequest as JSON), as JSON: the answer, or
        the request's fault (the input too long for the model, ...)."""
        quiet_library_output()
        request = InferenceRequest.model_validate(payload)
        try:
            job, artifact = self._rows(request)
            answer = _answer(self._model(job, artifact), request)
        except UserError as err:
            error = InferenceError(message=err.message, param=err.param)
            return InferenceReply(error=error).model_dump()
        return InferenceReply(answer=answer).model_dump()

    def drop_loaded(self) -> None:
        """Forget the loaded models, and give their memory back (a training job needs it)."""
        if not self._loaded:
            return
        self._loaded.clear()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _rows(self, request: InferenceRequest) -> tuple[Job, JobArtifact]:
        with self.sessions() as db:
            job = db.get(Job, request.job_id)
            artifact = newest_artifact(db=db, job=job, name=request.artifact) if job else None
            if job is None or artifact is None:
                raise UserError(f"job {request.job_id} has no {request.artifact} any more")
            return job, artifact

    def _model(self, job: Job, artifact: JobArtifact) -> TrainedModel:
        """The artifact loaded on the job's base model: kept, or fetched and loaded now."""
        key = (job.model, artifact.sha256)
        model = self._loaded.get(key)
        if model is not None:
            self._loaded.move_to_end(key)
            return model
        model = self._load(job, artifact)
        if self.settings.inference_models > 0:
            self._loaded[key] = model
            while len(self._loaded) > self.settings.inference_models:
                self._loaded.popitem(last=False)
        return model

    def _load(self, job: Job, artifact: JobArtifact) -> TrainedModel:
        from peft_engine.generate import TrainedModel, trained_dtype
        from peft_engine.training import select_device

        base_dir = model_dir(self.registry.get(job.model), self.settings.resolved_cache_dir)
        assert base_dir is not None
        device, _ = select_device()
        scratch = self.settings.resolved_work_dir / "inference"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            output_dir = _fetch(self.store, artifact, Path(tmp))
            dtype = trained_dtype(output_dir, device)  # the mode its metrics were taken in
            with self.resident.active():
                model = TrainedModel(output_dir, base_dir, device=device, dtype=dtype)
        log.info("loaded %s of job %s for generate requests", artifact.name, job.id)
        return model


def _fetch(store: ObjectStore, artifact: JobArtifact, directory: Path) -> Path:
    """The artifact's files, downloaded and unpacked into `directory`/model."""
    tarball = directory / artifact.name
    store.get_file(artifact.storage_key, tarball)
    with tarball.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if digest != artifact.sha256:
        raise RuntimeError(f"{artifact.storage_key} is not what was uploaded (sha256 {digest})")
    target = directory / "model"
    with tarfile.open(tarball, "r:gz") as archive:
        archive.extractall(target, filter="data")
    return target


def _answer(model: TrainedModel, request: InferenceRequest) -> dict[str, Any]:
    """The task's answer, as the members of a Generation (tuneq.inference.schemas)."""
    limit = request.max_input_tokens
    if model.task == "causal_lm" and (request.messages is not None or request.prompt is not None):
        if request.prompt is not None:
            reply = model.complete(
                request.prompt, max_new_tokens=request.max_new_tokens, max_input_tokens=limit
            )
        else:
            messages = [m.model_dump() for m in request.messages or ()]
            reply = model.reply(
                messages, max_new_tokens=request.max_new_tokens, max_input_tokens=limit
            )
        return {
            "task": model.task,
            "message": {"role": "assistant", "content": reply.content},
            "finish_reason": reply.finish_reason,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens},
        }
    if model.task == "seq_classification" and request.text is not None:
        scores = model.classify(request.text, request.text_pair, max_input_tokens=limit)
        return {
            "task": model.task,
            "label": scores.label,
            "scores": scores.scores,
            "usage": {"input_tokens": scores.input_tokens},
        }
    if model.task == "token_classification" and request.tokens is not None:
        tags = model.tag(request.tokens, max_input_tokens=limit)
        words = [{"token": w.word, "tag": w.tag, "score": w.score} for w in tags.words]
        return {"task": model.task, "tokens": words, "usage": {"input_tokens": tags.input_tokens}}
    raise UserError(f"a {model.task} model cannot answer this input")
