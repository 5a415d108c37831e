"""A loopback TCP proxy that adds a fixed delay to every request: S3-like latency on moto.

    python bench/latency_proxy.py --upstream 127.0.0.1:5000 --delay-ms 60 [--port 0]

or, from Python::

    with LatencyProxy(("127.0.0.1", 5000), delay_s=0.060) as proxy:
        ...  # point the client at proxy.endpoint_url

Each connection is forwarded to ``upstream``. Bytes from the client pass through a delay
line: a chunk read at time t is written upstream at t + delay, in order. An HTTP request
(headers plus a body that follows at once) therefore reaches the server ``delay`` late,
whatever its size, while the bytes still flow at full speed behind it (an upload is
delayed once, not once per chunk). Responses are forwarded without delay. So each
request/response exchange, one GET say, takes ``delay`` longer: roughly the first-byte
latency of S3 (tens of milliseconds) that a loopback moto server lacks. Parallel
requests on separate connections are delayed side by side, as they would be by S3.

The proxy runs an asyncio loop on a daemon thread of the calling process; ``stats()``
counts connections and client chunks forwarded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from typing import Any

__all__ = ["LatencyProxy"]

_CHUNK = 1 << 16


class LatencyProxy:
    """Forward ``listen`` -> ``upstream``, delaying client-to-server bytes by ``delay_s``."""

    def __init__(self, upstream: tuple[str, int], delay_s: float, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.upstream = (str(upstream[0]), int(upstream[1]))
        self.delay_s = float(delay_s)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._connections = 0
        self._chunks = 0
        self._bytes_up = 0
        self._bytes_down = 0

    @classmethod
    def for_url(cls, url: str, delay_s: float, **kwargs: Any) -> "LatencyProxy":
        """A proxy in front of ``http://host:port`` (the scheme and path are ignored)."""
        netloc = url.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = netloc.rpartition(":")
        return cls((host, int(port)), delay_s, **kwargs)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "LatencyProxy":
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="latency-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.host, self.port), loop).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = self._server = None

    def __enter__(self) -> "LatencyProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        return {"delay_ms": self.delay_s * 1e3, "connections": self._connections, "client_chunks": self._chunks,
                "bytes_up": self._bytes_up, "bytes_down": self._bytes_down}

    # ------------------------------------------------------------------ forwarding
    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._connections += 1
        upstream_writer = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            jobs = [asyncio.ensure_future(job) for job in (
                self._read_client(client_reader, line),
                self._delay_line(line, upstream_writer),
                self._copy(upstream_reader, client_writer))]
            try:
                # The connection ends when the server closes its side (after the client's EOF has
                # gone through the delay line, say), or when forwarding either way fails.
                line_job, copy_job = jobs[1:]
                done, _ = await asyncio.wait(jobs[1:], return_when=asyncio.FIRST_COMPLETED)
                if copy_job not in done and line_job.exception() is None:
                    await copy_job
            finally:
                for job in jobs:
                    job.cancel()
                await asyncio.gather(*jobs, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            for writer in (upstream_writer, client_writer):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            self._tasks.discard(task)

    async def _read_client(self, reader: asyncio.StreamReader, line: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                data = b""
            line.put_nowait((loop.time() + self.delay_s, data))
            if not data:
                return
            self._chunks += 1
            self._bytes_up += len(data)

    async def _delay_line(self, line: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await line.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                return
            self._bytes_down += len(data)
            writer.write(data)
            await writer.drain()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, default=60.0, help="added to each request (default 60)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    with LatencyProxy((host or "127.0.0.1", int(port)), args.delay_ms / 1e3, host=args.host, port=args.port) as proxy:
        print(f"forwarding {proxy.endpoint_url} -> {args.upstream} with {args.delay_ms:g} ms per request", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
