"""The dedup stores the contract tests run on, as fixtures (a pytest plugin of
tests/conftest.py): the in-memory one and, on the session's servers, Redis, Redis
through Sentinel and a Redis Cluster, each under its own key prefix."""

import time
import uuid

import pytest
import redis

from idempotent_worker.dedup.cluster import RedisClusterDedupStore
from idempotent_worker.dedup.memory import MemoryDedupStore
from idempotent_worker.dedup.redis import RedisDedupStore
from tests.support.services import SENTINEL_PASSWORD

LEASE = 0.3


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def sentinel_store(sentinel, prefix, **options):
    """A store on the primary ``sentinel`` names, through its password-protected Sentinels."""
    addresses = [(host, int(port)) for host, port in (a.split(":") for a in sentinel.addresses)]
    return RedisDedupStore.from_sentinel(
        "redis://", sentinel.master, addresses, prefix, sentinel_password=SENTINEL_PASSWORD,
        **options,
    )  # fmt: skip


def server_store(request, kind):
    """A store of ``kind`` ("redis", "sentinel" or "cluster") on the session's servers,
    under its own key prefix."""
    prefix = f"contract-{uuid.uuid4().hex}"
    if kind == "redis":
        return RedisDedupStore.from_url(request.getfixturevalue("redis_url"), prefix)
    if kind == "sentinel":
        return sentinel_store(request.getfixturevalue("redis_sentinel"), prefix)
    return RedisClusterDedupStore.from_url(request.getfixturevalue("redis_cluster_url"), prefix)


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
def store_and_wait(request):
    """(store, wait): wait(seconds) lets that much store time pass."""
    if request.param == "memory":
        clock = FakeClock()

        def advance(seconds):
            clock.now += seconds

        yield MemoryDedupStore(clock), advance
    else:
        store = server_store(request, request.param)
        yield store, time.sleep
        store.close()


@pytest.fixture
def redis_store(redis_url):
    """(store, client, prefix): a Redis store under its own prefix, and a plain client
    to look at or write its keys."""
    prefix = f"contract-{uuid.uuid4().hex}"
    store, client = RedisDedupStore.from_url(redis_url, prefix), redis.Redis.from_url(redis_url)
    yield store, client, prefix
    client.close()
    store.close()


@pytest.fixture
def cluster_store(redis_cluster_url):
    """(store, client, prefix): a Redis Cluster store under its own prefix, and a cluster
    client to look at or write its keys."""
    prefix = f"contract-{uuid.uuid4().hex}"
    store = RedisClusterDedupStore.from_url(redis_cluster_url, prefix)
    client = redis.RedisCluster.from_url(redis_cluster_url)
    yield store, client, prefix
    for node in client.get_nodes():  # RedisCluster.close() leaves these open
        node.redis_connection.connection_pool.disconnect()
    client.close()
    store.close()


def prefix_keys(client, prefix):
    """Every key under ``prefix``, on each primary of a cluster or the one server."""
    if isinstance(client, redis.RedisCluster):
        return client.keys(f"{prefix}*", target_nodes=redis.RedisCluster.PRIMARIES)
    return client.keys(f"{prefix}*")


@pytest.fixture
def store(store_and_wait):
    return store_and_wait[0]
