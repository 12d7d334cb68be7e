"""The real command line, as a subprocess: configuration errors stop it before it joins a group."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECRETS = ["kafka-sasl-pw-5531", "redis-pw-8812", "ssl-key-pw-0043", "oauth-secret-7730"]

GOOD = f"""
[kafka]
bootstrap_servers = "127.0.0.1:1"
group_id = "g"

[kafka.client]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "SCRAM-SHA-512"
"sasl.username" = "worker"
"sasl.password" = "{SECRETS[0]}"
"ssl.key.password" = "{SECRETS[2]}"

[redis]
url = "redis://worker:{SECRETS[1]}@127.0.0.1:1/0"

[[routes]]
topic = "orders"
handler = "idempotent_worker.examples.orders:handle"
"""


def cli(*args, env=None, timeout=60):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    return subprocess.run(
        [sys.executable, "-m", "idempotent_worker", *args],
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write(tmp_path, text):
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return str(path)


def assert_no_secret(result):
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr


def test_good_config_passes(tmp_path):
    result = cli("check-config", "--config", write(tmp_path, GOOD))
    assert result.returncode == 0, result.stderr
    assert "configuration OK: 1 route(s): orders" in result.stdout
    assert_no_secret(result)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (
            lambda t: t.replace(
                "idempotent_worker.examples.orders:handle", "handlers.nowhere:handle"
            ),
            "routes[0].handler",
        ),
        (
            lambda t: t.replace(
                "idempotent_worker.examples.orders:handle", "handlers.orders:missing"
            ),
            "routes[0].handler",
        ),
        (lambda t: t.replace('group_id = "g"', 'group_id = "g"\nretries = 3'), "kafka.retries"),
        (lambda t: t.replace('bootstrap_servers = "127.0.0.1:1"\n', ""), "kafka.bootstrap_servers"),
        (lambda t: t.replace('"SASL_SSL"', '"SASL_BOGUS"'), "kafka.client.security.protocol"),
        (lambda t: t.replace('"sasl.username"', '"sasl.usernme"'), "kafka.client.sasl.usernme"),
        (
            lambda t: t + '\n[kafka.consumer]\n"plugin.library.paths" = "/tmp/x.so"\n',
            "kafka.consumer",
        ),
        (
            lambda t: t.replace(
                "[kafka.client]",
                '[kafka.client]\n"sasl.oauthbearer.client.secret" = '
                f'"{SECRETS[3]}"\n"sasl.oauthbearer.method" = "nonsense"',
            ),
            "kafka.client.sasl.oauthbearer.method",
        ),
    ],
)
def test_bad_config_exits_2_naming_the_key_without_secrets(tmp_path, edit, key):
    result = cli("check-config", "--config", write(tmp_path, edit(GOOD)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"idempotent-worker: configuration error: {key}:")
    assert_no_secret(result)


def test_environment_errors_name_the_key(tmp_path):
    result = cli(
        "check-config",
        "--config",
        write(tmp_path, GOOD),
        env={"WORKER_DEDUP__LEASE_SECONDS": "not-a-number"},
    )
    assert result.returncode == 2
    assert "dedup.lease_seconds" in result.stderr


def test_run_refuses_bad_config_before_joining(tmp_path):
    text = GOOD.replace("idempotent_worker.examples.orders:handle", "handlers.nowhere:handle")
    result = cli("run", "--config", write(tmp_path, text))
    assert result.returncode == 2
    assert "routes[0].handler" in result.stderr
    assert_no_secret(result)


@pytest.mark.integration
def test_generate_publishes_rounds_with_the_asked_duplicate_share(
    kafka_bootstrap, unique_name, make_topics
):
    from idempotent_worker.local.demo import read_all

    topic = unique_name("traffic")
    make_topics({topic: 3})
    result = cli(
        "generate",
        *("--bootstrap-servers", kafka_bootstrap, "--topic", topic, "--partitions", "3"),
        *("--batch", "200", "--duplicate-share", "0.25", "--rounds", "2", "--interval", "0"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("150 new ids, 50 duplicates") == 2
    ids = [headers["message-id"] for headers, _ in read_all(kafka_bootstrap, topic)]
    assert len(ids) == 400
    assert len(set(ids)) == 300  # each round's ids are new


def test_generate_refuses_an_impossible_share():
    result = cli("generate", "--bootstrap-servers", "127.0.0.1:1", "--duplicate-share", "1")
    assert result.returncode == 2
    assert "--duplicate-share" in result.stderr


CONSOLE = Path(sys.executable).with_name("idempotent-worker")


def user_project(root: Path, package: str, *, init: bool) -> None:
    """The README's layout: ``<package>/payments.py`` (a package without an
    ``__init__.py`` unless ``init``) and ``worker.toml`` naming its handler."""
    (root / package).mkdir(parents=True)
    if init:
        (root / package / "__init__.py").write_text("")
    (root / package / "payments.py").write_text(
        (REPO / "examples" / "handlers" / "payments.py").read_text()
    )
    (root / "worker.toml").write_text(
        GOOD.replace("idempotent_worker.examples.orders:handle", f"{package}.payments:handle")
    )


@pytest.mark.parametrize("init", [False, True])
def test_handlers_beside_the_config_are_found_from_the_working_directory(tmp_path, init):
    # The console script's own folder is first on its path, not the working directory.
    user_project(tmp_path, "handlers", init=init)
    result = subprocess.run(
        [str(CONSOLE), "check-config", "--config", "worker.toml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "configuration OK: 1 route(s): orders" in result.stdout


def test_path_adds_folders_to_search_and_an_import_failure_says_where_it_looked(tmp_path):
    user_project(tmp_path / "src", "billing", init=False)
    config = str(tmp_path / "src" / "worker.toml")
    run = lambda *args: subprocess.run(  # noqa: E731
        [str(CONSOLE), "check-config", "--config", config, *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    missing = run()
    assert missing.returncode == 2
    assert "routes[0].handler: cannot import module 'billing.payments'" in missing.stderr
    assert f"searched {tmp_path}" in missing.stderr  # the working directory
    assert "ModuleNotFoundError" in missing.stderr
    assert run("--path", "src").returncode == 0
    keyed = cli("check-config", "--config", config, env={"WORKER_PATHS": f'["{tmp_path}/src"]'})
    assert keyed.returncode == 0, keyed.stderr
    nowhere = run("--path", "nowhere")
    assert nowhere.returncode == 2 and "--path: not a directory: nowhere" in nowhere.stderr
