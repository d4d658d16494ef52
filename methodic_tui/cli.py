"""The ``methodic-tui`` command: demo, upload, watch, resume, attach, status.

The dashboard (Textual) is imported only when it is shown; ``--no-ui`` (chosen by itself when
stdout or stdin is not a terminal) never loads it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from methodic import ChronicleError, __version__, parse_rate
from methodic_tui.options import DEFAULT_TRACKER, Options
from methodic_tui.source import Source

EXIT_USAGE = 2
PROG = "methodic-tui"


class UsageError(Exception):
    """Printed as one line; exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


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


_positive_int = _whole_number(1)
_index = _whole_number(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


def _bytes(text: str) -> float | None:
    try:
        return parse_rate(text)
    except ChronicleError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    # Given at either level (`methodic-tui --no-ui demo` or `methodic-tui demo --no-ui`);
    # SUPPRESS keeps the subcommand's absent flags from hiding the top level's.
    d = argparse.SUPPRESS
    g = parser.add_argument_group("common options") if not top else parser
    g.add_argument(
        "--server-url",
        default=d,
        metavar="URL",
        help="Chronicle server (env METHODIC_SERVER_URL); none: an embedded server",
    )
    g.add_argument("--api-key", default=d, metavar="KEY", help="API key (env METHODIC_API_KEY)")
    g.add_argument(
        "--tracker",
        type=Path,
        default=d,
        metavar="PATH",
        help=f"upload tracker (env METHODIC_TRACKER, default ./{DEFAULT_TRACKER})",
    )
    g.add_argument(
        "--workers",
        type=_positive_int,
        default=d,
        metavar="N",
        help="transfers at once (default 8)",
    )
    g.add_argument(
        "--max-bandwidth",
        type=_bytes,
        default=d,
        metavar="RATE",
        help="cap for all transfers, e.g. 200MB (bytes/s); 0: no cap",
    )
    g.add_argument(
        "--no-ui",
        action="store_true",
        default=d,
        help="no dashboard: status lines on stderr (the default when not on a terminal)",
    )
    g.add_argument(
        "--json",
        action="store_true",
        default=d,
        help="JSON lines on stdout instead of text (implies --no-ui)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="The methodic upload dashboard (and its headless twin)."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo", help="upload synthetic checkpoints to a throwaway embedded server"
    )
    demo.add_argument(
        "--size",
        type=_bytes,
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

    upload = sub.add_parser("upload", help="upload checkpoint directories")
    upload.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    upload.add_argument("--asset-type", default="checkpoint")
    _run_options(upload)

    watch = sub.add_parser("watch", help="upload each new checkpoint directory once it is complete")
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
    watch.add_argument("--asset-type", default="checkpoint")
    _run_options(watch)

    resume = sub.add_parser("resume", help="finish the uploads an earlier process left unfinished")
    resume.add_argument(
        "--take-over",
        action="store_true",
        help="also take the uploads another live process owns (it may be sending them too)",
    )
    sub.add_parser("attach", help="watch a tracker another process on this host uploads from")
    sub.add_parser("status", help="a one-shot summary of the tracker")
    for p in sub.choices.values():
        _common(p, top=False)
    return parser


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--experiment",
        default="uploads",
        metavar="ID|NAME",
        help="experiment to upload into, created if missing (default: uploads)",
    )
    p.add_argument("--variation", type=_index, default=0, metavar="N")
    p.add_argument("--run", type=_index, default=0, metavar="N")


def options_from(args: argparse.Namespace) -> Options:
    env = os.environ
    opts = Options(
        server_url=getattr(args, "server_url", None) or env.get("METHODIC_SERVER_URL") or None,
        api_key=getattr(args, "api_key", None) or env.get("METHODIC_API_KEY") or None,
        tracker=getattr(args, "tracker", None)
        or Path(env.get("METHODIC_TRACKER") or DEFAULT_TRACKER),
        workers=getattr(args, "workers", 8),
        max_bandwidth=getattr(args, "max_bandwidth", None),
        experiment=getattr(args, "experiment", "uploads"),
        variation=getattr(args, "variation", 0),
        run=getattr(args, "run", 0),
        asset_type=getattr(args, "asset_type", "checkpoint"),
    )
    opts.tracker = opts.tracker.expanduser().absolute()
    if opts.server_url and not opts.api_key:
        raise UsageError("--server-url needs an API key: pass --api-key or set METHODIC_API_KEY")
    return opts


def make_source(args: argparse.Namespace, opts: Options, headless: bool) -> Source:
    from methodic_tui.engine_source import EngineSource
    from methodic_tui.jobs import ResumeJob, UploadJob, check_dirs

    command = args.command
    if command == "attach":
        from methodic_tui.attach import AttachSource

        return AttachSource(opts.tracker)
    if command == "demo":
        from methodic_tui.demo import DEFAULT_BANDWIDTH, DEFAULT_SIZE, DemoJob

        if not hasattr(args, "max_bandwidth"):
            opts.max_bandwidth = DEFAULT_BANDWIDTH
        size = args.size or DEFAULT_SIZE
        return EngineSource(
            opts, DemoJob(total_size=int(size), interval=args.every), pending="leave"
        )
    if command == "upload":
        problem = check_dirs(args.dirs)
        if problem:
            raise UsageError(problem)
        job = UploadJob(args.dirs, args.asset_type)
        return EngineSource(opts, job, pending="leave" if headless else "hold")
    if command == "watch":
        from methodic_tui.watch import WatchJob

        problem = check_dirs([args.dir])
        if problem:
            raise UsageError(problem)
        return EngineSource(
            opts,
            WatchJob(args.dir, args.pattern, args.settle),
            pending="leave" if headless else "hold",
        )
    assert command == "resume"
    return EngineSource(
        opts, ResumeJob(), pending="start" if headless else "hold", take_over=args.take_over
    )


def wants_headless(args: argparse.Namespace) -> bool:
    if getattr(args, "no_ui", False) or getattr(args, "json", False):
        return True
    try:
        return not (sys.stdout.isatty() and sys.stdin.isatty())
    except (AttributeError, ValueError):
        return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(args)
    except (UsageError, ChronicleError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `methodic-tui status | head`: the reader left, that is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _dispatch(args: argparse.Namespace) -> int:
    opts = options_from(args)
    if args.command == "status":
        from methodic_tui.status import run_status

        return run_status(opts.tracker, json_out=getattr(args, "json", False))
    headless = wants_headless(args)
    source = make_source(args, opts, headless)
    hint = f"methodic-tui resume --tracker {opts.tracker}"
    if headless:
        from methodic_tui.headless import Reporter, run_headless

        reporter = Reporter(json_lines=getattr(args, "json", False))
        return asyncio.run(run_headless(source, reporter, resume_hint=hint))
    from methodic_tui.dashboard.app import run_app

    return run_app(source, start_on_recovery=args.command == "resume")


if __name__ == "__main__":
    sys.exit(main())
