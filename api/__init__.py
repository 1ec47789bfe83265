"""tuneq's HTTP control plane (FastAPI). Built in issue 4; never imports torch."""
