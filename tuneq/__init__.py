"""tuneq's shared domain layer: settings, ORM models, storage, queue, the job state machine.

Imported by api/ and worker/; never imports FastAPI or torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tuneq")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
