"""``idempotent-worker demo``: the whole product on one machine, nothing to install by hand.

Starts a local Kafka-compatible broker and ``redis-server``, runs worker replicas
with the example orders handler, publishes orders of which a share repeat an
earlier id (on other partitions, interleaved in time), shows progress from the
replicas' own metrics, and ends with a summary and a check that no id was
processed twice, read back from the output topic.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from prometheus_client.parser import text_string_to_metric_families

from idempotent_worker.kafka.records import header_pairs
from idempotent_worker.local import embedded

TOPIC, OUTPUT, DLQ = "demo.orders", "demo.orders.accepted", "demo.orders.dlq"
PARTITIONS = 6
# A fast group join and low fetch latency on the local broker (see the README).
FAST_CONSUMER = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 10}


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """A replica's metrics as ``{"name{label=value,...}": value}`` (counters with their _total)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def metric_sum(samples: Iterable[dict[str, float]], name: str, **labels: str) -> float:
    """Sum of a metric over replicas and over every label set matching ``labels``."""
    wanted = [f"{k}={v}" for k, v in labels.items()]
    return sum(
        value
        for replica in samples
        for key, value in replica.items()
        if key.split("{", 1)[0] == name and all(w in key for w in wanted)
    )


def probe(port: int, path: str, host: str = "127.0.0.1") -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def spawn_worker(
    env: dict[str, str], log_path: Path, cwd: Path | None = None, prefix: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Start ``idempotent-worker run`` as a subprocess, its output going to ``log_path``
    (run through ``prefix``, e.g. ``ip netns exec NAME``, if given)."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "idempotent_worker", "run"],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, count, 1) for name, count in topics.items()])
    for future in futures.values():
        future.result(timeout=30)


def worker_env(
    bootstrap: str,
    redis_url: str,
    group: str,
    http_port: int,
    routes: list[dict[str, str]],
    **extra: str,
) -> dict[str, str]:
    """Environment configuring one replica, as an operator would set it."""
    return {
        **os.environ,
        "WORKER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "WORKER_KAFKA__GROUP_ID": group,
        "WORKER_KAFKA__CONSUMER": json.dumps(FAST_CONSUMER),
        "WORKER_REDIS__URL": redis_url,
        "WORKER_HTTP__PORT": str(http_port),
        "WORKER_ROUTES": json.dumps(routes),
        "WORKER_RETRY__BACKOFF_INITIAL_SECONDS": "0.05",
        **extra,
    }


def read_all(
    bootstrap: str, topic: str, start: dict[int, int] | None = None, idle: float = 1.5
) -> list[tuple[dict[str, bytes], bytes | None]]:
    """Records of ``topic`` as (headers, value), from ``start`` offsets (default: the beginning)
    until nothing new arrives for ``idle`` seconds.

    It reads rather than trusting high watermarks: the local Tansu broker reports the
    end of a partition as the last batch's base offset + 1.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{time.time_ns()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, (start or {}).get(p, 0)) for p in partitions])
        records = []
        last_seen = time.monotonic()
        while time.monotonic() - last_seen < idle:
            for record in consumer.consume(1000, 0.2):
                if record.error() is None:
                    records.append((dict(header_pairs(record)), record.value()))
                    last_seen = time.monotonic()
        return records
    finally:
        consumer.close()


def publish_with_duplicates(
    bootstrap: str,
    topic: str,
    messages: int,
    duplicate_share: float,
    partitions: int = PARTITIONS,
    seed: int = 7,
    id_prefix: str = "order-",
) -> tuple[int, int]:
    """Publish ``messages`` orders; a share of them repeat an earlier order's id.

    A repeat goes to another partition than its original and is interleaved with new
    orders, as upstream retries and replays do. Returns (unique ids, repeats).
    """
    rng = random.Random(seed)
    repeats = round(messages * duplicate_share)
    is_repeat = [False] * (messages - repeats) + [True] * repeats
    rng.shuffle(is_repeat)
    first_new = is_repeat.index(False)  # the first message has nothing to repeat
    is_repeat[0], is_repeat[first_new] = False, is_repeat[0]
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    home: dict[str, int] = {}
    values: dict[str, str] = {}
    ids: list[str] = []
    for index, repeat in enumerate(is_repeat):
        if repeat:
            # Most real duplicates arrive close to their original: pick among recent ids.
            # A duplicate is a resend: the same order, byte for byte.
            order_id = ids[-rng.randrange(1, min(len(ids), 1000) + 1)]
            partition = (home[order_id] + rng.randrange(1, partitions)) % partitions
        else:
            order_id = f"{id_prefix}{index:07d}"
            partition = home[order_id] = rng.randrange(partitions)
            ids.append(order_id)
            order = {"order_id": order_id, "amount": 10 + index % 90, "currency": "EUR"}
            values[order_id] = json.dumps(order)
        producer.produce(
            topic,
            value=values[order_id],
            key=order_id,
            partition=partition,
            headers=[("message-id", order_id)],
        )
        producer.poll(0)
    producer.flush(30)
    return len(home), messages - len(home)


def generate_traffic(
    bootstrap: str,
    topic: str,
    batch: int,
    duplicate_share: float,
    partitions: int,
    interval: float,
    rounds: int,
) -> int:
    """Publish ``batch`` orders every ``interval`` seconds, ``rounds`` times (0: until stopped).

    Each round uses fresh ids, so the duplicate share of the stream is ``duplicate_share``.
    """
    round_number = 0
    while rounds == 0 or round_number < rounds:
        started = time.monotonic()
        unique, repeats = publish_with_duplicates(
            bootstrap,
            topic,
            batch,
            duplicate_share,
            partitions,
            seed=round_number,
            id_prefix=f"order-{os.getpid()}-{round_number}-",
        )
        print(f"round {round_number}: {unique} new ids, {repeats} duplicates", flush=True)
        round_number += 1
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return 0


def run_demo(messages: int, duplicate_share: float, replicas: int) -> int:
    with tempfile.TemporaryDirectory(prefix="idempotent-worker-demo-") as tmp:
        workdir = Path(tmp)
        broker, redis = embedded.broker(workdir), embedded.redis(workdir)
        processes: list[subprocess.Popen[bytes]] = []
        try:
            broker.start()
            redis.start()
            bootstrap = f"127.0.0.1:{broker.port}"
            print(f"broker on {bootstrap}, redis on 127.0.0.1:{redis.port}, work dir {workdir}")
            create_topics(bootstrap, {TOPIC: PARTITIONS, OUTPUT: PARTITIONS, DLQ: 1})
            routes = [
                {
                    "topic": TOPIC,
                    "handler": "idempotent_worker.examples.orders:handle",
                    "output_topic": OUTPUT,
                }
            ]
            ports = [embedded.free_port() for _ in range(replicas)]
            for number, port in enumerate(ports):
                env = worker_env(
                    bootstrap,
                    f"redis://127.0.0.1:{redis.port}/0",
                    "demo",
                    port,
                    routes,
                    WORKER_LOG__LEVEL="WARNING",
                )
                log = (workdir / f"replica-{number}.log").open("wb")
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "idempotent_worker", "run"],
                        env=env,
                        stdout=log,
                        stderr=log,
                    )
                )
            wait_for_group(ports, PARTITIONS)
            print(f"{replicas} replicas joined group 'demo' and share {PARTITIONS} partitions")
            unique, duplicates = publish_with_duplicates(
                bootstrap, TOPIC, messages, duplicate_share
            )
            print(f"published {messages} orders: {unique} unique ids, {duplicates} repeats")
            totals = follow_progress(ports, messages)
            for process in processes:
                process.terminate()
            codes = [process.wait(60) for process in processes]
            outputs = Counter(
                headers.get("message-id", b"").decode()
                for headers, _ in read_all(bootstrap, OUTPUT)
            )
            twice = sum(1 for count in outputs.values() if count > 1)
            missing = unique - len(outputs)
            processed, skipped = totals["processed"], totals["skipped"]
            print(
                f"summary: consumed {totals['consumed']:.0f}, processed {processed:.0f}, "
                f"duplicates skipped {skipped:.0f} "
                f"(duplicate rate {skipped / max(totals['consumed'], 1):.1%}), "
                f"ids processed twice {twice}, ids missing {missing}, replica exit codes {codes}"
            )
            ok = (
                twice == 0 and missing == 0 and skipped == duplicates and all(c == 0 for c in codes)
            )
            print("demo OK: every order handled exactly once" if ok else "demo FAILED")
            return 0 if ok else 1
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
            broker.stop()
            redis.stop()


def wait_for_group(
    ports: list[int], partitions: int, timeout: float = 60.0, hosts: list[str] | None = None
) -> None:
    """Wait until every replica is ready and the partitions are spread over all of them."""
    where = list(zip(ports, hosts or ["127.0.0.1"] * len(ports), strict=True))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(probe(port, "/readyz", host) for port, host in where):
            assigned = [
                metric_sum([scrape(p, h)], "idempotent_worker_assigned_partitions")
                for p, h in where
            ]
            if sum(assigned) == partitions and (all(assigned) or len(ports) > partitions):
                return
        time.sleep(0.2)
    raise TimeoutError("replicas did not join the group in time")


def follow_progress(ports: list[int], expected: int, timeout: float = 300.0) -> dict[str, float]:
    """Print a progress line when it changes, until ``expected`` messages are finished."""
    deadline = time.monotonic() + timeout
    last = ""
    totals: dict[str, float] = {}
    while time.monotonic() < deadline:
        samples = [scrape(port) for port in ports]
        totals = {
            "consumed": metric_sum(samples, "idempotent_worker_messages_consumed_total"),
            "processed": metric_sum(
                samples, "idempotent_worker_messages_processed_total", outcome="success"
            ),
            "skipped": metric_sum(samples, "idempotent_worker_duplicates_skipped_total"),
            "dead_lettered": metric_sum(samples, "idempotent_worker_dead_lettered_total"),
        }
        line = "  ".join(f"{name} {value:.0f}" for name, value in totals.items())
        if line != last:
            print(f"progress: {line}")
            last = line
        if totals["processed"] + totals["skipped"] + totals["dead_lettered"] >= expected:
            return totals
        time.sleep(0.5)
    raise TimeoutError(f"messages not finished in {timeout:g} s: {last}")
