"""Datasets: reading and validating JSONL (no torch), tokenizing, batching."""
