"""Contracts of the code's shape, checked on every run: who may import what, and one door.

- The engine never loads a UI library (``test_core``), and methodic-tui knows the engine only
  through its public names: no ``methodic._*`` import anywhere in ``methodic_tui``.
- ``AsyncChronicle`` is the whole API: every operator control, ``snapshot`` and ``subscribe``
  live there, and ``Chronicle`` offers each one with the same parameters.
- The import graph of the product has no circle, counting imports made only for type checking.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

from helpers import make_checkpoint

import methodic
from methodic import AsyncChronicle, Chronicle, ComponentProgress, EventStream, PoolSnapshot

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"methodic": ROOT / "engine" / "methodic", "methodic_tui": ROOT / "methodic_tui"}
CONTROLS = (
    "pause",
    "resume",
    "retry_failed",
    "force_finalize",
    "discard",
    "set_bandwidth",
    "snapshot",
)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [pkg, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in ``path``, type-only ones included."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in known else target), node.lineno


def test_methodic_tui_imports_only_public_engine_names() -> None:
    known = _modules()
    private = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for module, path in known.items()
        if module.startswith("methodic_tui")
        for name, line in _imports(module, path, known)
        if name.startswith("methodic.")
        and any(part.startswith("_") for part in name.split(".")[1:])
    ]
    assert private == [], "methodic_tui must use methodic's public API:\n" + "\n".join(private)


def test_the_contract_check_sees_a_private_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from methodic._pool import UploadPool\nfrom methodic import _events\n")
    known = _modules()
    names = [n for n, _ in _imports("methodic_tui.bad", bad, known)]
    assert names == ["methodic._pool", "methodic._events"]


def test_import_graph_has_no_cycle() -> None:
    known = _modules()
    graph = {
        m: sorted({name for name, _ in _imports(m, p, known) if name in known and name != m})
        for m, p in known.items()
    }
    # A package's __init__ re-exports its modules; a module importing the package's public
    # names from inside the package would close a circle through it, and is reported too.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_async_core_has_every_control_and_the_facade_mirrors_each() -> None:
    for name in CONTROLS:
        core, facade = getattr(AsyncChronicle, name), getattr(Chronicle, name)
        assert inspect.iscoroutinefunction(core), f"AsyncChronicle.{name} must be async"
        assert not inspect.iscoroutinefunction(facade)
        assert list(inspect.signature(core).parameters) == list(
            inspect.signature(facade).parameters
        ), name
    assert list(inspect.signature(AsyncChronicle.subscribe).parameters) == list(
        inspect.signature(Chronicle.subscribe).parameters
    )
    for name in ("Event", "PoolSnapshot", "AssetSnapshot", "Subscription", "LoopThread"):
        assert name in methodic.__all__


async def test_controls_on_the_async_core(server, tmp_path: Path) -> None:
    ckpt = await asyncio.to_thread(make_checkpoint, tmp_path / "ckpt", {"a.bin": 4 << 20})
    async with AsyncChronicle(server.url, server.api_key, max_bandwidth="1MB") as chronicle:
        sub = chronicle.subscribe()
        run = await chronicle.run(await chronicle.create_experiment("controls"), 0, 0)
        handle = await run.register_and_upload_async(ckpt)
        async for event in sub:  # the bytes are moving
            if isinstance(event, ComponentProgress):
                break
        assert await chronicle.pause() == [handle.asset_id]
        snap: PoolSnapshot = await chronicle.snapshot(with_components=handle.asset_id)
        (paused,) = snap.assets
        assert paused.state == "paused" and paused.bytes_done > 0
        assert [c.state for c in paused.components] == ["queued"]  # a paused asset sends nothing
        await chronicle.set_bandwidth(None)
        assert (await chronicle.snapshot()).bandwidth_cap is None
        # Resumed at once, before the stopped transfer has unwound: it must still go out.
        assert await chronicle.resume(handle.asset_id) == [handle.asset_id]
        asset = await handle.result(timeout=120)
        assert asset.state == "finalized"
        sub.close()


def test_the_sync_facade_streams_events_to_its_thread(server, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", {"a.bin": 10, "b.bin": 20})
    with Chronicle(server.url, server.api_key) as chronicle:
        stream = chronicle.subscribe()
        assert isinstance(stream, EventStream)
        run = chronicle.run(chronicle.create_experiment("stream"), 0, 0)
        handle = run.register_and_upload_async(ckpt)
        handle.result(timeout=120)
        # The finalized event is told before the handle resolves, so it is already here.
        kinds = [e.kind for e in stream.get_nowait()]
        assert kinds.count("AssetFinalized") == 1 and "AssetStateChanged" in kinds
        stream.close()
