"""The operators' commands against a real broker and Redis: ``dlq replay``, ``ids show``
and ``ids forget``, run through the command line's entry point."""

from __future__ import annotations

import json
import time

import pytest

from idempotent_worker.dedup.redis import RedisDedupStore
from idempotent_worker.local.demo import read_all
from idempotent_worker.ops.cli import main
from tests.support.harness import Run, make_settings, run_worker
from tests.support.kafka import dead_letter, produce, with_id

pytestmark = pytest.mark.integration


@pytest.fixture
def env(kafka_bootstrap, redis_url, unique_name, make_topics, tmp_path, monkeypatch):
    topic = unique_name("in")
    group = unique_name("group")
    make_topics({topic: 2, f"{topic}.dlq": 1})
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\ngroup_id = "{group}"\n'
        f'[redis]\nurl = "{redis_url}"\n[dedup]\nkey_prefix = "test:{group}"\n'
        f'[[routes]]\ntopic = "{topic}"\nhandler = "tests.support.handlers:ledger"\n'
    )

    class Env:
        input = topic
        dlq = f"{topic}.dlq"

        def settings(self, handler):
            route = {"topic": topic, "handler": f"tests.support.handlers:{handler}"}
            return make_settings(kafka_bootstrap, redis_url, group, [route])

        def cli(self, capsys, *args):
            capsys.readouterr()  # what the in-process workers printed before
            code = main([*args, "--config", str(config)])
            return code, capsys.readouterr().out

    return Env()


def test_dead_letters_are_replayed_once_each_after_the_fix(
    env, kafka_bootstrap, ledger, capsys, monkeypatch
):
    rejected = [f"r-{n}" for n in range(5)]
    produce(
        kafka_bootstrap, env.input, [with_id(id, partition=n % 2) for n, id in enumerate(rejected)]
    )
    produce(kafka_bootstrap, env.input, [with_id("fine")])
    monkeypatch.setenv("REJECT_IDS", ",".join(rejected))
    run_worker(env.settings("rejects_listed"), max_messages=6)
    assert ledger.runs() == {"fine": 1}
    produce(
        kafka_bootstrap,
        env.dlq,
        [
            dead_letter(env.input, "dropped", "permanent_failure", **{"dlq-value-dropped": "true"}),
            dead_letter(env.input, "later", "handler_failed"),
            dead_letter(env.input, "tired", "permanent_failure", **{"replay-count": "3"}),
        ],
    )

    code, out = env.cli(
        capsys,
        "dlq",
        "replay",
        "--topic",
        env.dlq,
        "--id",
        "r-1",
        "--id",
        "r-2",
        "--dry-run",
        "--json",
    )
    dry = json.loads(out)
    assert code == 0 and dry["dry_run"] and len(dry["replayed"]) == 2
    assert read_all(kafka_bootstrap, env.input, idle=1.0).__len__() == 6  # nothing published

    code, out = env.cli(
        capsys, "dlq", "replay", "--topic", env.dlq, "--reason", "permanent_failure", "--json"
    )
    summary = json.loads(out)
    assert code == 0
    assert summary["selected"] == 7 and len(summary["replayed"]) == 5
    assert {k: len(v) for k, v in summary["refused"].items()} == {
        "value_dropped": 1,
        "max_replays": 1,
    }
    replays = [h for h, _ in read_all(kafka_bootstrap, env.input) if "replay-of" in h]
    assert sorted(h["message-id"].decode() for h in replays) == rejected
    assert all(
        h["replay-count"] == b"1" and not any(k.startswith("dlq-") for k in h) for h in replays
    )

    run_worker(env.settings("ledger"), max_messages=5)  # the fixed handler
    assert ledger.runs() == {"fine": 1, **{id: 1 for id in rejected}}

    code, out = env.cli(
        capsys, "dlq", "replay", "--topic", env.dlq, "--reason", "permanent_failure"
    )
    assert out.splitlines()[-1] == (
        # The dropped value was passed for good; the tired record stays for a higher limit.
        "selected 1, replayed 0, replayed before 0, refused 1 (max_replays 1)"
    )
    code, out = env.cli(capsys, "dlq", "replay", "--topic", env.dlq)
    assert "replayed 1," in out.splitlines()[-1]  # "later", the one no filter selected before
    assert [line for line in out.splitlines() if line.startswith("replayed ")] == [
        f"replayed {env.dlq}/0/6"
    ]


def test_a_letter_another_replay_is_on_is_left_for_a_later_run(
    env, kafka_bootstrap, redis_url, capsys
):
    produce(kafka_bootstrap, env.dlq, [dead_letter(env.input, f"l{n}", "x") for n in range(3)])
    replays = RedisDedupStore.from_url(redis_url, f"{env.settings('ledger').key_prefix}:dlq-replay")
    busy = f"{env.dlq}/0/1"
    replays.claim([busy], "another-run", 60)  # another replay, on it now

    code, out = env.cli(capsys, "dlq", "replay", "--topic", env.dlq, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["busy"] == [busy]
    assert summary["replayed"] == [f"{env.dlq}/0/0", f"{env.dlq}/0/2"]

    replays.release([busy], "another-run")  # it failed before re-publishing
    code, out = env.cli(capsys, "dlq", "replay", "--topic", env.dlq)
    assert [line for line in out.splitlines() if line.startswith("replayed ")] == [
        f"replayed {busy}"
    ]
    published = [h["replay-of"].decode() for h, _ in read_all(kafka_bootstrap, env.input)]
    assert sorted(published) == [f"{env.dlq}/0/{n}" for n in range(3)]


def test_ids_show_and_forget(env, kafka_bootstrap, ledger, capsys):
    produce(kafka_bootstrap, env.input, [with_id("shown")])
    run_worker(env.settings("ledger"), max_messages=1)

    code, out = env.cli(capsys, "ids", "show", "shown", "never", "--json")
    shown, never = json.loads(out)
    assert (shown["state"], shown["origin"], never["state"]) == (
        "completed",
        f"{env.input}/0/0",
        "absent",
    )
    assert shown["ttl_left_ms"] > 0 and len(shown["fingerprint"]) == 16
    code, out = env.cli(capsys, "ids", "show", "shown")
    assert out.startswith(f"shown: completed from {env.input}/0/0, payload fingerprint ")

    code, out = env.cli(capsys, "ids", "forget", "shown")
    assert code == 0 and out.startswith("shown: forgotten (was completed from")
    produce(kafka_bootstrap, env.input, [with_id("shown", partition=1)])
    run_worker(env.settings("ledger"), max_messages=1)
    assert ledger.runs() == {"shown": 2}


def test_ids_in_progress_are_forgotten_only_with_force(env, capsys, redis_url):
    store = RedisDedupStore.from_url(redis_url, env.settings("ledger").key_prefix)
    try:
        store.claim(["busy"], "someone:1", 30)
        code, out = env.cli(capsys, "ids", "forget", "busy")
        assert code == 1 and "left alone: in progress, owner someone:1" in out
        code, out = env.cli(capsys, "ids", "forget", "busy", "--force")
        assert code == 0 and "forgotten (was in progress" in out
        assert store.inspect("busy").state.value == "absent"
    finally:
        store.close()


def test_a_running_replica_stops_skipping_a_forgotten_id(env, kafka_bootstrap, ledger, capsys):
    """A copy read right after ``ids forget`` runs again: the replica learns of the forget
    before it trusts its local cache, not when its lease keeper next looks (lease / 3)."""
    settings = env.settings("ledger").model_copy(
        update={"dedup": env.settings("ledger").dedup.model_copy(update={"lease_seconds": 60})}
    )
    run = Run(settings, max_messages=4, idle_timeout=30)
    thread = run.thread()
    produce(kafka_bootstrap, env.input, [with_id("cached"), with_id("cached")])
    deadline = time.monotonic() + 30
    while (
        run.value("duplicates_skipped_total", topic=env.input, reason="redelivery")
        + run.value("duplicates_skipped_total", topic=env.input, reason="duplicate")
        < 1
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert env.cli(capsys, "ids", "forget", "cached")[0] == 0
    produce(kafka_bootstrap, env.input, [with_id("cached"), with_id("other")])
    thread.join(60)
    assert not thread.is_alive()
    assert ledger.runs() == {"cached": 2, "other": 1}
