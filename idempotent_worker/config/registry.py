"""Routes resolved at start-up: each topic's handler imported and its id extractor built."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from idempotent_worker.config.ids import (
    IdExtractor,
    PositionExtractor,
    parse_id_spec,
    parse_position_specs,
)
from idempotent_worker.config.routes import Route
from idempotent_worker.config.settings import Settings
from idempotent_worker.errors import ConfigError
from idempotent_worker.types import BatchHandler, Handler


@dataclass(frozen=True, slots=True)
class ResolvedRoute:
    topic: str
    handler_path: str
    handler: Handler | BatchHandler
    extract_id: IdExtractor
    output_topic: str | None
    dlq_topic: str
    timeout_seconds: float
    max_in_flight: int
    dedup: str
    """``id``, ``shadow`` or ``sequence`` (see idempotent_worker/processing/modes/)."""
    on_duplicate: str
    reply_header: str | None
    """The header naming the topic of outputs that name none (``reply_to``)."""
    correlation_header: str | None
    extract_position: PositionExtractor | None = None
    """``dedup = "sequence"``: the message's entity and sequence."""
    on_gap: str = "process"
    batch: bool = False
    """The handler takes a partition's messages of a poll batch in one call."""
    cloudevent: tuple[str, str] | None = None
    """The ``ce_source`` and ``ce_type`` of the outputs (``emit_cloudevents``)."""

    def default_topic(self, headers: Mapping[str, bytes]) -> str | None:
        """Where a message's outputs that name no topic go: its reply header's topic,
        else the route's output topic."""
        if self.reply_header is not None and (reply := headers.get(self.reply_header)):
            return reply.decode(errors="replace")
        return self.output_topic

    def correlation(self, headers: Mapping[str, bytes]) -> tuple[str, bytes] | None:
        """The header copied onto the message's replies, if the route and message have one."""
        if self.correlation_header is None or self.correlation_header not in headers:
            return None
        return self.correlation_header, headers[self.correlation_header]


def search_path(folders: Sequence[tuple[str, str]]) -> None:
    """Put the working directory, then ``folders`` (each with the key that named it, for
    an error), first on the import path, as celery and gunicorn do (a console script's
    own folder is first otherwise)."""
    added = [os.getcwd()]
    for folder, key in folders:
        if not os.path.isdir(folder):
            raise ConfigError(key, f"not a directory: {folder}")
        added.append(os.path.abspath(folder))
    for folder in reversed(added):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
    _searched[:] = added


_searched: list[str] = []
"""The folders ``search_path`` put first, for the import errors' message."""


def import_handler(path: str, key: str, batch: bool = False) -> Handler | BatchHandler:
    """Import ``package.module:function``; raise ConfigError naming ``key`` if that fails
    (or if it cannot take ``(message, ctx)``, or ``(batch)`` with ``batch``)."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a config problem
        where = ", ".join([*_searched, "the installed packages"])
        raise ConfigError(
            key,
            f"cannot import module '{module_name}' (searched {where}): {type(exc).__name__}: {exc}",
        ) from exc
    handler = getattr(module, attribute, None)
    if handler is None:
        raise ConfigError(key, f"module '{module_name}' has no attribute '{attribute}'")
    if not callable(handler):
        raise ConfigError(key, f"'{path}' is not callable")
    try:
        signature = inspect.signature(handler)
    except ValueError:  # a builtin without an introspectable signature: trust it
        return handler  # type: ignore[no-any-return]
    arguments, shape = ((None,), "(batch)") if batch else ((None, None), "(message, ctx)")
    try:
        signature.bind(*arguments)
    except TypeError:
        raise ConfigError(key, f"'{path}' must accept {shape}") from None
    return handler  # type: ignore[no-any-return]


def resolve_routes(settings: Settings) -> dict[str, ResolvedRoute]:
    """Every route by topic, with handlers imported. Fails on the first bad route."""
    routes = {}
    for index, route in enumerate(settings.routes):
        routes[route.topic] = _resolve(index, route, settings.handler_timeout(route))
    return routes


def _resolve(index: int, route: Route, timeout_seconds: float) -> ResolvedRoute:
    handler = import_handler(route.handler, f"routes[{index}].handler", route.batch)
    return ResolvedRoute(
        topic=route.topic,
        handler_path=route.handler,
        handler=handler,
        extract_id=parse_id_spec(route.id),
        output_topic=route.output_topic,
        dlq_topic=route.dead_letter_topic,
        timeout_seconds=timeout_seconds,
        max_in_flight=route.max_in_flight,
        dedup=route.dedup,
        on_duplicate=route.on_duplicate,
        reply_header=route.reply_to.removeprefix("header:") if route.reply_to else None,
        correlation_header=route.correlation_header,
        extract_position=(
            parse_position_specs(route.entity, route.sequence)
            if route.entity is not None and route.sequence is not None
            else None
        ),
        on_gap=route.on_gap,
        batch=route.batch,
        cloudevent=(
            (route.emit_cloudevents.source, route.emit_cloudevents.type)
            if route.emit_cloudevents is not None
            else None
        ),
    )
