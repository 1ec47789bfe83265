"""tuneq's shared domain layer (settings, ORM models, storage, job state machine).

Imported by api/ and worker/; never imports FastAPI or torch. Built in issue 4.
"""
