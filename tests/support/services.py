"""Real Kafka-protocol broker, Redis and PostgreSQL for the tests, chosen in this order:

1. ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` / ``POSTGRES_URL`` from the environment
   (your cluster, or compose);
2. a Docker engine that answers -> testcontainers: Apache Kafka (KRaft), Redis, PostgreSQL;
3. otherwise local processes: the Tansu broker, ``redis-server`` and Debian's
   PostgreSQL server on free loopback ports.

A Redis Cluster is ``REDIS_CLUSTER_URL`` (any node of yours), else six local
``redis-server`` processes (3 primaries, 3 replicas): a cluster in containers needs
its nodes' announced addresses remapped, which buys nothing over local processes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from idempotent_worker.local import embedded, topologies
from idempotent_worker.local import postgres as embedded_postgres

SENTINEL_PASSWORD = "s3cret-sentinel"
"""What the session's Sentinels ask of their clients (the Redis servers ask nothing)."""

KAFKA_IMAGE = "confluentinc/cp-kafka:7.7.1"
REDIS_IMAGE = "redis:7.4"
POSTGRES_IMAGE = "postgres:16"


@functools.cache
def docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@contextlib.contextmanager
def kafka_bootstrap(workdir: Path) -> Iterator[str]:
    if servers := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield servers
    elif docker_engine_available():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
    else:
        with embedded.broker(workdir) as broker:
            yield f"127.0.0.1:{broker.port}"


@contextlib.contextmanager
def redis_url(workdir: Path) -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
    elif docker_engine_available():
        from testcontainers.community.redis import RedisContainer

        with RedisContainer(REDIS_IMAGE) as redis:
            host, port = redis.get_container_host_ip(), redis.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
    else:
        with embedded.redis(workdir) as server:
            yield f"redis://127.0.0.1:{server.port}/0"


@contextlib.contextmanager
def redis_cluster_url(workdir: Path) -> Iterator[str]:
    if url := os.environ.get("REDIS_CLUSTER_URL"):
        yield url
    else:
        with topologies.RedisCluster(workdir) as cluster:
            yield cluster.url


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    if url := os.environ.get("POSTGRES_URL"):
        yield url
    elif docker_engine_available():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer(POSTGRES_IMAGE, driver=None) as postgres:
            yield postgres.get_connection_url()
    else:
        with embedded_postgres.Postgres() as server:
            yield server.url
