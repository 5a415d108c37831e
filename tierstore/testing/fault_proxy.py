"""A loopback HTTP proxy that injects S3 faults in front of a real server (moto).

    with FaultProxy("http://127.0.0.1:5000", rate=0.1, seed=0) as proxy:
        tier = S3Tier(bucket, prefix, endpoint_url=proxy.endpoint_url)

A share ``rate`` of requests (chosen by a seeded generator) meets one of these faults
instead of a clean exchange:

- ``"500"``: ``500 InternalError`` (an S3 error document), request not forwarded;
- ``"503"``: ``503 SlowDown``, request not forwarded;
- ``"reset"``: the connection is reset before any response (the request may or may not
  have reached the server: it is forwarded first, as a lost response would be);
- ``"stall"``: no response for ``stall_s`` seconds, then a reset (a client's read
  timeout must fire first);
- ``"truncate"``: the real response's headers and part of its body (the advertised
  ``Content-Length`` stays), then the connection closes.

Every connection carries one request (``Connection: close`` both ways), so a fault never
poisons a pooled connection by accident. ``Expect: 100-continue`` is removed from
requests. :attr:`counts` says how many of each fault were injected; ``faults=`` picks
which kinds may occur. For tests only; it trusts what it relays.
"""

from __future__ import annotations

import random
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from typing import Iterable

__all__ = ["FaultProxy", "FAULTS"]

FAULTS = ("500", "503", "reset", "stall", "truncate")
_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


def _read_head(sock: socket.socket, buffer: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    return head


def _read_exact(sock: socket.socket, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        chunk = sock.recv(max(65536, n - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    body = bytes(buffer[:n])
    del buffer[:n]
    return body


def _read_line(sock: socket.socket, buffer: bytearray) -> bytes:
    while b"\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return b""
        buffer += chunk
    return _read_exact(sock, buffer, buffer.index(b"\r\n") + 2)


def _read_chunked(sock: socket.socket, buffer: bytearray) -> bytes:
    """A chunked body, returned raw (chunk framing and trailers included)."""
    raw = bytearray()
    while True:
        line = _read_line(sock, buffer)
        if not line:
            return bytes(raw)
        raw += line
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:  # the last chunk: trailers up to an empty line
            while True:
                line = _read_line(sock, buffer)
                raw += line
                if line in (b"\r\n", b""):
                    return bytes(raw)
        raw += _read_exact(sock, buffer, size + 2)


def _headers(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    fields = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            fields.append((name.strip(), value.strip()))
    return lines[0], fields


def _field(fields: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in fields:
        if key.lower() == name:
            return value
    return None


def _rebuild(first: bytes, fields: list[tuple[bytes, bytes]], drop: Iterable[bytes]) -> bytes:
    dropped = {d.lower() for d in drop}
    kept = [f"{k.decode('latin-1')}: {v.decode('latin-1')}".encode("latin-1") for k, v in fields
            if k.lower() not in dropped]
    return b"\r\n".join([first, *kept, b"Connection: close", b"", b""])


def _read_message(sock: socket.socket, buffer: bytearray, *, response: bool, method: bytes = b"") -> tuple | None:
    head = _read_head(sock, buffer)
    if head is None:
        return None
    first, fields = _headers(head)
    length = _field(fields, b"content-length")
    if _field(fields, b"transfer-encoding") and b"chunked" in _field(fields, b"transfer-encoding").lower():
        body = _read_chunked(sock, buffer)
    elif length is not None:
        body = _read_exact(sock, buffer, int(length))
    elif response and method != b"HEAD" and not first.split(b" ")[1].startswith((b"1", b"204", b"304")):
        body = bytes(buffer)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    else:
        body = b""
    return first, fields, body


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


class _Handler(socketserver.BaseRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        proxy = self.server.proxy
        client = self.request
        buffer = bytearray()
        request = _read_message(client, buffer, response=False)
        if request is None:
            return
        first, fields, body = request
        method = first.split(b" ")[0]
        fault = proxy._draw()
        if fault in _ERRORS:
            status, reason, code, message = _ERRORS[fault]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<RequestId>fault-proxy</RequestId></Error>").encode()
            client.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: "
                           f"{len(xml)}\r\nConnection: close\r\n\r\n".encode() + (b"" if method == b"HEAD" else xml))
            return
        if fault == "stall":
            time.sleep(proxy.stall_s)
            _reset(client)
            return
        with socket.create_connection(proxy.upstream, timeout=60) as upstream:
            upstream.sendall(_rebuild(first, fields, (b"connection", b"expect", b"keep-alive")) + body)
            reply = _read_message(upstream, bytearray(), response=True, method=method)
        if reply is None or fault == "reset":
            _reset(client)
            return
        status_line, reply_fields, reply_body = reply
        head = _rebuild(status_line, reply_fields, (b"connection", b"keep-alive"))
        if fault == "truncate" and len(reply_body) > 1:
            client.sendall(head + reply_body[: len(reply_body) // 2])
            _reset(client)
            return
        client.sendall(head + reply_body)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"


class FaultProxy:
    """Forward ``upstream_url`` on a loopback port, injecting faults into ``rate`` of requests."""

    def __init__(self, upstream_url: str, *, rate: float, seed: int = 0, faults: Iterable[str] = FAULTS,
                 stall_s: float = 3.0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate}")
        self.faults = tuple(faults)
        unknown = set(self.faults) - set(FAULTS)
        if unknown or not self.faults:
            raise ValueError(f"faults must be a non-empty subset of {FAULTS}, got {self.faults}")
        netloc = upstream_url.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = netloc.rpartition(":")
        self.upstream = (host, int(port))
        self.rate = rate
        self.stall_s = stall_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _draw(self) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self._rng.random() >= self.rate:
                return None
            fault = self._rng.choice(self.faults)
            self.counts[fault] += 1
            return fault

    @property
    def injected(self) -> int:
        """Faults injected so far."""
        return sum(v for k, v in self.counts.items() if k != "requests")

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = rate

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "start the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
