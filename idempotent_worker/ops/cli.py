"""``idempotent-worker``: run the worker, check a configuration, or run the embedded demo."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from prometheus_client import CollectorRegistry

from idempotent_worker.config.registry import ResolvedRoute, resolve_routes, search_path
from idempotent_worker.config.settings import Settings, client_config, load_settings
from idempotent_worker.deadletter.replay import Selection, replay
from idempotent_worker.dedup import open_store
from idempotent_worker.errors import ConfigError, StoreUnavailable
from idempotent_worker.observe.logs import Scrubber, configure_logging, get_logger
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import Health, HttpServer
from idempotent_worker.ops.operate import forget_ids, show_ids

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


PATH_HELP = "a folder to search for handler modules (repeatable; the working directory is first)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="idempotent-worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="consume, dedup and handle until stopped")
    run.add_argument("--config", help="TOML file (default: $WORKER_CONFIG)")
    run.add_argument("--path", action="append", default=[], help=PATH_HELP)
    run.add_argument("--max-messages", type=int, help="stop after finishing this many messages")
    run.add_argument("--idle-timeout", type=float, help="stop after this many idle seconds")
    check = commands.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--config", help="TOML file (default: $WORKER_CONFIG)")
    check.add_argument("--path", action="append", default=[], help=PATH_HELP)
    demo = commands.add_parser("demo", help="run two replicas on an embedded broker and Redis")
    demo.add_argument("--messages", type=int, default=5000)
    demo.add_argument("--duplicate-share", type=float, default=0.3)
    demo.add_argument("--replicas", type=int, default=2)
    generate = commands.add_parser(
        "generate", help="publish example orders with a share of duplicate ids (traffic)"
    )
    generate.add_argument(
        "--bootstrap-servers", default=os.environ.get("WORKER_KAFKA__BOOTSTRAP_SERVERS")
    )
    generate.add_argument("--topic", default="orders")
    generate.add_argument("--partitions", type=int, default=6)
    generate.add_argument("--batch", type=int, default=1000, help="messages per round")
    generate.add_argument("--duplicate-share", type=float, default=0.3)
    generate.add_argument("--interval", type=float, default=1.0, help="seconds per round")
    generate.add_argument("--rounds", type=int, default=0, help="0: until stopped")
    _add_operator_commands(commands)
    inbox = commands.add_parser("inbox", help="the database inbox of ctx.inbox() handlers")
    inbox_commands = inbox.add_subparsers(dest="inbox_command", required=True)
    ddl = inbox_commands.add_parser("ddl", help="print the inbox table's DDL, for migrations")
    ddl.add_argument("--config", help="TOML file (default: $WORKER_CONFIG, else defaults)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from idempotent_worker.local.demo import run_demo

        return run_demo(args.messages, args.duplicate_share, args.replicas)
    if args.command == "generate":
        from idempotent_worker.local.demo import generate_traffic

        if not args.bootstrap_servers:
            parser.error("generate: set --bootstrap-servers or WORKER_KAFKA__BOOTSTRAP_SERVERS")
        if not 0 <= args.duplicate_share < 1:
            parser.error("generate: --duplicate-share must be in [0, 1)")
        return generate_traffic(
            args.bootstrap_servers,
            args.topic,
            args.batch,
            args.duplicate_share,
            args.partitions,
            args.interval,
            args.rounds,
        )
    if args.command == "inbox":
        return _print_inbox_ddl(args.config)
    if args.command in ("ids", "dlq"):
        return _operate(args)
    try:
        settings, routes = prepare(args.config, args.path)
    except ConfigError as exc:
        print(f"idempotent-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(f"configuration OK: {len(routes)} route(s): {', '.join(routes)}")
        return 0
    return run_worker(settings, routes, args.max_messages, args.idle_timeout)


def _add_operator_commands(commands: Any) -> None:
    """``ids show``, ``ids forget`` and ``dlq replay``."""
    ids = commands.add_parser("ids", help="inspect or forget message ids in the dedup store")
    ids_commands = ids.add_subparsers(dest="ids_command", required=True)
    show = ids_commands.add_parser("show", help="each id's state in the dedup store")
    show.add_argument("ids", nargs="+", metavar="ID")
    show.add_argument("--json", action="store_true")
    forget = ids_commands.add_parser("forget", help="delete completed ids: later copies run")
    forget.add_argument("ids", nargs="+", metavar="ID")
    forget.add_argument("--force", action="store_true", help="forget ids in progress too")
    dlq = commands.add_parser("dlq", help="the dead-letter topics")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    replay = dlq_commands.add_parser("replay", help="re-publish dead letters, once each")
    replay.add_argument("--topic", required=True, help="the dead-letter topic")
    replay.add_argument("--reason", action="append", default=[], help="only this dlq-reason")
    replay.add_argument("--id", action="append", default=[], help="only this message id")
    replay.add_argument("--limit", type=int, help="replay at most this many")
    replay.add_argument("--max-replays", type=int, default=3, help="refuse records replayed more")
    replay.add_argument("--dry-run", action="store_true", help="say what would be replayed")
    replay.add_argument("--json", action="store_true")
    for operator in (show, forget, replay):
        operator.add_argument("--config", help="TOML file (default: $WORKER_CONFIG)")


def prepare(
    config_path: str | None, paths: Sequence[str] = ()
) -> tuple[Settings, dict[str, ResolvedRoute]]:
    """Everything that can be checked before joining the group; raises ConfigError."""
    settings = load_settings(config_path)
    search_path([(path, "--path") for path in paths] + [(path, "paths") for path in settings.paths])
    routes = resolve_routes(settings)
    _check_client_options(settings)
    if settings.inbox.url is not None:
        from idempotent_worker.inbox.cleanup import import_psycopg

        import_psycopg()
    if settings.tracing.enabled:
        from idempotent_worker.observe.tracing import require_otel

        require_otel()
    return settings, routes


def _operate(args: argparse.Namespace) -> int:
    """The operators' commands, on the worker's configuration (handlers not imported)."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"idempotent-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log, settings.secret_values())
    try:
        if args.command == "ids" and args.ids_command == "show":
            return show_ids(settings, args.ids, args.json, sys.stdout)
        if args.command == "ids":
            return forget_ids(settings, args.ids, args.force, sys.stdout)
        selection = Selection(args.reason, args.id, args.limit, args.max_replays)
        return replay(settings, args.topic, selection, args.dry_run, args.json)
    except StoreUnavailable as exc:
        print(f"idempotent-worker: the dedup store is unavailable: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


def _print_inbox_ddl(config_path: str | None) -> int:
    from idempotent_worker.config.settings import InboxSettings
    from idempotent_worker.inbox.sql import Table

    inbox = InboxSettings()
    if config_path or os.environ.get("WORKER_CONFIG"):
        try:
            inbox = load_settings(config_path).inbox
        except ConfigError as exc:
            print(f"idempotent-worker: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    for statement in Table(inbox.schema_, inbox.table).ddl():
        print(f"{statement};")
    return 0


def _check_client_options(settings: Settings) -> None:
    """Let librdkafka judge the passthrough options, as it would when the worker starts."""
    kafka = settings.kafka
    scrub = Scrubber(settings.secret_values()).scrub
    checks: list[tuple[type[Any], dict[str, Any], tuple[str, ...]]] = [
        (Consumer, {**kafka.consumer, "group.id": kafka.group_id}, ("consumer", "client")),
        (Producer, dict(kafka.producer), ("producer", "client")),
    ]
    for client_class, extra, tables in checks:
        try:
            # log_level 0: these throwaway clients must not report connection attempts.
            client = client_class(client_config(settings, {**extra, "log_level": 0}))
        except KafkaException as exc:
            text = scrub(exc.args[0].str())
            quoted = re.findall(r'"([^"]+)"', text)
            option = quoted[-1] if quoted else ""
            table = next((t for t in tables if option in getattr(kafka, t)), "client")
            key = f"kafka.{table}.{option}" if option else f"kafka.{table}"
            raise ConfigError(key, text) from None
        if isinstance(client, Consumer):
            client.close()


def run_worker(
    settings: Settings,
    routes: dict[str, ResolvedRoute],
    max_messages: int | None = None,
    idle_timeout: float | None = None,
) -> int:
    from idempotent_worker.processing.loop import Worker

    configure_logging(settings.log, settings.secret_values())
    log = get_logger()
    registry = CollectorRegistry()
    metrics = Metrics(registry, topics=routes)
    health = Health(stall_seconds=settings.kafka.max_poll_interval_seconds)
    metrics.ready.set_function(lambda: float(health.ready))
    store = open_store(settings.redis, settings.key_prefix, ttl_seconds=settings.dedup.ttl_seconds)
    server = HttpServer(settings.http.host, settings.http.port, registry, health)
    server.start()
    log.info(
        "starting",
        group=settings.kafka.group_id,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        redis=settings.redis.redacted_url(),
        redis_topology=settings.redis.topology(),
        min_replicas=settings.redis.min_replicas,
        key_prefix=settings.key_prefix,
        routes={topic: route.handler_path for topic, route in routes.items()},
        http=f"{settings.http.host}:{server.port}",
    )
    worker = Worker(
        settings,
        routes,
        store,
        metrics,
        health,
        max_messages=max_messages,
        idle_timeout=idle_timeout,
    )
    _install_signal_handlers(worker.stop, settings.shutdown.grace_seconds)
    try:
        worker.run()
    except ConfigError as exc:  # found once Redis answers, before joining the group
        log.error("configuration error", key=exc.key, problem=exc.problem)
        print(f"idempotent-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        health.stopped = True
        server.stop()
        store.close()
    if worker.fatal_error is not None:
        log.error("stopped on a fatal Kafka error", code=worker.fatal_error.name())
        return EXIT_RUNTIME
    log.info("stopped")
    return 0


def _install_signal_handlers(stop: Callable[[], None], grace_seconds: float) -> None:
    """First SIGTERM/SIGINT: drain within the grace period. Second SIGINT: exit at once."""
    stopping = threading.Event()

    def expire() -> None:
        print("idempotent-worker: shutdown grace period expired; exiting", file=sys.stderr)
        os._exit(EXIT_RUNTIME)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            if signum == signal.SIGINT:
                os._exit(128 + signum)
            return
        stopping.set()
        stop()
        timer = threading.Timer(grace_seconds, expire)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
