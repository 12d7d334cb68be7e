import pytest

from idempotent_worker.config.settings import client_config, load_settings
from idempotent_worker.errors import ConfigError
from idempotent_worker.kafka.consumer import CONSUMER_DEFAULTS

MINIMAL = """
[kafka]
bootstrap_servers = "localhost:9092"
group_id = "orders"

[redis]
url = "redis://:s3cret-redis@localhost:6379/0"

[[routes]]
topic = "orders"
handler = "idempotent_worker.examples.orders:handle"
"""


@pytest.fixture
def config(tmp_path, monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("WORKER_"):
            monkeypatch.delenv(name)

    def write(text=MINIMAL):
        path = tmp_path / "worker.toml"
        path.write_text(text)
        return path

    return write


def with_redis(*lines, url="redis://:s3cret-redis@localhost:6379/0"):
    """MINIMAL with ``url`` and more ``lines`` in its [redis] table."""
    return MINIMAL.replace(
        'url = "redis://:s3cret-redis@localhost:6379/0"', "\n".join([f'url = "{url}"', *lines])
    )


def error_for(path):
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value


def test_defaults_and_derived_values(config):
    settings = load_settings(config())
    assert settings.key_prefix == "idempotent-worker:orders"
    assert settings.routes[0].dead_letter_topic == "orders.dlq"
    assert settings.routes[0].id == "header:message-id"
    assert settings.http.host == "127.0.0.1"
    assert settings.redis.redacted_url() == "redis://:***@localhost:6379/0"
    assert settings.secret_values() == ["s3cret-redis"]


def test_environment_wins_over_file(config, monkeypatch):
    monkeypatch.setenv("WORKER_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("WORKER_DEDUP__LEASE_SECONDS", "12")
    monkeypatch.setenv("WORKER_ROUTES", '[{"topic": "a", "handler": "m:f", "id": "key"}]')
    settings = load_settings(config())
    assert settings.kafka.group_id == "from-env"
    assert settings.dedup.lease_seconds == 12
    assert [r.topic for r in settings.routes] == ["a"]


def test_config_path_from_environment(config, monkeypatch):
    monkeypatch.setenv("WORKER_CONFIG", str(config()))
    assert load_settings().kafka.group_id == "orders"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            MINIMAL.replace('bootstrap_servers = "localhost:9092"\n', ""),
            "kafka.bootstrap_servers",
            "missing",
        ),
        (MINIMAL + "\n[dedup]\nttl = 5\n", "dedup.ttl", "unknown key"),
        (
            MINIMAL.replace(
                'handler = "idempotent_worker.examples.orders:handle"', 'handler = "no colon"'
            ),
            "routes[0].handler",
            "",
        ),
        (MINIMAL + 'id = "header:"\n', "routes[0].id", "not an id spec"),
        (MINIMAL + 'dlq_topic = "orders dlq"\n', "routes[0].dlq_topic", "should match pattern"),
        (MINIMAL.replace("redis://", "http://"), "redis.url", "redis://"),
        (
            MINIMAL + '\n[kafka.client]\n"enable.auto.commit" = true\n',
            "kafka.client",
            "set by the worker",
        ),
        (
            MINIMAL + '\n[kafka.client]\n"sasl.kerberos.kinit.cmd" = "sh"\n',
            "kafka.client",
            "refused",
        ),
        (
            MINIMAL + "\n[dedup]\nlease_seconds = 400\n",
            "dedup.lease_seconds",
            "max.poll.interval.ms",
        ),
        (
            MINIMAL + "\n[dedup]\nttl_seconds = 10\nlease_seconds = 20\n",
            "dedup.ttl_seconds",
            "longer",
        ),
        (
            MINIMAL + '\n[[routes]]\ntopic = "orders"\nhandler = "a:b"\n',
            "routes",
            "more than one route",
        ),
        (
            MINIMAL.replace(
                'handler = "idempotent_worker.examples.orders:handle"',
                'handler = "a:b"\ntimeout_seconds = 300',
            ),
            "routes[0].timeout_seconds",
            "polling thread",
        ),
        (
            MINIMAL + "\n[dedup]\nlease_seconds = 5\n",
            "dedup.lease_seconds",
            "3 x redis.socket_timeout_seconds",
        ),
        (
            MINIMAL.replace(
                'group_id = "orders"', 'group_id = "orders"\nmax_payload_bytes = 990000'
            ),
            "kafka.max_payload_bytes",
            "message.max.bytes",
        ),
        (MINIMAL.split("[[routes]]")[0], "routes", "missing"),
        (
            with_redis("cluster = true", url="redis://:s3cret-redis@localhost:6379/1"),
            "redis.url",
            "only database 0",
        ),
        (
            with_redis("cluster = true", url="unix:///tmp/s3cret-redis.sock"),
            "redis.url",
            "redis.cluster",
        ),
        (
            with_redis("cluster = true") + '\n[dedup]\nkey_prefix = "{orders}"\n',
            "dedup.key_prefix",
            "hash tag",
        ),
        (with_redis('sentinel_master = "dedup"'), "redis.sentinels", "together"),
        (with_redis('sentinels = ["a:26379"]'), "redis.sentinel_master", "together"),
        (
            with_redis('sentinel_master = "dedup"', 'sentinels = ["a:26379", "b"]'),
            "redis.sentinels",
            "'b' is not host:port",
        ),
        (
            with_redis('sentinel_master = "dedup"', 'sentinels = ["a:1"]', "cluster = true"),
            "redis.sentinel_master",
            "not with Sentinel",
        ),
        (
            with_redis("min_replicas = 1", "replica_timeout_ms = 2000"),
            "redis.replica_timeout_ms",
            "socket_timeout_seconds",
        ),
        (MINIMAL + 'dedup = "sequence"\nsequence = "header:v"\n', "routes[0].entity", "required"),
        (MINIMAL + 'dedup = "sequence"\nentity = "key"\n', "routes[0].sequence", "required"),
        (MINIMAL + 'entity = "key"\n', "routes[0].entity", 'dedup = "sequence"'),
        (MINIMAL + 'on_gap = "dead_letter"\n', "routes[0].on_gap", 'dedup = "sequence"'),
        (
            MINIMAL + 'dedup = "sequence"\nentity = "hash"\nsequence = "header:v"\n',
            "routes[0].entity",
            "not an entity spec",
        ),
        (
            MINIMAL + 'dedup = "sequence"\nentity = "key"\nsequence = "key"\n',
            "routes[0].sequence",
            "not a sequence spec",
        ),
        (
            MINIMAL + 'dedup = "sequence"\nentity = "key"\nsequence = "json:v"\n'
            'on_duplicate = "replay"\n',
            "routes[0].on_duplicate",
            "nothing to replay",
        ),
        (
            MINIMAL + '[routes.emit_cloudevents]\nsource = "/my shop"\ntype = "t"\n',
            "routes[0].emit_cloudevents.source",
            "pattern",
        ),
        (
            MINIMAL + '[routes.emit_cloudevents]\nsource = "/s"\n',
            "routes[0].emit_cloudevents.type",
            "required",
        ),
        (
            MINIMAL.replace("[[routes]]", "[tracing]\nsampler_ratio = 2\n\n[[routes]]"),
            "tracing.sampler_ratio",
            "less than or equal",
        ),
        (
            MINIMAL.replace("[[routes]]", '[tracing]\nendpoint = "localhost:4318"\n\n[[routes]]'),
            "tracing.endpoint",
            "pattern",
        ),
        (MINIMAL + "[[[", "config", "not valid TOML"),
    ],
)
def test_invalid_configuration_names_the_key(config, text, key, problem):
    error = error_for(config(text))
    assert error.key == key
    assert problem in error.problem
    assert "s3cret-redis" not in str(error)


def test_missing_file_is_reported(tmp_path):
    error = error_for(tmp_path / "nope.toml")
    assert error.key == "config"
    assert "not found" in error.problem


def test_client_options_override_the_defaults_and_never_what_the_worker_manages(config):
    path = config(
        MINIMAL.replace(
            "[redis]",
            '[kafka.client]\n"auto.offset.reset" = "latest"\n"linger.ms" = 50\n'
            '[kafka.consumer]\n"queued.max.messages.kbytes" = 1024\n[redis]',
        )
    )
    settings = load_settings(path)
    managed = {**settings.kafka.consumer, "group.id": "orders"}
    consumer = client_config(settings, managed, CONSUMER_DEFAULTS)
    assert consumer["auto.offset.reset"] == "latest"  # kafka.client over a default
    assert consumer["queued.max.messages.kbytes"] == 1024  # kafka.consumer over both
    assert consumer["statistics.interval.ms"] == CONSUMER_DEFAULTS["statistics.interval.ms"]
    assert consumer["bootstrap.servers"] == "localhost:9092"
    assert client_config(settings, {})["linger.ms"] == 50


def test_sentinel_settings_and_their_secret(config):
    settings = load_settings(
        config(
            with_redis(
                'sentinel_master = "dedup"',
                'sentinels = ["10.0.0.1:26379", "sentinel-2:26380"]',
                'sentinel_password = "s3cret-sentinel"',
                "min_replicas = 1",
                url="rediss://:s3cret-redis@ignored/2",
            )
        )
    )
    assert settings.redis.sentinel_addresses() == [("10.0.0.1", 26379), ("sentinel-2", 26380)]
    assert {"s3cret-sentinel", "s3cret-redis"} <= set(settings.secret_values())
    assert "s3cret-sentinel" not in repr(settings)


def test_tracing_without_the_otel_extra_stops_start_up_naming_the_key(monkeypatch):
    from idempotent_worker.config.settings import TracingSettings
    from idempotent_worker.observe.tracing import start_tracing

    assert start_tracing(TracingSettings(), "g") is None  # off: nothing imported
    monkeypatch.setitem(__import__("sys").modules, "opentelemetry", None)  # not installed
    with pytest.raises(ConfigError) as caught:
        start_tracing(TracingSettings(enabled=True), "g")
    assert caught.value.key == "tracing.enabled"
    assert "idempotent-worker[otel]" in caught.value.problem
