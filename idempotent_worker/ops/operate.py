"""``idempotent-worker ids show|forget``: what the dedup store holds for an id, and
forgetting it so that a later copy runs again. Both go through the store code the
worker uses, with the worker's configuration."""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Sequence
from dataclasses import asdict
from typing import TextIO

from idempotent_worker.config.settings import Settings
from idempotent_worker.dedup import open_store
from idempotent_worker.dedup.base import Inspection, State
from idempotent_worker.observe.logs import get_logger


def show_ids(settings: Settings, ids: Sequence[str], as_json: bool, out: TextIO) -> int:
    store = open_store(settings.redis, settings.key_prefix, ttl_seconds=settings.dedup.ttl_seconds)
    try:
        found = [(id, store.inspect(id)) for id in ids]
    finally:
        store.close()
    if as_json:
        records = [{"id": id, **asdict(i), "state": i.state.value} for id, i in found]
        print(json.dumps(records, indent=2), file=out)
    else:
        for id, inspection in found:
            print(f"{id}: {describe(inspection)}", file=out)
    return 0


def forget_ids(settings: Settings, ids: Sequence[str], force: bool, out: TextIO) -> int:
    """Forget each id; 1 if an id in progress was left alone (no ``--force``)."""
    store = open_store(settings.redis, settings.key_prefix, ttl_seconds=settings.dedup.ttl_seconds)
    try:
        before = [store.inspect(id) for id in ids]
        found = store.forget(ids, force)
    finally:
        store.close()
    log = get_logger(group=settings.kafka.group_id)
    by = f"{getpass.getuser()}@{socket.gethostname()}"
    for id, previous, outcome in zip(ids, before, found, strict=True):
        if outcome == "refused":
            print(f"{id}: left alone: {describe(previous)} (--force forgets it)", file=out)
            continue
        log.warning("id forgotten", id=id, previous_state=outcome, by=by)
        print(f"{id}: forgotten (was {describe(previous)})", file=out)
    return 1 if "refused" in found else 0


def describe(inspection: Inspection) -> str:
    i = inspection
    if i.state is State.COMPLETED:
        return (
            f"completed from {i.origin}, payload fingerprint {i.fingerprint}, "
            f"{_duration(i.ttl_left_ms)} left"
        )
    if i.state is State.IN_PROGRESS:
        return (
            f"in progress, owner {i.owner}, lease {_duration(i.lease_left_ms)} left, "
            f"{i.runs} run(s) begun"
        )
    return f"absent ({i.runs} run(s) counted)" if i.runs else "absent"


def _duration(ms: int | None) -> str:
    seconds = (ms or 0) / 1000
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
