"""bench/throughput.py's results: medians per variant, the ratios against curl, the goals, the table."""

from __future__ import annotations

import statistics
from typing import Any

GOAL_THROUGHPUT = 0.9  # engine / curl (the parallel rows, and end to end)


GOAL_THROUGHPUT_ONE_STREAM = 0.8  # engine / curl, one 2 GiB stream into nginx


GOAL_CPU = 1.5  # engine CPU/GB / curl CPU/GB, the digest included


GOAL_RSS_MB = 150.0


RSS_FLAT_MB = 10.0  # "the same" peak RSS for 1 GiB and 8 GiB: within this many MB


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
    rows: list[dict[str, Any]], section: str, workload: str, name: str, tree: str | None = None
) -> dict[str, Any] | None:
    variant = f"{name} [{tree}]" if tree else name
    return next(
        (
            r
            for r in rows
            if r["section"] == section and r["workload"] == workload and r["variant"] == variant
        ),
        None,
    )


def pairs(workers: int, algorithms: list[str]) -> list[tuple[str, str, str, str, bool, Any]]:
    """(section, workload, engine variant, reference variant, checks CPU, throughput goal or
    None for an informational ratio), for every algorithm; the first pair of an engine variant
    is the reference of the table's "vs curl" columns."""
    out: list[tuple[str, str, str, str, bool, Any]] = []
    w = workers
    for a in algorithms:
        out += [
            (
                "nginx",
                "many",
                f"engine {a} + send_range x{w}",
                f"curl --parallel {w}",
                True,
                GOAL_THROUGHPUT,
            ),
            (
                "nginx",
                "single",
                f"engine {a} + send_range, 1 stream",
                "curl, 1 stream",
                True,
                GOAL_THROUGHPUT_ONE_STREAM,
            ),
            (
                "nginx",
                "single",
                f"engine {a} + send_range x{w}, parts",
                f"curl --parallel {w}, parts",
                True,
                GOAL_THROUGHPUT,
            ),
            # Against the cheapest client that hashes what it sends (informational: the ceiling).
            (
                "nginx",
                "many",
                f"engine {a} + send_range x{w}",
                f"{a} + curl --parallel {w}",
                False,
                None,
            ),
            (
                "nginx",
                "single",
                f"engine {a} + send_range, 1 stream",
                f"{a} + curl, 1 stream",
                False,
                None,
            ),
            (
                "server",
                "many",
                f"engine {a}, whole files x{w}",
                f"curl --parallel {w}, {a} asset",
                False,
                GOAL_THROUGHPUT,
            ),
            (
                "server",
                "single",
                f"engine {a}, 1 stream (no parts)",
                f"curl, 1 stream, {a} asset",
                False,
                GOAL_THROUGHPUT,
            ),
            (
                "server",
                "single",
                f"engine {a}, x{w} parts (defaults)",
                f"curl --parallel {w}, parts, {a} asset",
                False,
                GOAL_THROUGHPUT,
            ),
        ]
    return out


def evaluate(
    rows: list[dict[str, Any]],
    rss: list[dict[str, Any]],
    trees: list[str],
    workers: int,
    algorithms: list[str],
) -> list[dict[str, Any]]:
    goals = []
    for (section, workload, eng, ref, cpu, target), tree in (
        (pair, tree) for tree in [None, *trees] for pair in pairs(workers, algorithms)
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
            "throughput_goal": target,
            "throughput_pass": None if target is None else ratio >= target,
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
    workers: int,
    algorithms: list[str],
) -> None:
    refs = {}
    for section, workload, eng, ref, *_ in pairs(workers, algorithms):
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
            f"| methodic serve | 1 x {r['size_gib']:g} GiB (sparse) "
            f"| engine {r.get('checksum', '')}, x{r['workers']} (defaults) "
            f"| {r['mb_s']:.0f} | | {r['cpu_s_per_gb']:.2f} | | {r['peak_rss_mb']:.0f} | | |"
        )
    print()
    for g in goals:
        if g["section"] in ("nginx", "server"):
            line = (
                f"- {g['section']}, {labels[g['workload']]}: {g['engine']} at "
                f"{g['throughput_ratio']:.2f}x {g['curl']}'s throughput "
                + (
                    "(informational)"
                    if g["throughput_goal"] is None
                    else f"(goal >= {g['throughput_goal']}x): "
                    f"{'PASS' if g['throughput_pass'] else 'FAIL'}"
                )
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
