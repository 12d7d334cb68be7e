"""Throughput of the worker against hand-written consumers, in one run on one broker and
one Redis, so that the ratios hold on a shared, noisy machine.

    python bench/run.py            # 100,000 messages; RSS over 1,000,000
    python bench/run.py --quick    # 20,000 messages; RSS over 100,000 (what CI runs)
    python bench/run.py --profile  # only d, under pyinstrument: where its time goes

Every variant reads the same topic of ``--messages`` records of 200 B with unique ids
(6 partitions), under its own consumer group and key prefix, and is timed from its
first record to its last:

    a  raw confluent-kafka consume + one synchronous commit per batch (no dedup)
    b  the same with one Redis SET NX round trip per message (what people write by hand)
    c  the same with one Lua script claiming a whole batch (the best case)
    s  the same with the worker's own two scripts per batch, claim and complete (what
       the dedup protocol costs by itself: s/c is its share, d/s the framework's)
    d  the worker with a no-op handler
    e  the worker with a handler that sleeps 10 ms, at max_in_flight 1 and 64

Then a worker subprocess handles ``--rss-messages`` records and reports its peak RSS and
its growth between the first and the last tenth of the run.

Last, the store's scale (``--store-only`` runs just this): variant d again on a
standalone ``redis-server`` and on a Redis Cluster of 3 primaries with a replica each,
both with AOF fsynced at every write (the README's recommended settings), and
``redis.min_replicas`` 1 against a primary with one replica. For each, the store's CPU
per message (INFO's used_cpu_user + used_cpu_sys, summed over the primaries), its
split over the primaries, and the fleet's ceiling that implies: one core-second
divided by the CPU per message. The benchmark fails (exit
1) if any variant handled an id other than exactly once; the targets are reported, not
enforced, because absolute speed depends on the machine.

Then the database inbox (``--inbox-only`` runs just this): the worker with a handler
that inserts one row per message into PostgreSQL in a transaction of its own (``p``),
and the same handler with that transaction in ``ctx.inbox(conn)`` (``pi``), on
``--db-messages`` records; ``pi/p`` is what the inbox costs.

Then sequence mode against id mode (``--sequence-only`` runs just this; see
bench/sequence.py): msg/s and Redis memory per id and per entity, over ``--entities``
entities of 5 versions each.

Last, the store's cost per message (``--cost-only`` runs just this; see
bench/store_cost.py): Redis CPU per message with AOF fsynced at every write and where
it goes, and Redis memory per completed id; ``--cost-only --against REV`` compares them
with git revision REV's, in one run.

Kafka, Redis and PostgreSQL: ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` /
``POSTGRES_URL`` if set, else the local Tansu broker, ``redis-server`` and PostgreSQL
server that the tests and the demo use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka import Message as KafkaMessage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import handlers  # noqa: E402
from bench.sequence import sequence_cost  # noqa: E402
from bench.store_cost import compare_with, store_cost  # noqa: E402
from idempotent_worker.config.registry import resolve_routes  # noqa: E402
from idempotent_worker.config.settings import Settings  # noqa: E402
from idempotent_worker.dedup.base import FIRST_CLAIM, Completion  # noqa: E402
from idempotent_worker.dedup.redis import RedisDedupStore  # noqa: E402
from idempotent_worker.local import embedded, topologies  # noqa: E402
from idempotent_worker.local import postgres as embedded_postgres  # noqa: E402
from idempotent_worker.local.demo import FAST_CONSUMER, create_topics  # noqa: E402
from idempotent_worker.ops.cli import run_worker  # noqa: E402

PARTITIONS = 6
BATCH = 1000
TARGETS = {"d/c": 0.75, "d/b": 5.0, "e64/e1": 40.0, "dc/d": 0.8}
CLUSTER_CPU_LIMIT = 1.3  # the cluster's summed CPU per message, at most this x standalone's
CLUSTER_WORKER_LIMIT = 1.2  # the worker's own CPU per message on the cluster, x on one Redis
CLUSTER_SHARE_LIMIT = 0.4  # no primary above this share of the cluster's CPU
RSS_GROWTH_LIMIT_MB = 50.0

# One Lua call claims a whole batch: SET NX per key, 1 if it was free.
CLAIM_BATCH = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('SET', key, '1', 'NX', 'EX', ARGV[1]) and 1 or 0
end
return out
"""


@contextlib.contextmanager
def services(workdir: Path) -> Iterator[tuple[str, str]]:
    bootstrap, url = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("REDIS_URL")
    with contextlib.ExitStack() as stack:
        if not bootstrap:
            broker = stack.enter_context(embedded.broker(workdir))
            bootstrap = f"127.0.0.1:{broker.port}"
        if not url:
            server = stack.enter_context(embedded.redis(workdir))
            url = f"redis://127.0.0.1:{server.port}/0"
        yield bootstrap, url


def publish(bootstrap: str, topic: str, count: int) -> None:
    create_topics(bootstrap, {topic: PARTITIONS})
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000}
    )
    padding = "x" * 170
    for n in range(count):
        id = f"b-{n:09d}"
        value = f'{{"id":"{id}","p":"{padding}"}}'[:200]
        while True:
            try:
                producer.produce(
                    topic, value=value, key=id, partition=n % PARTITIONS,
                    headers=[("message-id", id)],
                )  # fmt: skip
                break
            except BufferError:
                producer.poll(0.1)
        if n % 10000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("publishing did not finish")


# -- hand-written baselines -------------------------------------------------------------


def hand_written(
    bootstrap: str, topic: str, count: int, per_batch: Callable[[list[str]], None]
) -> float:
    """Consume ``count`` records, call ``per_batch`` with their ids, commit per batch."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **FAST_CONSUMER,
        }
    )
    consumer.subscribe([topic])
    seen = handlers.Tally(count)
    started = 0.0
    try:
        while seen.total < count:
            records = consumer.consume(BATCH, 1.0)
            if not records:
                continue
            started = started or time.perf_counter()
            ids = [message_id(record) for record in records if record.error() is None]
            per_batch(ids)
            seen.record(*ids)
            consumer.commit(asynchronous=False)
        elapsed = time.perf_counter() - started
    finally:
        consumer.close()
    seen.expect_once("hand-written loop")
    return count / elapsed


def message_id(record: KafkaMessage) -> str:
    for name, value in record.headers() or ():
        if name == "message-id":
            return bytes(value).decode()
    raise ValueError("no message-id")


def set_nx_per_message(client: redis.Redis) -> Callable[[list[str]], None]:
    prefix = f"bench-b-{uuid.uuid4().hex}:"

    def per_batch(ids: list[str]) -> None:
        for id in ids:
            if not client.set(prefix + id, "1", nx=True, ex=86400):
                raise AssertionError(f"{id} claimed twice")

    return per_batch


def lua_per_batch(client: redis.Redis) -> Callable[[list[str]], None]:
    prefix = f"bench-c-{uuid.uuid4().hex}:"
    claim = client.register_script(CLAIM_BATCH)

    def per_batch(ids: list[str]) -> None:
        if not all(claim(keys=[prefix + id for id in ids], args=[86400])):
            raise AssertionError("an id was claimed twice")

    return per_batch


def worker_scripts(url: str) -> Callable[[list[str]], None]:
    """The worker's own claim and complete scripts, one call each per batch, and nothing
    else of the worker: what the dedup protocol costs without the framework around it."""
    store = RedisDedupStore.from_url(url, f"bench-s-{uuid.uuid4().hex}")

    def per_batch(ids: list[str]) -> None:
        token = uuid.uuid4().hex
        if any(claim != FIRST_CLAIM for claim in store.claim(ids, token, 30)):
            raise AssertionError("an id was claimed twice")
        completions = [Completion(id, token, "bench/0/0", "0" * 16) for id in ids]
        if not all(store.complete(completions, 86400)):
            raise AssertionError("a completion was refused")

    return per_batch


# -- the worker -------------------------------------------------------------------------


def worker_settings(
    bootstrap: str,
    url: str,
    topic: str,
    handler: str,
    max_in_flight: int,
    redis_options: dict[str, Any] | None = None,
    route: dict[str, Any] | None = None,
    dedup: dict[str, Any] | None = None,
    tracing: dict[str, Any] | None = None,
) -> Settings:
    return Settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": f"bench-{uuid.uuid4().hex}",
            "consumer": FAST_CONSUMER,
        },
        redis={"url": url, **(redis_options or {})},
        routes=[
            {
                "topic": topic,
                "handler": f"bench.handlers:{handler}",
                "max_in_flight": max_in_flight,
                **(route or {}),
            }
        ],
        dedup=dedup or {},
        tracing=tracing or {},
        http={"port": 0},
        log={"level": "WARNING"},  # what would be logged at INFO is not per message anyway
    )


def the_worker(
    bootstrap: str,
    url: str,
    topic: str,
    count: int,
    handler: str,
    max_in_flight: int = 1,
    redis_options: dict[str, Any] | None = None,
    route: dict[str, Any] | None = None,
    dedup: dict[str, Any] | None = None,
    tracing: dict[str, Any] | None = None,
) -> float:
    settings = worker_settings(
        bootstrap, url, topic, handler, max_in_flight, redis_options, route, dedup, tracing
    )
    handlers.reset(count)
    code = run_worker(settings, resolve_routes(settings), max_messages=count)
    if code != 0:
        raise RuntimeError(f"the worker exited {code}")
    tally = handlers.tally
    tally.expect_once(f"worker ({handler}, max_in_flight {max_in_flight})")
    return count / (tally.last - tally.first)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def rss_child(bootstrap: str, url: str, topic: str, count: int) -> None:
    """In a fresh process: handle ``count`` records with the no-op handler, sampling RSS."""
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            samples.append((handlers.tally.total, rss_kib()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rate = the_worker(bootstrap, url, topic, count, "noop")
    done.set()
    sampler.join()
    tenth = count // 10
    first = [rss for n, rss in samples if 0 < n <= tenth]
    last = [rss for n, rss in samples if n >= count - tenth]
    result = {
        "rate": rate,
        "peak_mb": max(rss for _, rss in samples) / 1024,
        "first_tenth_mb": max(first or [0]) / 1024,
        "last_tenth_mb": max(last or [0]) / 1024,
    }
    print(json.dumps(result))


def measure_rss(bootstrap: str, url: str, count: int) -> dict[str, float]:
    topic = f"bench-rss-{uuid.uuid4().hex[:8]}"
    publish(bootstrap, topic, count)
    args = ["--rss-child", "--bootstrap", bootstrap, "--redis", url, "--topic", topic]
    output = subprocess.run(
        [sys.executable, __file__, *args, "--messages", str(count)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def profile_worker(bootstrap: str, url: str, topic: str, count: int) -> None:
    """Variant d under pyinstrument (the loop's thread, which runs a no-op handler)."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0002)
    with profiler:
        rate = the_worker(bootstrap, url, topic, count, "noop")
    print(profiler.output_text(color=False, short_mode=False))
    print(f"d under the profiler: {rate:,.0f} msg/s")


# -- the store's scale -------------------------------------------------------------------


def store_cpu_seconds(port: int) -> float:
    with redis.Redis(port=port) as client:
        info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def worker_on(
    bootstrap: str, topic: str, count: int, url: str, ports: list[int], **redis_options: Any
) -> tuple[float, list[float], float]:
    """Variant d on the store at ``url``: msg/s, the CPU per message (µs) of each server
    in ``ports`` (the primaries), and the worker's own (this process's)."""
    before = [store_cpu_seconds(port) for port in ports]
    cpu = time.process_time()
    rate = the_worker(bootstrap, url, topic, count, "noop", redis_options=redis_options)
    worker_us = (time.process_time() - cpu) * 1e6 / count
    after = [store_cpu_seconds(port) for port in ports]
    return rate, [(b - a) * 1e6 / count for a, b in zip(before, after, strict=True)], worker_us


def store_scale(bootstrap: str, workdir: Path, count: int) -> None:
    topic = f"bench-store-{uuid.uuid4().hex[:8]}"
    publish(bootstrap, topic, count)
    with (
        embedded.redis(workdir, appendonly=True) as standalone,
        embedded.redis(workdir, appendonly=True) as primary,
        embedded.redis(workdir, appendonly=True, replica_of=primary.port),
        topologies.RedisCluster(workdir / "cluster") as cluster,
    ):
        wait_for_replica(primary.port)
        one = f"redis://127.0.0.1:{standalone.port}/0"
        replicated = f"redis://127.0.0.1:{primary.port}/0"
        primaries = [node.port for node in cluster.primaries()]
        runs = [
            ("d", "one Redis", one, [standalone.port], {}),
            ("dc", "Redis Cluster, 3 primaries", cluster.url, primaries, {"cluster": True}),
            ("dr0", "primary + replica, min_replicas 0", replicated, [primary.port], {}),
            ("dr1", "primary + replica, min_replicas 1", replicated, [primary.port],
             {"min_replicas": 1}),
        ]  # fmt: skip
        results: dict[str, tuple[float, list[float], float]] = {}
        print(f"\nthe store's scale: variant d over {count:,} messages, AOF fsync always")
        for name, what, url, ports, options in runs:
            result = results[name] = worker_on(bootstrap, topic, count, url, ports, **options)
            rate, cpu, worker_us = result
            split = "/".join(f"{part / sum(cpu):.0%}" for part in cpu)
            # The fleet's ceiling: when the busiest server spends a whole core.
            print(
                f"{name:>4}  {what:<36} {rate:>8,.0f} msg/s  {sum(cpu):5.1f} µs CPU/msg "
                f"(split {split}), fleet ceiling {1e6 / max(cpu):,.0f} msg/s, "
                f"worker {worker_us:4.1f} µs/msg"
            )
    (d_rate, d_cpu, d_worker), (dc_rate, dc_cpu, dc_worker) = results["d"], results["dc"]
    cpu_ratio = sum(dc_cpu) / sum(d_cpu)
    share = max(dc_cpu) / sum(dc_cpu)
    print(
        f"\n  cluster CPU/msg = {cpu_ratio:.2f} x one Redis's  target <= {CLUSTER_CPU_LIMIT:g}: "
        + ("met" if cpu_ratio <= CLUSTER_CPU_LIMIT else "MISSED")
    )
    worker_ratio = dc_worker / d_worker
    print(
        f"  worker CPU/msg on the cluster = {worker_ratio:.2f} x on one Redis  target <= "
        f"{CLUSTER_WORKER_LIMIT:g}: "
        + ("met" if worker_ratio <= CLUSTER_WORKER_LIMIT else "MISSED")
    )
    print(
        f"  busiest primary's share {share:.0%}  target <= {CLUSTER_SHARE_LIMIT:.0%}: "
        + ("met" if share <= CLUSTER_SHARE_LIMIT else "MISSED")
    )
    print(
        f"  dc/d = {dc_rate / d_rate:.2f}  target >= {TARGETS['dc/d']:g}: "
        + ("met" if dc_rate / d_rate >= TARGETS["dc/d"] else "MISSED")
    )
    print(f"  dr1/dr0 = {results['dr1'][0] / results['dr0'][0]:.2f} (the cost of min_replicas 1)")


# -- the database inbox ------------------------------------------------------------------


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    if url := os.environ.get("POSTGRES_URL"):
        yield url
    else:
        with embedded_postgres.Postgres() as server:
            yield server.url


def inbox_cost(bootstrap: str, url: str, count: int) -> None:
    import psycopg

    topic = f"bench-db-{uuid.uuid4().hex[:8]}"
    publish(bootstrap, topic, count)
    print(f"\nthe database inbox: one row per message, one transaction each, {count:,} messages")
    rates = {}
    with postgres() as database:
        for name, what, handler in [
            ("p", "worker, row in its own transaction", "db_row"),
            ("pi", "worker, row in ctx.inbox(conn)", "db_row_inbox"),
        ]:
            handlers.Database.url = database
            handlers.Database.table = f"bench_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(database) as conn:
                conn.execute(
                    f'CREATE TABLE "{handlers.Database.table}" (message_id text, value bytea)'
                )
            rates[name] = the_worker(bootstrap, url, topic, count, handler)
            print(f"{name:>4}  {what:<42} {rates[name]:>10,.0f} msg/s", flush=True)
        connection = getattr(handlers.Database.local, "connection", None)
        if connection is not None:
            connection.close()
            handlers.Database.local.connection = None
    print(f"  pi/p = {rates['pi'] / rates['p']:.2f} (the inbox's cost per message)")


def wait_for_replica(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with redis.Redis(port=port) as client:
        while client.info("replication").get("connected_slaves", 0) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not connect")
            time.sleep(0.1)


# -- the run ----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short run CI does")
    parser.add_argument("--messages", type=int)
    parser.add_argument("--slow-messages", type=int, help="for e at max_in_flight 64")
    parser.add_argument("--rss-messages", type=int)
    parser.add_argument("--profile", action="store_true", help="profile d, print the tree")
    parser.add_argument(
        "--store-only", action="store_true", help="only the store's scale: one Redis vs cluster"
    )
    parser.add_argument("--db-messages", type=int, help="for the database inbox")
    parser.add_argument(
        "--inbox-only", action="store_true", help="only the database inbox's cost per message"
    )
    parser.add_argument(
        "--sequence-only", action="store_true", help="only sequence mode against id mode"
    )
    parser.add_argument("--entities", type=int, help="for sequence mode (5 versions each)")
    parser.add_argument(
        "--cost-only", action="store_true", help="only the store's CPU and memory per message"
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="with --cost-only: this tree's figures against git revision REV's, alternately",
    )
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.bootstrap, args.redis, args.topic, args.messages)
        return 0
    messages = args.messages or (20_000 if args.quick else 100_000)
    slow = args.slow_messages or (2_000 if args.quick else 6_400)
    rss_messages = args.rss_messages or (100_000 if args.quick else 1_000_000)
    db_messages = args.db_messages or (2_000 if args.quick else 10_000)
    entities = args.entities or (4_000 if args.quick else 20_000)
    if args.against:
        compare_with(args.against, messages)
        return 0

    with tempfile.TemporaryDirectory() as workdir, services(Path(workdir)) as (bootstrap, url):
        client = redis.Redis.from_url(url)
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        publish(bootstrap, topic, messages)
        if args.profile:
            profile_worker(bootstrap, url, topic, messages)
            return 0
        if args.store_only:
            store_scale(bootstrap, Path(workdir), messages)
            return 0
        if args.inbox_only:
            inbox_cost(bootstrap, url, db_messages)
            return 0
        if args.cost_only:
            store_cost(bootstrap, Path(workdir), topic, messages, the_worker)
            return 0
        if args.sequence_only:
            sequence_cost(bootstrap, url, entities, 5, the_worker)
            return 0
        # e at max_in_flight 1 handles 100 msg/s: give it a sixteenth of the messages.
        slow_topic, slower_topic = (f"bench-slow-{uuid.uuid4().hex[:8]}" for _ in range(2))
        publish(bootstrap, slow_topic, slow)
        publish(bootstrap, slower_topic, slow // 16)
        rates: dict[str, float] = {}
        runs: list[tuple[str, str, Callable[[], float]]] = [
            ("a", "raw consume + commit per batch", lambda: hand_written(
                bootstrap, topic, messages, lambda ids: None)),
            ("b", "SET NX round trip per message", lambda: hand_written(
                bootstrap, topic, messages, set_nx_per_message(client))),
            ("c", "one Lua claim per batch", lambda: hand_written(
                bootstrap, topic, messages, lua_per_batch(client))),
            ("s", "the worker's claim + complete scripts", lambda: hand_written(
                bootstrap, topic, messages, worker_scripts(url))),
            ("d", "worker, no-op handler", lambda: the_worker(
                bootstrap, url, topic, messages, "noop")),
            ("e1", "worker, 10 ms handler, max_in_flight 1", lambda: the_worker(
                bootstrap, url, slower_topic, slow // 16, "sleeps_10ms", 1)),
            ("e64", "worker, 10 ms handler, max_in_flight 64", lambda: the_worker(
                bootstrap, url, slow_topic, slow, "sleeps_10ms", 64)),
        ]  # fmt: skip
        for name, what, run in runs:
            rates[name] = run()
            print(f"{name:>4}  {what:<42} {rates[name]:>10,.0f} msg/s", flush=True)
        store_cost(bootstrap, Path(workdir), topic, messages, the_worker)
        rss = measure_rss(bootstrap, url, rss_messages)
        client.close()

    ratios = {
        "d/a": rates["d"] / rates["a"],
        "d/b": rates["d"] / rates["b"],
        "d/c": rates["d"] / rates["c"],
        "s/c": rates["s"] / rates["c"],
        "d/s": rates["d"] / rates["s"],
        "e64/e1": rates["e64"] / rates["e1"],
    }
    growth = rss["last_tenth_mb"] - rss["first_tenth_mb"]
    print()
    for name, ratio in ratios.items():
        target = TARGETS.get(name)
        verdict = (
            ""
            if target is None
            else f"  target >= {target:g}: " + ("met" if ratio >= target else "MISSED")
        )
        print(f"{name:>7} = {ratio:6.2f}{verdict}")
    print(
        f"    RSS over {rss_messages:,} messages ({rss['rate']:,.0f} msg/s): peak "
        f"{rss['peak_mb']:.1f} MB, growth from the first to the last tenth {growth:+.1f} MB"
        f"  target < {RSS_GROWTH_LIMIT_MB:g} MB: "
        + ("met" if growth < RSS_GROWTH_LIMIT_MB else "MISSED")
    )
    with tempfile.TemporaryDirectory() as workdir, services(Path(workdir)) as (bootstrap, url):
        store_scale(bootstrap, Path(workdir), messages)
        inbox_cost(bootstrap, url, db_messages)
        sequence_cost(bootstrap, url, entities, 5, the_worker)
    print(f"\nevery variant handled every id exactly once; {describe_machine()}")
    return 0


def describe_machine() -> str:
    import confluent_kafka

    return (
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"confluent-kafka {confluent_kafka.version()}, librdkafka "
        f"{confluent_kafka.libversion()[0]}, redis-py {redis.__version__}"
    )


if __name__ == "__main__":
    sys.exit(main())
