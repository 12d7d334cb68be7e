"""Routes resolved at start-up: each topic's handler imported and its id extractor built."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from worker.errors import ConfigError
from worker.ids import IdExtractor, parse_id_spec
from worker.settings import Route, Settings
from worker.types import Handler


@dataclass(frozen=True, slots=True)
class ResolvedRoute:
    topic: str
    handler_path: str
    handler: Handler
    extract_id: IdExtractor
    output_topic: str | None
    dlq_topic: str
    timeout_seconds: float
    max_in_flight: int
    is_async: bool


def import_handler(path: str, key: str) -> Handler:
    """Import ``package.module:function``; raise ConfigError naming ``key`` if that fails."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a config problem
        raise ConfigError(key, f"cannot import module '{module_name}': {exc}") from exc
    handler = getattr(module, attribute, None)
    if handler is None:
        raise ConfigError(key, f"module '{module_name}' has no attribute '{attribute}'")
    if not callable(handler):
        raise ConfigError(key, f"'{path}' is not callable")
    try:
        signature = inspect.signature(handler)
    except ValueError:  # a builtin without an introspectable signature: trust it
        return handler  # type: ignore[no-any-return]
    try:
        signature.bind(None, None)
    except TypeError:
        raise ConfigError(key, f"'{path}' must accept (message, ctx)") from None
    return handler  # type: ignore[no-any-return]


def resolve_routes(settings: Settings) -> dict[str, ResolvedRoute]:
    """Every route by topic, with handlers imported. Fails on the first bad route."""
    routes = {}
    for index, route in enumerate(settings.routes):
        routes[route.topic] = _resolve(index, route, settings.handler_timeout(route))
    return routes


def _resolve(index: int, route: Route, timeout_seconds: float) -> ResolvedRoute:
    handler = import_handler(route.handler, f"routes[{index}].handler")
    return ResolvedRoute(
        topic=route.topic,
        handler_path=route.handler,
        handler=handler,
        extract_id=parse_id_spec(route.id),
        output_topic=route.output_topic,
        dlq_topic=route.dead_letter_topic,
        timeout_seconds=timeout_seconds,
        max_in_flight=route.max_in_flight,
        is_async=inspect.iscoroutinefunction(handler),
    )
