"""Download benchmark: the engine against curl and aria2c, from the same server, in one run.

    python bench/download.py [--quick] [--repeat 3] [--workers 8] [--only big,medium,small,rss]

Three sets are uploaded once to ``methodic serve`` (its blob listener on loopback): one big
file (2 GiB; --quick 512 MiB), 16 x 128 MiB (--quick 8 x 64 MiB), 2,000 x 1 MiB (--quick
300 x 1 MiB). Each set is then downloaded, clients alternating round by round, into a fresh
directory on the same file system:

- engine: ``Run.download_asset`` in a process of its own (``Chronicle(max_upload_workers=N)``):
  presigned GETs, parallel ranges written by pwrite, every file verified against its published
  crc64nvme checksum before it takes its final name;
- curl: ``curl --parallel --parallel-max N`` from the same presigned URLs (one stream per file;
  no verification);
- aria2c (the big file only): ``aria2c -x 8 -s 8`` from its presigned URL (8 ranges of one file).

MB/s is bytes / wall time (median of ``--repeat`` rounds): curl's and aria2c's whole process,
the engine's ``download_asset`` call (its process also starts Python and opens a Chronicle,
as ``bench/throughput.py`` measures its engine); CPU s/GB is user+system time per 10^9 bytes
over the same window; peak RSS the client process's VmHWM. ``rss`` downloads a
1 GiB and an 8 GiB (--quick: 256 MiB and 1 GiB) file with the engine: flat memory (with --only rss:
bench/results/download-partial.json). The machine is
shared (2 vCPUs, other benchmarks may run): figures are ratios within one run. Writes
bench/results/download.json (or download-quick.json) and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import GB, MB, ROOT, GiB, MiB, Server, machine, pick_base, run_process

CHILD = "--child"


def write_file(path: Path, size: int, salt: int) -> None:
    block = hashlib.sha256(str(salt).encode()).digest() * (MiB // 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            block = block[1:] + block[:1]


SETS: dict[str, tuple[int, int]] = {  # name: (files, size of each)
    "big": (1, 2 * GiB),
    "medium": (16, 128 * MiB),
    "small": (2000, 1 * MiB),
}
QUICK: dict[str, tuple[int, int]] = {
    "big": (1, 512 * MiB),
    "medium": (8, 64 * MiB),
    "small": (300, 1 * MiB),
}


def upload_set(server: Server, base: Path, name: str, count: int, size: int) -> str:
    """Write the set, upload it with the engine (finalized), delete the local copy."""
    from methodic import Chronicle

    src = base / f"src-{name}"
    for i in range(count):
        write_file(src / (f"f{i:05d}.bin" if count > 1 else "big.bin"), size, i)
    with Chronicle(server.url, server.api_key, max_upload_workers=8) as chronicle:
        run = chronicle.run(chronicle.create_experiment("bench-download"), 0, 0)
        handle = run.register_and_upload_async(src, asset_type=name)
        handle.result(timeout=3600)
    shutil.rmtree(src)
    return str(handle.asset_id)


def measured(code: int, usage: Any, wall: float, rss: float, nbytes: int, what: str) -> dict:
    if code != 0:
        raise RuntimeError(f"{what} exited {code}")
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "mb_s": nbytes / wall / MB,
        "cpu_s_per_gb": cpu / (nbytes / GB),
        "rss_mb": rss,
        "wall": wall,
    }


class Bench:
    def __init__(self, server: Server, base: Path, workers: int) -> None:
        self.server = server
        self.base = base
        self.workers = workers
        self.n = 0

    def fresh(self) -> Path:
        self.n += 1
        dest = self.base / f"dl-{self.n}"
        return dest

    def engine(self, asset_id: str, nbytes: int) -> dict:
        dest = self.fresh()
        spec = json.dumps(
            {
                "url": self.server.url,
                "key": self.server.api_key,
                "asset": asset_id,
                "dest": str(dest),
                "workers": self.workers,
            }
        )
        argv = [sys.executable, str(Path(__file__).resolve()), CHILD, spec]
        out = self.base / "engine.out"
        code, _usage, process_wall, rss = run_process(
            argv, out, self.base / "engine.err", env=_env()
        )
        if code != 0:
            raise RuntimeError(f"engine exited {code}: {(self.base / 'engine.err').read_text()}")
        window = json.loads(out.read_text())
        m = {
            "mb_s": nbytes / window["wall"] / MB,
            "cpu_s_per_gb": window["cpu"] / (nbytes / GB),
            "rss_mb": rss,
            "wall": window["wall"],
            "process_wall": process_wall,
        }
        check_sizes(dest, nbytes)
        shutil.rmtree(dest)
        return m

    def urls(self, asset_id: str) -> list[dict]:
        return list(self.server.call("GET", f"/assets/{asset_id}/download")["components"])

    def curl(self, asset_id: str, nbytes: int) -> dict:
        dest = self.fresh()
        dest.mkdir()
        config = self.base / "curl.cfg"
        with open(config, "w") as f:
            for c in self.urls(asset_id):
                f.write(f'url = "{c["url"]}"\noutput = "{dest / c["path"]}"\n')
        argv = [
            "curl",
            "--parallel",
            "--parallel-max",
            str(self.workers),
            "--fail",
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "-K",
            str(config),
        ]
        res = run_process(argv, self.base / "curl.out", self.base / "curl.err")
        m = measured(*res, nbytes, "curl")
        check_sizes(dest, nbytes)
        shutil.rmtree(dest)
        return m

    def aria2(self, asset_id: str, nbytes: int) -> dict:
        dest = self.fresh()
        dest.mkdir()
        (c,) = self.urls(asset_id)
        argv = [
            "aria2c",
            "-x",
            "8",
            "-s",
            "8",
            "--file-allocation=none",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "--check-certificate=false",
            "--no-conf",
            "--quiet",
            "--max-tries=1",
            "--all-proxy=",
            "-d",
            str(dest),
            "-o",
            c["path"],
            c["url"],
        ]
        res = run_process(argv, self.base / "aria2.out", self.base / "aria2.err")
        m = measured(*res, nbytes, "aria2c")
        check_sizes(dest, nbytes)
        shutil.rmtree(dest)
        return m


def check_sizes(dest: Path, nbytes: int) -> None:
    got = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    if got != nbytes:
        raise RuntimeError(f"{dest}: {got} bytes, expected {nbytes}")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METHODIC_")}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT.parent / "engine"), env.get("PYTHONPATH")])
    )
    return env


def child(spec_text: str) -> None:
    """The engine in a process of its own; prints the transfer window's wall and CPU time."""
    import resource

    from methodic import Chronicle

    spec = json.loads(spec_text)
    with Chronicle(spec["url"], spec["key"], max_upload_workers=spec["workers"]) as chronicle:
        run = chronicle.run(chronicle.create_experiment("bench-download"), 0, 0)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run.download_asset(spec["asset"], spec["dest"])
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    print(json.dumps({"wall": wall, "cpu": cpu}))


def summarize(rows: list[dict]) -> dict:
    return {
        k: statistics.median(r[k] for r in rows) for k in ("mb_s", "cpu_s_per_gb", "rss_mb", "wall")
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == CHILD:
        child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sets, 2 rounds")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 5; --quick 2)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--only", default="big,medium,small,rss")
    args = parser.parse_args()
    sets = QUICK if args.quick else SETS
    repeat = args.repeat or (2 if args.quick else 5)
    only = set(args.only.split(","))
    rss_sizes = (256 * MiB, 1 * GiB) if args.quick else (1 * GiB, 8 * GiB)
    # One set at a time is held: its upload (deleted once stored), the server's copy, a download.
    need = max([n * s for k, (n, s) in sets.items() if k in only] + list(rss_sizes)) * 3
    base = pick_base(need)
    server = Server(base).start()
    load_before = os.getloadavg()
    results: dict[str, Any] = {"sets": {}, "rss": {}}
    try:
        bench = Bench(server, base, args.workers)
        for name, (count, size) in sets.items():
            if name not in only:
                continue
            nbytes = count * size
            asset_id = upload_set(server, base, name, count, size)
            clients = {"engine": bench.engine, "curl": bench.curl}
            if name == "big":
                clients["aria2c"] = bench.aria2
            rows: dict[str, list[dict]] = {c: [] for c in clients}
            for rnd in range(repeat):
                order = list(clients) if rnd % 2 == 0 else list(reversed(clients))
                for c in order:
                    rows[c].append(clients[c](asset_id, nbytes))
                    print(f"{name} round {rnd + 1} {c}: {rows[c][-1]['mb_s']:.0f} MB/s", flush=True)
            med = {c: summarize(r) for c, r in rows.items()}
            entry: dict[str, Any] = {
                "files": count,
                "file_size": size,
                "median": med,
                "runs": rows,
                "engine_vs_curl": med["engine"]["mb_s"] / med["curl"]["mb_s"],
            }
            if "aria2c" in med:
                entry["engine_vs_aria2c"] = med["engine"]["mb_s"] / med["aria2c"]["mb_s"]
            results["sets"][name] = entry
            server.clear_blobs()
        if "rss" in only:
            for size in rss_sizes:
                asset_id = upload_set(server, base, f"rss-{size}", 1, size)
                m = bench.engine(asset_id, size)
                results["rss"][f"{size // MiB} MiB"] = m
                server.clear_blobs()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    results["load_before"] = load_before
    results["load_after"] = os.getloadavg()
    results["machine"] = machine()
    results["quick"] = args.quick
    results["repeat"] = repeat
    results["workers"] = args.workers
    results["at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    partial = only != {"big", "medium", "small", "rss"}
    name = "download-quick" if args.quick else "download-partial" if partial else "download"
    out = ROOT / "results" / f"{name}.json"  # only a full run is the recorded one
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {out}")


def print_table(results: dict) -> None:
    print("| set | client | MB/s | vs curl | CPU s/GB | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, entry in results["sets"].items():
        curl = entry["median"]["curl"]["mb_s"]
        for c, m in entry["median"].items():
            print(
                f"| {name} ({entry['files']} x {entry['file_size'] // MiB} MiB) | {c} | "
                f"{m['mb_s']:.0f} | {m['mb_s'] / curl:.2f}x | {m['cpu_s_per_gb']:.2f} | "
                f"{m['rss_mb']:.0f} |"
            )
    for size, m in results["rss"].items():
        print(f"engine peak RSS, one {size} file: {m['rss_mb']:.0f} MB")
    print(f"load average before/after: {results['load_before']} / {results['load_after']}")


if __name__ == "__main__":
    main()
