"""bench/throughput.py's runs: the workloads (files written once, reused) and ``Bench``, which runs
each variant (engine or curl, into nginx or `methodic serve`) in processes of its own."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    GB,
    MB,
    ROOT,
    Measured,
    Nginx,
    Server,
    proc_cpu,
    run_process,
)


@dataclass
class Workload:
    name: str  # "many" or "single"
    label: str
    dir: Path
    files: list[Path]
    sha256: dict[str, str]
    part_files: dict[tuple[str, int], Path] = field(default_factory=dict)
    # algorithm -> (file name, part or None) -> hex digest of that range (computed once)
    digests: dict[str, dict[tuple[str, int | None], str]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def range_digests(self, algorithm: str, part_size: int) -> dict[tuple[str, int | None], str]:
        """Every whole file's and every part's digest: what curl's side is given, for free, to
        bind its URLs (outside the timing), and what the engine's digests are checked against."""
        if algorithm not in self.digests:
            from methodic._checksum import hash_range

            out: dict[tuple[str, int | None], str] = {}
            for f in self.files:
                size = f.stat().st_size
                out[(f.name, None)] = hash_range(f, 0, size, algorithm)
                if self.part_files:
                    for n in range(1, -(-size // part_size) + 1):
                        off = (n - 1) * part_size
                        out[(f.name, n)] = hash_range(f, off, min(part_size, size - off), algorithm)
            self.digests[algorithm] = out
        return self.digests[algorithm]


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
            [sys.executable, str(ROOT / "throughput.py"), "--child", mode, str(spec_path)],
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
        hash_alongside: str | None = None,
        headers: list[dict[str, str]] | None = None,
    ) -> Measured:
        """curl PUTs ``pairs`` (with ``headers[i]`` on the i-th, e.g. a bound URL's
        x-methodic-checksum). ``hash_alongside`` (an algorithm): a second process reads and
        hashes the same files at the same time (wall time and CPU of both): ``openssl dgst
        -sha256``, or for crc64nvme a Python one-liner over awscrt's CRC (what the engine uses),
        i.e. the cheapest uploader that hashes what it sends, the ceiling of such a client here."""
        self.counter += 1
        common = [
            "--silent",
            "--show-error",
            "--no-progress-meter",
            "-H",
            "Expect:",
            "-w",
            "%{http_code}\\n",
        ]
        argv = ["curl"]
        if parallel > 1:
            argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(parallel)]
        if headers is None:
            argv += common
            for path, url in pairs:
                argv += ["-T", str(path), "-o", "/dev/null", url]
        else:  # per-URL headers: one --next section each (curl still runs them in parallel)
            for i, ((path, url), extra) in enumerate(zip(pairs, headers, strict=True)):
                argv += (["--next"] if i else []) + common
                for k, v in extra.items():
                    argv += ["-H", f"{k}: {v}"]
                argv += ["-T", str(path), "-o", "/dev/null", url]
        if hash_alongside:  # sh waits for both, so its rusage from wait4 includes both
            files = [str(p) for p, _ in pairs]
            if hash_alongside == "sha256":
                hasher = shlex.join(["openssl", "dgst", "-sha256", *files])
            else:
                code = (
                    "import os, sys; from awscrt.checksums import crc64nvme\n"
                    "b = bytearray(4 << 20); v = memoryview(b)\n"
                    "for p in sys.argv[1:]:\n"
                    "    c = 0; fd = os.open(p, os.O_RDONLY)\n"
                    "    while n := os.readv(fd, [b]): c = crc64nvme(v[:n], c)\n"
                    "    os.close(fd)\n"
                )
                hasher = shlex.join([sys.executable, "-c", code, *files])
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
        algorithms = self.args.checksums
        recv = nginx.pids()
        part = self.args.part_size
        origin = nginx.origin

        def whole_targets(prefix: str, algorithm: str) -> list[dict[str, Any]]:
            digests = w.range_digests(algorithm, part)
            return [
                {
                    "name": f.name,
                    "url": f"{origin}/{prefix}/{f.name}",
                    "local_path": str(f),
                    "offset": 0,
                    "length": f.stat().st_size,
                    "digest": digests[(f.name, None)],
                }
                for f in w.files
            ]

        def part_targets(prefix: str, algorithm: str) -> list[dict[str, Any]]:
            f = w.files[0]
            size = f.stat().st_size
            digests = w.range_digests(algorithm, part)
            return [
                {
                    "name": f"{f.name}.{n}",
                    "url": f"{origin}/{prefix}/{f.name}.{n:05d}",
                    "local_path": str(f),
                    "offset": (n - 1) * part,
                    "length": min(part, size - (n - 1) * part),
                    "digest": digests[(f.name, n)],
                }
                for n in range(1, -(-size // part) + 1)
            ]

        def engine(targets: list[dict[str, Any]], n: int, algorithm: str) -> Measured:
            spec = {"origin": origin, "workers": n, "targets": targets, "checksum": algorithm}
            return self._child("put", spec, recv)

        def bind(fn: Any, *args: Any) -> Any:
            return lambda: fn(*args)

        many = [(f, f"{origin}/curl/{f.name}") for f in w.files]
        one = [(w.files[0], f"{origin}/curl/{w.files[0].name}")]
        variants: dict[str, Any] = {}
        if w.name == "many":
            variants[f"curl --parallel {workers}"] = bind(self._curl, many, workers, recv)
            for a in algorithms:
                variants[f"{a} + curl --parallel {workers}"] = bind(
                    self._curl, many, workers, recv, a
                )
            for a in algorithms:
                variants[f"engine {a} + send_range x{workers}"] = bind(
                    lambda a: engine(whole_targets("engine", a), workers, a), a
                )
            return variants
        variants["curl, 1 stream"] = bind(self._curl, one, 1, recv)
        for a in algorithms:
            variants[f"{a} + curl, 1 stream"] = bind(self._curl, one, 1, recv, a)
        for a in algorithms:
            variants[f"engine {a} + send_range, 1 stream"] = bind(
                lambda a: engine(whole_targets("engine", a), 1, a), a
            )
        if w.part_files:
            parts = [(p, f"{origin}/curl/{p.name}") for p in w.part_files.values()]
            variants[f"curl --parallel {workers}, parts"] = bind(self._curl, parts, workers, recv)
            for a in algorithms:
                variants[f"engine {a} + send_range x{workers}, parts"] = bind(
                    lambda a: engine(part_targets("engine", a), workers, a), a
                )
        return variants

    # (b) server ------------------------------------------------------------------------

    def server_variants(
        self, server: Server, w: Workload, runs: dict[tuple[str, str], Any]
    ) -> dict[str, Any]:
        """``runs[(layout, algorithm)]``: a run of a Chronicle with that layout and algorithm,
        for curl's assets (created with the algorithm, so the server verifies the same way)."""

        workers = self.args.workers
        recv = [server.proc.pid] if server.proc else []

        def engine(whole: bool, algorithm: str) -> Measured:
            self.counter += 1
            spec = {
                "server_url": server.url,
                "api_key": server.api_key,
                "workers": workers,
                "local_dir": str(w.dir),
                "tracker": str(self.scratch / f"t{self.counter}.sqlite"),
                "run": self.counter,
                "part_size": self.args.part_size,
                "checksum": algorithm,
            }
            if whole:
                spec["part_threshold"] = 1 << 62
            return self._child("e2e", spec, recv)

        def curl(layout: str, parallel: int, algorithm: str) -> Measured:
            """The engine's protocol, minus the hashing (curl is given the digests): create the
            asset with the algorithm, presign every range bound to its digest, curl with each
            URL's x-methodic-checksum header, finalize (the server derives the checksums)."""
            run = runs[(layout, algorithm)]
            part = self.args.part_size if layout == "parts" else None
            digests = w.range_digests(algorithm, self.args.part_size)
            by_name = {f.name: f for f in w.files}
            manifest, keys = [], []
            for f in w.files:
                size = f.stat().st_size
                manifest.append({"path": f.name, "size": size, "sha256": None, "part_size": part})
                if part is None:
                    keys.append((f.name, None))
                else:
                    keys += [(f.name, n) for n in range(1, -(-size // part) + 1)]
            self.counter += 1
            call = server.call
            rc0 = proc_cpu(recv)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            asset_id = call(
                "POST",
                f"/runs/{run.id}/assets",
                {
                    "asset_id": f"curl-{self.counter}",
                    "asset_type": "checkpoint",
                    "components": manifest,
                    "checksum_algorithm": algorithm,
                },
            )["asset_id"]
            targets = call(
                "POST",
                f"/assets/{asset_id}/presign",
                {"targets": [{"path": p, "part": n, "checksum": digests[(p, n)]} for p, n in keys]},
            )["targets"]
            pairs, headers = [], []
            for t in targets:
                n = t.get("part")
                local = by_name[t["path"]] if n is None else w.part_files[(t["path"], n)]
                pairs.append((local, t["url"]))
                headers.append(t["headers"])
            if not all("x-methodic-checksum" in h for h in headers):
                raise RuntimeError(f"targets not bound to their digests: {headers[:1]}")
            m = self._curl(pairs, parallel, recv, headers=headers)
            t_fin = time.perf_counter()
            asset = call("POST", f"/assets/{asset_id}/finalize", {})
            m.extra["finalize_s"] = time.perf_counter() - t_fin
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            # the API calls and finalize too, as for the engine
            m.receiver_cpu = proc_cpu(recv) - rc0
            if asset["state"] != "finalized":
                raise RuntimeError(f"curl's asset is {asset['state']}")
            api_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            m.extra["curl_wall"] = m.wall
            m.extra["api_cpu"] = api_cpu
            m.wall = wall
            m.cpu += api_cpu  # the API calls, made from this process
            return m

        def bind(fn: Any, *args: Any) -> Any:
            return lambda: fn(*args)

        variants: dict[str, Any] = {}
        for a in self.args.checksums:
            if w.name == "many":  # curl sends whole files: so does the compared engine variant
                variants[f"curl --parallel {workers}, {a} asset"] = bind(curl, "whole", workers, a)
                variants[f"engine {a}, whole files x{workers}"] = bind(engine, True, a)
                variants[f"engine {a}, x{workers} (defaults: 16 MiB parts)"] = bind(
                    engine, False, a
                )
                continue
            variants[f"curl, 1 stream, {a} asset"] = bind(curl, "whole", 1, a)
            variants[f"engine {a}, 1 stream (no parts)"] = bind(engine, True, a)
            if w.part_files:
                variants[f"curl --parallel {workers}, parts, {a} asset"] = bind(
                    curl, "parts", workers, a
                )
                variants[f"engine {a}, x{workers} parts (defaults)"] = bind(engine, False, a)
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
