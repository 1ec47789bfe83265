"""Every ORM model, imported in one place so that the metadata (and Alembic) sees them all."""

from tuneq.audit.models import AuditRecord
from tuneq.db import Base
from tuneq.files.models import File
from tuneq.idempotency.models import IdempotencyKey
from tuneq.jobs.models import Job, JobArtifact, JobCheckpoint, JobEvent, JobMetric, OutboxMessage
from tuneq.quotas.models import TeamQuota
from tuneq.teams.models import ApiKey, Team
from tuneq.throughput.models import ModelThroughput
from tuneq.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

__all__ = [
    "ApiKey",
    "AuditRecord",
    "Base",
    "File",
    "IdempotencyKey",
    "Job",
    "JobArtifact",
    "JobCheckpoint",
    "JobEvent",
    "JobMetric",
    "ModelThroughput",
    "OutboxMessage",
    "Team",
    "TeamQuota",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
]
