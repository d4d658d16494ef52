"""Soak the crash-recovery harness: SIGKILL an uploader at random instants, drain, verify.

    python bench/torture.py --rounds 200 [--max-delay 2.4] [--seed 1]

Each round is the suite's kill round (tests/killharness.py): a fresh embedded server, a child
uploading a multi-file checkpoint through a byte-counting proxy, SIGKILL, a fresh process
draining, then the invariants (nothing incomplete visible, listed once, byte-identical, nothing
pending, at most one part per in-flight transfer re-sent). Two rounds in ten are kill points of
their own: SIGKILL after an unsealed registration (the drain reports it unsealed and returns;
after seal() a drain finalizes it), and a reused pid (by the drain, the dead uploader's pid names
a live unrelated process: the drain still finishes the asset). Every drain runs under a ceiling,
so a drain that hangs fails its round. Prints a line per round and a summary; writes
bench/results/torture.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from killharness import LAYOUT, counted_server, kill_round, reused_pid_round, unsealed_round


def kind_of(i: int) -> str:
    return {3: "unsealed", 7: "reused pid"}.get(i % 10, "kill")


def phase(result_registered: bool, finished: bool, resent: int, bytes_up: int) -> str:
    if finished:
        return "after finalize"
    if not result_registered:
        return "before registration"
    return "mid-upload" if resent else "around finalize"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--max-delay", type=float, default=3.2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows, failures = [], 0
    started = time.monotonic()
    for i in range(args.rounds):
        delay = round(0.1 + rng.random() * args.max_delay, 3)
        with tempfile.TemporaryDirectory(prefix="methodic-torture-") as tmp:
            work = Path(tmp)
            kind = kind_of(i)
            try:
                with counted_server(work / "server") as (srv, proxy):
                    if kind == "unsealed":
                        unsealed_round(work, srv.url, srv.api_key, seed=i)
                        rows.append({"round": i, "kind": kind, "phase": kind, "ok": True})
                        print(
                            f"round {i:4d}  unsealed registration, seal, drain      ok", flush=True
                        )
                        continue
                    play = reused_pid_round if kind == "reused pid" else kill_round
                    r = play(work, srv.url, srv.url, srv.api_key, delay, proxy, seed=i)
                where = phase(r.registered, r.finished_before_kill, r.resent, r.bytes_up)
                rows.append(
                    {
                        "round": i,
                        "kind": kind,
                        "kill_after": delay,
                        "phase": where,
                        "resent": r.resent,
                        "bytes_up": r.bytes_up,
                        "ok": True,
                    }
                )
                print(
                    f"round {i:4d}  kill at {delay:5.2f}s  {where:<20} re-sent {r.resent:>10,} B"
                    f"  on the wire {r.bytes_up:>11,} B  ok{'  (reused pid)' if kind != 'kill' else ''}",
                    flush=True,
                )
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                failures += 1
                rows.append(
                    {"round": i, "kind": kind, "kill_after": delay, "ok": False, "error": repr(exc)}
                )
                print(f"round {i:4d}  kill at {delay:5.2f}s  FAILED: {exc!r}", flush=True)
    total = sum(LAYOUT.values())
    wire = [
        r["bytes_up"] / total
        for r in rows
        if r.get("ok") and "bytes_up" in r and r["phase"] != "before registration"
    ]
    summary = {
        "rounds": args.rounds,
        "failures": failures,
        "seconds": round(time.monotonic() - started, 1),
        "phases": {
            p: sum(1 for r in rows if r.get("phase") == p)
            for p in (
                "before registration",
                "mid-upload",
                "around finalize",
                "after finalize",
                "unsealed",
            )
        },
        "kinds": {
            k: sum(1 for r in rows if r.get("kind") == k)
            for k in ("kill", "unsealed", "reused pid")
        },
        "median_wire_bytes_per_checkpoint_byte": statistics.median(wire) if wire else None,
        "max_wire_bytes_per_checkpoint_byte": max(wire) if wire else None,
    }
    print(json.dumps(summary, indent=2))
    out = Path(__file__).parent / "results" / "torture.json"
    out.write_text(json.dumps({"summary": summary, "rounds": rows}, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
