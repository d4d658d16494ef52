"""A loopback TCP proxy that breaks connections on purpose: cut mid-body, or stall.

Faults apply to new connections in order: ``proxy.cut_after(n_bytes, connections=2)`` makes the
next two connections die once they have carried ``n_bytes`` from the client; ``stall(seconds)``
makes the next connection stop forwarding (without closing) for that long after ``after`` bytes.
Counts of bytes forwarded upstream are kept so tests can assert what was (re)sent.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass


@dataclass
class Fault:
    kind: str  # "cut", "stall" or "corrupt"
    after: int
    seconds: float = 0.0


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults: deque[Fault] = deque()
        self.bytes_up = 0
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
            while data := await up_reader.read(65536):
                writer.write(data)
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
