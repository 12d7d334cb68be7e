"""What a handler that emits one output costs, beside a no-op in the same run.

    .venv/bin/python bench/emit.py [MESSAGES]     # default 5,000

On the local broker and a Redis with AOF (fsync always), for the no-op handler, then
one output per message with ``max_in_flight`` 1 and 32: msg/s, the worker's CPU per
message (this process's CPU time over the messages), Redis's CPU and commands per
message, and each emitting variant's rate and Redis CPU as a ratio to the no-op's.
Every id must be handled exactly once (exit 1 otherwise), as in bench/run.py.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import publish, store_cpu_seconds, the_worker
from idempotent_worker.local import embedded
from idempotent_worker.local.demo import create_topics

VARIANTS = [("noop", 1), ("emits_one", 1), ("emits_one", 32)]


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with embedded.broker(workdir) as broker, embedded.redis(workdir, appendonly=True) as server:
            bootstrap = f"127.0.0.1:{broker.port}"
            url = f"redis://127.0.0.1:{server.port}/0"
            client = redis.Redis(port=server.port)
            baseline: tuple[float, float] | None = None
            for handler, lanes in VARIANTS:
                topic = f"bench-emit-{uuid.uuid4().hex[:8]}"
                publish(bootstrap, topic, count)
                create_topics(bootstrap, {f"{topic}.out": 6})
                commands = client.info("stats")["total_commands_processed"]
                store_cpu = store_cpu_seconds(server.port)
                cpu = time.process_time()
                rate = the_worker(
                    bootstrap, url, topic, count, handler, max_in_flight=lanes,
                    route={"output_topic": f"{topic}.out"},
                )  # fmt: skip
                worker_us = (time.process_time() - cpu) * 1e6 / count
                redis_us = (store_cpu_seconds(server.port) - store_cpu) * 1e6 / count
                per_message = (client.info("stats")["total_commands_processed"] - commands) / count
                line = (
                    f"{handler:9s} max_in_flight {lanes:<3d} {rate:8,.0f} msg/s  "
                    f"worker {worker_us:5.0f} us/msg  redis {redis_us:6.1f} us/msg  "
                    f"{per_message:5.2f} commands/msg"
                )
                if baseline is None:
                    baseline = (rate, redis_us)
                else:
                    line += (
                        f"  rate x{rate / baseline[0]:.2f} of no-op, "
                        f"redis x{redis_us / baseline[1]:.1f} of no-op"
                    )
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
