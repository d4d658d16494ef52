"""The ``methodic`` command: ``methodic serve`` runs the embedded Chronicle server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from methodic import __version__

if TYPE_CHECKING:
    import socket

    from methodic.server.assemble import ListenError
    from methodic.server.config import ServerConfig
    from methodic.server.runner import QuietServer

EXIT_USAGE = 2
KEY_ENV = "METHODIC_API_KEY"


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


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
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
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="accept this API key instead of the generated one in DATA_DIR/api_key; the "
        "command line is visible to other users of this host (ps): prefer --api-key-file "
        f"or the {KEY_ENV} environment variable",
    )
    keys.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="accept the API key held in this file (mode 0600 recommended); default: "
        f"{KEY_ENV} if set, else the key generated in DATA_DIR/api_key",
    )
    serve.add_argument(
        "--public-url",
        default=None,
        help="origin of presigned URLs (default: the scheme and Host of each request)",
    )
    serve.add_argument(
        "--blob-port",
        type=_port,
        default=None,
        help="port of the blob data path (presigned PUT/GET); 0 picks a free one (default: "
        "the data dir's port of last time, and the server refuses to start if another process "
        "took it; give 0 or a port to move it; for a new data dir, a free one)",
    )
    serve.add_argument(
        "--public-blob-url",
        default=None,
        metavar="URL",
        help="origin of presigned blob URLs (default: --public-url, which must then route "
        "/blobs/ to the blob port; without either, the request's host with the blob port)",
    )
    serve.add_argument(
        "--storage",
        default="local",
        metavar="local|s3://BUCKET[/PREFIX]",
        help="where blob bytes live: local (under the data dir, the default) or an S3 bucket "
        "(clients upload straight to it; the data dir keeps only metadata; needs methodic[s3])",
    )
    serve.add_argument(
        "--s3-endpoint-url",
        default=None,
        metavar="URL",
        help="S3-compatible service to use instead of AWS (MinIO, Ceph RGW, ...)",
    )
    serve.add_argument(
        "--s3-region", default=None, help="the bucket's region (default: the AWS configuration's)"
    )
    serve.add_argument(
        "--pending-ttl",
        type=_seconds,
        default=3 * 86400.0,
        metavar="SECONDS",
        help="a pending asset idle this long expires and its stored bytes are removed "
        "(default: 259200, 3 days)",
    )
    serve.add_argument(
        "--presign-ttl",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="lifetime of presigned URLs (default: 3600)",
    )
    serve.add_argument(
        "--session-lost-after",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="an uploader silent this long shows as lost in `methodic-tui monitor` (default: 30)",
    )
    serve.add_argument(
        "--session-retention",
        type=_seconds,
        default=86400.0,
        metavar="SECONDS",
        help="an uploader session is forgotten this long after its last beat (default: 86400)",
    )
    limits = serve.add_argument_group(
        "limits", "what one request may ask of the server (over them: 413, naming the limit)"
    )
    limits.add_argument(
        "--max-components-per-asset",
        type=_count,
        default=200_000,
        metavar="N",
        help="components in one asset's manifest (default: 200000)",
    )
    limits.add_argument(
        "--max-request-bytes",
        type=_count,
        default=64 * 1024 * 1024,
        metavar="BYTES",
        help="size of a control-API request body (default: 67108864, 64 MiB)",
    )
    limits.add_argument(
        "--max-presign-batch",
        type=_count,
        default=1000,
        metavar="N",
        help="upload targets per presign call, and per create with presign (default: 1000)",
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
    from methodic.server.assemble import ListenError, build_server
    from methodic.server.config import ServerConfig
    from methodic.server.runner import is_loopback, socket_url
    from methodic.server.state import DataDirError

    data_dir: Path = (args.data_dir or default_data_dir()).expanduser().absolute()
    api_key, key_source = _api_key(args)
    try:
        config = ServerConfig(
            data_dir=data_dir,
            api_key=api_key,
            public_url=args.public_url,
            presign_ttl=args.presign_ttl,
            host=args.host,
            port=args.port,
            blob_port=args.blob_port,
            public_blob_url=args.public_blob_url,
            storage=args.storage,
            s3_endpoint_url=args.s3_endpoint_url,
            s3_region=args.s3_region,
            pending_ttl=args.pending_ttl,
            max_components_per_asset=args.max_components_per_asset,
            max_json_body=args.max_request_bytes,
            max_presign_batch=args.max_presign_batch,
            session_lost_after=args.session_lost_after,
            session_retention=args.session_retention,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        server = build_server(config)
    except ListenError as exc:
        raise UsageError(_listen_problem(exc, args.host)) from None
    except (DataDirError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    try:
        if not is_loopback(args.host) and not _behind_tls(config):
            print(
                f"methodic serve: warning: listening on {args.host}, not loopback, without TLS in "
                "front: API keys and presigned URLs cross the network in clear and anyone who can "
                "reach this address can try keys; prefer an SSH tunnel, or a TLS reverse proxy "
                "(then pass its https:// --public-url)",
                file=sys.stderr,
                flush=True,
            )
        logging.basicConfig(
            level=logging.WARNING,
            stream=sys.stderr,
            format="methodic serve: %(levelname)s %(name)s: %(message)s",
        )
        state, blobs, url = server.state, server.blobs, server.url

        def announce() -> None:
            _say(f"Chronicle server listening on {url} (OpenAPI at {url}/openapi.json)")
            _say(f"data dir: {data_dir}")
            _say(f"storage: {state.storage.describe()}")
            key = state.active_key
            if key.key_file is None:
                _say(f"API key: the one given with {key_source}")
            elif key.generated_now:
                _say(f"API key: generated now and written to {key.key_file} (mode 0600)")
            else:
                _say(f"API key: in {key.key_file}")
            if blobs is not None:
                _say(f"blob data path on {socket_url(blobs.server.sock, args.host)}")
            if config.public_blob_url or config.public_url:
                _say(f"presigned URLs point at {config.public_blob_url or config.public_url}")

        asyncio.run(_run(server.http, server.sock, announce))
    finally:
        server.close()
    return 0


def _api_key(args: argparse.Namespace) -> tuple[str | None, str]:
    """The key this start accepts (None: DATA_DIR/api_key's) and where it came from."""
    if args.api_key is not None:
        return args.api_key, "--api-key"
    path: Path | None = args.api_key_file
    if path is not None:
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise UsageError(f"cannot read the API key file {path}: {reason}") from None
        if not key:
            raise UsageError(f"the API key file {path} is empty")
        return key, f"--api-key-file {path}"
    key = os.environ.get(KEY_ENV, "").strip()
    if key:
        return key, f"the {KEY_ENV} environment variable"
    return None, "DATA_DIR/api_key"


def _behind_tls(config: ServerConfig) -> bool:
    """Whether clients are told to reach this server through TLS (an https public URL)."""
    urls = [config.public_url, config.public_blob_url]
    return any(urls) and all(u is None or u.startswith("https://") for u in urls)


def _listen_problem(exc: ListenError, host: str) -> str:
    if exc.remembered:
        return str(exc.strerror)
    option = "--blob-port" if exc.listener == "blob" else "--port"
    if exc.in_use:
        return f"port {exc.port} on {host} is already in use (another server?); choose another with {option}"
    return f"cannot listen on {host}:{exc.port}: {exc.strerror or exc}"


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
