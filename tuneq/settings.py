"""Typed settings, read once from `TUNEQ_*` environment variables (DESIGN §2).

The defaults are the embedded stack: SQLite, a broker needing no server and a local
artifact directory, all under `TUNEQ_HOME` (./.tuneq). The production stack sets the
database, broker and S3 variables; the code paths are the same.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEQ_", extra="ignore", frozen=True)

    environment: Literal["development", "production"] = Field(
        "development",
        description="production refuses placeholder secrets and fault injection",
    )
    home: Path = Field(Path(".tuneq"), description="state directory of the embedded stack")

    database_url: str | None = Field(
        None, description="SQLAlchemy URL, e.g. postgresql+psycopg://...; unset: SQLite in home"
    )
    database_read_connections: int = Field(
        20,
        ge=1,
        description="connections an API process opens, at most, for the job reads clients poll "
        "(PostgreSQL; besides SQLAlchemy's pool of 10 + 20 overflow)",
    )
    database_statement_cache: int = Field(
        100,
        ge=0,
        description="prepared statements the API's PostgreSQL reads keep per connection "
        "(0 behind PgBouncer in transaction mode)",
    )
    broker_url: str | None = Field(
        None, description="Celery broker, e.g. redis://...; unset: a filesystem broker in home"
    )

    store: Literal["local", "s3"] = Field(
        "local", description="where files and artifacts go: a directory, or S3/MinIO"
    )
    store_dir: Path | None = Field(None, description="local store directory; unset: home/artifacts")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO: http://minio:9000)")
    s3_public_endpoint_url: str | None = Field(
        None, description="S3 endpoint as download clients reach it; unset: s3_endpoint_url"
    )
    s3_bucket: str = Field("tuneq", description="bucket for files, checkpoints and adapters")
    s3_region: str = Field("us-east-1", description="S3 region")
    s3_access_key_id: str | None = Field(None, description="S3 access key (unset: boto3's chain)")
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret key")
    presign_ttl_seconds: int = Field(
        600, ge=1, le=900, description="lifetime of download URLs (at most 15 minutes)"
    )
    multipart_chunk_bytes: int = Field(
        16 * 1024 * 1024, ge=5 * 1024 * 1024, description="S3 multipart part size"
    )

    max_upload_bytes: int = Field(1024**3, ge=1, description="largest accepted upload (413 above)")
    max_line_bytes: int = Field(4 * 1024 * 1024, ge=1, description="longest accepted JSONL line")
    max_examples: int = Field(5_000_000, ge=1, description="most examples in one file")
    max_archive_members: int = Field(
        100_000, ge=1, description="most members (files and folders) in an uploaded archive"
    )
    max_archive_bytes: int = Field(
        4 * 1024**3, ge=1, description="most bytes an uploaded archive's members hold, unpacked"
    )
    max_compression_ratio: float = Field(
        200.0, gt=1, description="largest unpacked:packed ratio of an archive or one member"
    )
    max_image_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="largest image file (in an archive or a JSONL line)"
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="most pixels (width x height) in one uploaded image"
    )

    lease_ttl_seconds: float = Field(
        30.0, gt=0, description="a job's lease; workers heartbeat every third of it"
    )
    store_retries: int = Field(
        5,
        ge=1,
        description="tries a worker gives a store call that fails transiently (resets, "
        "timeouts, 5xx), the first included, beyond boto3's own quick retries",
    )
    store_retry_base_seconds: float = Field(
        1.0, ge=0, description="backoff before the first retry; doubled each retry, jittered"
    )
    store_retry_cap_seconds: float = Field(60.0, ge=0, description="the most backoff a retry")
    handback_delay_seconds: float = Field(
        30.0,
        ge=0,
        description="a job handed back after a transient fault, or queued again after its "
        "worker was lost, waits this long before it is published again; doubled each "
        "attempt, at most 10 minutes",
    )
    max_runtime_seconds: int | None = Field(
        None,
        ge=1,
        description="a job's max_runtime_seconds when its spec sets none (unset: no limit)",
    )
    max_runtime_seconds_cap: int | None = Field(
        None,
        ge=1,
        description="the most max_runtime_seconds a job may ask for; a larger one is refused "
        "(422), and with no default set, a job that sets none gets the cap (unset: no cap)",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="attempts a job gets in all; a worker lost, or a fault handed back, on "
        "the last one fails it",
    )
    reaper_interval_seconds: float = Field(
        15.0, gt=0, description="how often beat looks for expired leases"
    )
    relay_interval_seconds: float = Field(
        5.0, gt=0, description="how often beat publishes unsent outbox rows"
    )
    requeue_after_seconds: float = Field(
        300.0, gt=0, description="a queued job unclaimed this long is published again"
    )
    idempotency_ttl_hours: float = Field(
        24.0, ge=24.0, description="how long Idempotency-Key responses are kept"
    )

    model_registry: Path | None = Field(
        None, description="operator registry file (YAML/JSON); unset: home/models.yaml if present"
    )
    gpu_queue_memory_gib: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        None,
        description='GPU queues and their device memory in GiB, a JSON object ({"l4": 24, '
        '"a100": 80}): a job goes to the smallest listed queue its estimated peak memory '
        "fits, in place of its model's registry queue, and one that fits none is refused at "
        "submit (unset: the registry's queue)",
    )
    cache_dir: Path | None = Field(None, description="dequantised base models; unset: home/cache")
    work_dir: Path | None = Field(
        None, description="workers' scratch space and file copies; unset: home/work"
    )
    file_cache_bytes: int = Field(
        20 * 1024**3,
        ge=0,
        description="most bytes of dataset copies a host keeps in work_dir/files; the least "
        "recently used copy that no job holds goes first (0: only those in use)",
    )
    broker_visibility_timeout_seconds: float = Field(
        6 * 3600.0,
        gt=0,
        description="Redis: how long a delivered, unacknowledged job message waits before "
        "it is offered again (a job still running drops the copy at its claim)",
    )
    history_log: Path | None = Field(
        None,
        description="for bench/faults.py: a JSON-lines file each worker appends its claims, "
        "renewals, checkpoints and job ends to, for the history checker (unset: none)",
    )
    faults: dict[str, Any] | None = Field(
        None,
        description="fault injection for the fault tests and bench/faults.py only, a JSON "
        "object (tuneq/faults.py); never set in a deployment",
    )
    keep_checkpoints: int | None = Field(
        None,
        ge=0,
        description="checkpoints a succeeded job keeps: the last N and the best one (its kept "
        "weights' step); the others are deleted from the store. Unset: every one is kept",
    )
    quota_running_jobs: int | None = Field(
        None,
        ge=0,
        description="default quota: a team's jobs running at once; more wait while other "
        "teams' jobs start (unset: no limit)",
    )
    quota_queued_jobs: int | None = Field(
        None, ge=0, description="default quota: a team's jobs waiting (queued or paused); "
        "POST /jobs answers 429 at the limit (unset: no limit)",
    )  # fmt: skip
    quota_stored_bytes: int | None = Field(
        None, ge=0, description="default quota: bytes a team stores (files and artifacts); "
        "POST /files answers 403 past it (unset: no limit)",
    )  # fmt: skip
    quota_gpu_seconds: int | None = Field(
        None, ge=0, description="default quota: GPU-seconds a team's jobs may use in the "
        "rolling window; POST /jobs answers 429 past it (unset: no limit)",
    )  # fmt: skip
    quota_gpu_window_seconds: int = Field(
        7 * 86400, gt=0, description="the rolling window of the GPU-seconds quota"
    )
    resident_models: int = Field(
        1, ge=0, description="base models a worker keeps in memory between jobs (0: none)"
    )
    resident_model_bytes: int = Field(
        8 * 1024**3, ge=0, description="most bytes of base-model weights a worker keeps in memory"
    )
    # POST /jobs/{id}/generate: answered by a worker on the job's inference queue.
    generate_wait_seconds: float = Field(
        10.0,
        gt=0,
        description="how long a generate request waits for a worker to take it (503 after: "
        "every worker is busy, or none listens on the inference queue)",
    )
    generate_timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="how long a worker may take to answer a generate request it took (503 after)",
    )
    generate_max_input_chars: int = Field(
        32_000, ge=1, description="most characters of input a generate request may send (422 above)"
    )
    generate_max_input_tokens: int = Field(
        2048,
        ge=1,
        description="most tokens a generate request's input may make, within the model's "
        "context (422 above)",
    )
    generate_max_new_tokens: int = Field(
        256,
        ge=1,
        description="most tokens a causal LM's generated answer may have (a request's default)",
    )
    inference_models: int = Field(
        2,
        ge=0,
        description="trained models (adapters, checkpoints) a worker keeps loaded for generate "
        "requests; dropped when it starts a training job",
    )
    # The dry run's duration: a model's figures measured by the workers (tuneq.throughput)
    # when it has trained here, else these.
    estimated_tokens_per_second: float = Field(
        100.0,
        gt=0,
        description="trained tokens/s the duration estimate assumes for a model not yet "
        "trained here (evaluation: 3x as fast, a forward pass only)",
    )
    estimated_images_per_second: float = Field(
        50.0,
        gt=0,
        description="trained images/s the duration estimate assumes for an image model not "
        "yet trained here (evaluation: 3x as fast)",
    )
    estimated_load_seconds: float = Field(
        10.0,
        ge=0,
        description="seconds the estimate allows for loading a model not yet trained here",
    )
    estimated_checkpoint_seconds: float = Field(
        2.0,
        ge=0,
        description="seconds the estimate allows for each checkpoint (and the output) of a "
        "model not yet trained here",
    )

    api_key_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="an API process trusts a verified key this long; a revoked key is refused "
        "within it (0: check every request)",
    )
    # What one client may send (api/ratelimit.py, api/limits.py).
    rate_limit_per_second: float = Field(
        20.0,
        ge=0,
        description="requests an API key (a client address, for requests without one) may "
        "send per second, sustained; over it, 429 with Retry-After (0: no limit)",
    )
    rate_limit_burst: int = Field(
        100,
        ge=1,
        description="requests an API key may send at once before the sustained rate applies "
        "(the size of its token bucket)",
    )
    rate_limit_redis_timeout_seconds: float = Field(
        0.5,
        gt=0,
        description="longest a request waits for the limiter's Redis; past it the request goes "
        "through and limits are off for 5 s (an outage of the limiter is never one of the API)",
    )
    max_body_bytes: int = Field(
        1024**2,
        ge=1,
        description="largest request body other than an upload's (a job spec, a webhook); "
        "413 above, refused before it is read whole",
    )

    # Server-Sent Events: GET /jobs/{id}/events/stream (api/routes/job_events.py)
    sse_poll_seconds: float = Field(
        0.5, gt=0, description="how often an event stream looks for new events while its job runs"
    )
    sse_heartbeat_seconds: float = Field(
        15.0,
        gt=0,
        description="an event stream silent this long sends a `: keep-alive` comment",
    )
    sse_max_seconds: float = Field(
        3600.0,
        gt=0,
        description="an event stream open this long ends without `end`; the client "
        "reconnects with Last-Event-ID",
    )

    # Webhooks (tuneq.webhooks): delivered by beat's maintenance worker, never by the API.
    webhook_poll_seconds: float = Field(
        2.0, gt=0, description="how often beat sends the webhook deliveries that are due"
    )
    webhook_retry_schedule_seconds: Annotated[tuple[float, ...], NoDecode] = Field(
        (5, 300, 1800, 7200, 18000, 36000, 36000),
        description="waits before each retry of a failed webhook delivery, comma-separated "
        "(each with up to 20% jitter); once spent, the delivery is failed",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="connect, send and read timeout of one webhook attempt"
    )
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="hosts webhooks may target, comma-separated: exact names or "
        "`*.example.com` (empty: any host whose addresses are public)",
    )
    webhook_allow_private: bool = Field(
        False,
        description="let webhooks target loopback, private, link-local and other "
        "non-public addresses (a test or a closed network)",
    )

    # Experiment tracking (worker/tracking.py): a job's `integrations` name an experiment or a
    # project; where runs go, and with which credentials, is the operator's alone.
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server that `mlflow` integrations log to, e.g. "
        "http://mlflow:5000 (unset: a job asking for MLflow is refused)",
    )
    mlflow_tracking_token: SecretStr | None = Field(
        None, description="bearer token sent to the MLflow tracking server (never logged)"
    )
    wandb_mode: Literal["online", "offline"] | None = Field(
        None,
        description="Weights & Biases: online (to wandb_base_url) or offline (run directories "
        "in wandb_dir, for `wandb sync`); unset: a job asking for W&B is refused",
    )
    wandb_base_url: str | None = Field(
        None, description="W&B server of online runs (unset: W&B's cloud)"
    )
    wandb_api_key: SecretStr | None = Field(
        None, description="W&B API key of online runs (never logged)"
    )
    wandb_entity: str | None = Field(
        None, description="W&B entity (team or user) runs are created under (unset: the key's)"
    )
    wandb_dir: Path | None = Field(
        None, description="where workers write W&B run directories; unset: home/wandb"
    )

    host: str = Field("127.0.0.1", description="address `tuneq api` listens on")
    port: int = Field(8000, ge=0, le=65535, description="port `tuneq api` listens on")
    metrics_host: str = Field(
        "127.0.0.1",
        description="address the Prometheus /metrics of `tuneq worker` and `tuneq beat` "
        "listen on (0.0.0.0 in a container)",
    )
    worker_metrics_port: int = Field(
        9464,
        ge=0,
        le=65535,
        description="port of a worker's Prometheus /metrics (0: none); each worker on a "
        "host needs its own",
    )
    beat_metrics_port: int = Field(
        9465, ge=0, le=65535, description="port of beat's Prometheus /metrics: the queues (0: none)"
    )

    # The user's side: the API that the `tuneq files|jobs|models` commands and the SDK
    # (tuneq.client.Client) call, and their key; `tuneq up` prints both.
    url: str | None = Field(
        None, description="API the user commands and SDK call, e.g. http://127.0.0.1:8000"
    )
    api_key: SecretStr | None = Field(
        None, description="API key the user commands and SDK send (never logged)"
    )

    @field_validator("webhook_retry_schedule_seconds", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("webhook_retry_schedule_seconds")
    @classmethod
    def _non_negative_waits(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(wait < 0 for wait in value):
            raise ValueError("retry waits are seconds, 0 or more")
        return value

    @model_validator(mode="after")
    def _refuse_placeholders_in_production(self) -> Settings:
        if self.environment == "production":
            secret = self.s3_secret_access_key
            if secret is not None and secret.get_secret_value() in {"", "changeme", "minioadmin"}:
                raise ValueError("TUNEQ_S3_SECRET_ACCESS_KEY is a placeholder; set a real secret")
            if self.faults is not None:  # with it, a job's metadata could kill a worker
                raise ValueError("TUNEQ_FAULTS is for the fault tests only; unset it")
        return self

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'tuneq.db').resolve()}"

    @cached_property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @cached_property
    def broker_dir(self) -> Path:
        return (self.home / "broker").resolve()

    @cached_property
    def results_dir(self) -> Path:
        """Generate answers, when the broker is the filesystem one (tuneq.queue)."""
        return (self.home / "results").resolve()

    @property
    def resolved_model_registry(self) -> Path | None:
        """The operator's registry file: TUNEQ_MODEL_REGISTRY, else home/models.yaml when it
        exists (where `tuneq admin build-image-model` registers what it builds)."""
        if self.model_registry is not None:
            return self.model_registry
        default = (self.home / "models.yaml").resolve()
        return default if default.is_file() else None

    @cached_property
    def resolved_store_dir(self) -> Path:
        return (self.store_dir or self.home / "artifacts").resolve()

    @cached_property
    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.home / "cache").resolve()

    @cached_property
    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.home / "work").resolve()
