"""Every code block of docs/ runs as written.

Each page runs top to bottom in a directory of its own, against an embedded server whose URL
and key are in ``METHODIC_SERVER_URL``/``METHODIC_API_KEY`` (what a reader exports after
``methodic serve``): ```python blocks share one namespace per page, ```sh blocks run in bash
with the project's commands on PATH. A block that cannot run here is preceded by
``<!-- skip: next "why" -->``; a skip without a reason fails the page.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unittest
from pathlib import Path

import pytest
from helpers import CEILING
from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

from methodic.server.embedded import EmbeddedServer

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
RUNNABLE = {"python", "sh"}
FENCE = re.compile(r"^```(\S*)", re.MULTILINE)
SKIP = re.compile(r"<!--\s*skip:\s*next\s*(.*?)-->")


def run_shell(example: Example) -> None:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example.parsed],
        capture_output=True,
        text=True,
        timeout=CEILING,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{example.path}:{example.line}: exit {done.returncode}\n"
            f"{example.parsed}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )


SYBIL = Sybil(parsers=[PythonCodeBlockParser(), CodeBlockParser("sh", run_shell), SkipParser()])


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = page.read_text()
    for reason in SKIP.findall(text):
        assert reason.strip(), f"{page.name}: a skip marker must say why the next block can't run"
    work = tmp_path / "work"
    work.mkdir()
    with EmbeddedServer(tmp_path / "server") as server:
        assert server.url and server.api_key
        monkeypatch.setenv("METHODIC_SERVER_URL", server.url)
        monkeypatch.setenv("METHODIC_API_KEY", server.api_key)
        monkeypatch.setenv("METHODIC_TRACKER", str(work / "uploads.sqlite"))
        monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.chdir(work)
        for example in SYBIL.parse(page):
            try:
                example.evaluate()
            except unittest.SkipTest:
                continue


DOCSTRING_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def docstring_examples() -> list[tuple[str, str]]:
    """The ```python blocks of every public name's docstrings (the API reference's source)."""
    import inspect

    import methodic

    found: dict[str, str] = {}
    for name in methodic.__all__:
        obj = getattr(methodic, name)
        members = [obj, *vars(obj).values()] if inspect.isclass(obj) else [obj]
        for member in members:
            for i, block in enumerate(DOCSTRING_BLOCK.findall(inspect.getdoc(member) or "")):
                found[f"{name}.{getattr(member, '__name__', name)}[{i}]"] = block
    return sorted(found.items())


@pytest.mark.parametrize(
    "code", [c for _, c in docstring_examples()], ids=[n for n, _ in docstring_examples()]
)
def test_docstring_example_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with EmbeddedServer(tmp_path / "server") as server:
        assert server.url and server.api_key
        monkeypatch.setenv("METHODIC_SERVER_URL", server.url)
        monkeypatch.setenv("METHODIC_API_KEY", server.api_key)
        monkeypatch.chdir(tmp_path)
        exec(compile(code, "<docstring>", "exec"), {})


def test_every_code_block_is_run_or_says_why_not() -> None:
    """Shell and Python blocks are fenced as ```sh/```python, so none escapes the runner:
    other fences are output, config or formats (```text, ```json, ```yaml...)."""
    for page in PAGES:
        fences = FENCE.findall(page.read_text())[::2]  # opening fences
        wrong = {lang for lang in fences if lang in {"bash", "shell", "console", "py", ""}}
        assert not wrong, f"{page.name}: fence {wrong} as ```sh/```python (or ```text for output)"
    assert any(lang in RUNNABLE for p in PAGES for lang in FENCE.findall(p.read_text()))


def test_every_public_name_is_in_the_api_reference() -> None:
    import methodic

    directives = "".join(p.read_text() for p in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: methodic\.(\w+)", directives, re.MULTILINE))
    missing = sorted(set(methodic.__all__) - documented - {"__version__"})
    assert not missing, f"add to a docs/reference page: ::: methodic.{missing[0]} ({missing})"
