"""Throughput benchmark: the engine against curl, into the same receivers, in one run.

    python bench/throughput.py [--quick] [--repeat 5] [--workers 8] [--only nginx,server,rss]

(a) nginx: the engine's PUT path (``methodic._transfer.send_range`` on the engine's own
    ``httpx.AsyncClient`` and ``TokenBucket``, sha256 on) and ``curl --parallel`` into an nginx
    WebDAV sink on loopback, for 16 files of 128 MiB and one 2 GiB file (one stream each, and
    in 16 MiB parts with the same number of parallel streams; curl sends pre-split part files).
(b) server: the engine end to end (``Chronicle`` + ``UploadTracker``,
    ``register_and_upload_async``, wait, finalize) against ``methodic serve``, and curl PUTting
    the same files to the same server's presigned URLs (``create_asset_presigned``, curl,
    ``finalize_asset``).
(c) rss: peak RSS of the engine end to end for a 1 GiB and an 8 GiB (sparse) file.

Every client runs in its own process: MB/s is bytes / wall time of the transfer (median of
``--repeat`` runs, variants alternating), CPU s/GB is the client's user+system time per 10^9
bytes (the engine: its whole process over the transfer window; curl: the curl process), peak RSS
is the client process's ru_maxrss. Needs ``nginx`` (Debian's nginx-light has the dav module) and
``curl`` on PATH. Prints a markdown table and writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
MB = 1e6
GB = 1e9
ROOT = Path(__file__).resolve().parent
GOAL_THROUGHPUT = 0.9  # engine / curl
GOAL_CPU = 2.5  # engine CPU/GB / curl CPU/GB, sha256 included
GOAL_RSS_MB = 150.0
RSS_FLAT_MB = 10.0  # "the same" peak RSS for 1 GiB and 8 GiB: within this many MB


# --------------------------------------------------------------------------- child processes


def _rusage_cpu(r: resource.struct_rusage) -> tuple[float, float]:
    return r.ru_utime, r.ru_stime


def child_put(spec: dict[str, Any]) -> dict[str, Any]:
    """The engine's PUT path: send_range over the engine's own client, N transfers at once."""
    from methodic import AsyncChronicle
    from methodic._transfer import FileIdentity, send_range
    from methodic._types import UploadTarget

    async def main() -> dict[str, Any]:
        targets = spec["targets"]
        sent = 0
        digests: dict[int, str] = {}

        def on_bytes(n: int) -> None:
            nonlocal sent
            sent += n

        # The engine's real client configuration (limits, timeouts) and shared TokenBucket(None).
        async with AsyncChronicle(
            server_url=spec["origin"], api_key="sk_bench_unused", max_upload_workers=spec["workers"]
        ) as chronicle:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(len(targets)):
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    t = targets[i]
                    st = os.stat(t["local_path"])
                    identity = FileIdentity(t["local_path"], st.st_size, st.st_mtime_ns, st.st_ino)
                    target = UploadTarget(
                        path=t["name"],
                        part=None,
                        method="PUT",
                        url=t["url"],
                        headers={},
                        offset=t["offset"],
                        length=t["length"],
                        expires_at=time.time() + 3600,
                    )
                    # The pool's connections (the sendfile path) where this tree has them.
                    more = (
                        [chronicle._pool.connections]
                        if hasattr(chronicle._pool, "connections")
                        else []
                    )
                    _etag, digests[i] = await send_range(
                        chronicle._http, target, identity, chronicle.bucket, on_bytes, *more
                    )

            rc0 = proc_cpu(spec["receiver_pids"])
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(spec["workers"])))
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            rc1 = proc_cpu(spec["receiver_pids"])
        for i, t in enumerate(targets):
            if t.get("sha256") and digests[i] != t["sha256"]:
                raise SystemExit(f"sha256 of {t['name']} is {digests[i]}, expected {t['sha256']}")
        return {
            "wall": wall,
            "bytes": sent,
            "user": r1.ru_utime - r0.ru_utime,
            "sys": r1.ru_stime - r0.ru_stime,
            "receiver_cpu": rc1 - rc0,
        }

    return asyncio.run(main())


def child_e2e(spec: dict[str, Any]) -> dict[str, Any]:
    """The engine end to end through the public API, as user code writes it."""
    from methodic import AssetStateChanged, Chronicle, RetryScheduled, UploadTracker

    options = {k: spec[k] for k in ("part_threshold", "part_size") if spec.get(k)}
    tracker = UploadTracker(db_path=Path(spec["tracker"]))
    seen: dict[str, Any] = {"finalizing": None, "retries": []}

    async def watch(sub: Any) -> None:  # on the engine's loop: no polling, no extra thread
        async for event in sub:
            if isinstance(event, AssetStateChanged) and event.state == "finalizing":
                seen["finalizing"] = seen["finalizing"] or time.perf_counter()
            elif isinstance(event, RetryScheduled):
                seen["retries"].append(event.cause[:200])

    with Chronicle(
        server_url=spec["server_url"],
        api_key=spec["api_key"],
        max_upload_workers=spec["workers"],
        **options,
    ) as chronicle:
        pool = chronicle.core._pool
        watcher = asyncio.run_coroutine_threadsafe(
            watch(pool.events.subscribe()), chronicle._loop.loop
        )
        exp_id = chronicle.create_experiment("throughput-bench")
        run = chronicle.run(exp_id, variation=0, run=spec["run"])
        rc0 = proc_cpu(spec["receiver_pids"])
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        handle = run.register_and_upload_async(
            local_dir=Path(spec["local_dir"]), asset_type="checkpoint", upload_tracker=tracker
        )
        run.wait_for_uploads()
        asset = handle.result()
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        rc1 = proc_cpu(spec["receiver_pids"])
        sent = pool.meter.total
        watcher.cancel()
    tracker.close()
    if asset.state != "finalized":
        raise SystemExit(f"asset {asset.asset_id} is {asset.state}, not finalized")
    return {
        "wall": t1 - t0,
        "bytes": asset.total_size,
        "user": r1.ru_utime - r0.ru_utime,
        "sys": r1.ru_stime - r0.ru_stime,
        "receiver_cpu": rc1 - rc0,
        "asset_id": asset.asset_id,
        # from "all bytes stored" to "finalized": the server's verification
        "finalize_s": t1 - seen["finalizing"] if seen["finalizing"] else None,
        "bytes_sent": sent,
        "retries": len(seen["retries"]),
        "retry_causes": seen["retries"][:5],
    }


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM: the peak RSS of this process image (ru_maxrss of a child that was vforked from a
    big parent reports the parent's peak, so it is not used)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no VmHWM for {pid}")


def child_main(mode: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = child_put(spec) if mode == "put" else child_e2e(spec)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- process helpers


@dataclass
class Measured:
    wall: float
    bytes: int
    cpu: float  # client user+sys seconds over the transfer
    rss_mb: float  # client peak RSS
    receiver_cpu: float
    extra: dict[str, Any] = field(default_factory=dict)


def run_process(
    argv: list[str], out: Path, err: Path, env: dict[str, str] | None = None
) -> tuple[int, resource.struct_rusage, float, float]:
    """Run argv, stdout/stderr to files; (exit status, rusage from os.wait4, wall, peak RSS MB).

    The peak RSS is VmHWM polled while it runs (the last reading before exit; HWM only grows).
    """
    peak = 0.0
    done = threading.Event()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env)

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                with contextlib.suppress(OSError, ValueError):
                    peak = max(peak, peak_rss_mb(proc.pid))
                done.wait(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            done.set()
            poller.join()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4
    return proc.returncode, usage, wall, peak


def proc_cpu(pids: list[int]) -> float:
    """User+system seconds consumed so far by these processes (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 15.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            httpx.get(url, timeout=1.0, trust_env=False)
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def clear_dir(path: Path) -> None:
    for entry in path.iterdir() if path.exists() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------- receivers

NGINX_CONF = """\
worker_processes auto;
daemon off;
master_process on;
{user}pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{port};
    root {sink};
    client_max_body_size 0;
    client_body_buffer_size 1m;
    client_body_timeout 60s;
    location / {{
      dav_methods PUT;
      create_full_put_path on;
      dav_access user:rw;
    }}
  }}
}}
"""


class Nginx:
    def __init__(self, base: Path) -> None:
        self.prefix = base / "nginx"
        self.sink = base / "nginx-sink"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> Nginx:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(exe):
            raise SystemExit(
                "nginx not found: apt-get install -y nginx-light (it has the dav module)"
            )
        self.prefix.mkdir(parents=True)
        self.sink.mkdir(parents=True)
        self.port = free_port()
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must write the sink
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(prefix=self.prefix, sink=self.sink, port=self.port, user=user)
        )
        self.proc = subprocess.Popen(
            [exe, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix / "error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(self.origin)
        return self

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *children_of(self.proc.pid)]

    def stop(self) -> None:
        stop_process(self.proc)

    def version(self) -> str:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        out = subprocess.run([exe, "-v"], capture_output=True, text=True)
        return (out.stderr or out.stdout).strip().replace("nginx version: ", "")


class Server:
    """``methodic serve`` in a subprocess, with its data in a temporary directory."""

    def __init__(self, base: Path, pythonpath: str | None = None) -> None:
        self.pythonpath = pythonpath
        self.data_dir = base / "server-data"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.api_key = ""

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True)
        log = self.data_dir.parent / "server.log"
        self._log = open(log, "wb")  # noqa: SIM115
        env = dict(os.environ)
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [self.pythonpath, env.get("PYTHONPATH")])
            )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "methodic",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--port",
                "0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"methodic serve exited: {log.read_text()[-2000:]}")
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m.group(1)
                break
        else:
            raise RuntimeError("methodic serve did not announce its URL")
        # Keep reading its output (to the log), so it never writes into a full or closed pipe.
        threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()
        wait_http(f"{self.url}/healthz")
        self.api_key = (self.data_dir / "api_key").read_text().strip()
        return self

    def _drain(self, stream: Any) -> None:
        with contextlib.suppress(Exception):
            for line in stream:
                self._log.write(line)
                self._log.flush()

    def clear_blobs(self) -> None:
        """Drop stored bytes between runs (finalized assets are not deletable through the API)."""
        clear_dir(self.data_dir / "blobs")

    def stop(self) -> None:
        stop_process(self.proc)
        with contextlib.suppress(Exception):
            self._log.close()


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str  # "many" or "single"
    label: str
    dir: Path
    files: list[Path]
    sha256: dict[str, str]
    part_files: dict[tuple[str, int], Path] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def write_file(path: Path, size: int, block: bytes, salt: int) -> str:
    hasher = hashlib.sha256()
    with open(path, "wb") as f:
        offset = 0
        while offset < size:
            chunk = block[: min(len(block), size - offset)]
            head = f"{salt}:{offset}:".encode()
            chunk = head + chunk[len(head) :]
            f.write(chunk)
            hasher.update(chunk)
            offset += len(chunk)
    return hasher.hexdigest()


def make_workload(
    base: Path, name: str, label: str, count: int, size: int, block: bytes, part_size: int
) -> Workload:
    d = base / "src" / name
    d.mkdir(parents=True)
    files, digests = [], {}
    for i in range(count):
        p = d / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        digests[p.name] = write_file(p, size, block, hash((name, i)) & 0xFFFF)
        files.append(p)
    w = Workload(name, label, d, files, digests)
    if count == 1 and size > part_size:  # pre-split parts, so curl can PUT parts too
        split = base / "src" / f"{name}-parts"
        split.mkdir()
        with open(files[0], "rb") as f:
            n = 1
            while chunk := f.read(part_size):
                part = split / f"{files[0].name}.{n:05d}"
                part.write_bytes(chunk)
                w.part_files[(files[0].name, n)] = part
                n += 1
    return w


# --------------------------------------------------------------------------- runners


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.scratch = base / "scratch"
        self.scratch.mkdir()
        self.runs: list[dict[str, Any]] = []
        self.failed: dict[tuple[str, str, str], str] = {}
        self.counter = 0
        self.child_pythonpath: str | None = None  # an --engine-tree being measured

    def _child(self, mode: str, spec: dict[str, Any], receiver: list[int]) -> Measured:
        self.counter += 1
        spec_path = self.scratch / f"spec{self.counter}.json"
        # The child reads the receiver's CPU itself, over the same window as its own.
        spec_path.write_text(json.dumps({**spec, "receiver_pids": receiver}))
        out, err = self.scratch / f"out{self.counter}", self.scratch / f"err{self.counter}"
        env = None
        if self.child_pythonpath:
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [self.child_pythonpath, os.environ.get("PYTHONPATH")])
                ),
            }
        status, usage, _, _ = run_process(
            [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(spec_path)],
            out,
            err,
            env=env,
        )
        if status != 0:
            raise RuntimeError(f"engine child ({mode}) failed: {err.read_text()[-3000:]}")
        r = json.loads(out.read_text().strip().splitlines()[-1])
        return Measured(
            wall=r["wall"],
            bytes=r["bytes"],
            cpu=r["user"] + r["sys"],
            rss_mb=r["peak_rss_mb"],
            receiver_cpu=r["receiver_cpu"],
            extra={
                "user": r["user"],
                "sys": r["sys"],
                "process_cpu": usage.ru_utime + usage.ru_stime,
                **{
                    k: r[k]
                    for k in ("finalize_s", "bytes_sent", "retries", "retry_causes")
                    if k in r
                },
            },
        )

    def _curl(
        self,
        pairs: list[tuple[Path, str]],
        parallel: int,
        receiver: list[int],
        hash_alongside: bool = False,
    ) -> Measured:
        """curl PUTs ``pairs``; ``hash_alongside``: ``openssl dgst -sha256`` reads and hashes the
        same files at the same time (wall time and CPU of both): what the cheapest uploader
        that hashes what it sends would cost, the practical ceiling of a hashing client here."""
        self.counter += 1
        argv = [
            "curl",
            "--silent",
            "--show-error",
            "--no-progress-meter",
            "-H",
            "Expect:",
            "-w",
            "%{http_code}\\n",
        ]
        if parallel > 1:
            argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(parallel)]
        for path, url in pairs:
            argv += ["-T", str(path), "-o", "/dev/null", url]
        if hash_alongside:  # sh waits for both, so its rusage from wait4 includes both
            hasher = shlex.join(["openssl", "dgst", "-sha256", *(str(p) for p, _ in pairs)])
            argv = ["sh", "-c", f"{hasher} >/dev/null & {shlex.join(argv)}; s=$?; wait; exit $s"]
        out, err = self.scratch / f"out{self.counter}", self.scratch / f"err{self.counter}"
        rc0 = proc_cpu(receiver)
        status, usage, wall, peak = run_process(argv, out, err)
        rc1 = proc_cpu(receiver)
        codes = out.read_text().split()
        if (
            status != 0
            or len(codes) != len(pairs)
            or any(c not in ("200", "201", "204") for c in codes)
        ):
            raise RuntimeError(
                f"curl failed (exit {status}, codes {sorted(set(codes))}): "
                f"{err.read_text()[-2000:]}"
            )
        return Measured(
            wall=wall,
            bytes=sum(p.stat().st_size for p, _ in pairs),
            cpu=usage.ru_utime + usage.ru_stime,
            rss_mb=peak,
            receiver_cpu=rc1 - rc0,
            extra={"user": usage.ru_utime, "sys": usage.ru_stime},
        )

    def record(self, section: str, workload: Workload, variant: str, rep: int, m: Measured) -> None:
        row = {
            "section": section,
            "workload": workload.name,
            "variant": variant,
            "rep": rep,
            "wall_s": m.wall,
            "bytes": m.bytes,
            "mb_s": m.bytes / m.wall / MB,
            "cpu_s": m.cpu,
            "cpu_s_per_gb": m.cpu / (m.bytes / GB),
            "peak_rss_mb": m.rss_mb,
            "receiver_cpu_s_per_gb": m.receiver_cpu / (m.bytes / GB),
            **m.extra,
        }
        self.runs.append(row)
        print(
            f"  {section:<6} {workload.name:<6} {variant:<28} rep {rep}: {row['mb_s']:7.0f} MB/s "
            f"{row['cpu_s_per_gb']:5.2f} CPU s/GB {m.rss_mb:6.0f} MB RSS "
            f"(receiver {row['receiver_cpu_s_per_gb']:.2f} s/GB)"
            + (f" finalize {m.extra['finalize_s']:.1f} s" if m.extra.get("finalize_s") else "")
            + (f" {m.extra['retries']} retries" if m.extra.get("retries") else ""),
            file=sys.stderr,
            flush=True,
        )

    # (a) nginx -------------------------------------------------------------------------

    def nginx_variants(self, nginx: Nginx, w: Workload) -> dict[str, Any]:
        workers = self.args.workers
        recv = nginx.pids()
        part = self.args.part_size
        origin = nginx.origin

        def whole_targets(prefix: str) -> list[dict[str, Any]]:
            return [
                {
                    "name": f.name,
                    "url": f"{origin}/{prefix}/{f.name}",
                    "local_path": str(f),
                    "offset": 0,
                    "length": f.stat().st_size,
                    "sha256": w.sha256[f.name],
                }
                for f in w.files
            ]

        def part_targets(prefix: str) -> list[dict[str, Any]]:
            f = w.files[0]
            size = f.stat().st_size
            return [
                {
                    "name": f"{f.name}.{n}",
                    "url": f"{origin}/{prefix}/{f.name}.{n:05d}",
                    "local_path": str(f),
                    "offset": (n - 1) * part,
                    "length": min(part, size - (n - 1) * part),
                }
                for n in range(1, -(-size // part) + 1)
            ]

        def engine(targets: list[dict[str, Any]], n: int) -> Measured:
            return self._child("put", {"origin": origin, "workers": n, "targets": targets}, recv)

        if w.name == "many":
            return {
                f"curl --parallel {workers}": lambda: self._curl(
                    [(f, f"{origin}/curl/{f.name}") for f in w.files], workers, recv
                ),
                f"sha256 + curl --parallel {workers}": lambda: self._curl(
                    [(f, f"{origin}/curl/{f.name}") for f in w.files], workers, recv, True
                ),
                f"engine send_range x{workers}": lambda: engine(whole_targets("engine"), workers),
            }
        variants = {
            "curl, 1 stream": lambda: self._curl(
                [(w.files[0], f"{origin}/curl/{w.files[0].name}")], 1, recv
            ),
            "sha256 + curl, 1 stream": lambda: self._curl(
                [(w.files[0], f"{origin}/curl/{w.files[0].name}")], 1, recv, True
            ),
            "engine send_range, 1 stream": lambda: engine(whole_targets("engine"), 1),
        }
        if w.part_files:
            variants[f"curl --parallel {workers}, parts"] = lambda: self._curl(
                [(p, f"{origin}/curl/{p.name}") for p in w.part_files.values()], workers, recv
            )
            variants[f"engine send_range x{workers}, parts"] = lambda: engine(
                part_targets("engine"), workers
            )
        return variants

    # (b) server ------------------------------------------------------------------------

    def server_variants(
        self, server: Server, w: Workload, chronicles: dict[str, Any]
    ) -> dict[str, Any]:
        from methodic import ComponentSpec

        workers = self.args.workers
        recv = [server.proc.pid] if server.proc else []

        def engine(whole: bool) -> Measured:
            self.counter += 1
            spec = {
                "server_url": server.url,
                "api_key": server.api_key,
                "workers": workers,
                "local_dir": str(w.dir),
                "tracker": str(self.scratch / f"t{self.counter}.sqlite"),
                "run": self.counter,
                "part_size": self.args.part_size,
            }
            if whole:
                spec["part_threshold"] = 1 << 62
            return self._child("e2e", spec, recv)

        def curl(layout: str, parallel: int) -> Measured:
            run = chronicles[layout]
            specs = [ComponentSpec.from_file(f.name, f, sha256=w.sha256[f.name]) for f in w.files]
            by_name = {f.name: f for f in w.files}
            rc0 = proc_cpu(recv)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            presigned = run.create_asset_presigned(asset_type="checkpoint", components=specs)
            pairs = []
            for t in presigned.targets:
                if t.headers:
                    raise RuntimeError(f"target headers {t.headers} are not passed to curl")
                local = by_name[t.path] if t.part is None else w.part_files[(t.path, t.part)]
                pairs.append((local, t.url))
            m = self._curl(pairs, parallel, recv)
            t_fin = time.perf_counter()
            asset = run.finalize_asset(presigned.asset_id)
            m.extra["finalize_s"] = time.perf_counter() - t_fin
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            m.receiver_cpu = (
                proc_cpu(recv) - rc0
            )  # the API calls and finalize too, as for the engine
            if asset.state != "finalized":
                raise RuntimeError(f"curl's asset is {asset.state}")
            api_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            m.extra["curl_wall"] = m.wall
            m.extra["api_cpu"] = api_cpu
            m.wall = wall
            m.cpu += api_cpu  # the presign and finalize calls, made from this process
            return m

        if w.name == "many":  # curl sends whole files: so does the compared engine variant
            return {
                f"curl --parallel {workers}": lambda: curl("whole", workers),
                f"engine whole files x{workers}": lambda: engine(True),
                f"engine x{workers} (defaults: 16 MiB parts)": lambda: engine(False),
            }
        variants = {
            "curl, 1 stream": lambda: curl("whole", 1),
            "engine, 1 stream (no parts)": lambda: engine(True),
        }
        if w.part_files:
            variants[f"curl --parallel {workers}, parts"] = lambda: curl("parts", workers)
            variants[f"engine x{workers}, parts (defaults)"] = lambda: engine(False)
        return variants

    # ---------------------------------------------------------------------------------

    def with_trees(self, variants: dict[str, Any]) -> dict[str, Any]:
        """Each engine variant again for every ``--engine-tree NAME=DIR``, run from DIR."""
        out: dict[str, Any] = {}
        for name, fn in variants.items():
            out[name] = fn
            if name.startswith("engine"):
                for tree, path in self.args.engine_tree:
                    out[f"{name} [{tree}]"] = self._from_tree(fn, path)
        return out

    def _from_tree(self, fn: Any, path: str) -> Any:
        def run() -> Measured:
            self.child_pythonpath = path
            try:
                return fn()
            finally:
                self.child_pythonpath = None

        return run

    def alternate(self, section: str, w: Workload, variants: dict[str, Any], after: Any) -> None:
        """``--warmup`` unrecorded rounds, then ``--repeat`` rounds, each variant once per round."""
        variants = self.with_trees(variants)
        names = list(variants)
        for rep in range(-self.args.warmup, self.args.repeat):
            shift = rep % len(names)  # rotate the order, so no variant always runs first
            for name in names[shift:] + names[:shift]:
                if (section, w.name, name) in self.failed:
                    continue
                try:
                    m = variants[name]()
                    if rep >= 0:
                        self.record(section, w, name, rep, m)
                except (RuntimeError, OSError, ValueError) as exc:
                    # One broken variant (say, a server being edited) must not lose the others.
                    self.failed[(section, w.name, name)] = str(exc)
                    print(f"  {section:<6} {w.name:<6} {name:<28} FAILED: {exc}", file=sys.stderr)
                finally:
                    after()


def median_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["section"], r["workload"], r["variant"]), []).append(r)
    out = []
    for (section, workload, variant), rs in groups.items():
        out.append(
            {
                "section": section,
                "workload": workload,
                "variant": variant,
                "runs": len(rs),
                "bytes": rs[0]["bytes"],
                **{
                    k: statistics.median(r[k] for r in rs)
                    for k in ("mb_s", "cpu_s_per_gb", "peak_rss_mb", "receiver_cpu_s_per_gb")
                },
                "mb_s_min": min(r["mb_s"] for r in rs),
                "mb_s_max": max(r["mb_s"] for r in rs),
                "finalize_s": (
                    statistics.median(r["finalize_s"] for r in rs)
                    if all(r.get("finalize_s") for r in rs)
                    else None
                ),
                "retries": sum(r.get("retries", 0) for r in rs),
            }
        )
    return out


def find(
    rows: list[dict[str, Any]], section: str, workload: str, prefix: str, tree: str | None = None
) -> dict[str, Any] | None:
    suffix = f" [{tree}]" if tree else ""
    return next(
        (
            r
            for r in rows
            if r["section"] == section
            and r["workload"] == workload
            and r["variant"].startswith(prefix)
            and r["variant"].endswith(suffix)
            and (tree or not r["variant"].endswith("]"))
        ),
        None,
    )


PAIRS = [  # (section, workload, engine variant prefix, curl variant prefix, checks CPU)
    ("nginx", "many", "engine send_range x", "curl --parallel", True),
    ("nginx", "single", "engine send_range, 1 stream", "curl, 1 stream", True),
    ("nginx", "single", "engine send_range x", "curl --parallel", True),
    # Against the cheapest client that hashes what it sends (informational: the ceiling here).
    ("nginx", "many", "engine send_range x", "sha256 + curl --parallel", False),
    ("nginx", "single", "engine send_range, 1 stream", "sha256 + curl, 1 stream", False),
    ("server", "many", "engine whole files x", "curl --parallel", False),
    ("server", "single", "engine, 1 stream", "curl, 1 stream", False),
    ("server", "single", "engine x", "curl --parallel", False),
]


def evaluate(
    rows: list[dict[str, Any]], rss: list[dict[str, Any]], trees: list[str]
) -> list[dict[str, Any]]:
    goals = []
    for (section, workload, eng, ref, cpu), tree in (
        (pair, tree) for tree in [None, *trees] for pair in PAIRS
    ):
        e, c = find(rows, section, workload, eng, tree), find(rows, section, workload, ref)
        if e is None or c is None:
            continue
        ratio = e["mb_s"] / c["mb_s"]
        goal = {
            "section": section,
            "workload": workload,
            "tree": tree,
            "engine": e["variant"],
            "curl": c["variant"],
            "throughput_ratio": ratio,
            "throughput_pass": ratio >= GOAL_THROUGHPUT,
        }
        if cpu:
            cr = e["cpu_s_per_gb"] / c["cpu_s_per_gb"]
            goal.update(cpu_ratio=cr, cpu_pass=cr <= GOAL_CPU)
        goals.append(goal)
    engine_rss = [
        r["peak_rss_mb"]
        for r in rows
        if r["variant"].startswith("engine") and not r["variant"].endswith("]")
    ]
    engine_rss += [r["peak_rss_mb"] for r in rss]
    if engine_rss:
        goals.append(
            {
                "section": "rss",
                "max_engine_peak_rss_mb": max(engine_rss),
                "rss_pass": max(engine_rss) < GOAL_RSS_MB,
            }
        )
    if len(rss) >= 2:
        spread = max(r["peak_rss_mb"] for r in rss) - min(r["peak_rss_mb"] for r in rss)
        goals.append(
            {
                "section": "rss-flat",
                "spread_mb": spread,
                "flat_pass": spread <= RSS_FLAT_MB,
                "sizes": [r["size_gib"] for r in rss],
            }
        )
    return goals


def print_report(
    rows: list[dict[str, Any]],
    rss: list[dict[str, Any]],
    goals: list[dict[str, Any]],
    labels: dict[str, str],
    trees: list[str],
) -> None:
    refs = {}
    for section, workload, eng, ref, _ in PAIRS:
        for tree in [None, *trees]:
            c, e = find(rows, section, workload, ref), find(rows, section, workload, eng, tree)
            if c and e:  # the table compares with plain curl (the first pair)
                refs.setdefault((section, workload, e["variant"]), c)
    print()
    print(
        "| receiver | files | client | MB/s | vs curl | CPU s/GB | vs curl | peak RSS MB "
        "| receiver CPU s/GB | of which finalize, s |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c = refs.get((r["section"], r["workload"], r["variant"]))
        vs = f"{r['mb_s'] / c['mb_s']:.2f}x" if c else ""
        vs_cpu = f"{r['cpu_s_per_gb'] / c['cpu_s_per_gb']:.2f}x" if c else ""
        receiver = "nginx WebDAV" if r["section"] == "nginx" else "methodic serve"
        print(
            f"| {receiver} | {labels[r['workload']]} | {r['variant']} | {r['mb_s']:.0f} | {vs} "
            f"| {r['cpu_s_per_gb']:.2f} | {vs_cpu} | {r['peak_rss_mb']:.0f} "
            f"| {r['receiver_cpu_s_per_gb']:.2f} "
            f"| {'' if r['finalize_s'] is None else format(r['finalize_s'], '.1f')} |"
        )
    for r in rss:
        print(
            f"| methodic serve | 1 x {r['size_gib']:g} GiB (sparse) | engine x{r['workers']} (defaults) "
            f"| {r['mb_s']:.0f} | | {r['cpu_s_per_gb']:.2f} | | {r['peak_rss_mb']:.0f} | | |"
        )
    print()
    for g in goals:
        if g["section"] in ("nginx", "server"):
            line = (
                f"- {g['section']}, {labels[g['workload']]}: {g['engine']} at "
                f"{g['throughput_ratio']:.2f}x {g['curl']}'s throughput "
                f"(goal >= {GOAL_THROUGHPUT}x): {'PASS' if g['throughput_pass'] else 'FAIL'}"
            )
            if "cpu_ratio" in g:
                line += (
                    f"; {g['cpu_ratio']:.2f}x its CPU/GB (goal <= {GOAL_CPU}x): "
                    f"{'PASS' if g['cpu_pass'] else 'FAIL'}"
                )
            print(line)
        elif g["section"] == "rss":
            print(
                f"- engine peak RSS, every run: max {g['max_engine_peak_rss_mb']:.0f} MB "
                f"(goal < {GOAL_RSS_MB:.0f} MB): {'PASS' if g['rss_pass'] else 'FAIL'}"
            )
        else:
            print(
                f"- engine peak RSS for {' and '.join(f'{s:g} GiB' for s in g['sizes'])}: "
                f"spread {g['spread_mb']:.1f} MB (goal: the same, within {RSS_FLAT_MB:.0f} MB): "
                f"{'PASS' if g['flat_pass'] else 'FAIL'}"
            )


def pick_base(need: int) -> Path:
    """A scratch directory on tmpfs when it has room (the disk is then not what is measured)."""
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        with contextlib.suppress(OSError):
            st = os.statvfs(candidate)
            if st.f_bavail * st.f_frsize > need:
                return Path(tempfile.mkdtemp(prefix="methodic-throughput-", dir=candidate))
    raise SystemExit(
        f"no scratch space with {need / GiB:.0f} GiB free (tmpfs or {tempfile.gettempdir()})"
    )


def machine() -> dict[str, Any]:
    import httpx

    import methodic

    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "engine"], capture_output=True, text=True
    ).stdout.strip()
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[
        0
    ]
    model = ""
    with contextlib.suppress(OSError):
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    return {
        "machine": f"{platform.machine()} {model}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB RAM",
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "httpx": httpx.__version__,
        "methodic": methodic.__version__,
        "git": rev + (" (engine modified)" if dirty else ""),
        "curl": " ".join(curl.split()[:2]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, < 1 min")
    parser.add_argument(
        "--repeat", type=int, default=None, help="runs per variant (default 5; --quick 2)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="unrecorded rounds before each workload (default 1; --quick 0)",
    )
    parser.add_argument("--workers", type=int, default=8, help="parallel streams for both clients")
    parser.add_argument("--part-size", type=int, default=16, help="MiB (the engine's default)")
    parser.add_argument("--only", default="nginx,server,rss", help="comma list of nginx,server,rss")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results (default bench/results/throughput.json; --quick: none)",
    )
    parser.add_argument(
        "--server-pythonpath",
        default=None,
        metavar="DIR",
        help="run `methodic serve` from another source tree (DIR/methodic)",
    )
    parser.add_argument(
        "--engine-tree",
        action="append",
        default=[],
        metavar="NAME=DIR",
        type=lambda v: tuple(v.split("=", 1)),
        help="also run every engine variant with DIR first on PYTHONPATH "
        "(an engine change to compare, in the same run); repeatable",
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    from methodic import ChronicleError as ChronicleErrorType

    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    args.part_size *= MiB
    sections = set(args.only.split(","))
    if args.quick:
        many, single, rss_sizes = (16, 4 * MiB), 64 * MiB, [128 * MiB, 512 * MiB]
    else:
        many, single, rss_sizes = (16, 128 * MiB), 2 * GiB, [1 * GiB, 8 * GiB]
    if not shutil.which("curl"):
        raise SystemExit("curl not found: apt-get install -y curl")

    total = many[0] * many[1] + 2 * single  # sources and single-file parts
    # Sources plus one run's sink; the sources are deleted before the RSS runs' sinks fill up.
    need = max(total + max(many[0] * many[1], single), max(rss_sizes) if "rss" in sections else 0)
    base = pick_base(need + GiB)

    # SIGTERM/SIGHUP clean up like Ctrl-C does.
    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    nginx: Nginx | None = None
    server: Server | None = None
    chronicles: list[Any] = []
    bench = Bench(args, base)
    rss: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        print(f"scratch in {base}; writing test files...", file=sys.stderr, flush=True)
        block = os.urandom(16 * MiB)
        label = lambda n, s: f"{n} x {s // GiB} GiB" if s >= GiB else f"{n} x {s // MiB} MiB"  # noqa: E731
        workloads = [
            make_workload(base, "many", label(*many), many[0], many[1], block, args.part_size),
            make_workload(base, "single", label(1, single), 1, single, block, args.part_size),
        ]
        labels = {w.name: w.label for w in workloads}

        def section(name: str, body: Any) -> None:
            """Run one section; if it breaks (a server being edited), keep the others' figures."""
            try:
                body()
            except (RuntimeError, OSError, ValueError, ChronicleErrorType) as exc:
                bench.failed[(name, "*", "*")] = f"{type(exc).__name__}: {exc}"
                print(f"  {name}: FAILED: {exc}", file=sys.stderr, flush=True)

        def run_nginx() -> None:
            nonlocal nginx
            nginx = Nginx(base).start()
            print(
                f"(a) nginx {nginx.version()} WebDAV at {nginx.origin}", file=sys.stderr, flush=True
            )
            for w in workloads:
                bench.alternate(
                    "nginx", w, bench.nginx_variants(nginx, w), lambda: clear_dir(nginx.sink)
                )
            nginx.stop()

        def run_server() -> None:
            from methodic import Chronicle

            runs = {}
            for layout, opts in (
                ("whole", {"part_threshold": 1 << 62}),
                ("parts", {"part_size": args.part_size}),
            ):
                c = Chronicle(server_url=server.url, api_key=server.api_key, **opts)
                chronicles.append(c)
                runs[layout] = c.run(c.create_experiment("throughput-bench-curl"), 0, len(runs))
            for w in workloads:
                bench.alternate(
                    "server", w, bench.server_variants(server, w, runs), server.clear_blobs
                )

        def run_rss() -> None:
            shutil.rmtree(base / "src", ignore_errors=True)  # room for the stored copies
            for size in rss_sizes:
                d = base / "src" / f"rss-{size}"
                d.mkdir(parents=True)
                with open(d / "model.safetensors", "wb") as f:
                    f.truncate(size)  # sparse: reads as zeros, costs no memory on tmpfs
                bench.counter += 1
                spec = {
                    "server_url": server.url,
                    "api_key": server.api_key,
                    "workers": args.workers,
                    "local_dir": str(d),
                    "tracker": str(bench.scratch / f"t{bench.counter}.sqlite"),
                    "run": 1000 + bench.counter,
                }
                try:
                    m = bench._child("e2e", spec, [server.proc.pid])
                finally:
                    server.clear_blobs()
                    shutil.rmtree(d, ignore_errors=True)
                rss.append(
                    {
                        "size_gib": size / GiB,
                        "workers": args.workers,
                        "mb_s": m.bytes / m.wall / MB,
                        "cpu_s_per_gb": m.cpu / (m.bytes / GB),
                        "peak_rss_mb": m.rss_mb,
                    }
                )
                print(
                    f"  rss    {size / GiB:g} GiB: {m.rss_mb:.0f} MB peak RSS, "
                    f"{m.bytes / m.wall / MB:.0f} MB/s",
                    file=sys.stderr,
                    flush=True,
                )

        def start_server() -> None:
            nonlocal server
            server = Server(base, args.server_pythonpath).start()
            print(f"(b) methodic serve at {server.url}", file=sys.stderr, flush=True)

        if "nginx" in sections:
            section("nginx", run_nginx)
        if sections & {"server", "rss"}:
            section("server", start_server)
        if server is not None and server.url:
            if "server" in sections:
                section("server", run_server)
            if "rss" in sections:
                section("rss", run_rss)
    finally:
        for c in chronicles:
            with contextlib.suppress(Exception):
                c.close()
        if server is not None:
            server.stop()
        if nginx is not None:
            nginx.stop()
        shutil.rmtree(base, ignore_errors=True)

    load_after = os.getloadavg()
    rows = median_rows(bench.runs)
    trees = [name for name, _ in args.engine_tree]
    goals = evaluate(rows, rss, trees)
    print_report(rows, rss, goals, labels, trees)
    print(
        f"\nload average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
        f"on {os.cpu_count()} CPUs"
    )
    result = {
        **machine(),
        "engine_trees": dict(args.engine_tree),
        "quick": args.quick,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "workers": args.workers,
        "part_size": args.part_size,
        "scratch_fs": str(base.parent),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "medians": rows,
        "rss": rss,
        "goals": goals,
        "runs": bench.runs,
    }
    if bench.failed:
        result["failed"] = [
            {"section": k[0], "workload": k[1], "variant": k[2], "error": v}
            for k, v in bench.failed.items()
        ]
        for k, v in bench.failed.items():
            print(f"- FAILED {' / '.join(k)}: {v[:300]}")
    output = args.output or (None if args.quick else ROOT / "results" / "throughput.json")
    if output is not None:
        output.parent.mkdir(exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
