"""Security on real servers: a TLS ``redis-server`` with an ACL user, and a worker run
at DEBUG with a secret in every secret-bearing setting and credentials that fail."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme

from idempotent_worker.local import embedded
from idempotent_worker.local.demo import spawn_worker, worker_env
from tests.support.kafka import produce, with_id

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "acl-pw-4420"
# What the worker needs, and nothing else: its own keys, the scripts and the commands
# they run, PING, and CONFIG GET for the maxmemory-policy check. No FLUSHALL, no KEYS.
ACL = (
    f"worker on >{PASSWORD} ~idempotent-worker:* resetchannels -@all "
    "+ping +get +set +del +hmget +hset +hdel +hsetnx +hgetall +zadd +zrangebyscore "
    "+zremrangebyscore +zrem +exists +pexpireat +pttl +incr +time +eval +evalsha +script|load "
    "+config|get"
)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks only TLS and knows only the ACL user ``worker``:
    (port, the CA file that signed its certificate)."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.cert_chain_pems[0].write_to_path(str(cert_file))
    server.private_key_pem.write_to_path(str(key_file))
    config = tmp_path / "redis.conf"
    config.write_text(f"user default off\nuser {ACL}\n")
    port = embedded.free_port()
    argv = [
        embedded.redis_binary(),
        str(config),
        *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
        *("--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file)),
        *("--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no"),
        *("--save", "", "--dir", str(tmp_path), "--maxmemory-policy", "noeviction"),
    ]
    with embedded.LocalService("redis-server (TLS)", argv, port, tmp_path / "redis.log"):
        yield port, ca_file


@pytest.fixture
def topic(unique_name, make_topics):
    name = unique_name("in")
    make_topics({name: 3, f"{name}.dlq": 1})
    return name


def test_rediss_with_an_acl_user(kafka_bootstrap, unique_name, topic, ledger, tls_redis, tmp_path):
    port, ca_file = tls_redis
    routes = [{"topic": topic, "handler": "tests.support.handlers:ledger"}]
    env = worker_env(
        kafka_bootstrap,
        f"rediss://worker:{PASSWORD}@127.0.0.1:{port}/0",
        unique_name("group"),
        embedded.free_port(),
        routes,
        WORKER_REDIS__TLS_CA_FILE=str(ca_file),
        LEDGER_PATH=str(ledger.path),
    )
    process = spawn_worker(env, tmp_path / "worker.log", cwd=REPO)
    try:
        produce(kafka_bootstrap, topic, [with_id(f"s-{n % 20}", n % 3) for n in range(40)])
        deadline = time.monotonic() + 60
        while len(ledger.runs()) < 20:
            assert process.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0
    assert ledger.runs() == {f"s-{n}": 1 for n in range(20)}
    user = redis.Redis(
        port=port, ssl=True, ssl_ca_certs=str(ca_file), username="worker", password=PASSWORD
    )
    with user, pytest.raises(redis.exceptions.NoPermissionError):
        user.flushall()  # the worker's user cannot empty the store
    log = (tmp_path / "worker.log").read_text()
    assert PASSWORD not in log
    assert "rediss://worker:***@" in log
    # Every script ran under the ACL: no call was refused (the handlers ran all the same
    # when only the completions failed, which is how EXISTS went missing from it).
    assert "dedup store" not in log, log[-2000:]


SECRETS = {
    "sasl.password": "sasl-pw-1187",
    "ssl.key.password": "ssl-key-pw-2290",
    "ssl.keystore.password": "keystore-pw-3371",
    "sasl.oauthbearer.client.secret": "oauth-secret-4462",
    "redis": "redis-pw-5553",
}


def test_no_secret_reaches_the_logs_at_debug_with_failing_credentials(
    kafka_bootstrap, unique_name, topic, ledger, tls_redis, tmp_path
):
    port, ca_file = tls_redis
    client = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "worker",
        "debug": "security,broker,conf",  # librdkafka's own debug output too
        **{option: secret for option, secret in SECRETS.items() if option != "redis"},
    }
    routes = [{"topic": topic, "handler": "tests.support.handlers:ledger"}]
    env = worker_env(
        kafka_bootstrap,
        f"rediss://worker:{SECRETS['redis']}@127.0.0.1:{port}/0",  # the wrong password
        unique_name("group"),
        embedded.free_port(),
        routes,
        WORKER_REDIS__TLS_CA_FILE=str(ca_file),
        WORKER_KAFKA__CLIENT=json.dumps(client),
        WORKER_LOG__LEVEL="DEBUG",
        LEDGER_PATH=str(ledger.path),
    )
    process = spawn_worker(env, tmp_path / "worker.log", cwd=REPO)
    deadline = time.monotonic() + 30
    while not all(
        refusal in (tmp_path / "worker.log").read_text()
        for refusal in ("invalid username-password pair", "_AUTHENTICATION")
    ):  # both refused it: Redis (the wrong password) and the broker (SCRAM)
        assert time.monotonic() < deadline, "the credentials were not refused"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    log = (tmp_path / "worker.log").read_text()
    # Both refused the credentials, and the worker said so; librdkafka dumped its
    # configuration (the secret options redacted).
    assert "invalid username-password pair" in log
    assert "_AUTHENTICATION" in log
    assert "sasl.password = [redacted]" in log
    for secret in SECRETS.values():
        assert secret not in log
    assert ledger.runs() == {}
