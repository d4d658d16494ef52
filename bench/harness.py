"""What the benchmarks share: processes and their CPU and RSS, ports, nginx and `methodic serve`
as receivers, the machine's description."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MiB = 1 << 20


GiB = 1 << 30


MB = 1e6


GB = 1e9


ROOT = Path(__file__).resolve().parent


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM: the peak RSS of this process image (ru_maxrss of a child that was vforked from a
    big parent reports the parent's peak, so it is not used)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no VmHWM for {pid}")


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


def serve_argv(data_dir: Path, port: int) -> list[str]:
    """`methodic serve` on loopback, with this interpreter (so a venv's methodic is the one run)."""
    return [
        sys.executable,
        "-m",
        "methodic",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
    ]


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

    def __init__(
        self, base: Path, pythonpath: str | None = None, options: list[str] | None = None
    ) -> None:
        self.pythonpath = pythonpath
        self.options = options or []  # more `methodic serve` options (e.g. --storage s3://...)
        self.data_dir = base / "server-data"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.api_key = ""
        self._api: httpx.Client | None = None

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One control-API call (``path`` under /api/v1); its JSON, or RuntimeError."""
        if self._api is None:
            self._api = httpx.Client(
                base_url=f"{self.url}/api/v1",
                headers={"Authorization": f"Bearer {self.api_key}"},
                trust_env=False,
                timeout=600,
            )
        answer = self._api.request(method, path, json=body)
        if answer.is_error:
            raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text[:500]}")
        return answer.json()

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
            serve_argv(self.data_dir, 0) + self.options,
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
        if self._api is not None:
            self._api.close()
            self._api = None
        stop_process(self.proc)
        with contextlib.suppress(Exception):
            self._log.close()


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
