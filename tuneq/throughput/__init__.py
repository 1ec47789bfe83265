"""How fast each model trains on this deployment, measured by the workers from real jobs.

A job that succeeds adds its figures (train and eval tokens/s, the model's load, seconds a
checkpoint: its result.json's timings) to its model's row for the device it ran on; the
dry run and `POST /jobs` estimate a job's duration from the row of its model and task most
recently updated, or from the `TUNEQ_ESTIMATED_*` settings before any has finished.
"""
