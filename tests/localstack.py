"""LocalStack's S3 for tests that need an S3 which verifies what moto does not: additional
checksums (x-amz-checksum-*, a multipart upload's full-object CRC), SigV4 signatures, expiry.

LocalStack runs without Docker from its PyPI package, on Python 3.13 only, so it lives in its
own venv (``scripts/localstack-venv`` makes ``.venv-localstack``; CI does it, and the first test
that needs it does it too, once, under a file lock, so the README's test command stays one
command). Its python is ``$METHODIC_LOCALSTACK_PYTHON``, or ``<repo>/.venv-localstack/bin/python``;
when it cannot be made the tests that use it fail (never skip), saying how to install it.

    with localstack_s3() as endpoint:
        bucket = new_versioned_bucket(endpoint)
        s3 = s3_client(endpoint)

Presigned URLs must be signed with ``SECRET_KEY`` (any access key id). Use versioned buckets:
in a non-versioned one, LocalStack (4.14) loses an existing object's data when a PUT over its key
is refused for a bad checksum.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from helpers import CEILING, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
PYTHON_ENV = "METHODIC_LOCALSTACK_PYTHON"
DEFAULT_PYTHON = REPO / ".venv-localstack" / "bin" / "python"
INSTALL = f"cd {REPO} && scripts/localstack-venv"
INSTALL_BY_HAND = (
    "python3.13 -m venv .venv-localstack && .venv-localstack/bin/pip install"
    ' "localstack-core[runtime]==4.14.0" "cbor2==5.9.0" "pyOpenSSL==24.3.0"'
    ' "cryptography==44.0.3" "service_identity==24.2.0"'
)

REGION = "us-east-1"
ACCESS_KEY = "methodic-test"  # LocalStack takes any access key id ...
SECRET_KEY = "test"  # ... with this secret (it checks SigV4 signatures against it)


class LocalStackMissing(RuntimeError):
    """No LocalStack python: the message is the command that installs it."""


def _installed(python: Path) -> bool:
    return python.is_file() and os.access(python, os.X_OK)


def _install_default() -> None:
    """Make ``.venv-localstack`` with ``scripts/localstack-venv``, once across test workers."""
    lock = REPO / ".venv-localstack.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another worker may be installing it right now
        if not _installed(DEFAULT_PYTHON):
            subprocess.run(
                [str(REPO / "scripts" / "localstack-venv")],
                cwd=REPO,
                capture_output=True,
                timeout=30 * 60,
                check=False,
            )


def localstack_python() -> Path:
    """The python of the LocalStack venv (made now if it is the default and missing), or
    LocalStackMissing saying how to make it."""
    configured = os.environ.get(PYTHON_ENV)
    python = Path(configured) if configured else DEFAULT_PYTHON
    if not configured and not _installed(python):
        _install_default()
    if not _installed(python):
        where = f"${PYTHON_ENV}={configured}" if configured else f"{python} (default)"
        raise LocalStackMissing(
            f"LocalStack is not installed: no python at {where}.\n"
            f"Install it with:\n    {INSTALL}\n"
            f"(Python 3.13 only; by hand, from {REPO}:\n    {INSTALL_BY_HAND})\n"
            f"or point ${PYTHON_ENV} at the python of a venv that has it."
        )
    return python


def _env(port: int, volume: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("METHODIC_", "AWS_", "LOCALSTACK"))
    }
    env.update(
        GATEWAY_LISTEN=f"127.0.0.1:{port}",
        SERVICES="s3",
        EAGER_SERVICE_LOADING="1",
        S3_SKIP_SIGNATURE_VALIDATION="0",
        LOCALSTACK_VOLUME_DIR=str(volume),
        DISABLE_EVENTS="1",
        LOCALSTACK_CLI="0",
        DNS_ADDRESS="0",
        DEBUG="0",
    )
    return env


def _s3_available(endpoint: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(
            f"LocalStack exited with {proc.returncode} before S3 was available:\n"
            + log.read_text(errors="replace")[-4000:]
        )
    try:
        r = httpx.get(f"{endpoint}/_localstack/health", timeout=5, trust_env=False)
        return r.status_code == 200 and r.json().get("services", {}).get("s3") in (
            "available",
            "running",
        )
    except (httpx.TransportError, ValueError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM; if LocalStack has not exited within CEILING, SIGKILL its process group."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(CEILING)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): only its
        proc.wait()


@contextmanager
def localstack_s3() -> Iterator[str]:
    """LocalStack (S3 only) on a free 127.0.0.1 port, its data in a temp dir; yields the
    endpoint URL once S3 is available, and always stops it."""
    python = localstack_python()
    with tempfile.TemporaryDirectory(prefix="methodic-localstack-") as tmp:
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "localstack.log"
        volume = Path(tmp) / "volume"
        volume.mkdir()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                # -P: the temp cwd is not on sys.path, so LocalStack's plugin cache (plux, in
                # ~/.cache) keeps one entry instead of one per run
                [str(python), "-P", "-m", "localstack.runtime.main"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(port, volume),
                cwd=tmp,
                start_new_session=True,
            )
        try:
            wait_until(
                lambda: _s3_available(endpoint, proc, log),
                interval=0.1,
                what=f"LocalStack S3 available at {endpoint}",
            )
            yield endpoint
        finally:
            _stop(proc)


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client on LocalStack (path-style, SigV4, LocalStack's credentials)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def new_versioned_bucket(endpoint: str) -> str:
    """A fresh, empty bucket with versioning enabled (see the module's note); its name."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3 = s3_client(endpoint)
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name
