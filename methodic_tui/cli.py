"""The ``methodic-tui`` command: demo, upload, watch, resume, attach, status, list, discard,
seal, retry, completion.

The dashboard (Textual) is imported only when it is shown; ``--no-ui`` (chosen by itself when
stdout or stdin is not a terminal) never loads it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from methodic import ChronicleError, __version__
from methodic_tui import parsing
from methodic_tui.options import DEFAULT_TRACKER, Options
from methodic_tui.source import Source

T = TypeVar("T")
EXIT_USAGE = 2
PROG = "methodic-tui"
SCHEMA = 1  # of the --json lines; see docs/headless.md
_json_errors = False  # --json was given: configuration errors are a JSON line too

EXIT_CODES = """\
exit codes:
  0    done (every upload finalized, or the command did what it said)
  1    some upload failed (`methodic-tui retry ASSET` retries one)
  2    usage or configuration error (one line on stderr; a JSON line too with --json)
  129  the terminal hung up (SIGHUP); 130 SIGINT; 143 SIGTERM: the tracker is flushed
       first, and `methodic-tui resume` continues"""


class UsageError(Exception):
    """Printed as one line; exit status 2."""


def _report_error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    if _json_errors:
        line = {"schema": SCHEMA, "event": "error", "at": time.time(), "exit_code": EXIT_USAGE}
        print(json.dumps({**line, "message": message}), flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _report_error(f"{message} (see {self.prog} --help)")
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
SERVER, TRACKER, TRANSFER, OUTPUT, UI, JSON = (
    "server",
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
    if SERVER in groups:
        g.add_argument(
            "--server-url",
            default=d,
            metavar="URL",
            help="Chronicle server (env METHODIC_SERVER_URL)",
        )
        g.add_argument("--api-key", default=d, metavar="KEY", help="API key (env METHODIC_API_KEY)")
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
    _command(
        sub,
        "attach",
        "watch a tracker another process on this host uploads from",
        "Read-only view of a tracker another process writes (the controls act in that "
        "process); stop it and run `resume` to take over.",
        ["methodic-tui attach --tracker /scratch/run1/uploads.sqlite"],
        (TRACKER, UI, JSON, OUTPUT),
    )
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


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--experiment",
        default="uploads",
        metavar="ID|NAME",
        help="experiment to upload into, created if missing (default: uploads)",
    )
    p.add_argument("--variation", type=_index, default=0, metavar="N", help="(default 0)")
    p.add_argument("--run", type=_index, default=0, metavar="N", help="(default 0)")


def _env(name: str, parse: Callable[[str], T]) -> T | None:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        return parse(text)
    except parsing.ValueProblem as exc:
        raise UsageError(f"{name}: {exc}") from None


def options_from(args: argparse.Namespace) -> Options:
    env = os.environ
    workers = getattr(args, "workers", None)
    if workers is None:
        workers = _env("METHODIC_WORKERS", parsing.workers) or 8
    if hasattr(args, "max_bandwidth"):
        bandwidth = args.max_bandwidth
    else:
        bandwidth = _env("METHODIC_MAX_BANDWIDTH", parsing.rate)
    opts = Options(
        server_url=getattr(args, "server_url", None) or env.get("METHODIC_SERVER_URL") or None,
        api_key=getattr(args, "api_key", None) or env.get("METHODIC_API_KEY") or None,
        tracker=getattr(args, "tracker", None)
        or Path(env.get("METHODIC_TRACKER") or DEFAULT_TRACKER),
        workers=workers,
        max_bandwidth=bandwidth,
        experiment=getattr(args, "experiment", "uploads"),
        variation=getattr(args, "variation", 0),
        run=getattr(args, "run", 0),
        asset_type=getattr(args, "asset_type", "checkpoint"),
        include=getattr(args, "include", None),
        exclude=getattr(args, "exclude", None) or [],
    )
    opts.tracker = opts.tracker.expanduser().absolute()
    if opts.tracker.is_dir():
        raise UsageError(
            f"--tracker {opts.tracker} is a directory; pass a file in it, "
            f"e.g. {opts.tracker / DEFAULT_TRACKER}"
        )
    if opts.server_url:
        try:
            parsing.server_url(opts.server_url)
        except parsing.ValueProblem as exc:
            raise UsageError(str(exc)) from None
        if not opts.api_key:
            raise UsageError(
                "--server-url needs an API key: pass --api-key or set METHODIC_API_KEY"
            )
    return opts


NEEDS_SERVER = ("upload", "watch", "resume", "discard", "retry")


def check_server(args: argparse.Namespace, opts: Options, headless: bool) -> None:
    """No server URL: refuse a batch job (its bytes would stay on this node) unless --embedded."""
    if opts.server_url or args.command not in NEEDS_SERVER or getattr(args, "dry_run", False):
        return
    opts.embedded = True
    if getattr(args, "embedded", False) or not headless:
        return
    raise UsageError(
        "no server: pass --server-url URL or set METHODIC_SERVER_URL (or --embedded to run "
        "a server on this machine and keep the bytes here)"
    )


def make_source(args: argparse.Namespace, opts: Options, headless: bool) -> Source:
    from methodic_tui.engine_source import EngineSource
    from methodic_tui.jobs import AssetJob, ResumeJob, UploadJob, check_dirs

    command = args.command
    if command == "attach":
        from methodic_tui.attach import AttachSource

        return AttachSource(opts.tracker)
    if command == "demo":
        from methodic_tui.demo import DEFAULT_BANDWIDTH, DEFAULT_SIZE, DemoJob

        if not hasattr(args, "max_bandwidth") and "METHODIC_MAX_BANDWIDTH" not in os.environ:
            opts.max_bandwidth = DEFAULT_BANDWIDTH
        opts.embedded = opts.server_url is None
        size = args.size or DEFAULT_SIZE
        return EngineSource(
            opts, DemoJob(total_size=int(size), interval=args.every), pending="leave"
        )
    if command == "upload":
        problem = check_dirs(args.dirs, include=opts.include, exclude=opts.exclude)
        if problem:
            raise UsageError(problem)
        job = UploadJob(args.dirs, args.asset_type, force=args.force)
        return EngineSource(opts, job, pending="leave" if headless else "hold")
    if command == "watch":
        from methodic_tui.watch import WatchJob

        problem = check_dirs([args.dir], allow_empty=True)
        if problem:
            raise UsageError(problem)
        return EngineSource(
            opts,
            WatchJob(args.dir, args.pattern, args.settle),
            pending="leave" if headless else "hold",
        )
    if command == "retry":
        return EngineSource(opts, AssetJob(args.asset, "retry"), pending="hold")
    assert command == "resume"
    return EngineSource(
        opts, ResumeJob(), pending="start" if headless else "hold", take_over=args.take_over
    )


def wants_headless(args: argparse.Namespace) -> bool:
    if getattr(args, "no_ui", False) or getattr(args, "json", False):
        return True
    if args.command not in ("demo", "upload", "watch", "resume", "attach"):
        return True
    try:
        return not (sys.stdout.isatty() and sys.stdin.isatty())
    except (AttributeError, ValueError):
        return True


def main(argv: Sequence[str] | None = None) -> int:
    global _json_errors
    argv = list(sys.argv[1:] if argv is None else argv)
    _json_errors = "--json" in argv[: argv.index("--") if "--" in argv else None]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(args, parser)
    except (UsageError, ChronicleError) as exc:
        _report_error(_one_line(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `methodic-tui status | head`: the reader left, that is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "completion":
        from methodic_tui.completion import bash_script

        print(bash_script(parser))
        return 0
    opts = options_from(args)
    json_out = getattr(args, "json", False)
    if args.command == "status":
        from methodic_tui.status import run_status

        return run_status(opts.tracker, json_out=json_out)
    if args.command in ("list", "seal"):
        from methodic_tui import manage

        if args.command == "list":
            return manage.run_list(opts.tracker, json_out=json_out)
        return manage.run_seal(opts.tracker, args.asset, json_out=json_out)
    if args.command in ("resume", "retry", "discard") and not opts.tracker.exists():
        raise UsageError(f"no tracker at {opts.tracker} (pass --tracker or set METHODIC_TRACKER)")
    if args.command == "retry":
        from methodic_tui import manage

        target = manage.find(opts.tracker, args.asset)
        if target.state in ("finalized", "discarded"):
            raise UsageError(f"{target.asset_id} is {target.state}: there is nothing to retry")
        args.asset = target.asset_id
    if args.command in ("upload", "watch"):
        from methodic_tui.jobs import check_dirs

        problem = (
            check_dirs(args.dirs, include=opts.include, exclude=opts.exclude)
            if args.command == "upload"
            else None
        )
        problem = problem or (
            check_dirs([args.dir], allow_empty=True) if args.command == "watch" else None
        )
        if problem:
            raise UsageError(problem)
    if args.command == "upload" and args.dry_run:
        from methodic_tui.jobs import dry_run

        try:
            return dry_run(
                args.dirs,
                opts.tracker,
                force=args.force,
                json_out=json_out,
                include=opts.include,
                exclude=opts.exclude,
            )
        except ChronicleError as exc:
            raise UsageError(str(exc)) from None
    headless = wants_headless(args)
    check_server(args, opts, headless)
    if args.command == "discard":
        from methodic_tui import manage

        return asyncio.run(manage.run_discard(opts, args.asset, json_out=json_out))
    source = make_source(args, opts, headless)
    hint = f"methodic-tui resume --tracker {opts.tracker}"
    if headless:
        from methodic_tui.headless import Reporter, run_headless

        reporter = Reporter(
            json_lines=json_out,
            quiet=getattr(args, "quiet", False),
            verbose=getattr(args, "verbose", False),
            log_file=getattr(args, "log_file", None),
            retry_hint=f"methodic-tui retry ASSET --tracker {opts.tracker}",
        )
        try:
            return asyncio.run(
                run_headless(
                    source,
                    reporter,
                    resume_hint=hint,
                    heartbeat=getattr(args, "stats", 30.0),
                )
            )
        finally:
            reporter.close()
    from methodic_tui.dashboard.app import run_app

    code, left = run_app(source, start_on_recovery=args.command == "resume")
    if left:
        with contextlib.suppress(OSError):  # the terminal may have gone (SIGHUP)
            print(f"{PROG}: {left} uploads unfinished; resume with: {hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
