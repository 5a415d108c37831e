"""A real S3 HTTP endpoint on loopback: moto's server mode in a child process.

Used by the test suite and the benchmarks so that S3 code paths run real HTTP through
real boto3, not in-process patching. Needs ``moto[server]`` (the ``test`` extra).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

__all__ = ["MotoServer"]

_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """Start ``moto.server`` on 127.0.0.1 in a subprocess; stop it on exit.

    >>> with MotoServer() as server:
    ...     client = server.client()            # a boto3 S3 client for the endpoint
    ...     client.create_bucket(Bucket="b")
    """

    def __init__(self, port: int | None = None, *, startup_timeout: float = 30.0) -> None:
        self.port = port or _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None

    @staticmethod
    def credentials() -> dict[str, str]:
        """The dummy credentials moto accepts (also exported into ``os.environ`` on start)."""
        return dict(_ENV)

    def start(self) -> "MotoServer":
        for name, value in _ENV.items():
            os.environ.setdefault(name, value)
        env = {**os.environ, **_ENV}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self._proc.returncode}; is moto[server] installed?")
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} within {self._startup_timeout}s")

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        req = urllib.request.Request(self.endpoint_url + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def client(self, **kwargs):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing", **kwargs)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
