"""Heartbeat benchmark (#18): what uploader sessions cost the server and the uploader.

    python bench/heartbeats.py [--sessions 1000] [--interval 2] [--phase 8] [--rounds 2]
                               [--size 1000] [--uploads 4]

1. Server: `methodic serve` with ordinary API calls (GET experiment, GET run, PUT run) paced
   at 20/s, alternating phases without and with ``--sessions`` simulated uploader sessions
   beating every ``--interval`` s (a separate load process, ~1 KB beats with two assets each).
   Per phase: the server's CPU (user+sys / wall), p50/p99 of the ordinary calls, and the beats
   actually answered per second with their p99.
2. Uploader: one AsyncChronicle uploading ``--size`` (tmpfs) to the same server, heartbeats
   on (every 1 s) vs off, ``--uploads`` times each in alternating order: median throughput
   ratio; and the uploader's CPU per beat, measured over 200 beats in a row.

Writes bench/results/heartbeats.json. The machine is shared (other engineers' tests and
benchmarks run beside it): figures are medians of alternated phases, ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from harness import MB, Server, machine, pick_base, proc_cpu

ROOT = Path(__file__).resolve().parent
BEATERS = 2  # load processes (one Python process cannot offer 500 beats/s here)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------- the load: simulated sessions


def beat_body(i: int) -> dict[str, Any]:
    assets = [
        {
            "asset_id": f"01SIM{i:06d}{k}",
            "asset_type": "checkpoint",
            "local_dir": f"/scratch/job{i}/checkpoint-{k}",
            "state": "uploading",
            "components_done": 3,
            "component_count": 8,
            "bytes_done": 3_000_000_000 + i,
            "bytes_total": 8_000_000_000,
            "rate": 250e6,
            "eta": 20.0,
            "last_error": None,
            "files_uploading": 2,
        }
        for k in range(2)
    ]
    return {
        "info": {
            "host": f"node{i % 64:03d}",
            "pid": 10_000 + i,
            "user": "train",
            "version": "0.1.0",
            "interval": 2.0,
            "runs": [{"run_id": f"R{i}", "experiment_id": "E", "variation": 0, "run": i}],
        },
        "status": {"assets": assets, "rate": 500e6, "total_sent": 6e9, "bandwidth_cap": None},
        "acks": [],
        "closed": False,
    }


class Connection:
    """A bare keep-alive HTTP/1.1 client connection: an httpx client costs too much CPU to
    offer 500 beats/s from one process of a 2-core machine, and the load must not be the
    bottleneck being measured."""

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port, self.key = host, port, key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return int(status_line.split()[1])


async def beater(
    url: str, key: str, first: int, sessions: int, total: int, interval: float, duration: float
) -> None:
    """Sessions ``first`` .. ``first + sessions - 1`` of ``total`` beat every ``interval`` s
    (spread evenly) for ``duration`` s; prints JSON."""
    latencies: list[float] = []
    steady = 0  # beats answered after the first round (every session has started)
    errors = 0
    lags: list[float] = []  # how late each beat left: the load kept its schedule if ~0
    parsed = httpx.URL(url)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(32):
        pool.put_nowait(Connection(parsed.host, parsed.port or 80, key))
    start = time.monotonic()
    stop = start + duration

    async def session(i: int) -> None:
        nonlocal errors, steady
        body = json.dumps(beat_body(i)).encode()
        due = start + interval * i / total
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if time.monotonic() >= stop:
                return
            conn = await pool.get()
            lags.append(time.monotonic() - due)
            t0 = time.perf_counter()
            try:
                status = await conn.post(f"/api/v1/sessions/sim-{i}/beat", body)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                errors += 1
                conn.writer = None
            else:
                if status != 200:
                    errors += 1
                else:
                    latencies.append(time.perf_counter() - t0)
                    steady += time.monotonic() - start >= interval
            pool.put_nowait(conn)
            due += interval

    await asyncio.gather(*(session(i) for i in range(first, first + sessions)))
    wall = time.monotonic() - start
    print(
        json.dumps(
            {
                "beats": len(latencies),
                "beats_per_s": steady / (duration - interval),
                "lag_p99_ms": _pct(lags, 0.99) * 1000,
                "errors": errors,
                "wall": wall,
                "p50_ms": _pct(latencies, 0.5) * 1000,
                "p99_ms": _pct(latencies, 0.99) * 1000,
            }
        ),
        flush=True,
    )


# ---------------------------------------------------------------- 1. the server beside the load


def ordinary_calls(server: Server, exp_id: str, run_id: str, duration: float) -> list[float]:
    """Ordinary control-API calls paced at 20/s for ``duration`` s: their latencies."""
    out: list[float] = []
    headers = {"Authorization": f"Bearer {server.api_key}"}
    calls = [
        ("GET", f"/api/v1/experiments/{exp_id}"),
        ("GET", f"/api/v1/runs/{run_id}"),
        ("PUT", f"/api/v1/experiments/{exp_id}/runs/0/0"),
    ]
    with httpx.Client(base_url=server.url, headers=headers, timeout=30, trust_env=False) as c:
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < duration:
            method, path = calls[n % len(calls)]
            t0 = time.perf_counter()
            c.request(method, path).raise_for_status()
            out.append(time.perf_counter() - t0)
            n += 1
            time.sleep(max(0.0, start + n * 0.05 - time.monotonic()))
    return out


def server_phase(
    server: Server, exp_id: str, run_id: str, *, sessions: int, interval: float, phase: float
) -> dict[str, Any]:
    assert server.proc is not None
    loads = []
    share = -(-sessions // BEATERS)
    for first in range(0, sessions, share) if sessions else ():
        argv = [sys.executable, str(Path(__file__)), "--beater", server.url, server.api_key]
        argv += [str(first), str(min(share, sessions - first)), str(sessions), str(interval)]
        argv.append(str(phase + 2 * interval))
        loads.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
    if loads:
        time.sleep(interval)  # every session has beaten once: the steady state
    cpu0, t0 = proc_cpu([server.proc.pid]), time.monotonic()
    lat = ordinary_calls(server, exp_id, run_id, phase)
    cpu = (proc_cpu([server.proc.pid]) - cpu0) / (time.monotonic() - t0)
    result: dict[str, Any] = {
        "sessions": sessions,
        "server_cpu": cpu,
        "calls": len(lat),
        "p50_ms": _pct(lat, 0.5) * 1000,
        "p99_ms": _pct(lat, 0.99) * 1000,
    }
    if loads:
        beats = [
            json.loads(proc.communicate(timeout=600)[0].strip().splitlines()[-1]) for proc in loads
        ]
        result["beats_per_s"] = sum(b["beats_per_s"] for b in beats)
        result["beat_errors"] = sum(b["errors"] for b in beats)
        result["beat_p99_ms"] = max(b["p99_ms"] for b in beats)
        result["load_lag_p99_ms"] = max(b["lag_p99_ms"] for b in beats)
    return result


# ---------------------------------------------------------------- 2. the uploader, beats on/off


async def one_upload(server: Server, ckpt: Path, heartbeat: float) -> float:
    from methodic import AsyncChronicle

    async with AsyncChronicle(server.url, server.api_key, heartbeat_interval=heartbeat) as c:
        run = await c.run(await c.create_experiment("bench-heartbeats"), 0, 0)
        t0 = time.perf_counter()
        handle = await run.register_and_upload_async(ckpt)
        await handle.result()
        wall = time.perf_counter() - t0
        if heartbeat:
            assert c._heartbeat is not None and c._heartbeat.beats > 0, "no beat was answered"
    return wall


async def beat_cost(server: Server, ckpt: Path, beats: int = 200) -> float:
    """The uploader's CPU seconds per beat (snapshot, JSON, HTTP round trip, answer), measured
    over ``beats`` beats in a row with an asset in the pool: noise-free, unlike throughput."""
    from methodic import AsyncChronicle

    async with AsyncChronicle(server.url, server.api_key, heartbeat_interval=3600) as c:
        run = await c.run(await c.create_experiment("bench-heartbeats"), 0, 0)
        await (await run.register_and_upload_async(ckpt)).result()
        hb = c._heartbeat
        assert hb is not None
        await hb._beat()  # connected
        cpu0 = time.process_time()
        for _ in range(beats):
            await hb._beat()
        return (time.process_time() - cpu0) / beats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--phase", type=float, default=8.0, help="seconds per measured phase")
    p.add_argument("--rounds", type=int, default=2, help="phases of each kind, alternated")
    p.add_argument("--size", type=float, default=1000, help="MB uploaded per upload run")
    p.add_argument("--uploads", type=int, default=4, help="upload runs of each kind")
    args = p.parse_args()

    base = pick_base(int(args.size * MB * 2))
    server = Server(base).start()
    try:
        exp_id = server.call("POST", "/experiments", {"name": "bench"})["id"]
        run_id = server.call("PUT", f"/experiments/{exp_id}/runs/0/0")["id"]
        phases: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
        for _ in range(args.rounds):
            for kind in ("without", "with"):
                n = args.sessions if kind == "with" else 0
                r = server_phase(
                    server, exp_id, run_id, sessions=n, interval=args.interval, phase=args.phase
                )
                phases[kind].append(r)
                print(f"server {kind:>7} sessions: {json.dumps(r)}", flush=True)

        ckpt = base / "ckpt"
        ckpt.mkdir()
        with open(ckpt / "weights.bin", "wb") as f:
            chunk = bytes(range(256)) * 4096
            for _ in range(int(args.size * MB) // len(chunk)):
                f.write(chunk)
        per_beat = asyncio.run(beat_cost(server, ckpt))
        print(f"uploader CPU per beat: {per_beat * 1000:.2f} ms", flush=True)
        server.clear_blobs()
        walls: dict[str, list[float]] = {"on": [], "off": []}
        for n in range(args.uploads):
            for kind in ("off", "on") if n % 2 == 0 else ("on", "off"):
                wall = asyncio.run(one_upload(server, ckpt, 1.0 if kind == "on" else 0))
                walls[kind].append(wall)
                print(f"upload heartbeats {kind}: {args.size / wall:.0f} MB/s", flush=True)
                server.clear_blobs()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in phases[kind])

    summary = {
        "server_cpu_without": med("without", "server_cpu"),
        "server_cpu_with": med("with", "server_cpu"),
        "p50_ms_without": med("without", "p50_ms"),
        "p50_ms_with": med("with", "p50_ms"),
        "p99_ms_without": med("without", "p99_ms"),
        "p99_ms_with": med("with", "p99_ms"),
        "beats_per_s": med("with", "beats_per_s"),
        "beats_per_s_wanted": args.sessions / args.interval,
        "beat_p99_ms": med("with", "beat_p99_ms"),
        "upload_mb_s_off": args.size / statistics.median(walls["off"]),
        "upload_mb_s_on": args.size / statistics.median(walls["on"]),
        "uploader_cpu_ms_per_beat": per_beat * 1000,
        "uploader_cpu_share_at_5s": per_beat / 5.0,
        "upload_ratio_on_vs_off": statistics.median(walls["off"]) / statistics.median(walls["on"]),
    }
    print(json.dumps(summary, indent=2))
    out = {
        "benchmark": "heartbeats",
        "args": vars(args),
        "machine": machine(),
        "note": "2 cores shared with other engineers' tests and benchmarks during the run",
        "summary": summary,
        "phases": phases,
        "uploads": walls,
    }
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "heartbeats.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--beater":
        url, key, first, n, total, interval, duration = sys.argv[2:9]
        asyncio.run(
            beater(url, key, int(first), int(n), int(total), float(interval), float(duration))
        )
    else:
        main()
