"""The clients bench/throughput.py measures, each run in a process of its own
(``throughput.py --child MODE SPEC``): the engine's PUT path, and the engine end to end."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

from harness import peak_rss_mb, proc_cpu


def _rusage_cpu(r: resource.struct_rusage) -> tuple[float, float]:
    return r.ru_utime, r.ru_stime


def child_put(spec: dict[str, Any]) -> dict[str, Any]:
    """The engine's PUT path, per range what the engine does: the range's digest first
    (``_checksum.hash_range`` in a thread, as ``_digests`` does before presigning), then
    ``send_range`` (the ETag) with the digest in the bound URL's header, over the engine's own
    client and TokenBucket, N ranges at once."""
    from methodic import AsyncChronicle
    from methodic._checksum import hash_range
    from methodic._transfer import FileIdentity, send_range
    from methodic._types import UploadTarget

    algorithm = spec["checksum"]

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
                    identity = FileIdentity(
                        t["local_path"],
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ino,
                        st.st_ctime_ns,
                        st.st_dev,
                    )
                    # The digest bound into the URL: identity checked around it, as _digests does.
                    await asyncio.to_thread(identity.check)
                    digests[i] = await asyncio.to_thread(
                        hash_range, t["local_path"], t["offset"], t["length"], algorithm
                    )
                    await asyncio.to_thread(identity.check)
                    target = UploadTarget(
                        path=t["name"],
                        part=None,
                        method="PUT",
                        url=t["url"],
                        headers={"x-methodic-checksum": f"{algorithm}:{digests[i]}"},
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
                    await send_range(
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
            if t.get("digest") and digests[i] != t["digest"]:
                raise SystemExit(
                    f"{algorithm} of {t['name']} is {digests[i]}, expected {t['digest']}"
                )
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
    if spec.get("checksum") not in (None, "crc64nvme"):  # crc64nvme: the default, left unset
        options["checksum_algorithm"] = spec["checksum"]
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


def child_main(mode: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = child_put(spec) if mode == "put" else child_e2e(spec)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)
