"""Checks made once the dedup store and the broker answer, before joining the group."""

from __future__ import annotations

from collections.abc import Mapping

from structlog.typing import FilteringBoundLogger

from idempotent_worker.config.redis import RedisSettings
from idempotent_worker.config.registry import ResolvedRoute
from idempotent_worker.errors import ConfigError
from idempotent_worker.kafka.consumer import GroupConsumer


def check_eviction_policy(
    policy: str | None, redis: RedisSettings, log: FilteringBoundLogger
) -> None:
    """Refuse a store that evicts keys when full (each a forgotten id), unless allowed."""
    if policy is None:
        log.warning("could not read the dedup store's maxmemory-policy; make sure it is noeviction")
    elif policy != "noeviction" and not redis.allow_eviction:
        raise ConfigError(
            "redis.allow_eviction",
            f"Redis runs with maxmemory-policy {policy}: when full it evicts keys, and an "
            "evicted dedup record is a forgotten id whose duplicates would run again. "
            "Set maxmemory-policy noeviction, or set redis.allow_eviction = true to "
            "accept that risk",
        )


def warn_missing_topics(
    routes: Mapping[str, ResolvedRoute], consumer: GroupConsumer, log: FilteringBoundLogger
) -> None:
    for route in routes.values():
        topics = {route.topic, route.dlq_topic, route.output_topic or route.topic}
        for topic in sorted(consumer.missing_topics(topics)):
            log.warning("topic does not exist (yet)", topic=topic, route=route.topic)
