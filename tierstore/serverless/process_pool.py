"""ProcessInvoker: worker processes that behave like Lambda containers.

A pool of long-lived processes. An invocation takes an idle process or, when every
process is busy, starts a new one: a *cold start* (process start, imports, optional
``cold_start`` delay, empty caches), after which the process stays *warm* and keeps its
loaded partitions for later invocations, as a Lambda execution environment does. A node
waiting for its children keeps its process busy, so a tree of ``N`` nodes holds ``N``
processes at once, like ``N`` concurrent Lambda invocations.

Workers invoke their sub-trees through a dispatcher in the parent process (a
``multiprocessing.connection`` listener on loopback with an auth key), which routes each
request to an idle process. Processes come from a ``forkserver`` that has already imported
the worker (a few ms per start rather than a fresh interpreter's import of numpy and faiss).

Injected overheads for benchmarks: ``invoke_overhead`` seconds per invocation (Lambda's
~15 ms warm invoke), ``cold_start`` seconds per new process (Lambda's init), and
``WorkerConfig.s3_get_delay`` per S3 read round. ``timeout``: an invocation running longer
is killed (its process is discarded) and reported as :class:`~tierstore.errors.WorkerError`.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import secrets
import threading
import time
from multiprocessing.connection import Client, Listener

from ..errors import ConfigError, WorkerError
from .invokers import check_payload

__all__ = ["ProcessInvoker"]

_OK, _ERR = b"0", b"1"


class _DispatchClient:
    """A worker process's invoker: requests go to the parent's dispatcher (pooled connections)."""

    def __init__(self, address, authkey: bytes) -> None:
        self.address, self.authkey = address, authkey
        self._idle: list = []
        self._lock = threading.Lock()

    def invoke(self, payload: bytes, affinity: int | None = None) -> bytes:
        check_payload(payload, "request")
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = Client(self.address, authkey=self.authkey)
        # One message (key line + payload): two small writes in a row would meet Nagle's
        # algorithm and the peer's delayed ACK, a 40 ms stall per call on loopback TCP.
        conn.send_bytes((b"-" if affinity is None else str(int(affinity)).encode()) + b"\n" + payload)
        answer = conn.recv_bytes()
        with self._lock:
            self._idle.append(conn)
        return _unwrap(answer)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _unwrap(answer: bytes) -> bytes:
    if answer[:1] == _OK:
        return answer[1:]
    info = json.loads(answer[1:])
    raise WorkerError(info["message"], cause_type=info["type"])


def _wrap_error(exc: BaseException) -> bytes:
    return _ERR + json.dumps({"type": getattr(exc, "cause_type", None) or type(exc).__name__,
                              "message": f"{type(exc).__name__}: {exc}"}).encode()


def _container_main(conn, config, address, authkey: bytes, cold_start: float) -> None:
    """A container: build the worker, then serve invocations until the pipe closes."""
    import faiss

    from .events import dumps, loads
    from .worker import Worker

    faiss.omp_set_num_threads(1)  # one vCPU-ish per container, and no OpenMP pool after fork
    if cold_start:
        time.sleep(cold_start)
    client = _DispatchClient(address, authkey)
    worker = Worker(config, child_invoker=client)
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            break
        try:
            answer = _OK + dumps(worker.handle(loads(payload, what="request")), what="worker response")
        except Exception as exc:  # a function error, as Lambda reports it
            answer = _wrap_error(exc)
        try:
            conn.send_bytes(answer)
        except (BrokenPipeError, OSError):
            break
    client.close()


class _Container:
    def __init__(self, process, conn) -> None:
        self.process, self.conn = process, conn
        self.invocations = 0
        self.held: set[int] = set()  # affinity keys it served: it holds those partitions


class ProcessInvoker:
    """Lambda-like worker processes on this machine (see the module docstring).

    :param config: a :class:`~.worker.WorkerConfig` for every worker.
    :param max_processes: at most this many at once (more concurrent invocations wait).
    :param cold_start: seconds a new process sleeps before its first invocation.
    :param invoke_overhead: seconds added to every invocation (by the dispatcher).
    :param timeout: seconds an invocation may run before its process is killed.
    """

    def __init__(self, config, *, max_processes: int = 512, cold_start: float = 0.0, invoke_overhead: float = 0.0,
                 timeout: float = 60.0) -> None:
        for name, value in (("cold_start", cold_start), ("invoke_overhead", invoke_overhead), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be seconds >= 0, got {value!r}")
        self.config = config
        self.max_processes = max_processes
        self.cold_start, self.invoke_overhead, self.timeout = cold_start, invoke_overhead, timeout
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["tierstore.serverless.worker", "tierstore.serverless.process_pool"])
        self._authkey = secrets.token_bytes(16)
        # A deep backlog: with the default of 1, a burst of sub-tree calls overflows it and the
        # kernel retries the dropped connects after 1, 3, 7 ... seconds.
        self._listener = Listener(("127.0.0.1", 0), backlog=4096, authkey=self._authkey)
        self._idle: list[_Container] = []
        self._all: list[_Container] = []
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max_processes)
        self._closed = False
        self.cold_starts = 0
        self.warm_invocations = 0
        self.timeouts = 0
        self._serving: list = []
        self._accept = threading.Thread(target=self._accept_loop, name="tierstore-dispatch", daemon=True)
        self._accept.start()

    # --------------------------------------------------------------- containers
    def _start(self) -> _Container:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_container_main, daemon=True,
                                    args=(child, self.config, self._listener.address, self._authkey, self.cold_start))
        process.start()
        child.close()
        return _Container(process, parent)

    def _acquire(self, affinity: int | None) -> tuple[_Container, bool]:
        self._slots.acquire()
        with self._lock:
            if self._closed:
                self._slots.release()
                raise WorkerError("the process invoker is closed")
            # The idle process that served this node before (it holds the node's partitions);
            # else one holding nothing; else, below the cap, a new one, as per-node functions
            # would start: taking a process that holds other partitions would make it load
            # these and the next caller of those reload them.
            chosen = None
            if affinity is not None:
                chosen = next((i for i, c in enumerate(self._idle) if affinity in c.held), None)
            if chosen is None:
                chosen = next((i for i, c in enumerate(self._idle) if not c.held), None)
            if chosen is None and self._idle and (affinity is None or len(self._all) >= self.max_processes):
                chosen = 0
            if chosen is not None:
                self.warm_invocations += 1
                return self._idle.pop(chosen), False
            self.cold_starts += 1
        container = self._start()
        with self._lock:
            self._all.append(container)
        return container, True

    def _release(self, container: _Container, healthy: bool) -> None:
        with self._lock:
            if healthy and not self._closed:
                self._idle.append(container)
            elif container in self._all:
                self._all.remove(container)
        if not healthy:
            container.process.kill()
            container.process.join(5)
            container.conn.close()
        self._slots.release()

    # ---------------------------------------------------------------- invoking
    def invoke(self, payload: bytes, affinity: int | None = None) -> bytes:
        """Run one invocation on an idle (warm) or new (cold) process.

        ``affinity``: prefer the idle process that last served this key (see :class:`Invoker`).
        """
        check_payload(payload, "request")
        if self.invoke_overhead:
            time.sleep(self.invoke_overhead)
        container, _ = self._acquire(affinity)
        try:
            container.conn.send_bytes(payload)
            if not container.conn.poll(self.timeout):
                with self._lock:
                    self.timeouts += 1
                raise TimeoutError(f"no answer within {self.timeout}s")
            answer = container.conn.recv_bytes()
        except TimeoutError as exc:
            self._release(container, healthy=False)
            raise WorkerError(f"the worker timed out after {self.timeout}s (its process was stopped)",
                              cause_type="Timeout") from exc
        except (EOFError, OSError) as exc:
            self._release(container, healthy=False)
            raise WorkerError(f"the worker process exited during the invocation: {exc!r}",
                              cause_type="Crash") from exc
        container.invocations += 1
        if affinity is not None:
            container.held.add(affinity)
        self._release(container, healthy=True)
        return _unwrap(answer)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except (OSError, EOFError):
                return  # closed
            except Exception:  # a client that failed authentication: ignore it
                continue
            if self._closed:
                conn.close()
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()

    def _serve(self, conn) -> None:
        with conn:
            while True:
                try:
                    key, _, payload = conn.recv_bytes().partition(b"\n")
                except (EOFError, OSError):
                    return
                try:
                    answer = _OK + self.invoke(payload, affinity=None if key == b"-" else int(key))
                except Exception as exc:
                    answer = _wrap_error(exc)
                try:
                    conn.send_bytes(answer)
                except OSError:
                    return

    # ------------------------------------------------------------------- state
    @property
    def processes(self) -> int:
        with self._lock:
            return len(self._all)

    def kill_idle(self) -> int:
        """Stop every idle process (the next invocations start cold). Returns how many."""
        with self._lock:
            idle, self._idle = self._idle, []
            for container in idle:
                self._all.remove(container)
        for container in idle:
            container.conn.close()
            container.process.join(5)
            if container.process.is_alive():
                container.process.kill()
                container.process.join(5)
        return len(idle)

    def close(self) -> None:
        """Stop every process and the dispatcher."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            containers, self._all, self._idle = list(self._all), [], []
        with contextlib.suppress(OSError):  # wake the accept loop (closing the listener does not interrupt accept())
            Client(self._listener.address, authkey=self._authkey).close()
        self._listener.close()
        for container in containers:
            container.conn.close()
        for container in containers:
            container.process.join(5)
            if container.process.is_alive():
                container.process.kill()
                container.process.join(5)
        self._accept.join(5)

    def __enter__(self) -> "ProcessInvoker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

