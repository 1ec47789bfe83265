"""Typed settings, read once from `TUNEQ_*` environment variables (DESIGN §2).

The defaults are the embedded stack: SQLite, a broker needing no server and a local
artifact directory, all under `TUNEQ_HOME` (./.tuneq). The production stack sets the
database, broker and S3 variables; the code paths are the same.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEQ_", extra="ignore", frozen=True)

    environment: Literal["development", "production"] = "development"
    home: Path = Field(Path(".tuneq"), description="state directory of the embedded stack")

    # Database: SQLite under home unless set (postgresql+psycopg://... in production).
    database_url: str | None = None
    # Broker: a filesystem transport under home unless set (redis://... in production).
    broker_url: str | None = None

    # Object store: "local" (a directory under home) or "s3" (any S3-compatible endpoint).
    store: Literal["local", "s3"] = "local"
    store_dir: Path | None = None
    s3_endpoint_url: str | None = None
    s3_bucket: str = "tuneq"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    presign_ttl_seconds: int = Field(600, ge=1, le=900)  # at most 15 minutes
    multipart_chunk_bytes: int = Field(16 * 1024 * 1024, ge=5 * 1024 * 1024)

    # Uploads (DESIGN §6).
    max_upload_bytes: int = Field(1024**3, ge=1)
    max_line_bytes: int = Field(4 * 1024 * 1024, ge=1)
    max_examples: int = Field(5_000_000, ge=1)

    # Queue and leases (DESIGN §3).
    lease_ttl_seconds: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    reaper_interval_seconds: float = Field(15.0, gt=0)
    relay_interval_seconds: float = Field(5.0, gt=0)
    # A queued job whose message went out this long ago without a claim is published again.
    requeue_after_seconds: float = Field(300.0, gt=0)
    idempotency_ttl_hours: float = Field(24.0, ge=24.0)

    # Engine.
    model_registry: Path | None = Field(None, description="operator registry file (YAML/JSON)")
    cache_dir: Path | None = None
    work_dir: Path | None = None
    # Used for the duration estimate until the deployment has measured its own throughput.
    estimated_tokens_per_second: float = Field(100.0, gt=0)

    # API.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @model_validator(mode="after")
    def _refuse_placeholders_in_production(self) -> Settings:
        if self.environment == "production":
            secret = self.s3_secret_access_key
            if secret is not None and secret.get_secret_value() in {"", "changeme", "minioadmin"}:
                raise ValueError("TUNEQ_S3_SECRET_ACCESS_KEY is a placeholder; set a real secret")
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
    def resolved_store_dir(self) -> Path:
        return (self.store_dir or self.home / "artifacts").resolve()

    @cached_property
    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.home / "cache").resolve()

    @cached_property
    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.home / "work").resolve()


def get_settings() -> Settings:
    return Settings()
