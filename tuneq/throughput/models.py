from __future__ import annotations

from datetime import datetime

from sqlalchemy import Float, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from tuneq.db import Base, UTCDateTime, utcnow


class ModelThroughput(Base):
    """A model's running figures for one task and method type on one kind of device ("cpu",
    "cuda:<gpu>"): the mean of its first jobs, then an exponentially weighted mean
    (service.blend). Method "" is a row recorded before methods were told apart."""

    __tablename__ = "model_throughput"
    __table_args__ = (UniqueConstraint("model", "task", "method", "device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(100))
    task: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(32), server_default="")
    device: Mapped[str] = mapped_column(String(255))
    jobs: Mapped[int] = mapped_column(Integer)  # succeeded jobs whose figures are in the row
    train_tokens_per_second: Mapped[float] = mapped_column(Float)
    # None until a job measured it (no validation data, no checkpoint, no timings recorded)
    eval_tokens_per_second: Mapped[float | None] = mapped_column(Float)
    load_seconds: Mapped[float | None] = mapped_column(Float)
    seconds_per_checkpoint: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
