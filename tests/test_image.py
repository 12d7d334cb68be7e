"""The image tier: the project's container image built from the Dockerfile with podman
and run as users run it, two containers against the test's broker and Redis.

Skipped, with the reason, where podman is missing or cannot run containers; the
machines the suite runs on have it (scripts/setup.sh installs podman, runc and
debootstrap). See tests/support/images.py for the stand-in base image.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from pathlib import Path

import pytest

from idempotent_worker.local import embedded
from idempotent_worker.local.demo import FAST_CONSUMER, metric_sum, scrape, wait_for_group
from tests.support import figures, images
from tests.support.chaos import message_ids
from tests.support.kafka import Record, group_lag, produce

pytestmark = [pytest.mark.image, pytest.mark.integration]

TAG = "localhost/idempotent-worker:test"
PARTITIONS = 6
GRACE_SECONDS = 20


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    reason = images.unavailable()
    if reason is not None:
        pytest.skip(reason)
    base = images.ensure_base()
    reason = images.cannot_run(base.reference)
    if reason is not None:
        pytest.skip(reason)
    seconds = images.build(TAG, tmp_path_factory.mktemp("image"))
    figures.record(
        f"image: base {base.reference} ({base.origin}, {base.seconds:.0f} s), "
        f"image built in {seconds:.0f} s (podman reuses unchanged layers), "
        f"{images.size_mb(TAG):.0f} MB ({images.size_mb(base.reference):.0f} MB of it the base)"
    )
    return TAG


HANDLER = '''
def handle(message, ctx):
    """Mounted under /app: emits the value once per run, keyed as it came."""
    ctx.emit(message.value, key=message.key)
'''


def readable(path: Path, text: str) -> Path:
    """``text`` in ``path``, readable by the image's user (uid 10001)."""
    path.write_text(text)
    path.chmod(0o644)
    return path


MOUNTED = ["/app", "/etc/idempotent-worker/worker.toml", "/etc/hosts", "/etc/hostname",
           "/etc/resolv.conf", "/run/.containerenv"]  # fmt: skip
"""What podman mounts into a container: it creates their mount points."""


def written(name: str, mounted: list[str]) -> list[str]:
    """What ``podman diff`` finds changed in the container's root filesystem, other than
    the mount points (and the directories holding them)."""
    allowed = {str(parent) for path in mounted for parent in [Path(path), *Path(path).parents]}
    changes = images.podman("diff", name).stdout.split()
    return [path for path in changes[1::2] if path not in allowed]


def traffic(count: int, duplicate_share: float, seed: int = 3) -> tuple[list[Record], set[str]]:
    """``count`` orders, ``duplicate_share`` of them repeating an earlier id."""
    rng = random.Random(seed)
    records: list[Record] = []
    ids: list[str] = []
    for n in range(count):
        if ids and rng.random() < duplicate_share:
            id = rng.choice(ids)
        else:
            id = f"order-{n}"
            ids.append(id)
        value = json.dumps({"id": id, "amount": int(id.split("-")[1])})  # a duplicate's too
        records.append(Record(value, id, {"message-id": id}, partition=rng.randrange(PARTITIONS)))
    return records, set(ids)


def test_two_read_only_containers_handle_each_id_once_and_stop_on_sigterm(
    image, kafka_bootstrap, redis_url, make_topics, unique_name, tmp_path
):
    topic, group = unique_name("in"), unique_name("group")
    output = f"{topic}.out"
    make_topics({topic: PARTITIONS, output: PARTITIONS, f"{topic}.dlq": 1})
    app = tmp_path / "app"
    app.mkdir(mode=0o755)
    app.chmod(0o755)
    # A package without an __init__.py, as the README's layout allows: /app is the
    # working directory, which is on the import path.
    (app / "handlers").mkdir(mode=0o755)
    (app / "handlers").chmod(0o755)
    readable(app / "handlers" / "image.py", HANDLER)
    config = readable(
        tmp_path / "worker.toml",
        f"""
[kafka]
bootstrap_servers = "{kafka_bootstrap}"

[redis]
url = "{redis_url}"

[[routes]]
topic = "{topic}"
handler = "handlers.image:handle"
output_topic = "{output}"
""",
    )
    ports = [embedded.free_port() for _ in range(2)]
    names = [f"iw-{uuid.uuid4().hex[:8]}" for _ in ports]
    try:
        for name, port in zip(names, ports, strict=True):
            images.podman(
                "run", "--detach", "--name", name, "--read-only", "--network", "host",
                *images.LIMITS,
                "--env", f"WORKER_KAFKA__GROUP_ID={group}",
                "--env", f"WORKER_KAFKA__CONSUMER={json.dumps(FAST_CONSUMER)}",
                "--env", f"WORKER_HTTP__PORT={port}",
                "--env", f"WORKER_SHUTDOWN__GRACE_SECONDS={GRACE_SECONDS // 2}",
                "--volume", f"{config}:/etc/idempotent-worker/worker.toml:ro",
                "--volume", f"{app}:/app:ro",
                image,
            )  # fmt: skip
        wait_for_group(ports, PARTITIONS, timeout=90)

        records, ids = traffic(2000, 0.3)
        produce(kafka_bootstrap, topic, records)
        deadline = time.monotonic() + 120
        while not (
            set(message_ids(kafka_bootstrap, output)) >= {f"{id}:0" for id in ids}
            and group_lag(kafka_bootstrap, group, topic) == 0
        ):
            assert time.monotonic() < deadline, "the containers did not handle every message"
            time.sleep(1)

        outputs = message_ids(kafka_bootstrap, output)
        assert set(outputs) == {f"{id}:0" for id in ids}
        assert [id for id, count in outputs.items() if count > 1] == []  # each handled once
        samples = [scrape(port) for port in ports]
        skipped = metric_sum(samples, "idempotent_worker_duplicates_skipped_total", topic=topic)
        assert skipped == len(records) - len(ids)
        assert all(metric_sum([s], "idempotent_worker_messages_consumed_total") for s in samples)

        for name in names:
            assert images.podman("healthcheck", "run", name, check=False).returncode == 0
            status = images.podman("exec", name, "cat", "/proc/1/status").stdout
            assert re.search(r"^Uid:\s+10001\s", status, re.M), status
            assert written(name, MOUNTED) == []

        for name in names:
            started = time.monotonic()
            images.podman("stop", "--time", str(GRACE_SECONDS), name)
            stopped_in = time.monotonic() - started
            code = images.podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout
            assert int(code) == 0, images.podman("logs", name).stderr[-3000:]
            assert stopped_in < GRACE_SECONDS
        figures.record(
            f"image: 2 containers, {len(records)} messages, {len(ids)} ids: each output once, "
            f"{int(skipped)} duplicates skipped, healthcheck passed, uid 10001, root "
            f"filesystem untouched, stopped by SIGTERM with exit 0 in {stopped_in:.1f} s"
        )
    finally:
        for name in names:
            images.podman("rm", "--force", name, check=False)


def test_the_tier_says_why_it_cannot_run_where_podman_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = images.unavailable()
    assert reason is not None and "podman is not installed" in reason
