"""The ``[redis]`` section of the settings: how the dedup store is reached (one server,
Sentinel, or a Redis Cluster), and the checks that refuse a combination that cannot work.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from idempotent_worker.config.routes import CombinationError, Section


class RedisSettings(Section):
    url: SecretStr
    """``redis://``, ``rediss://`` (TLS) or ``unix://``; ``redis://user:password@host:6379/0``
    for an ACL user."""
    socket_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    """A Redis call slower than this counts as a store failure."""
    tls_ca_file: str | None = None
    """CA bundle for rediss:// when the server's certificate is not signed by a system CA."""
    allow_eviction: bool = False
    """Start even if Redis's maxmemory-policy can evict keys (forgotten ids)."""
    cluster: bool = False
    """``url`` names one node of a Redis Cluster; the worker discovers the others."""
    min_replicas: int = Field(default=0, ge=0, le=100)
    """Replicas that must acknowledge a claim or a completion (WAIT) before it counts;
    fewer is a store failure: the worker holds until they catch up."""
    replica_timeout_ms: int = Field(default=500, ge=1, le=60_000)
    """How long a write waits for ``min_replicas`` acknowledgements."""
    sentinel_master: str | None = Field(default=None, min_length=1)
    """Follow the primary the Sentinels know by this name; ``url`` then gives only the
    scheme (TLS), the credentials and the database."""
    sentinels: list[str] = Field(default_factory=list)
    """The Sentinels' addresses, ``host:port``."""
    sentinel_username: str | None = None
    """The Sentinels' own user, when they require one."""
    sentinel_password: SecretStr | None = None
    """Credentials of the Sentinels themselves, when they require them."""
    sentinel_tls: bool = False
    """Speak TLS to the Sentinels (with ``tls_ca_file`` if set)."""

    @field_validator("sentinels")
    @classmethod
    def _check_sentinels(cls, sentinels: list[str]) -> list[str]:
        for address in sentinels:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"'{address}' is not host:port")
        return sentinels

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in self.sentinels]

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: SecretStr) -> SecretStr:
        scheme = urlsplit(url.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return url

    @model_validator(mode="after")
    def _check_topology(self) -> RedisSettings:
        if bool(self.sentinel_master) != bool(self.sentinels):
            key = "redis.sentinels" if self.sentinel_master else "redis.sentinel_master"
            raise CombinationError(
                key, "redis.sentinel_master and redis.sentinels are set together, or neither"
            )
        if self.sentinel_master and self.cluster:
            raise CombinationError(
                "redis.sentinel_master", "a Redis Cluster fails over by itself: not with Sentinel"
            )
        if self.sentinel_master and urlsplit(self.url.get_secret_value()).scheme == "unix":
            raise CombinationError(
                "redis.url", "must be a redis:// or rediss:// URL with redis.sentinel_master"
            )
        if self.min_replicas and self.replica_timeout_ms >= 1000 * self.socket_timeout_seconds:
            raise CombinationError(
                "redis.replica_timeout_ms",
                "must be shorter than redis.socket_timeout_seconds: a WAIT for replicas that "
                "runs out must answer before the client gives up on the connection",
            )
        if self.cluster:
            parts = urlsplit(self.url.get_secret_value())
            if parts.scheme == "unix":
                raise CombinationError(
                    "redis.url", "must be a redis:// or rediss:// URL with redis.cluster"
                )
            if parts.path.strip("/") not in ("", "0"):
                raise CombinationError(
                    "redis.url", "a Redis Cluster has only database 0 (redis.cluster is set)"
                )
        return self

    def topology(self) -> str:
        """How the store is reached, for a log line: one server, Sentinel or a cluster."""
        if self.sentinel_master:
            return f"sentinel master {self.sentinel_master} via {', '.join(self.sentinels)}"
        return "cluster" if self.cluster else "one server"

    def redacted_url(self) -> str:
        """The URL with any password replaced, fit for a log line."""
        parts = urlsplit(self.url.get_secret_value())
        if parts.password is None:
            return parts.geturl()
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()
