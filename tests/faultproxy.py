"""A loopback TCP proxy that breaks connections on purpose: cut mid-body, or stall.

Faults apply to new connections in order: ``proxy.cut_after(n_bytes, connections=2)`` makes the
next two connections die once they have carried ``n_bytes`` from the client; ``stall(seconds)``
makes the next connection stop forwarding (without closing) for that long after ``after`` bytes.
Counts of bytes forwarded upstream are kept so tests can assert what was (re)sent.

Downloads: ``cut_down_after``, ``stall_down`` and ``corrupt_down`` act on the bytes from the
server to the client; ``answer(status)`` answers the next connection's request itself (e.g. a
503 with ``Retry-After``) without reaching the server. ``bytes_down`` counts what was served.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from dataclasses import dataclass


@dataclass
class Fault:
    kind: str  # "cut", "stall" or "corrupt" (upstream); "cut_down", ..., or "answer"
    after: int
    seconds: float = 0.0
    status: int = 0


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults: deque[Fault] = deque()
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.faults_fired = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault-proxy")
        self.port = 0

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_after(self, n_bytes: int, connections: int = 1) -> None:
        for _ in range(connections):
            self.faults.append(Fault("cut", n_bytes))

    def stall(self, seconds: float, after: int = 0) -> None:
        self.faults.append(Fault("stall", after, seconds))

    def corrupt(self, after: int) -> None:
        """Flip one byte of the next connection's upstream stream at offset ``after``."""
        self.faults.append(Fault("corrupt", after))

    def cut_down_after(self, n_bytes: int, connections: int = 1) -> None:
        """The next ``connections`` connections die once they carried ``n_bytes`` to the client."""
        for _ in range(connections):
            self.faults.append(Fault("cut_down", n_bytes))

    def stall_down(self, seconds: float, after: int = 0) -> None:
        """The next connection stops sending to the client for ``seconds`` after ``after`` bytes."""
        self.faults.append(Fault("stall_down", after, seconds))

    def corrupt_down(self, after: int) -> None:
        """Flip one byte the next connection sends to the client, at offset ``after``."""
        self.faults.append(Fault("corrupt_down", after))

    def answer(self, status: int, count: int = 1, retry_after: float | None = 0) -> None:
        """The next ``count`` connections get ``status`` (and Retry-After) from the proxy itself."""
        for _ in range(count):
            self.faults.append(Fault("answer", 0, retry_after or 0.0, status))

    async def _answer(
        self, fault: Fault, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
        body = b'{"error": {"code": "injected", "message": "injected by the fault proxy"}}'
        head = (
            f"HTTP/1.1 {fault.status} Injected\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {fault.seconds:g}\r\n"
            "Connection: close\r\n\r\n"
        )
        self.faults_fired += 1
        writer.write(head.encode() + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.transport.abort()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        fault = self.faults.popleft() if self.faults else None
        if fault is not None and fault.kind == "answer":
            await self._answer(fault, reader, writer)
            return
        down = fault if fault is not None and fault.kind.endswith("_down") else None
        if down is not None:
            fault = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return

        async def client_to_server() -> None:
            carried = 0
            nonlocal fault
            while data := await reader.read(65536):
                if fault is not None and carried + len(data) >= fault.after:
                    keep = max(fault.after - carried, 0)
                    up_writer.write(data[:keep])
                    self.bytes_up += keep
                    carried += keep
                    data = data[keep:]
                    f, fault = fault, None
                    self.faults_fired += 1
                    if f.kind == "cut":
                        raise ConnectionResetError("fault: cut")
                    if f.kind == "corrupt" and data:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                    await asyncio.sleep(f.seconds)
                up_writer.write(data)
                self.bytes_up += len(data)
                carried += len(data)
                await up_writer.drain()
            up_writer.write_eof()

        async def server_to_client() -> None:
            carried = 0
            nonlocal down
            while data := await up_reader.read(65536):
                if down is not None and carried + len(data) >= down.after:
                    keep = max(down.after - carried, 0)
                    writer.write(data[:keep])
                    self.bytes_down += keep
                    carried += keep
                    data = data[keep:]
                    f, down = down, None
                    self.faults_fired += 1
                    if f.kind == "cut_down":
                        await writer.drain()
                        raise ConnectionResetError("fault: cut")
                    if f.kind == "corrupt_down" and data:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                    await writer.drain()
                    await asyncio.sleep(f.seconds)
                writer.write(data)
                self.bytes_down += len(data)
                carried += len(data)
                await writer.drain()
            writer.write_eof()

        tasks = [
            asyncio.ensure_future(client_to_server()),
            asyncio.ensure_future(server_to_client()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            for w in (writer, up_writer):
                w.transport.abort()
