"""What a handler that emits one output costs, beside a no-op in the same run.

    .venv/bin/python bench/emit.py [MESSAGES]     # default 20,000

On the local broker and a Redis with AOF (fsync always), for a raw consume loop (the
floor of any Python consumer: consume, commit per batch), the no-op handler, then
one output per message with ``max_in_flight`` 1 and 32, and on a batch route (a
partition's messages in one call): msg/s, the worker's CPU per
message (this process's CPU time over the messages), Redis's CPU and commands per
message, and each emitting variant's rate and Redis CPU as a ratio to the no-op's,
with its target. Then a steady rate (``LATENCY_RATE`` msg/s for ``LATENCY_SECONDS``,
emitting one output, ``max_in_flight`` 32): produce-to-output latency, from the moment
an input is handed to its producer to the moment its output is read by a consumer
(``fetch.wait.max.ms`` 10 on both consumers), p50 and p99, beside the broker's own
(an input read back at the same rate: the worker's path is two such hops). Every id
must be handled exactly once (exit 1 otherwise), as in bench/run.py.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis
from confluent_kafka import Consumer, Producer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import PARTITIONS, hand_written, publish, store_cpu_seconds, the_worker
from idempotent_worker.local import embedded
from idempotent_worker.local.demo import FAST_CONSUMER, create_topics

VARIANTS = [("noop", 1), ("emits_one", 1), ("emits_one", 32), ("emits_one_batch", 1)]
"""Handler and max_in_flight; ``*_batch`` handlers run on a batch route."""
RATE_TARGETS = {("emits_one", 1): 0.5, ("emits_one", 32): 0.8}
"""The emitting variants' rate as a share of the no-op's, at least (issue #26)."""
REDIS_TARGET = 1.5
"""The dedup Redis's CPU per emitting message, as a multiple of the no-op's, at most."""
RAW_TARGET = 6
"""The no-op worker's CPU per message, as a multiple of the raw consume loop's, at most."""
LATENCY_RATE = 2000
LATENCY_SECONDS = 5
P99_TARGET_MS = 50


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with embedded.broker(workdir) as broker, embedded.redis(workdir, appendonly=True) as server:
            bootstrap = f"127.0.0.1:{broker.port}"
            url = f"redis://127.0.0.1:{server.port}/0"
            client = redis.Redis(port=server.port)
            topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
            publish(bootstrap, topic, count)
            cpu = time.process_time()
            rate = hand_written(bootstrap, topic, count, lambda ids: None)
            raw_us = (time.process_time() - cpu) * 1e6 / count
            print(f"raw consume + commit per batch {rate:8,.0f} msg/s  {raw_us:5.1f} us/msg")
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
                    route={"output_topic": f"{topic}.out", "batch": handler.endswith("_batch")},
                )  # fmt: skip
                worker_us = (time.process_time() - cpu) * 1e6 / count
                redis_us = (store_cpu_seconds(server.port) - store_cpu) * 1e6 / count
                per_message = (client.info("stats")["total_commands_processed"] - commands) / count
                line = (
                    f"{handler:15s} max_in_flight {lanes:<3d} {rate:8,.0f} msg/s  "
                    f"worker {worker_us:5.0f} us/msg  redis {redis_us:6.1f} us/msg  "
                    f"{per_message:5.2f} commands/msg"
                )
                if baseline is None:
                    baseline = (rate, redis_us)
                    share = worker_us / raw_us
                    line += (
                        f"  worker CPU x{share:.1f} of the raw loop's (target at most "
                        f"x{RAW_TARGET}: {verdict(share <= RAW_TARGET)})"
                    )
                else:
                    share, redis_share = rate / baseline[0], redis_us / baseline[1]
                    target = RATE_TARGETS.get((handler, lanes))
                    line += f"  rate x{share:.2f} of no-op " + (
                        "(no target)"
                        if target is None
                        else f"(target x{target}: {verdict(share >= target)})"
                    )
                    line += (
                        f", redis x{redis_share:.1f} of no-op "
                        f"(target at most x{REDIS_TARGET}: {verdict(redis_share <= REDIS_TARGET)})"
                    )
                print(line, flush=True)
            floor50, floor99 = latency(bootstrap, None)
            p50, p99 = latency(bootstrap, url)
            print(
                f"emits_one max_in_flight 32 at a steady {LATENCY_RATE:,} msg/s: produce to "
                f"output p50 {p50:.1f} ms, p99 {p99:.1f} ms (target p99 under "
                f"{P99_TARGET_MS} ms: {verdict(p99 < P99_TARGET_MS)}); the broker alone, "
                f"an input read back: p50 {floor50:.1f} ms, p99 {floor99:.1f} ms "
                f"(the worker's path is two of those hops)",
                flush=True,
            )
    return 0


def latency(bootstrap: str, url: str | None) -> tuple[float, float]:
    """Produce-to-output latency at a steady rate, in milliseconds: p50 and p99; with
    ``url`` None, the broker's own (an input read back, no worker)."""
    topic = f"bench-latency-{uuid.uuid4().hex[:8]}"
    read = topic if url is None else f"{topic}.out"
    count = LATENCY_RATE * LATENCY_SECONDS
    create_topics(bootstrap, {topic: PARTITIONS, f"{topic}.out": PARTITIONS})
    sent: dict[str, float] = {}
    seen: list[float] = []
    warm = threading.Event()
    warm_id = f"l-{count:09d}"  # the bench's ids are numbered (bench/handlers.py)

    def produce() -> None:
        # One message first, timed from once its output is read: the worker has joined
        # its group and has its partitions by then.
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
        producer.produce(topic, value=warm_id, key=warm_id, headers=[("message-id", warm_id)])
        producer.flush(30)
        warm.wait(60)
        started = time.monotonic()
        for n in range(count):
            time.sleep(max(0.0, started + n / LATENCY_RATE - time.monotonic()))
            id = f"l-{n:09d}"
            sent[id] = time.monotonic()
            producer.produce(topic, value=id, key=id, headers=[("message-id", id)])
            producer.poll(0)
        producer.flush(30)

    def read_outputs() -> None:
        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, **FAST_CONSUMER}
        )
        consumer.assign([TopicPartition(read, p, 0) for p in range(PARTITIONS)])
        deadline = time.monotonic() + LATENCY_SECONDS + 60
        while len(seen) < count and time.monotonic() < deadline:
            for record in consumer.consume(500, 0.1):
                if record.error() is None:
                    header = dict(record.headers() or [])["message-id"]
                    assert isinstance(header, bytes)
                    id = header.decode().rsplit(":", 1)[0]
                    if id == warm_id:
                        warm.set()
                    else:
                        seen.append(time.monotonic() - sent[id])
        consumer.close()

    reader = threading.Thread(target=read_outputs)
    reader.start()
    producer = threading.Thread(target=produce)
    producer.start()
    if url is not None:
        the_worker(
            bootstrap, url, topic, count + 1, "emits_one", max_in_flight=32,
            route={"output_topic": read},
        )  # fmt: skip
    producer.join()
    reader.join()
    if len(seen) < count:
        raise RuntimeError(f"{count - len(seen)} outputs not read")
    cuts = statistics.quantiles(seen, n=100)
    return cuts[49] * 1000, cuts[98] * 1000


if __name__ == "__main__":
    sys.exit(main())
