"""One small HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

STUCK_SECONDS = 30.0
"""Records waiting on owned partitions and no message finished, no handler running, for
this long: the replica is not ready (it holds partitions it makes no progress on)."""


class Health:
    """What the consumer loop tells the probes. Written by the loop, read by the server.

    Ready: the loop is alive, the dedup store answers, the replica is in its group (its
    group coordinator reached and its session live, as librdkafka's statistics report
    them every ``statistics.interval.ms``), and it makes progress on the partitions it
    holds. Alive (``/healthz``): the loop beats, and no partition it holds has been
    stuck for longer than ``stall_seconds`` either."""

    def __init__(self, stall_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_seconds = stall_seconds
        self._clock = clock
        self.last_beat = clock()
        self.joined = False
        self.store_ok = False
        self.store_error = ""
        """The last dedup store failure, shown by ``/readyz`` while the store is not ok."""
        self.group_error = ""
        """Why the group is not usable now (coordinator unreachable, session lost), or ""."""
        self.records_waiting = 0
        """Records on the owned partitions not consumed yet (the lag statistics report)."""
        self.last_progress = clock()
        self.working: Callable[[], int] = lambda: 0
        """How many handlers run now (a long handler is not a stuck partition)."""
        self.stopped = False

    def beat(self) -> None:
        self.last_beat = self._clock()

    def progressed(self) -> None:
        """A message finished, or partitions were assigned afresh."""
        self.last_progress = self._clock()

    def stuck_for(self) -> float:
        """Seconds the owned partitions have had records waiting with nothing done (0 if
        they have not)."""
        if self.records_waiting <= 0 or self.working() > 0 or not self.store_ok:
            return 0.0  # (a store outage is waited out, not restarted: see guard.py)
        return max(0.0, self._clock() - self.last_progress)

    @property
    def alive(self) -> bool:
        """The loop is running and has not been stuck for longer than ``stall_seconds``."""
        return (
            not self.stopped
            and self._clock() - self.last_beat < self.stall_seconds
            and self.stuck_for() < self.stall_seconds
        )

    @property
    def ready(self) -> bool:
        return self.not_ready_because() == ""

    def not_ready_because(self) -> str:
        """Why the replica is not ready ("" when it is), for ``/readyz``'s body."""
        if not self.alive:
            if self.stuck_for() >= self.stall_seconds:
                return f"no progress for {self.stuck_for():.0f} s with records waiting"
            return "the consumer loop is stopped or stalled"
        if not self.store_ok:
            return f"dedup store: {self.store_error or 'not reached yet'}"
        if self.group_error:
            return f"consumer group: {self.group_error}"
        if not self.joined:
            return "not in the consumer group yet"
        if (stuck := self.stuck_for()) >= STUCK_SECONDS:
            return f"no progress for {stuck:.0f} s with {self.records_waiting} records waiting"
        return ""


class HttpServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        handler = _handler_class(registry, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_class(registry: CollectorRegistry, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                # OpenMetrics when the scraper asks for it: the handler-duration
                # histogram's exemplars (trace ids) exist only there.
                encode, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encode(registry), content_type)
            elif path == "/healthz":
                self._probe(health.alive)
            elif path == "/readyz":
                reason = health.not_ready_because()
                if reason:
                    self._send(503, f"not ready: {reason}\n".encode(), "text/plain")
                else:
                    self._probe(True)
            else:
                self._send(404, b"not found\n", "text/plain")

        def _probe(self, ok: bool) -> None:
            self._send(200 if ok else 503, b"ok\n" if ok else b"not ok\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None  # probes every few seconds would flood the structured log

    return Handler
