"""methodic-tui's command line: every subcommand, its options, help, examples and exit codes,
and how a usage error is reported (one line; a JSON line too with --json)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from methodic import __version__
from methodic_tui import parsing
from methodic_tui.options import DEFAULT_TRACKER

T = TypeVar("T")
EXIT_USAGE = 2
PROG = "methodic-tui"
SCHEMA = 1  # of the --json lines; see docs/headless.md

EXIT_CODES = """\
exit codes:
  0    done (every upload finalized, every download restored, or the command did
       what it said)
  1    some upload failed (`methodic-tui retry ASSET` retries one), or a download
       did (run it again: it resumes)
  2    usage or configuration error (one line on stderr; a JSON line too with --json)
  129  the terminal hung up (SIGHUP); 130 SIGINT; 143 SIGTERM: the tracker is flushed
       first, and `methodic-tui resume` continues"""


class UsageError(Exception):
    """Printed as one line; exit status 2."""


class _Errors:
    json = False  # --json was given: configuration errors are a JSON line too


def json_errors(on: bool) -> None:
    _Errors.json = on


def report_error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    if _Errors.json:
        line = {"schema": SCHEMA, "event": "error", "at": time.time(), "exit_code": EXIT_USAGE}
        print(json.dumps({**line, "message": message}), flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        report_error(f"{message} (see {self.prog} --help)")
        self.exit(EXIT_USAGE)


def _typed(parse: Callable[[str], object]) -> Callable[[str], object]:
    def wrapped(text: str) -> object:
        try:
            return parse(text)
        except parsing.ValueProblem as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    wrapped.__name__ = parse.__name__
    return wrapped


def _whole_number(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not >= {minimum}")
        return value

    return parse


_index = _whole_number(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


# Which option groups each subcommand takes: its --help lists only those.
# REMOTE: the server's URL and key only (a view of another process's uploads: no --embedded).
SERVER, REMOTE, TRACKER, TRANSFER, OUTPUT, UI, JSON = (
    "server",
    "remote",
    "tracker",
    "transfer",
    "output",
    "ui",
    "json",
)


def _add_options(parser: argparse.ArgumentParser, groups: Sequence[str], top: bool) -> None:
    # Given at either level (`methodic-tui --no-ui demo` or `methodic-tui demo --no-ui`);
    # SUPPRESS keeps the subcommand's absent flags from hiding the top level's.
    d = argparse.SUPPRESS
    g = parser if top else parser.add_argument_group("common options")
    if SERVER in groups or REMOTE in groups:
        g.add_argument(
            "--server-url",
            default=d,
            metavar="URL",
            help="Chronicle server (env METHODIC_SERVER_URL)",
        )
        g.add_argument("--api-key", default=d, metavar="KEY", help="API key (env METHODIC_API_KEY)")
    if SERVER in groups:
        g.add_argument(
            "--embedded",
            action="store_true",
            default=d,
            help="no server: start one on loopback with its data in the user data dir "
            "(~/.local/share/methodic/server): the bytes stay on this machine",
        )
    if TRACKER in groups:
        g.add_argument(
            "--tracker",
            type=Path,
            default=d,
            metavar="PATH",
            help=f"upload tracker (env METHODIC_TRACKER, default ./{DEFAULT_TRACKER})",
        )
    if TRANSFER in groups:
        g.add_argument(
            "--workers",
            type=_typed(parsing.workers),
            default=d,
            metavar="N",
            help=f"transfers at once, 1-{parsing.MAX_WORKERS} (env METHODIC_WORKERS, default 8)",
        )
        g.add_argument(
            "--max-bandwidth",
            type=_typed(parsing.rate),
            default=d,
            metavar="RATE",
            help="cap for all transfers: bytes/s (200MB) or bits/s (200Mbit, 1Gbps); "
            "0: no cap (env METHODIC_MAX_BANDWIDTH)",
        )
    if UI in groups or not top:
        g.add_argument(
            "--no-ui",
            action="store_true",
            default=d,
            # Accepted everywhere (scripts pass it to every command), listed where it matters.
            help="no dashboard: status lines on stderr (the default when not on a terminal)"
            if UI in groups
            else argparse.SUPPRESS,
        )
    if JSON in groups:
        g.add_argument(
            "--json",
            action="store_true",
            default=d,
            help="JSON on stdout instead of text"
            + (
                " (JSON lines, schema 1: docs/headless.md; implies --no-ui)" if UI in groups else ""
            ),
        )
    if OUTPUT in groups:
        g.add_argument(
            "--stats",
            type=_typed(parsing.duration),
            default=d,
            metavar="EVERY",
            help="headless: a status line on each change and at least this often "
            "(default 30s; 0: only on change)",
        )
        g.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=d,
            help="headless: only warnings, errors and the final summary",
        )
        g.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=d,
            help="headless: a status line on every change, however small",
        )
        g.add_argument(
            "--log-file",
            type=Path,
            default=d,
            metavar="PATH",
            help="headless: also append every line to PATH (no colour)",
        )


RUNNING = (SERVER, TRACKER, TRANSFER, UI, JSON, OUTPUT)


def _filter_options(p: argparse.ArgumentParser) -> None:
    for flag, what in (
        ("--include", "only files matching GLOB"),
        ("--exclude", "never files matching GLOB"),
    ):
        p.add_argument(
            flag,
            action="append",
            metavar="GLOB",
            help=f"{what} (repeatable; relative to each directory; a GLOB without / matches "
            "a file name at any depth)",
        )


def _command(
    sub: argparse._SubParsersAction[_Parser],
    name: str,
    summary: str,
    description: str,
    examples: Sequence[str],
    groups: Sequence[str],
) -> argparse.ArgumentParser:
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n" + EXIT_CODES
    p = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 88),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(groups=tuple(groups))
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="The methodic upload dashboard (and its headless twin).",
        epilog="`methodic-tui COMMAND --help` describes each command.\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_options(parser, RUNNING, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = _command(
        sub,
        "demo",
        "upload synthetic checkpoints to a throwaway embedded server",
        "Write a few synthetic checkpoints, as a training loop would, and upload them live "
        "to an embedded server in a temporary directory (deleted on exit); the server refuses "
        "one upload once, to show a retry.",
        ["methodic-tui demo", "methodic-tui demo --no-ui --size 1GB --max-bandwidth 0"],
        (TRANSFER, UI, JSON, OUTPUT),
    )
    demo.add_argument(
        "--size",
        type=_typed(parsing.size),
        default=None,
        metavar="SIZE",
        help="total size of the checkpoints (default 300MB)",
    )
    demo.add_argument(
        "--every",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="time between two checkpoints, as a training loop writes them (default 1)",
    )

    upload = _command(
        sub,
        "upload",
        "upload checkpoint directories",
        "Upload each DIR as one asset of the run, then exit. A directory this tracker already "
        "finalized is skipped (--force uploads it again).",
        [
            "methodic-tui upload out/checkpoint-1000 --server-url http://chronicle:8765",
            "methodic-tui upload out/checkpoint-* --no-ui --stats 1m --log-file upload.log",
            "methodic-tui upload out/checkpoint-1000 --dry-run",
        ],
        RUNNING,
    )
    upload.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    upload.add_argument(
        "--asset-type", default="checkpoint", metavar="TYPE", help="(default: checkpoint)"
    )
    upload.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would be uploaded; contact no server, create no tracker rows",
    )
    upload.add_argument(
        "--force",
        action="store_true",
        help="upload a directory again even if this tracker already finalized it",
    )
    _filter_options(upload)
    _run_options(upload)

    watch = _command(
        sub,
        "watch",
        "upload each new checkpoint directory once it is complete",
        "Poll DIR for directories matching --pattern and upload each once it is complete "
        "(a marker file appears, or nothing changed for --settle seconds). Runs until "
        "stopped; what the tracker already holds is not uploaded again.",
        [
            "methodic-tui watch out/ --server-url http://chronicle:8765 --no-ui",
            "methodic-tui watch out/ --pattern 'step_*' --settle 60 --stats 5m",
        ],
        RUNNING,
    )
    watch.add_argument("dir", type=Path, metavar="DIR")
    watch.add_argument("--pattern", default="checkpoint-*", help="directory names to upload")
    watch.add_argument(
        "--settle",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="complete after this long without change, if no marker file "
        "(.complete, COMPLETE) appears first (default 30)",
    )
    watch.add_argument(
        "--asset-type", default="checkpoint", metavar="TYPE", help="(default: checkpoint)"
    )
    _filter_options(watch)
    _run_options(watch)

    resume = _command(
        sub,
        "resume",
        "finish the uploads an earlier process left unfinished",
        "Take over the tracker's unfinished uploads (those whose process is gone) and send "
        "only what the server lacks. Interactive: a recovery screen lets you choose.",
        [
            "methodic-tui resume --tracker /scratch/run1/uploads.sqlite",
            "methodic-tui resume --no-ui --server-url http://chronicle:8765",
            "methodic-tui resume --no-ui --take-over   # the owner's pid was reused",
        ],
        RUNNING,
    )
    resume.add_argument(
        "--take-over",
        action="store_true",
        help="also take the uploads another live process owns (it may be sending them too)",
    )
    download = _command(
        sub,
        "download",
        "restore a finalized asset (a checkpoint) into a directory",
        "Download ASSET_ID, or with --latest the run's newest finalized asset of --asset-type, "
        "into DEST. Every file is verified against its published checksum before it takes its "
        "final name; files already in DEST with the right bytes are kept; after a failure or "
        "an interruption the same command fetches only what is missing (docs/restore.md).",
        [
            "methodic-tui download 01J9Z3... /scratch/restore --server-url http://chronicle:8765",
            "methodic-tui download --latest --experiment llama --run 3 /scratch/restore --no-ui",
            "methodic-tui download --latest /scratch/restore --include '__3_*.distcp' --json",
        ],
        (SERVER, TRANSFER, UI, JSON, OUTPUT),
    )
    download.add_argument(
        "targets",
        nargs="+",
        metavar="ASSET_ID|DEST",
        help="the asset's full id (as `list --json` shows it; none with --latest), then DEST",
    )
    download.add_argument(
        "--latest",
        action="store_true",
        help="the newest finalized asset of the run (--experiment, --variation, --run)",
    )
    download.add_argument(
        "--asset-type",
        default="checkpoint",
        metavar="TYPE",
        help="with --latest: of this type ('' for any; default: checkpoint)",
    )
    download.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="only components matching GLOB (repeatable; relative to the asset's root; a GLOB "
        "without / matches a file name at any depth)",
    )
    _run_options(download, "with --latest: the run's experiment (default: uploads)")
    _command(
        sub,
        "attach",
        "watch a tracker another process on this host uploads from",
        "View of a tracker another process writes. With --server-url and --api-key the keys act "
        "in that process, relayed through the server (docs/monitor.md); without, it only "
        "watches (stop that process and run `resume` to take over).",
        [
            "methodic-tui attach --tracker /scratch/run1/uploads.sqlite",
            "methodic-tui attach --tracker uploads.sqlite --server-url http://chronicle:8765",
        ],
        (TRACKER, REMOTE, UI, JSON, OUTPUT),
    )
    monitor = _command(
        sub,
        "monitor",
        "every uploader's progress, live, through the server",
        "Show every process that uploads to the server (any host) with its assets, live; "
        "lost uploaders stand out with their last beat. The keys act on the uploader that "
        "owns the asset, through the server, and its acknowledgement is shown. --no-ui prints "
        "them once (exit 1 when one is lost). See docs/monitor.md.",
        [
            "methodic-tui monitor --server-url http://chronicle:8765",
            "methodic-tui monitor --experiment llama-7b --run 3",
            "methodic-tui monitor --json | jq '.sessions[] | select(.state == \"lost\")'",
        ],
        (REMOTE, UI, JSON),
    )
    monitor.add_argument(
        "--experiment", default=None, metavar="ID|NAME", help="only uploaders into this experiment"
    )
    monitor.add_argument("--run", type=_index, default=None, metavar="N", help="only this run")
    _command(
        sub,
        "status",
        "a one-shot summary of the tracker",
        "Count the tracker's assets by state and list the unfinished ones, with why each "
        "stopped. Reads the tracker only.",
        ["methodic-tui status", "methodic-tui status --json | jq .unfinished"],
        (TRACKER, JSON),
    )
    _command(
        sub,
        "list",
        "every asset of the tracker, one a line",
        "List the tracker's assets: id, name, state, files and bytes. Reads the tracker only.",
        ["methodic-tui list", "methodic-tui list --json"],
        (TRACKER, JSON),
    )
    for name, summary, description, groups in (
        (
            "discard",
            "abort an unfinished upload: on the server (its bytes go) and in the tracker",
            "Discard ASSET: stop it, abort it on the server and mark it discarded in the "
            "tracker. A finalized asset cannot be discarded.",
            (SERVER, TRACKER, JSON),
        ),
        (
            "seal",
            "declare an asset's registration complete, so that it can be finalized",
            "Seal ASSET in the tracker: every file of it is registered (a registration a "
            "crash split is never finalized until sealed). Then `resume` finishes it.",
            (TRACKER, JSON),
        ),
        (
            "retry",
            "upload a failed (or held) asset again and wait for it",
            "Queue ASSET's failed files again (attempts reset) and upload until it is "
            "finalized or fails again. Other unfinished uploads are left alone.",
            (SERVER, TRACKER, TRANSFER, JSON, OUTPUT),  # always headless
        ),
    ):
        p = _command(
            sub,
            name,
            summary,
            description + " ASSET is an asset id, a unique prefix of one, or the name of "
            "its directory (see `methodic-tui list`).",
            [f"methodic-tui {name} checkpoint-1000", f"methodic-tui {name} 01J9Z3"],
            groups,
        )
        p.add_argument("asset", metavar="ASSET")
    completion = _command(
        sub,
        "completion",
        "print a shell completion script",
        "Print a completion script for SHELL. bash: add "
        '`eval "$(methodic-tui completion bash)"` to ~/.bashrc.',
        ["methodic-tui completion bash > ~/.local/share/bash-completion/completions/methodic-tui"],
        (),
    )
    completion.add_argument("shell", choices=["bash"], metavar="SHELL", help="bash")
    for p in sub.choices.values():
        _add_options(p, p.get_default("groups") or (), top=False)
    return parser


def _run_options(
    p: argparse.ArgumentParser,
    experiment_help: str = "experiment to upload into, created if missing (default: uploads)",
) -> None:
    p.add_argument("--experiment", default="uploads", metavar="ID|NAME", help=experiment_help)
    p.add_argument("--variation", type=_index, default=0, metavar="N", help="(default 0)")
    p.add_argument("--run", type=_index, default=0, metavar="N", help="(default 0)")
