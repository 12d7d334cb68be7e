"""The consumer loop against a real broker and a real Redis, run in this process."""

import time

import pytest

from idempotent_worker.dedup import State
from idempotent_worker.dedup.redis import RedisDedupStore
from idempotent_worker.local import embedded
from idempotent_worker.local.demo import read_all
from tests.support.harness import Run, complete, make_settings, run_worker
from tests.support.kafka import Record, group_lag, produce, with_id

pytestmark = pytest.mark.integration

PARTITIONS = 3


@pytest.fixture
def env(kafka_bootstrap, redis_url, unique_name, make_topics, ledger):
    topic = unique_name("in")

    class Env:
        bootstrap = kafka_bootstrap
        group = unique_name("group")
        input = topic
        output = f"{topic}.out"
        dlq = f"{topic}.dlq"
        runs = ledger.runs

        def settings(self, handler="ledger", redis=redis_url, **sections):
            route = {
                "topic": topic,
                "handler": f"tests.support.handlers:{handler}",
                "output_topic": self.output,
            }
            route.update(sections.pop("route", {}))
            return make_settings(kafka_bootstrap, redis, self.group, [route], **sections)

        def store(self):
            return RedisDedupStore.from_url(redis_url, f"test:{self.group}")

        def produce(self, records):
            return produce(kafka_bootstrap, topic, records)

        def lag(self):
            return group_lag(kafka_bootstrap, self.group, topic)

    make_topics({topic: PARTITIONS, f"{topic}.out": PARTITIONS, f"{topic}.dlq": 1})
    return Env()


def headers_of(record):
    return {k: v.decode() for k, v in record[0].items()}


def test_each_id_handled_once_duplicates_skipped_offsets_committed(env):
    unique = [with_id(f"id-{n}", partition=n % PARTITIONS) for n in range(30)]
    repeats = [with_id(f"id-{n}", partition=(n + 1) % PARTITIONS) for n in range(0, 30, 3)]
    same_batch = [with_id("id-burst", partition=2) for _ in range(3)]
    total = env.produce(unique + repeats + same_batch)

    run = run_worker(env.settings("ledger_and_emit"), max_messages=total)

    runs = env.runs()
    assert set(runs) == {f"id-{n}" for n in range(30)} | {"id-burst"}
    assert max(runs.values()) == 1
    assert run.value("messages_consumed_total", topic=env.input) == total
    assert run.value("messages_processed_total", topic=env.input, outcome="success") == 31
    assert run.value("duplicates_skipped_total", topic=env.input, reason="duplicate") == 12
    assert env.lag() == 0
    outputs = [headers_of(r)["message-id"] for r in read_all(env.bootstrap, env.output)]
    assert sorted(outputs) == sorted(f"{id}:0" for id in runs)


def test_cloudevents_are_deduplicated_by_source_and_id_and_outputs_are_cloudevents(env):
    """A copy of an event is a duplicate; the same event in structured mode has the
    same id (its value differs, so it is a payload conflict: dead-lettered by default);
    the same id from another source is another event; a record that is no CloudEvent is
    dead-lettered. The outputs are CloudEvents themselves, named by their message ids."""
    binary = Record(
        value=b'{"amount": 5}',
        headers={"ce_specversion": "1.0", "ce_type": "t", "ce_source": "/shop", "ce_id": "A-1"},
    )
    structured = Record(
        value=b'{"specversion": "1.0", "type": "t", "source": "/shop", "id": "A-1"}',
        headers={"content-type": "application/cloudevents+json"},
    )
    elsewhere = Record(value=b"{}", headers={"ce_source": "/stock", "ce_id": "A-1"})
    plain = with_id("not-an-event")
    total = env.produce([binary, binary, structured, elsewhere, plain])
    events = {"source": "/payments", "type": "payment.charged"}
    settings = env.settings(
        "ledger_and_emit", route={"id": "cloudevents", "emit_cloudevents": events}
    )

    run = run_worker(settings, max_messages=total)

    assert env.runs() == {"/shop A-1": 1, "/stock A-1": 1}
    assert run.value("duplicates_skipped_total", topic=env.input, reason="duplicate") == 1
    letters = [headers_of(letter)["dlq-reason"] for letter in read_all(env.bootstrap, env.dlq)]
    assert sorted(letters) == ["id_conflict", "id_missing"]
    outputs = sorted(headers_of(r)["ce_id"] for r in read_all(env.bootstrap, env.output))
    assert outputs == ["/shop A-1:0", "/stock A-1:0"]
    output = headers_of(read_all(env.bootstrap, env.output)[0])
    assert output["ce_id"] == output["message-id"]
    assert (output["ce_specversion"], output["ce_source"], output["ce_type"]) == (
        "1.0", "/payments", "payment.charged",
    )  # fmt: skip


def test_message_without_id_is_dead_lettered_with_reason(env):
    env.produce([Record(value=b"no id here", key=b"k"), with_id("fine")])

    run = run_worker(env.settings(), max_messages=2)

    assert env.runs() == {"fine": 1}
    [letter] = read_all(env.bootstrap, env.dlq)
    headers = headers_of(letter)
    assert letter[1] == b"no id here"
    assert headers["dlq-reason"] == "id_missing"
    assert headers["dlq-original-topic"] == env.input
    assert headers["dlq-original-partition"] == "0"
    assert headers["dlq-original-offset"] == "0"
    assert "message-id" in headers["dlq-error-message"]
    assert run.value("dead_lettered_total", topic=env.input, reason="id_missing") == 1
    assert env.lag() == 0


def test_failing_handler_is_retried_until_it_succeeds(env):
    env.produce([with_id("flaky", **{"fail-times": "2"})])

    run = run_worker(env.settings("flaky"), max_messages=1)

    assert env.runs() == {"flaky": 1}
    assert run.value("messages_processed_total", topic=env.input, outcome="failed") == 2
    assert run.value("messages_processed_total", topic=env.input, outcome="success") == 1
    assert read_all(env.bootstrap, env.dlq) == []


@pytest.mark.parametrize(
    ("handler", "reason", "attempts", "error_type"),
    [
        ("always_fails", "handler_failed", "3", "RuntimeError"),
        ("rejects", "permanent_failure", "1", "PermanentFailure"),
    ],
)
def test_failures_end_in_the_dead_letter_topic_and_release_the_id(
    env, handler, reason, attempts, error_type
):
    env.produce([with_id("bad"), with_id("after")])

    run = run_worker(env.settings(handler), max_messages=2)

    letters = read_all(env.bootstrap, env.dlq)
    assert [headers_of(letter)["dlq-message-id"] for letter in letters] == ["bad", "after"]
    headers = headers_of(letters[0])
    assert headers["dlq-reason"] == reason
    assert headers["dlq-attempts"] == attempts
    assert headers["dlq-error-type"] == error_type
    assert headers["message-id"] == "bad"  # the original headers travel along
    assert run.value("messages_processed_total", topic=env.input, outcome="dead_lettered") == 2
    assert env.store().state("bad") is State.ABSENT  # released: a later copy may run
    assert env.lag() == 0


def test_completed_ids_are_skipped_and_busy_claims_are_waited_for(env):
    store = env.store()
    store.claim(["done", "busy"], "another-worker", 60)
    complete(store, "done", "another-worker", 60, "elsewhere/0/0")
    store.claim(["busy"], "another-worker", 8)  # its worker died: the lease runs out
    env.produce([with_id("done"), with_id("busy"), with_id("fresh")])

    started = time.monotonic()
    run = run_worker(env.settings(), max_messages=3)

    assert env.runs() == {"busy": 1, "fresh": 1}
    assert time.monotonic() - started >= 5.0  # it waited for the lease instead of skipping
    assert run.value("duplicates_skipped_total", topic=env.input, reason="duplicate") == 1
    assert run.value("claim_waits_total", topic=env.input) == 1
    assert store.state("busy") is State.COMPLETED
    assert env.lag() == 0


def test_redelivered_record_is_counted_as_redelivery(env):
    store = env.store()
    store.claim(["again"], "crashed-worker", 60)
    complete(store, "again", "crashed-worker", 60, f"{env.input}/0/0")  # completed, never committed
    env.produce([with_id("again")])

    run = run_worker(env.settings(), max_messages=1)

    assert env.runs() == {}
    assert run.value("duplicates_skipped_total", topic=env.input, reason="redelivery") == 1


def test_emit_without_output_topic_dead_letters(env):
    env.produce([with_id("x")])

    run = run_worker(env.settings("ledger_and_emit", route={"output_topic": None}), max_messages=1)

    [letter] = read_all(env.bootstrap, env.dlq)
    assert headers_of(letter)["dlq-reason"] == "permanent_failure"
    assert run.value("dead_lettered_total", topic=env.input, reason="permanent_failure") == 1


def test_failed_dead_letter_write_commits_nothing_and_blocks_the_partition(env):
    # Too large to handle, and its 80 kB key (kept in the dead-letter record) is more than
    # the producer may write: the dead-letter write fails until an operator steps in.
    big = Record(value=b"{}", key=b"k" * 80_000, headers={"message-id": "big"})
    env.produce([big, with_id("after")])
    limits = {"producer": {"message.max.bytes": 70_000}, "max_payload_bytes": 4000}
    run = Run(env.settings("ledger", kafka=limits), idle_timeout=None)
    thread = run.thread()
    deadline = time.monotonic() + 30
    while run.value("dead_letter_write_failures_total", topic=env.input) < 3:
        assert time.monotonic() < deadline, "the dead-letter write was not tried"
        time.sleep(0.05)

    assert run.value("dead_lettered_total", topic=env.input, reason="payload_too_large") == 0
    run.worker.stop()
    thread.join(30)
    assert env.runs() == {}  # "after" waits behind the unfinished message
    assert env.lag() == 2  # nothing was committed
    assert read_all(env.bootstrap, env.dlq) == []


def test_redis_outage_holds_the_worker_then_it_resumes(env, tmp_path):
    redis = embedded.redis(tmp_path)
    redis.start()
    settings = env.settings(redis=f"redis://127.0.0.1:{redis.port}/0")
    run = Run(settings, max_messages=4, idle_timeout=None)
    thread = run.thread()
    env.produce([with_id("before")])
    deadline = time.monotonic() + 20
    while env.runs() != {"before": 1} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.health.ready

    redis.stop()
    env.produce([with_id(f"during-{n}", partition=n) for n in range(3)])
    time.sleep(3)
    assert env.runs() == {"before": 1}  # no handler runs without dedup
    assert not run.health.ready
    assert run.value("dedup_store_errors_total", operation="claim") >= 1

    redis.start()
    thread.join(30)
    assert not thread.is_alive()
    assert env.runs() == {"before": 1, "during-0": 1, "during-1": 1, "during-2": 1}
    assert env.lag() == 0
    redis.stop()
