"""What tracing costs per message, beside tracing off in the same run.

    .venv/bin/python bench/tracing.py [MESSAGES]     # default 20,000

On the local broker and a Redis with AOF (fsync always): the no-op handler with
tracing off, then on with ``sampler_ratio`` 1.0 (every message traced) and 0.01 (the
producer's records carry no trace context, so the ratio decides), exporting over
OTLP/HTTP to an endpoint in this process that takes and drops the exports. Prints each
one's msg/s and the worker's CPU per message (this process's CPU time over the
messages, the endpoint's small share included), and each traced variant's as a ratio
to tracing off. Every id must be handled exactly once (exit 1 otherwise), as in
bench/run.py.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import publish, the_worker
from idempotent_worker.local import embedded

VARIANTS = [("off", None), ("sampler 1.0", 1.0), ("sampler 0.01", 0.01)]


class Sink(BaseHTTPRequestHandler):
    """Takes an export and answers it as a collector would, keeping nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: http.server would log every export to stderr."""


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_port}/v1/traces"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with embedded.broker(workdir) as broker, embedded.redis(workdir, appendonly=True) as server:
            bootstrap = f"127.0.0.1:{broker.port}"
            url = f"redis://127.0.0.1:{server.port}/0"
            baseline: tuple[float, float] | None = None
            for name, ratio in VARIANTS:
                topic = f"bench-trace-{uuid.uuid4().hex[:8]}"
                publish(bootstrap, topic, count)
                tracing = (
                    {"enabled": True, "endpoint": endpoint, "sampler_ratio": ratio}
                    if ratio is not None
                    else {}
                )
                cpu = time.process_time()
                rate = the_worker(bootstrap, url, topic, count, "noop", tracing=tracing)
                worker_us = (time.process_time() - cpu) * 1e6 / count
                line = f"tracing {name:13s} {rate:8,.0f} msg/s  worker {worker_us:5.1f} us/msg"
                if baseline is None:
                    baseline = (rate, worker_us)
                else:
                    line += (
                        f"  rate x{rate / baseline[0]:.2f} of tracing off, "
                        f"CPU per message x{worker_us / baseline[1]:.2f}"
                    )
                print(line, flush=True)
    sink.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
