"""S3 in the test suite: moto's standalone server on loopback, buckets, and a data-path proxy.

moto checks neither SigV4 signatures nor expiry, so those properties are tested on the local
backend; everything else (the S3 protocol, multipart, listing) is real HTTP to a real server.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy

from methodic.server import ServerConfig

REGION = "us-east-1"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_SESSION_TOKEN": "testing-session-token",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


def s3_config(data_dir: Path, endpoint: str, bucket: str, prefix: str = "pfx") -> ServerConfig:
    """A server on a free port storing in ``s3://bucket/prefix`` at ``endpoint``."""
    return ServerConfig(
        data_dir=data_dir,
        port=0,
        storage=f"s3://{bucket}/{prefix}",
        s3_endpoint_url=endpoint,
        s3_region=REGION,
    )


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's ThreadedMotoServer on a free 127.0.0.1 port, with fake credentials in the env."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        srv.start()
        try:
            host, port = srv.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            srv.stop()


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def new_bucket(endpoint: str) -> str:
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def bucket_keys(endpoint: str, bucket: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))


def multipart_uploads(endpoint: str, bucket: str) -> list[tuple[str, str]]:
    out = s3_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return sorted((u["Key"], u["UploadId"]) for u in out)


class DataProxy:
    """A test's ``proxy``: Chronicle talks to ``url`` (the server) directly, blob bytes cross ``data``.

    Exposes what tests use of a FaultProxy (bytes_up, cut_after, faults_fired, ...) for the data
    path: from the client to the blob listener (local) or to the bucket (S3).
    """

    def __init__(self, chronicle_url: str, data: FaultProxy) -> None:
        self.url = chronicle_url
        self.data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.data, name)
