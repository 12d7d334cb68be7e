"""The shared dedup store: the record of which message ids are in progress or completed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.dedup.base import Claim, ClaimStatus, DedupStore, State

if TYPE_CHECKING:
    from worker.settings import RedisSettings

__all__ = ["Claim", "ClaimStatus", "DedupStore", "State", "open_store"]


def open_store(
    settings: RedisSettings, key_prefix: str, *, timeout: float | None = None
) -> DedupStore:
    """The Redis dedup store ``settings`` describe: one server, or a Redis Cluster."""
    from worker.dedup.cluster import RedisClusterDedupStore
    from worker.dedup.redis import Durability, RedisDedupStore

    store_class = RedisClusterDedupStore if settings.cluster else RedisDedupStore
    return store_class.from_url(
        settings.url.get_secret_value(),
        key_prefix,
        timeout=timeout or settings.socket_timeout_seconds,
        tls_ca_file=settings.tls_ca_file,
        durability=Durability(settings.min_replicas, settings.replica_timeout_ms),
    )
