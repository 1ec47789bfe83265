"""An S3-compatible server over real HTTP for tests: moto in server mode (DESIGN §8)."""

from __future__ import annotations

from typing import Any

from moto.server import ThreadedMotoServer


def start_moto_server() -> tuple[ThreadedMotoServer, str]:
    """Start moto on a free loopback port; returns the server (call `.stop()`) and its URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_client(endpoint_url: str) -> Any:
    """A plain boto3 client of the server, with its test credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
