"""Run the real consumer loop in this process, bounded, against the real broker and Redis."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry

from idempotent_worker.config.registry import resolve_routes
from idempotent_worker.config.settings import Settings
from idempotent_worker.dedup import open_store
from idempotent_worker.dedup.base import Completion, DedupStore
from idempotent_worker.local.demo import FAST_CONSUMER
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import Health
from idempotent_worker.processing.loop import Worker


def make_settings(
    bootstrap: str, redis_url: str, group: str, routes: list[dict[str, Any]], **sections: Any
) -> Settings:
    kafka = {"bootstrap_servers": bootstrap, "group_id": group, "consumer": FAST_CONSUMER}
    kafka.update(sections.pop("kafka", {}))
    retry = {"max_attempts": 3, "backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.05}
    retry.update(sections.pop("retry", {}))
    return Settings(
        kafka=kafka,
        redis={"url": redis_url, "socket_timeout_seconds": 0.5},
        routes=routes,
        retry=retry,
        dedup={"key_prefix": f"test:{group}", **sections.pop("dedup", {})},
        **sections,
    )


class Run:
    """A worker built like the CLI builds it; ``run()`` blocks, ``thread()`` runs it aside."""

    def __init__(
        self,
        settings: Settings,
        *,
        max_messages: int | None = None,
        idle_timeout: float | None = 8.0,
    ) -> None:
        self.registry = CollectorRegistry()
        self.health = Health(stall_seconds=60)
        self.store = open_store(
            settings.redis,
            settings.key_prefix,
            ttl_seconds=settings.dedup.ttl_seconds,
            timeout=0.5,
        )
        self.worker = Worker(
            settings,
            resolve_routes(settings),
            self.store,
            Metrics(self.registry),
            self.health,
            max_messages=max_messages,
            idle_timeout=idle_timeout,
        )

    def run(self) -> Run:
        try:
            self.worker.run()
        finally:
            self.store.close()
        return self

    def thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(f"idempotent_worker_{name}", labels) or 0.0


def run_worker(settings: Settings, **bounds: Any) -> Run:
    return Run(settings, **bounds).run()


def complete(
    store: DedupStore, id: str, token: str, ttl: int, origin: str, fingerprint: str = ""
) -> bool:
    """Complete one id, as the loop completes many in one call."""
    return store.complete([Completion(id, token, origin, fingerprint)], ttl)[0]
