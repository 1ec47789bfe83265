"""Log lines that name the request they were written for.

api/request_ids.py sets `current_request_id` for the length of each HTTP request. A
`RequestIdFilter` on a handler gives every record the handler takes that id as
`record.request_id` ("-" outside a request: startup, a background loop), and the API
process's formats print it. A handler's filter runs in the thread and context that made
the record, whichever logger made it: the route's worker thread sees its request's id.
"""

from __future__ import annotations

import copy
import logging
from contextvars import ContextVar
from typing import Any

current_request_id: ContextVar[str | None] = ContextVar("tuneq_request_id", default=None)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
API_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True


def configure_logging(level: int, *, request_ids: bool = False) -> None:
    """The root handler of a `tuneq` process: with the request id on each line (the API)."""
    handler = logging.StreamHandler()
    if request_ids:
        handler.addFilter(RequestIdFilter())
    logging.basicConfig(
        level=level, format=API_LOG_FORMAT if request_ids else LOG_FORMAT, handlers=[handler]
    )


def with_request_ids(uvicorn_config: dict[str, Any]) -> dict[str, Any]:
    """uvicorn's logging configuration (its LOGGING_CONFIG) with the request id on each
    line of its handlers, access lines included."""
    config = copy.deepcopy(uvicorn_config)
    config.setdefault("filters", {})["request_id"] = {"()": RequestIdFilter}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", ()), "request_id"]
    for formatter in config["formatters"].values():
        formatter["fmt"] = formatter["fmt"].replace(
            "%(levelprefix)s", "%(levelprefix)s [%(request_id)s]", 1
        )
    return config
