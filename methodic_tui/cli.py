"""The ``methodic-tui`` command: demo, upload, watch, resume, attach, status, list, discard,
seal, retry, completion.

The dashboard (Textual) is imported only when it is shown; ``--no-ui`` (chosen by itself when
stdout or stdin is not a terminal) never loads it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from methodic import ChronicleError
from methodic_tui import format as fmt
from methodic_tui import parsing
from methodic_tui.arguments import (
    EXIT_USAGE,
    PROG,
    UsageError,
    build_parser,
    json_errors,
    report_error,
)
from methodic_tui.options import DEFAULT_TRACKER, Options
from methodic_tui.source import Source

T = TypeVar("T")


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


NEEDS_SERVER = ("upload", "watch", "resume", "discard", "retry", "download")


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

        return AttachSource(opts.tracker, relay_to=opts if opts.server_url else None)
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
    if command == "download":
        from methodic_tui.download import DownloadUsage, job_from

        try:
            return EngineSource(opts, job_from(args), pending="leave")
        except DownloadUsage as exc:
            raise UsageError(str(exc)) from None
    assert command == "resume"
    return EngineSource(
        opts, ResumeJob(), pending="start" if headless else "hold", take_over=args.take_over
    )


def wants_headless(args: argparse.Namespace) -> bool:
    if getattr(args, "no_ui", False) or getattr(args, "json", False):
        return True
    if args.command not in ("demo", "upload", "watch", "resume", "attach", "download", "monitor"):
        return True
    try:
        return not (sys.stdout.isatty() and sys.stdin.isatty())
    except (AttributeError, ValueError):
        return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    json_errors("--json" in argv[: argv.index("--") if "--" in argv else None])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(args, parser)
    except (UsageError, ChronicleError) as exc:
        report_error(_one_line(exc))
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
    if args.command == "monitor":
        from methodic_tui.monitor import run_monitor

        return run_monitor(args, opts, wants_headless(args))
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
    hint = (
        "the same methodic-tui download (it fetches only what is missing)"
        if args.command == "download"
        else f"methodic-tui resume --tracker {opts.tracker}"
    )
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
        unfinished = fmt.plural(left, "upload")
        with contextlib.suppress(OSError):  # the terminal may have gone (SIGHUP)
            print(f"{PROG}: {unfinished} unfinished; resume with: {hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
