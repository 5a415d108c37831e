"""A loopback HTTP server that speaks the AWS Lambda ``Invoke`` API and runs a handler.

Real Lambda is out of reach of the tests, so :class:`~tierstore.serverless.LambdaInvoker`
(real boto3, real HTTP) is pointed at this server instead. It implements what the
invoker relies on:

* ``POST /2015-03-31/functions/{name}/invocations`` with ``X-Amz-Invocation-Type:
  RequestResponse``: the handler's return value as JSON, status 200;
* a handler exception: status 200 with ``X-Amz-Function-Error: Unhandled`` and
  ``{"errorMessage", "errorType", "stackTrace"}``, as Lambda answers;
* a request over 6 MB: 413 ``RequestTooLargeException``; a response over 6 MB: a
  function error of type ``Function.ResponseSizeTooLarge``;
* an unknown function: 404 ``ResourceNotFoundException``;
* throttling on demand (:meth:`LambdaServer.throttle_next`): 429
  ``TooManyRequestsException``; slow answers on demand (:meth:`LambdaServer.delay_next`).

Every request is recorded (``requests``: path, headers, body size) so tests can check
how the invoker built it.
"""

from __future__ import annotations

import json
import re
import threading
import time
import traceback
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any, Callable

__all__ = ["LambdaServer"]

MAX_PAYLOAD = 6 * 1024 * 1024
_PATH = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations$")


class LambdaServer:
    """Serve ``handler(event, context)`` as Lambda function ``function_name`` on 127.0.0.1.

    >>> with LambdaServer(my_handler) as server:
    ...     invoker = LambdaInvoker("tierstore-search", endpoint_url=server.endpoint_url)
    """

    def __init__(self, handler: Callable[[Any, Any], Any], *, function_name: str = "tierstore-search",
                 max_payload: int = MAX_PAYLOAD) -> None:
        self.handler = handler
        self.function_name = function_name
        self.max_payload = max_payload
        self.requests: list[dict] = []
        self.invocations = 0
        self._lock = threading.Lock()
        self._throttle = 0
        self._delays: list[float] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint_url = ""

    # ---------------------------------------------------------------- control
    def throttle_next(self, count: int) -> None:
        """Answer the next ``count`` invocations with 429 TooManyRequestsException."""
        with self._lock:
            self._throttle = count

    def delay_next(self, *seconds: float) -> None:
        """Sleep this long before running each of the next invocations (one value each)."""
        with self._lock:
            self._delays.extend(seconds)

    def _take(self) -> tuple[bool, float]:
        with self._lock:
            if self._throttle > 0:
                self._throttle -= 1
                return True, 0.0
            return False, self._delays.pop(0) if self._delays else 0.0

    # -------------------------------------------------------------- lifecycle
    def start(self) -> "LambdaServer":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                return

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"Type": "User", "message": message, "__type": code}).encode()
                self._send(status, body, {"x-amzn-ErrorType": code})

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                match = _PATH.match(urllib.parse.urlsplit(self.path).path)
                with outer._lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers.items()), "bytes": length})
                if match is None:
                    return self._error(404, "UnknownOperationException", f"unknown path {self.path}")
                name = urllib.parse.unquote(match.group(1))
                if name.split(":function:")[-1].split(":")[0] != outer.function_name:
                    return self._error(404, "ResourceNotFoundException", f"Function not found: {name}")
                kind = self.headers.get("X-Amz-Invocation-Type", "RequestResponse")
                if kind != "RequestResponse":
                    return self._error(400, "InvalidParameterValueException",
                                       f"this server runs only RequestResponse invocations, got {kind}")
                if length > outer.max_payload:
                    return self._error(413, "RequestTooLargeException",
                                       f"Request must be smaller than {outer.max_payload} bytes for the "
                                       "InvokeFunction operation")
                throttled, delay = outer._take()
                if throttled:
                    return self._error(429, "TooManyRequestsException", "Rate Exceeded.")
                with outer._lock:
                    outer.invocations += 1
                if delay:
                    time.sleep(delay)
                context = SimpleNamespace(function_name=outer.function_name, aws_request_id=str(uuid.uuid4()),
                                          get_remaining_time_in_millis=lambda: 30_000)
                try:
                    result = outer.handler(json.loads(body) if body else None, context)
                    answer = json.dumps(result).encode()
                except Exception as exc:  # reported as Lambda reports an unhandled error
                    error = {"errorMessage": str(exc), "errorType": type(exc).__name__,
                             "stackTrace": traceback.format_tb(exc.__traceback__)[-3:]}
                    return self._send(200, json.dumps(error).encode(), {"X-Amz-Function-Error": "Unhandled"})
                if len(answer) > outer.max_payload:
                    error = {"errorMessage": "Response payload size exceeded maximum allowed payload size "
                                             f"({outer.max_payload} bytes).",
                             "errorType": "Function.ResponseSizeTooLarge"}
                    return self._send(200, json.dumps(error).encode(), {"X-Amz-Function-Error": "Unhandled"})
                self._send(200, answer, {"X-Amz-Executed-Version": "$LATEST"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="lambda-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "LambdaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
