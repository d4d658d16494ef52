"""The SIGKILL harness shared by the test suite and bench/torture.py.

A child process uploads a multi-file checkpoint (one file large enough to go in parts) through
a byte-counting proxy with a bandwidth cap, and is SIGKILLed at a chosen instant. A fresh
process then runs ``drain_incomplete_uploads``. ``check_round`` asserts the invariants:
nothing incomplete is ever visible, the asset ends up listed exactly once and byte-identical,
nothing stays pending, and at most one part per in-flight transfer is sent twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from faultproxy import FaultProxy
from helpers import CEILING, free_port, make_checkpoint, subprocess_env, tree_digest

from methodic.server import EmbeddedServer

MiB = 1 << 20
PART = 5 * MiB
WORKERS = 2
LAYOUT = {
    "model.safetensors": 12 * MiB + 333,
    "optimizer.pt": 2 * MiB,
    "config.json": 211,
    "rng/state-0.pt": 70_000,
    "rng/state-1.pt": 70_001,
}
OPTS = f"part_threshold={8 * MiB}, part_size={PART}, max_upload_workers={WORKERS}"

UPLOADER = textwrap.dedent(f"""
    import sys
    from pathlib import Path
    from methodic import Chronicle, RetryPolicy, UploadTracker
    url, key, tracker_path, ckpt, rate = sys.argv[1:6]
    tracker = UploadTracker(Path(tracker_path))
    with Chronicle(url, key, max_bandwidth=rate, {OPTS},
                   retry=RetryPolicy(base=0.05, cap=0.5)) as chronicle:
        run = chronicle.run(chronicle.create_experiment("kill-harness"), 0, 0)
        handle = run.register_and_upload_async(Path(ckpt), upload_tracker=tracker)
        print("registered", handle.asset_id, flush=True)
        run.wait_for_uploads()
        print("finalized", handle.asset_id, flush=True)
""")

DRAINER = textwrap.dedent(f"""
    import json, sys
    from pathlib import Path
    from methodic import Chronicle, RetryPolicy, UploadTracker, drain_incomplete_uploads
    url, key, tracker_path = sys.argv[1:4]
    tracker = UploadTracker(Path(tracker_path))
    with Chronicle(url, key, {OPTS}, retry=RetryPolicy(base=0.05, cap=0.5)) as chronicle:
        report = drain_incomplete_uploads(chronicle, tracker)
    print(json.dumps(report.__dict__))
""")


@contextlib.contextmanager
def counted_server(data_dir: Path) -> Iterator[tuple[EmbeddedServer, FaultProxy]]:
    """An embedded server whose presigned blob URLs cross a byte-counting FaultProxy."""
    blob_port = free_port()
    with (
        FaultProxy("127.0.0.1", blob_port) as proxy,
        EmbeddedServer(data_dir, blob_port=blob_port, public_blob_url=proxy.url) as srv,
    ):
        yield srv, proxy


@dataclass
class RoundResult:
    kill_after: float
    registered: bool
    finished_before_kill: bool
    resent: int
    bytes_up: int
    report: dict[str, object]


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
    )


class Api:
    def __init__(self, url: str, key: str) -> None:
        self.client = httpx.Client(
            base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def assets(self, include_pending: bool) -> list[dict[str, object]]:
        exps = self.client.get("/experiments", params={"name": "kill-harness"}).json()[
            "experiments"
        ]
        if not exps:
            return []
        run = self.client.put(f"/experiments/{exps[0]['id']}/runs/0/0").json()
        params = {"include_pending": str(include_pending).lower()}
        return self.client.get(f"/runs/{run['id']}/assets", params=params).json()["assets"]

    def download(self, asset_id: str, dest: Path) -> Path:
        data = self.client.get(f"/assets/{asset_id}/download").json()
        for comp in data["components"]:
            out = dest / comp["path"]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(httpx.get(comp["url"], timeout=60).content)
        return dest


def kill_round(
    workdir: Path,
    proxy_url: str,
    api_url: str,
    key: str,
    kill_after: float,
    proxy: object,
    rate: str = "6MB",
    seed: int = 0,
    before_drain: Callable[[], None] | None = None,
    kill_at_bytes: int | None = None,
) -> RoundResult:
    """One round: upload, SIGKILL after ``kill_after`` s, check what is visible, drain, check.

    With ``kill_at_bytes`` the kill comes instead once that many bytes crossed the proxy
    (a condition, not an instant: the same phase on a loaded machine).
    ``before_drain`` runs once the uploader is dead, before the drain (e.g. to reuse its pid).
    """
    ckpt = make_checkpoint(workdir / "ckpt", LAYOUT, seed=seed)
    tracker = workdir / "uploads.sqlite"
    api = Api(api_url, key)
    start_up = proxy.bytes_up  # type: ignore[attr-defined]
    child = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, proxy_url, key, str(tracker), str(ckpt), rate],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    deadline = time.monotonic() + (kill_after if kill_at_bytes is None else CEILING)
    while time.monotonic() < deadline and child.poll() is None:
        if kill_at_bytes is not None and proxy.bytes_up - start_up >= kill_at_bytes:  # type: ignore[attr-defined]
            break
        check_nothing_incomplete_visible(api)
        time.sleep(0.05)
    finished = child.poll() is not None
    if not finished:
        os.kill(child.pid, signal.SIGKILL)
    out, err = child.communicate(timeout=CEILING)
    if finished:
        assert child.returncode == 0, err
    check_nothing_incomplete_visible(api)

    registered = "registered" in out or (tracker.exists() and _tracker_has_asset(tracker))
    if before_drain is not None:
        before_drain()
    drained = run_python(DRAINER, proxy_url, key, str(tracker))
    assert drained.returncode == 0, drained.stderr
    report = json.loads(drained.stdout)
    assert report["failed"] == {}, report

    listed = api.assets(include_pending=False)
    pending = [a for a in api.assets(include_pending=True) if a["state"] == "pending"]
    assert pending == []
    if registered:
        assert len(listed) == 1, listed
        dest = api.download(str(listed[0]["asset_id"]), workdir / "download")
        assert tree_digest(dest) == tree_digest(ckpt)
        check = run_python(
            "import sys; from methodic import UploadTracker; "
            "print(len(UploadTracker(sys.argv[1]).get_pending_uploads()))",
            str(tracker),
        )
        assert check.stdout.strip() == "0", check
    else:
        assert listed == []  # the tracker row is written before the server hears of the asset
    bytes_up = proxy.bytes_up - start_up  # type: ignore[attr-defined]
    total = sum(LAYOUT.values())
    # Every byte once, plus at most one part per in-flight transfer, plus HTTP heads and API calls.
    slack = WORKERS * PART + 512 * 1024
    if registered:
        assert bytes_up <= total + slack, (bytes_up, total)
    return RoundResult(
        kill_after, registered, finished, int(report["bytes_resent"]), bytes_up, report
    )


def _tracker_has_asset(path: Path) -> bool:
    code = "import sys; from methodic import UploadTracker; print(len(UploadTracker(sys.argv[1]).list_assets()))"
    res = run_python(code, str(path))
    return res.returncode == 0 and res.stdout.strip() not in ("", "0")


def check_nothing_incomplete_visible(api: Api) -> None:
    """Whatever ``list_assets()`` shows is finalized with every component stored."""
    for asset in api.assets(include_pending=False):
        assert asset["state"] == "finalized", asset
        full = api.client.get(f"/assets/{asset['asset_id']}").json()
        assert all(c["stored"] for c in full["components"]), full
        assert len(full["components"]) == len(LAYOUT)


# ---------------------------------------------------------------- kill points of their own

UNSEALED_REGISTRAR = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from methodic import Chronicle, ComponentSpec, UploadTracker
    from methodic._ids import new_asset_id
    url, key, tracker_path, ckpt = sys.argv[1:5]
    root = Path(ckpt)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    specs = [ComponentSpec(p.relative_to(root).as_posix(), p, p.stat().st_size) for p in files]
    half = len(specs) // 2
    tracker = UploadTracker(Path(tracker_path))
    with Chronicle(url, key) as chronicle:
        run = chronicle.run(chronicle.create_experiment("kill-harness"), 0, 0)
        asset_id = new_asset_id()
        # Registered in two calls, as a producer that adds files as it writes them; the
        # process dies before it calls seal().
        for part in (specs[:half], specs[half:]):
            tracker.register_components(asset_id, part, asset_type="checkpoint", seal=False,
                                        binding=run.core.binding, local_dir=root)
        print("registered", asset_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")

DRAIN_OPTS = ("upload_unsealed", "take_over")


def drain_in_child(
    url: str, key: str, tracker: Path, *flags: str, timeout: float = CEILING
) -> dict[str, object]:
    """``drain_incomplete_uploads`` in a fresh process; ``flags`` name its keyword options.

    ``timeout`` is only a ceiling that fails a hung drain; a drain that works returns long
    before it.
    """
    code = DRAINER.replace(
        "drain_incomplete_uploads(chronicle, tracker)",
        "drain_incomplete_uploads(chronicle, tracker, "
        + "".join(f"{f}=True, " for f in flags if f in DRAIN_OPTS)
        + ")",
    )
    drained = run_python(code, url, key, str(tracker), timeout=timeout)
    assert drained.returncode == 0, drained.stderr
    report: dict[str, object] = json.loads(drained.stdout)
    return report


def register_unsealed_and_die(
    workdir: Path, url: str, key: str, seed: int = 0, tracker: Path | None = None
) -> tuple[str, Path]:
    """A child registers a checkpoint with ``seal=False`` (in two calls) and is SIGKILLed
    before ``seal()``. Returns the asset id and the checkpoint."""
    ckpt = make_checkpoint(workdir / "ckpt", LAYOUT, seed=seed)
    tracker = tracker or workdir / "uploads.sqlite"
    res = run_python(UNSEALED_REGISTRAR, url, key, str(tracker), str(ckpt))
    assert res.returncode == -signal.SIGKILL, res.stderr
    return res.stdout.split()[1], ckpt


def unsealed_round(workdir: Path, url: str, key: str, seed: int = 0) -> dict[str, object]:
    """SIGKILL after an unsealed registration: drain reports it unsealed and returns without
    finalizing anything; once sealed, a drain finalizes it byte-identical, listed once."""
    asset_id, ckpt = register_unsealed_and_die(workdir, url, key, seed)
    tracker = workdir / "uploads.sqlite"
    api = Api(url, key)
    first = drain_in_child(url, key, tracker)
    assert list(first["unsealed"]) == [asset_id], first  # type: ignore[call-overload]
    assert first["failed"] == {} and first["finalized"] == [], first
    assert api.assets(include_pending=False) == []
    seal = run_python(
        "import sys; from methodic import UploadTracker; UploadTracker(sys.argv[1]).seal(sys.argv[2])",
        str(tracker),
        asset_id,
    )
    assert seal.returncode == 0, seal.stderr
    second = drain_in_child(url, key, tracker)
    assert second["finalized"] == [asset_id] and second["unsealed"] == {}, second
    _check_finalized_once(api, workdir, ckpt, tracker)
    return second


REUSE_PID = "UPDATE assets SET owner_pid = ?, owner_start_pid = ? WHERE asset_id = ?"


def reuse_owner_pid(tracker: Path, asset_id: str, pid: int) -> None:
    """Make the tracker row look as it does after PID reuse: the dead owner's start time is
    still recorded, but its pid now names ``pid`` (a live, unrelated process)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(tracker, timeout=60)) as conn, conn:
        conn.execute(REUSE_PID, (pid, pid, asset_id))


def reused_pid_round(
    workdir: Path,
    proxy_url: str,
    api_url: str,
    key: str,
    kill_after: float,
    proxy: object,
    seed: int = 0,
    kill_at_bytes: int | None = None,
) -> RoundResult:
    """A kill round in which, by the time the drain runs, the dead uploader's pid names a live
    unrelated process: the drain must still take the asset and finish it."""
    tracker = workdir / "uploads.sqlite"
    squatter = subprocess.Popen(["sleep", "600"])
    try:

        def before_drain() -> None:
            if tracker.exists():
                for asset_id in _tracked_ids(tracker):
                    reuse_owner_pid(tracker, asset_id, squatter.pid)

        return kill_round(
            workdir,
            proxy_url,
            api_url,
            key,
            kill_after,
            proxy,
            seed=seed,
            before_drain=before_drain,
            kill_at_bytes=kill_at_bytes,
        )
    finally:
        squatter.kill()
        squatter.wait(30)


def _tracked_ids(path: Path) -> list[str]:
    code = (
        "import sys; from methodic import UploadTracker; "
        "print(' '.join(t.asset_id for t in UploadTracker(sys.argv[1]).list_assets()))"
    )
    res = run_python(code, str(path))
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def _check_finalized_once(api: Api, workdir: Path, ckpt: Path, tracker: Path) -> None:
    listed = api.assets(include_pending=False)
    assert len(listed) == 1, listed
    pending = [a for a in api.assets(include_pending=True) if a["state"] == "pending"]
    assert pending == []
    dest = api.download(str(listed[0]["asset_id"]), workdir / "download")
    assert tree_digest(dest) == tree_digest(ckpt)
    check = run_python(
        "import sys; from methodic import UploadTracker; "
        "print(len(UploadTracker(sys.argv[1]).get_pending_uploads()))",
        str(tracker),
    )
    assert check.stdout.strip() == "0", check
