"""tuneq's Celery worker: claims jobs and runs peft_engine. Built in issue 4."""
