"""Configuration: defaults < TOML file < ``WORKER_`` environment variables.

Settings are frozen pydantic models, built once at start-up by :func:`load_settings`;
nothing here reads the environment at import time. Every validation error is
turned into a :class:`~idempotent_worker.errors.ConfigError` that names the dotted key and
never echoes the offending value, so secrets cannot leak through error output.
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from idempotent_worker.config.redis import RedisSettings
from idempotent_worker.config.routes import CombinationError, Route, Section
from idempotent_worker.errors import ConfigError

ClientValue = str | int | float | bool

# librdkafka options the worker sets itself: letting configuration override them would
# break the processing guarantees (auto commit, auto offset store) or the group identity.
MANAGED_CLIENT_OPTIONS = frozenset(
    {
        "bootstrap.servers",
        "group.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "enable.idempotence",
        "acks",
        "transactional.id",
    }
)
# Options that make the client run a command, load a shared library, or accept unsigned
# tokens: a configuration file must not be able to do that.
REFUSED_CLIENT_OPTIONS = frozenset(
    {
        "sasl.kerberos.kinit.cmd",
        "plugin.library.paths",
        "enable.sasl.oauthbearer.unsecure.jwt",
    }
)
SECRET_CLIENT_OPTION_MARKERS = ("password", "secret", "sasl.oauthbearer.config", "key.pem")

_config_file: ContextVar[Path | None] = ContextVar("_config_file", default=None)


class KafkaSettings(Section):
    bootstrap_servers: str = Field(min_length=1)
    """The brokers, ``host:port,host:port``."""
    group_id: str = Field(min_length=1)
    """The consumer group; the replicas share it."""
    client: dict[str, ClientValue] = Field(default_factory=dict)
    """Extra librdkafka options (security, tuning), applied to the consumer and the producer."""
    consumer: dict[str, ClientValue] = Field(default_factory=dict)
    """Extra librdkafka options for the consumer only (e.g. session.timeout.ms)."""
    producer: dict[str, ClientValue] = Field(default_factory=dict)
    """Extra librdkafka options for the producer only (e.g. compression.type)."""
    poll_batch_size: int = Field(default=500, ge=1, le=100_000)
    """Records per poll; their ids are claimed in one Redis round trip."""
    poll_timeout_seconds: float = Field(default=0.2, gt=0, le=10)
    """How long a poll waits for records."""
    commit_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    """How often offsets are committed (also on revoke and at shutdown)."""
    max_payload_bytes: int = Field(default=900_000, ge=1)
    """Larger values are dead-lettered without their value (reason payload_too_large)."""

    @field_validator("client", "consumer", "producer")
    @classmethod
    def _check_client(cls, client: dict[str, ClientValue]) -> dict[str, ClientValue]:
        for option in client:
            if option in MANAGED_CLIENT_OPTIONS:
                raise ValueError(f"'{option}' is set by the worker and cannot be overridden")
            if option in REFUSED_CLIENT_OPTIONS:
                raise ValueError(f"'{option}' is refused: it can run code or weaken authentication")
        return client

    @property
    def max_poll_interval_seconds(self) -> float:
        options = {**self.client, **self.consumer}
        return float(options.get("max.poll.interval.ms", 300_000)) / 1000


class DedupSettings(Section):
    key_prefix: str | None = Field(default=None, min_length=1)
    """Namespace of dedup keys; derived from the group id when unset."""
    ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    """How long a completed id is remembered (at most a quarter longer: records expire
    by windows)."""
    lease_seconds: float = Field(default=30.0, ge=1)
    """How long a claim in progress lives if its worker dies; renewed every third of it
    while the worker lives; at least 3 x ``redis.socket_timeout_seconds``."""
    complete_linger_ms: float = Field(default=5.0, ge=0, le=1000)
    """Handled messages are marked completed together, in one round trip, once the
    oldest has waited this long (and at the end of each poll batch). 0: each on its
    own. A replica that dies runs again at most what it handled in this window."""
    local_cache_size: int = Field(default=100_000, ge=0)
    """Completed ids remembered in the replica, to skip redeliveries without Redis."""
    on_payload_conflict: Literal["dead_letter", "skip"] = "dead_letter"
    """A completed id seen again with a different payload: dead-letter it (reason
    id_conflict) or skip it as a duplicate (counted with reason conflict)."""
    max_stored_reply_bytes: int = Field(default=65_536, ge=0)
    """The most output bytes (keys, values, headers) a completed record keeps for
    duplicates to replay (``on_duplicate = "replay"``); above it nothing is kept and
    duplicates are skipped (reason reply_not_kept)."""
    sequence_ttl_seconds: int | None = Field(default=None, ge=1)
    """How long a sequence route's entity position lives after its last advance; unset:
    until deleted. An entity whose position expired starts over: its next message sets
    the position, whatever its number."""


SqlName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,49}$")]
"""A PostgreSQL identifier the worker quotes as written (room left for index names)."""


class InboxSettings(Section):
    """The transactional inbox of database handlers (``ctx.inbox(conn)``)."""

    table: SqlName = "idempotent_worker_inbox"
    """The inbox table of ``ctx.inbox(conn)`` handlers (a plain identifier, kept in its case)."""
    schema_: SqlName = Field(default="public", alias="schema")
    """Its schema."""
    url: SecretStr | None = None
    """A PostgreSQL URL for the worker's own connection: it creates the table at
    start-up and deletes rows older than ``dedup.ttl_seconds``. Unset: the table is
    created on first use and nothing deletes old rows."""
    lock_timeout_ms: int = Field(default=2000, ge=0, le=600_000)
    """How long entering the inbox waits for another transaction holding the same id
    (a replica paused mid-transaction) before the message is retried with backoff."""
    max_output_bytes: int = Field(default=1_048_576, ge=0)
    """The most output bytes (keys, values, headers) one inbox row stores; a run that
    emits more fails permanently, its transaction rolled back, so nothing applied
    can lose its outputs."""
    cleanup_interval_seconds: float = Field(default=60.0, gt=0)
    """How often one replica deletes expired inbox rows."""
    cleanup_batch_size: int = Field(default=1000, ge=1, le=100_000)
    """Rows deleted per statement (each its own short transaction)."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None and urlsplit(url.get_secret_value()).scheme not in (
            "postgresql",
            "postgres",
        ):
            raise ValueError("must be a postgresql:// URL")
        return url


class RetrySettings(Section):
    max_attempts: int = Field(default=5, ge=1, le=1000)
    """Runs of a message's handler, over every replica and restart, before it is
    dead-lettered."""
    backoff_initial_seconds: float = Field(default=0.2, ge=0)
    """The first wait between attempts, doubled at each one."""
    backoff_max_seconds: float = Field(default=10.0, ge=0)
    """The longest wait between attempts."""


class HttpSettings(Section):
    host: str = "127.0.0.1"
    """Where ``/metrics``, ``/healthz`` and ``/readyz`` listen (``0.0.0.0`` in a container)."""
    port: int = Field(default=8080, ge=0, le=65535)
    """Their port."""


class LogSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """The lowest level logged."""
    format: Literal["json", "console"] = "json"
    """``json`` lines, or ``console`` for people."""


class TracingSettings(Section):
    enabled: bool = False
    """Export OpenTelemetry traces of every message (needs the ``[otel]`` extra)."""
    endpoint: str = Field(default="http://localhost:4318/v1/traces", pattern=r"^https?://\S+$")
    """The OTLP/HTTP traces endpoint."""
    protocol: Literal["http/protobuf"] = "http/protobuf"
    """The OTLP protocol."""
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    """Headers sent with every export (an API key): never logged."""
    sampler_ratio: float = Field(default=1.0, ge=0, le=1)
    """The share of traces started here that are sampled; a message whose producer's
    trace is sampled (or not) follows that decision."""
    service_name: str = Field(default="idempotent-worker", min_length=1)
    """The ``service.name`` resource attribute."""
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    """More resource attributes (``deployment.environment``, ...)."""


class ShutdownSettings(Section):
    grace_seconds: float = Field(default=30.0, gt=0)
    """How long the message in hand may take to finish after SIGTERM."""


class Settings(BaseSettings):
    """The whole configuration; see ``config/worker.toml`` for a commented example."""

    model_config = SettingsConfigDict(
        env_prefix="WORKER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    kafka: KafkaSettings
    redis: RedisSettings
    dedup: DedupSettings = DedupSettings()
    retry: RetrySettings = RetrySettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    inbox: InboxSettings = InboxSettings()
    tracing: TracingSettings = TracingSettings()
    paths: list[str] = []
    """Folders searched for handler modules, after the working directory and before the
    installed packages (as ``--path``); relative ones are relative to the working
    directory."""
    routes: list[Route] = Field(min_length=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file.get())
        return (init_settings, env_settings, toml)

    @field_validator("routes")
    @classmethod
    def _unique_topics(cls, routes: list[Route]) -> list[Route]:
        seen: set[str] = set()
        for route in routes:
            if route.topic in seen:
                raise ValueError(f"topic '{route.topic}' has more than one route")
            seen.add(route.topic)
        return routes

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        max_poll = self.kafka.max_poll_interval_seconds
        if self.dedup.lease_seconds >= max_poll:
            raise CombinationError(
                "dedup.lease_seconds",
                f"must be shorter than max.poll.interval.ms ({max_poll:g} s): waiting for "
                "another replica's claim can take a whole lease, and the consumer would "
                "be expelled from its group meanwhile",
            )
        if self.retry.backoff_max_seconds >= max_poll:
            raise CombinationError(
                "retry.backoff_max_seconds",
                f"must be shorter than max.poll.interval.ms ({max_poll:g} s)",
            )
        for index, route in enumerate(self.routes):
            if route.timeout_seconds is not None and route.timeout_seconds >= max_poll:
                raise CombinationError(
                    f"routes[{index}].timeout_seconds",
                    f"must be shorter than max.poll.interval.ms ({max_poll:g} s): the handler "
                    "runs on the polling thread, and the consumer would be expelled from its "
                    "group before the timeout fires",
                )
        socket_timeout = self.redis.socket_timeout_seconds
        if self.dedup.lease_seconds < 3 * socket_timeout:
            raise CombinationError(
                "dedup.lease_seconds",
                f"must be at least 3 x redis.socket_timeout_seconds ({3 * socket_timeout:g} s): "
                "leases are renewed every lease/3, and a renewal that times out must leave "
                "time for another before the lease runs out",
            )
        producer = {**self.kafka.client, **self.kafka.producer}
        message_max = int(producer.get("message.max.bytes", 1_000_000))
        if self.kafka.max_payload_bytes > message_max - 65_536:
            raise CombinationError(
                "kafka.max_payload_bytes",
                f"must leave 64 KiB under the producer's message.max.bytes ({message_max}) "
                "for the dead-letter headers, or a large message could not be dead-lettered",
            )
        if self.dedup.ttl_seconds <= self.dedup.lease_seconds:
            raise CombinationError("dedup.ttl_seconds", "must be longer than dedup.lease_seconds")
        if self.redis.cluster and ("{" in self.key_prefix or "}" in self.key_prefix):
            raise CombinationError(
                "dedup.key_prefix",
                "must not contain { or } with redis.cluster: the worker puts its own hash "
                "tag in every key",
            )
        return self

    def handler_timeout(self, route: Route) -> float:
        return route.timeout_seconds or 0.9 * self.kafka.max_poll_interval_seconds

    @property
    def key_prefix(self) -> str:
        return self.dedup.key_prefix or f"idempotent-worker:{self.kafka.group_id}"

    def secret_values(self) -> list[str]:
        """Every secret string in the configuration, for scrubbing output."""
        options = {**self.kafka.client, **self.kafka.consumer, **self.kafka.producer}
        secrets = [
            str(value)
            for option, value in options.items()
            if any(marker in option for marker in SECRET_CLIENT_OPTION_MARKERS) and str(value)
        ]
        password = urlsplit(self.redis.url.get_secret_value()).password
        if password:
            secrets.append(password)
        if self.redis.sentinel_password is not None:
            secrets.append(self.redis.sentinel_password.get_secret_value())
        if self.inbox.url is not None:
            secrets.append(urlsplit(self.inbox.url.get_secret_value()).password or "")
        secrets += [value.get_secret_value() for value in self.tracing.headers.values()]
        return [secret for secret in secrets if secret]


def load_settings(config_path: str | Path | None = None) -> Settings:
    """Build the settings from the TOML file (argument or ``WORKER_CONFIG``) and the environment.

    Raises :class:`ConfigError` naming the first offending key.
    """
    path_text = config_path or os.environ.get("WORKER_CONFIG")
    path = Path(path_text) if path_text else None
    if path is not None:
        if not path.is_file():
            raise ConfigError("config", f"file not found: {path}")
        try:
            tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    token = _config_file.set(path)
    try:
        return Settings()  # type: ignore[call-arg]  # fields come from the sources
    except ValidationError as exc:
        raise _to_config_error(exc) from None
    finally:
        _config_file.reset(token)


def _to_config_error(exc: ValidationError) -> ConfigError:
    error = exc.errors(include_input=False, include_url=False)[0]
    key = _dotted(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, CombinationError):
        # A key without a dot is relative to where the check ran (a route).
        relative = key and "." not in cause.key
        return ConfigError(f"{key}.{cause.key}" if relative else cause.key, str(cause))
    problem = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        problem = "unknown key"
    elif error["type"] == "missing":
        problem = "required key is missing"
    return ConfigError(key or "config", problem)


def _dotted(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def client_config(
    settings: Settings, extra: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """librdkafka configuration: the worker's defaults, the passthrough options over
    them, then ``extra`` (per-client options, and what the worker manages)."""
    return {
        **(defaults or {}),
        **settings.kafka.client,
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        **extra,
    }
