"""The shared dedup store: the record of which message ids are in progress or completed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from idempotent_worker.dedup.base import Claim, ClaimStatus, DedupStore, State

if TYPE_CHECKING:
    from idempotent_worker.config.redis import RedisSettings

__all__ = ["Claim", "ClaimStatus", "DedupStore", "State", "open_store"]


def open_store(
    settings: RedisSettings,
    key_prefix: str,
    *,
    ttl_seconds: int,
    timeout: float | None = None,
) -> DedupStore:
    """The Redis dedup store ``settings`` describe: one server, the primary Sentinel
    names, or a Redis Cluster; ``ttl_seconds`` is the dedup TTL it completes with."""
    from idempotent_worker.dedup.cluster import RedisClusterDedupStore
    from idempotent_worker.dedup.redis import Durability, RedisDedupStore

    url = settings.url.get_secret_value()
    options: dict[str, Any] = {
        "timeout": timeout or settings.socket_timeout_seconds,
        "tls_ca_file": settings.tls_ca_file,
        "durability": Durability(settings.min_replicas, settings.replica_timeout_ms),
        "ttl_seconds": ttl_seconds,
    }
    if settings.sentinel_master:
        password = settings.sentinel_password
        return RedisDedupStore.from_sentinel(
            url,
            settings.sentinel_master,
            settings.sentinel_addresses(),
            key_prefix,
            sentinel_username=settings.sentinel_username,
            sentinel_password=password.get_secret_value() if password else None,
            sentinel_tls=settings.sentinel_tls,
            **options,
        )
    store_class = RedisClusterDedupStore if settings.cluster else RedisDedupStore
    return store_class.from_url(url, key_prefix, **options)
