"""The two trackers a job's `integrations` can name, each behind the same five calls:
start (or continue) a run, params, metrics of a step, the adapter, end. Their packages are
optional (`pip install tuneq[mlflow]`, `tuneq[wandb]`) and imported only here, only when a
job asks for them. Guarding, buffering and retrying are worker/tracking.py's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tuneq.settings import Settings

# MLflow's client retries a refused connection 7 times with exponential backoff (minutes);
# a tracking call runs between training steps, so it fails fast here and tracking.py
# retries later instead. The operator's environment wins.
_MLFLOW_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch
_PARAM_CHARS = 6000  # MLflow's limit on a param's value
_WANDB_INIT_TIMEOUT = 30.0  # seconds wandb.init waits for its server (its default: 90)


class MlflowSink:
    kind, label = "mlflow", "MLflow"

    def __init__(self, settings: Settings, experiment: str) -> None:
        for name, value in _MLFLOW_FAIL_FAST.items():
            os.environ.setdefault(name, value)
        if settings.mlflow_tracking_token is not None:  # the client reads it from here only
            os.environ["MLFLOW_TRACKING_TOKEN"] = settings.mlflow_tracking_token.get_secret_value()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        self.experiment = experiment
        self.run_id: str | None = None

    def start(self, run_id: str | None, name: str, tags: dict[str, str]) -> str:
        if run_id is not None:  # a later attempt continues the run
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(self.experiment)
            except Exception:  # another worker created it first
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v[:_PARAM_CHARS]) for k, v in flatten(values).items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self._run(), params=items[start : start + _PARAMS_PER_BATCH])

    def metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self._run(), metrics=metrics)

    def adapter(self, directory: Path, store_key: str) -> None:
        self.client.set_tag(self._run(), "tuneq.adapter_key", store_key)
        self.client.log_artifacts(self._run(), str(directory), "adapter")

    def end(self, status: str | None) -> None:
        """FINISHED, FAILED, KILLED; None leaves the run RUNNING for the next attempt."""
        if status is not None:
            self.client.set_terminated(self._run(), status)

    def _run(self) -> str:
        assert self.run_id is not None, "start() first"
        return self.run_id


class WandbSink:
    kind, label = "wandb", "W&B"

    def __init__(self, settings: Settings, project: str) -> None:
        import wandb

        self.wandb = wandb
        self.project, self.entity = project, settings.wandb_entity
        self.dir = (settings.wandb_dir or settings.home / "wandb").resolve()
        key = settings.wandb_api_key
        self.settings = wandb.Settings(
            mode=settings.wandb_mode or "offline",
            base_url=settings.wandb_base_url or "https://api.wandb.ai",
            api_key=key.get_secret_value() if key is not None else None,
            silent=True,
            console="off",  # the worker's own log is not the run's
            save_code=False,  # the worker's code and checkout are none of the run's business
            disable_git=True,
            disable_job_creation=True,
            init_timeout=_WANDB_INIT_TIMEOUT,
        )
        self.run: Any = None

    def start(self, run_id: str | None, name: str, tags: dict[str, str]) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(
            project=self.project,
            entity=self.entity,
            dir=str(self.dir),
            id=run_id,
            resume="allow" if run_id else None,
            name=name,
            tags=[f"{k.removeprefix('tuneq.')}:{v}"[:64] for k, v in tags.items()],
            config={"tuneq": tags},
            settings=self.settings,
            reinit="create_new",  # one run per job, never the process's global one
        )
        return str(self.run.id)

    def params(self, values: dict[str, Any]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def adapter(self, directory: Path, store_key: str) -> None:
        artifact = self.wandb.Artifact(
            f"adapter-{self.run.id}", type="model", metadata={"tuneq_artifact_key": store_key}
        )
        artifact.add_dir(str(directory))
        self.run.log_artifact(artifact)

    def end(self, status: str | None) -> None:
        """A run left for the next attempt is marked preempting: W&B resumes it then."""
        if status is None:
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status in {None, "FINISHED"} else 1)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; lists and scalars as JSON text (MLflow's params are
    strings)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        elif value is not None:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat
