"""The ``methodic`` command: ``methodic serve`` runs the embedded Chronicle server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from methodic import __version__

if TYPE_CHECKING:
    import socket

    from methodic.server.runner import QuietServer

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 0..65535")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("methodic", appauthor=False)) / "server"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="methodic", description="methodic: crash-safe uploads of ML checkpoints.")
    parser.add_argument("--version", action="version", version=f"methodic {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the embedded Chronicle server",
        description="Run the embedded Chronicle experiment server (OpenAPI at /openapi.json).",
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"where metadata, blobs and the API key live (default: {default_data_dir()})",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=8765,
        help="port to listen on; 0 picks a free one (default: 8765)",
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="accept this API key instead of the generated one in DATA_DIR/api_key",
    )
    serve.add_argument(
        "--public-url",
        default=None,
        help="origin of presigned URLs (default: the scheme and Host of each request)",
    )
    serve.add_argument("--storage", default="local", help="storage backend: local (default)")
    serve.add_argument(
        "--presign-ttl",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="lifetime of presigned URLs (default: 3600)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _serve(args)
    except UsageError as exc:
        print(f"methodic serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _say(message: str) -> None:
    print(f"methodic serve: {message}", flush=True)


def _serve(args: argparse.Namespace) -> int:
    # Imported here so that `methodic --version` stays fast.
    from methodic.server.app import create_app
    from methodic.server.config import ServerConfig
    from methodic.server.runner import (
        PortInUseError,
        bind_socket,
        is_loopback,
        make_server,
        socket_url,
    )
    from methodic.server.state import DataDirError, open_state

    if args.storage != "local":
        if args.storage.startswith("s3://"):
            raise UsageError(
                "--storage s3://... is not available yet in this version; use --storage local"
            )
        raise UsageError(f"unknown --storage {args.storage!r}; use --storage local")
    data_dir: Path = (args.data_dir or default_data_dir()).expanduser().absolute()
    try:
        config = ServerConfig(
            data_dir=data_dir,
            api_key=args.api_key,
            public_url=args.public_url,
            presign_ttl=args.presign_ttl,
            host=args.host,
            port=args.port,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # Bind before touching the data dir: a busy port must not leave a fresh key behind.
    try:
        sock = bind_socket(args.host, args.port)
    except PortInUseError:
        raise UsageError(
            f"port {args.port} on {args.host} is already in use (another server?); "
            "choose another with --port"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from None
    try:
        state = open_state(config)
    except (DataDirError, ValueError) as exc:
        sock.close()
        raise UsageError(str(exc)) from None
    try:
        if not is_loopback(args.host):
            print(
                f"methodic serve: warning: listening on {args.host}, not loopback: anyone who can reach "
                "this address can try API keys; prefer an SSH tunnel or a TLS reverse proxy",
                file=sys.stderr,
                flush=True,
            )
        logging.basicConfig(
            level=logging.WARNING,
            stream=sys.stderr,
            format="methodic serve: %(levelname)s %(name)s: %(message)s",
        )
        server = make_server(create_app(config, state=state))
        url = socket_url(sock, args.host)

        def announce() -> None:
            _say(f"Chronicle server listening on {url} (OpenAPI at {url}/openapi.json)")
            _say(f"data dir: {data_dir}")
            key = state.active_key
            if key.key_file is None:
                _say("API key: the one given with --api-key")
            elif key.generated_now:
                _say(f"API key: generated now and written to {key.key_file} (mode 0600)")
            else:
                _say(f"API key: in {key.key_file}")
            if config.public_url:
                _say(f"presigned URLs point at {config.public_url}")

        asyncio.run(_run(server, sock, announce))
    finally:
        state.close()
    return 0


async def _run(server: QuietServer, sock: socket.socket, announce: Callable[[], None]) -> None:
    """Serve until SIGINT/SIGTERM, then shut down cleanly (so the exit status is 0)."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if server.should_exit:
            server.force_exit = True  # a second Ctrl-C: stop waiting for in-flight requests
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if server.started:
        announce()
    await serving


if __name__ == "__main__":
    sys.exit(main())
