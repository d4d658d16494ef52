"""Ingest benchmark: the same curl PUTs the same files into nginx WebDAV and into `methodic serve`.

    python bench/ingest.py [--rounds 5] [--dir /dev/shm/methodic-ingest]
                           [--checksum crc64nvme,sha256] [--baseline-src /tmp/asgi/engine]

Shapes: one 2 GiB file, and 16 files of 128 MiB (one curl, one keep-alive connection).
Servers, alternating in one run (the order flips every round): nginx-light's WebDAV module
(started and stopped here, on loopback ports) reading bodies into 1 MiB buffers (the
reference of the ratios, as in bench/throughput.py) and with its default 16k buffer,
`methodic serve` (presigned URLs of the blob listener; one server per ``--checksum`` algorithm,
each asset created with it and every URL bound to its file's digest, presigned outside the
timing, curl sending the ``x-methodic-checksum`` header), and with ``--baseline-src`` the same
command from another checkout (e.g. the Starlette blob route before the listener:
``git worktree add /tmp/asgi <commit>``, then ``--baseline-src /tmp/asgi/engine``).

Reported: MB/s (10^6 bytes per second of curl wall time) and server CPU seconds per GB (from
/proc/<pid>/stat of each server's processes), medians over the rounds after a warm-up. Writes
go to the page cache (tmpfs by default): nginx writes its temp file and renames it; methodic
hashes every body with the asset's algorithm, stores it only if it has the bound digest (each
PUT's answer is checked: ``bound`` and that digest), no fsync per PUT (finalize fsyncs; not
timed here). Goal (issues 7, 12): at least 0.8x the 1m-buffer nginx with the digests verified.
Prints a table and writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import children_of, free_port, proc_cpu, serve_argv

MiB = 1024 * 1024
RESULTS = Path(__file__).parent / "results" / "ingest.json"

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_max_body_size 0;
    {body_buffer}
    client_body_temp_path {prefix}/body-tmp;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            root {prefix}/root;
            dav_methods PUT DELETE;
            create_full_put_path on;
        }}
    }}
}}
"""


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@dataclass
class Source:
    path: Path
    size: int
    sha256: str
    digests: dict[str, str] = field(default_factory=dict)  # algorithm -> hex digest

    def digest(self, algorithm: str) -> str:
        if algorithm not in self.digests:
            from methodic._checksum import hash_range

            self.digests[algorithm] = hash_range(self.path, 0, self.size, algorithm)
        return self.digests[algorithm]


def make_sources(
    root: Path, big_mib: int, small_count: int, small_mib: int
) -> dict[str, list[Source]]:
    root.mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 * MiB)

    def write(name: str, mib: int) -> Source:
        path, h = root / name, hashlib.sha256()
        with open(path, "wb") as f:
            for i in range(mib // 16):
                chunk = i.to_bytes(8, "little") + block[8:]  # no two blocks alike
                h.update(chunk)
                f.write(chunk)
        return Source(path, mib * MiB, h.hexdigest())

    return {
        "1 x 2 GiB" if big_mib == 2048 else f"1 x {big_mib} MiB": [write("big.bin", big_mib)],
        f"{small_count} x {small_mib} MiB": [
            write(f"s{i:02d}.bin", small_mib) for i in range(small_count)
        ],
    }


def curl(
    pairs: list[tuple[Path, str]],
    headers: list[dict[str, str]] | None = None,
    answers: list[Path] | None = None,
) -> float:
    """PUT every (file, url) with one curl (one keep-alive connection); the wall time.

    ``headers[i]``: the i-th PUT's headers (a bound URL's x-methodic-checksum), each PUT then in
    a ``--next`` section of its own (same process, same connection); ``answers[i]``: where its
    response body goes (else /dev/null)."""
    args = ["curl"]
    for i, (path, url) in enumerate(pairs):
        if i and headers is not None:
            args.append("--next")
        if i == 0 or headers is not None:
            args += ["-sS", "--fail", "-w", "%{http_code}\\n"]
        for k, v in (headers[i] if headers else {}).items():
            args += ["-H", f"{k}: {v}"]
        args += ["-T", str(path), "-o", str(answers[i]) if answers else "/dev/null", url]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    codes = done.stdout.split()
    if (
        done.returncode != 0
        or len(codes) != len(pairs)
        or any(c not in ("201", "204") for c in codes)
    ):
        raise RuntimeError(f"curl failed ({done.returncode}): {codes} {done.stderr[-500:]}")
    return elapsed


class Nginx:
    hashing = "off (nginx does not hash)"
    durability = "page cache: temp file renamed into place, no fsync"

    def __init__(self, prefix: Path, body_buffer: str | None) -> None:
        """``body_buffer``: nginx's client_body_buffer_size (None: its default, 16k)."""
        self.name = "nginx WebDAV" + (
            f", {body_buffer} body buffer" if body_buffer else ", defaults"
        )
        self.prefix = prefix
        for sub in ("root", "body-tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = prefix / "nginx.conf"
        directive = f"client_body_buffer_size {body_buffer};" if body_buffer else ""
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=self.port, body_buffer=directive))
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(prefix), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_port(self.port, self.proc)

    def pids(self) -> list[int]:
        return [self.proc.pid, *children_of(self.proc.pid)]

    def targets(self, label: str, sources: list[Source]) -> list[tuple[Path, str]]:
        return [(s.path, f"http://127.0.0.1:{self.port}/{label}/{s.path.name}") for s in sources]

    def curl_options(self, sources: list[Source]) -> tuple[Any, Any]:
        return None, None

    def verify_and_clean(self, label: str, sources: list[Source]) -> None:
        for s in sources:
            assert (self.prefix / "root" / label / s.path.name).stat().st_size == s.size
        shutil.rmtree(self.prefix / "root" / label)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Methodic:
    durability = "page cache, no fsync per PUT; finalize fsyncs every file and directory"

    def __init__(self, name: str, data_dir: Path, src: str | None, algorithm: str) -> None:
        self.name = f"{name} ({algorithm})"
        self.algorithm = algorithm
        self.hashing = (
            f"on: assets of {algorithm}, every URL bound to its range's digest, the server "
            "hashes every body and stores it only if it has that digest"
        )
        self.work = data_dir.parent / f"{data_dir.name}-answers"
        self.work.mkdir(parents=True, exist_ok=True)
        self._headers: dict[str, dict[str, str]] = {}
        self.commit = git_commit(src)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("METHODIC_")}
        if src:
            env["PYTHONPATH"] = src
        self.proc = subprocess.Popen(
            serve_argv(data_dir, self.port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            wait_port(self.port, self.proc)
            deadline = time.monotonic() + 20
            while not (data_dir / "api_key").exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # the port can open before the key is written
            key = (data_dir / "api_key").read_text().strip()
            self.api = httpx.Client(
                base_url=f"http://127.0.0.1:{self.port}/api/v1",
                trust_env=False,
                headers={"Authorization": f"Bearer {key}"},
                timeout=120,
            )
            experiment = self.api.post("/experiments", json={"name": "ingest"}).json()
            self.run_id = self.api.put(f"/experiments/{experiment['id']}/runs/0/0").json()["id"]
        except BaseException:  # not in the caller's list yet: stop it here
            self.proc.terminate()
            self.proc.wait(20)
            raise

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def targets(self, label: str, sources: list[Source]) -> list[tuple[Path, str]]:
        """Create the asset with the algorithm, then presign every PUT bound to its digest (the
        protocol since issue 12; the create's own targets are not bound), outside the timing."""
        asset = self.api.post(
            f"/runs/{self.run_id}/assets",
            json={
                "asset_id": label,
                "asset_type": "bench",
                "checksum_algorithm": self.algorithm,
                "components": [{"path": s.path.name, "size": s.size} for s in sources],
            },
        )
        asset.raise_for_status()
        presigned = self.api.post(
            f"/assets/{label}/presign",
            json={
                "targets": [
                    {"path": s.path.name, "part": None, "checksum": s.digest(self.algorithm)}
                    for s in sources
                ]
            },
        )
        presigned.raise_for_status()
        by_path = {t["path"]: t for t in presigned.json()["targets"]}
        self._headers = {p: t["headers"] for p, t in by_path.items()}
        return [(s.path, by_path[s.path.name]["url"]) for s in sources]

    def curl_options(self, sources: list[Source]) -> tuple[Any, Any]:
        headers = [self._headers[s.path.name] for s in sources]
        if not all("x-methodic-checksum" in h for h in headers):
            raise RuntimeError(f"targets not bound to their digests: {headers[:1]}")
        return headers, [self.work / f"{s.path.name}.json" for s in sources]

    def verify_and_clean(self, label: str, sources: list[Source]) -> None:
        # 201 (checked by curl) and the server's answer: the bound digest it verified.
        for s in sources:
            answer = json.loads((self.work / f"{s.path.name}.json").read_text())
            want = f"{self.algorithm}:{s.digest(self.algorithm)}"
            assert answer["bound"] and answer["checksum"] == want, (s.path.name, answer)
        self.api.delete(f"/assets/{label}").raise_for_status()  # a pending asset: bytes removed

    def stop(self) -> None:
        self.api.close()
        self.proc.terminate()
        self.proc.wait(20)


@dataclass
class Samples:
    mb_s: list[float] = field(default_factory=list)
    cpu_s_per_gb: list[float] = field(default_factory=list)

    def medians(self) -> dict[str, float]:
        return {
            "mb_s": round(statistics.median(self.mb_s), 1),
            "cpu_s_per_gb": round(statistics.median(self.cpu_s_per_gb), 3),
        }


def measure(server: Nginx | Methodic, label: str, sources: list[Source]) -> tuple[float, float]:
    pairs = server.targets(label, sources)
    pids = server.pids()
    cpu_before = proc_cpu(pids)
    elapsed = curl(pairs, *server.curl_options(sources))
    cpu = proc_cpu(pids) - cpu_before
    server.verify_and_clean(label, sources)
    total = sum(s.size for s in sources)
    return total / elapsed / 1e6, cpu / (total / 1e9)


def describe_environment(work: Path) -> dict[str, Any]:
    def first_line(cmd: list[str]) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (done.stdout or done.stderr).strip().splitlines()[0]

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor(),
    )
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(work)], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "curl": first_line(["curl", "--version"]),
        "nginx": first_line(["nginx", "-v"]),
        "work_dir": str(work),
        "work_fs": fs,
    }


def git_commit(src: str | None) -> str:
    where = Path(src).parent if src else Path(__file__).parent
    done = subprocess.run(
        ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return done.stdout.strip() + ("+changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm/methodic-ingest"))
    parser.add_argument(
        "--baseline-src",
        default=None,
        help="engine/ dir of another checkout, run as a third server",
    )
    parser.add_argument("--baseline-name", default="methodic serve, ASGI (Starlette) blob route")
    parser.add_argument(
        "--no-nginx-defaults",
        action="store_true",
        help="skip the second nginx, the one with its default 16k body buffer",
    )
    parser.add_argument(
        "--checksum",
        default="crc64nvme,sha256",
        help="the assets' checksum algorithm(s), comma list: one methodic server each",
    )
    parser.add_argument("--big-mib", type=int, default=2048)
    parser.add_argument("--small-count", type=int, default=16)
    parser.add_argument("--small-mib", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = args.dir
    load_before = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)
    shapes = make_sources(work / "src", args.big_mib, args.small_count, args.small_mib)
    # The reference (ratios): nginx reading bodies into 1 MiB buffers, as the listener does.
    servers: list[Nginx | Methodic] = [Nginx(work / "nginx", "1m")]
    try:
        if not args.no_nginx_defaults:
            servers.append(Nginx(work / "nginx-defaults", None))
        for algorithm in args.checksum.split(","):
            servers.append(
                Methodic(
                    "methodic serve, blob listener", work / f"methodic-{algorithm}", None, algorithm
                )
            )
            if args.baseline_src:
                servers.append(
                    Methodic(
                        args.baseline_name,
                        work / f"baseline-{algorithm}",
                        args.baseline_src,
                        algorithm,
                    )
                )
        samples = {(s.name, shape): Samples() for s in servers for shape in shapes}
        for round_no in range(args.warmup + args.rounds):
            order = servers if round_no % 2 == 0 else servers[::-1]
            for shape_no, (shape, sources) in enumerate(shapes.items()):
                for server in order:
                    label = f"r{round_no}-{shape_no}"
                    mb_s, cpu = measure(server, label, sources)
                    kept = round_no >= args.warmup
                    if kept:
                        samples[(server.name, shape)].mb_s.append(mb_s)
                        samples[(server.name, shape)].cpu_s_per_gb.append(cpu)
                    print(
                        f"{'' if kept else 'warm-up '}round {round_no} {shape:>14} "
                        f"{server.name:<45} {mb_s:7.0f} MB/s {cpu:6.2f} CPU s/GB",
                        flush=True,
                    )
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    reference = servers[0].name
    results: dict[str, Any] = {}
    print(f"\nmedians of {args.rounds} rounds; ratios to {reference}")
    print(f"{'server':<45} {'shape':>14} {'MB/s':>8} {'CPU s/GB':>9} {'x nginx':>8}")
    for server in servers:
        per_shape = {}
        for shape in shapes:
            m = samples[(server.name, shape)].medians()
            ratio = m["mb_s"] / samples[(reference, shape)].medians()["mb_s"]
            per_shape[shape] = {
                **m,
                "ratio_to_nginx": round(ratio, 2),
                "runs_mb_s": [round(x, 1) for x in samples[(server.name, shape)].mb_s],
            }
            print(
                f"{server.name:<45} {shape:>14} {m['mb_s']:8.0f} {m['cpu_s_per_gb']:9.2f} {ratio:8.2f}"
            )
        results[server.name] = {
            **({"commit": server.commit} if isinstance(server, Methodic) else {}),
            "hashing": server.hashing,
            "durability": server.durability,
            "shapes": per_shape,
        }
    goals = []
    for server in servers:
        if isinstance(server, Methodic):
            for shape in shapes:
                ratio = results[server.name]["shapes"][shape]["ratio_to_nginx"]
                goals.append(
                    {"server": server.name, "shape": shape, "ratio": ratio, "pass": ratio >= 0.8}
                )
                print(
                    f"- {server.name}, {shape}: {ratio:.2f}x {reference} (goal >= 0.8x): "
                    f"{'PASS' if ratio >= 0.8 else 'FAIL'}"
                )
    report = {
        "benchmark": "bench/ingest.py",
        "goals": goals,
        "client": "curl -T FILE URL (one process per shape, one keep-alive connection)",
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "order": "alternating, flipped each round",
        "reference": reference,
        "units": {
            "mb_s": "10^6 bytes per second of curl wall time, median",
            "cpu_s_per_gb": "server user+system CPU seconds per 10^9 bytes, median",
        },
        "environment": {
            **describe_environment(work.parent),
            # Other work on the machine shows here; the ratios are of runs alternating with it.
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
