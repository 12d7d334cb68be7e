"""Batch routes (``batch = true``): the handler gets a poll batch's new messages of one
partition, in order, in one call, and says per message how it went. Dedup, fencing,
retries and dead letters are per message, as on any route."""

import pytest

from idempotent_worker.config.registry import import_handler
from idempotent_worker.errors import ConfigError
from idempotent_worker.local.demo import read_all
from idempotent_worker.processing.attempts import per_message
from tests.support.harness import make_settings, run_worker
from tests.support.kafka import group_lag, produce, with_id

PARTITIONS = 3


@pytest.fixture
def env(kafka_bootstrap, redis_url, unique_name, make_topics, ledger):
    topic = unique_name("in")
    make_topics({topic: PARTITIONS, f"{topic}.out": PARTITIONS, f"{topic}.dlq": 1})

    class Env:
        input, output, dlq = topic, f"{topic}.out", f"{topic}.dlq"
        group = unique_name("group")

        def settings(self, handler, **route):
            route = {
                "topic": topic,
                "handler": f"tests.support.handlers:{handler}",
                "output_topic": self.output,
                "batch": True,
                **route,
            }
            return make_settings(kafka_bootstrap, redis_url, self.group, [route])

        def calls(self):
            """Each call's messages, as (partition, offset)."""
            text = ledger.path.with_name("ledger.txt.calls").read_text()
            return [
                [tuple(map(int, m.split(":"))) for m in line.split()] for line in text.splitlines()
            ]

        def dead_letters(self):
            return read_all(kafka_bootstrap, self.dlq)

        def output_ids(self):
            return sorted(
                r[0]["message-id"].decode() for r in read_all(kafka_bootstrap, self.output)
            )

    env = Env()
    env.runs = ledger.runs
    env.produce = lambda records: produce(kafka_bootstrap, topic, records)
    env.lag = lambda: group_lag(kafka_bootstrap, env.group, topic)
    return env


@pytest.mark.integration
@pytest.mark.parametrize("max_in_flight", [1, 3])
@pytest.mark.parametrize("handler", ["batch_ledger_and_emit", "batch_ledger_and_emit_async"])
def test_each_call_is_one_partitions_new_messages_in_order_each_run_once(
    env, handler, max_in_flight
):
    unique = [with_id(f"id-{n}", partition=n % PARTITIONS) for n in range(30)]
    repeats = [with_id(f"id-{n}", partition=(n + 1) % PARTITIONS) for n in range(0, 30, 3)]
    total = env.produce(unique + repeats)

    run = run_worker(env.settings(handler, max_in_flight=max_in_flight), max_messages=total)

    runs = env.runs()
    assert set(runs) == {f"id-{n}" for n in range(30)}
    assert max(runs.values()) == 1
    calls = env.calls()
    for call in calls:
        assert len({partition for partition, _ in call}) == 1, call
        assert [offset for _, offset in call] == sorted(offset for _, offset in call), call
    assert sum(len(call) for call in calls) == 30  # no duplicate reached a call
    assert len(calls) < 30
    assert run.value("messages_processed_total", topic=env.input, outcome="success") == 30
    assert run.value("duplicates_skipped_total", topic=env.input, reason="duplicate") == 10
    assert env.output_ids() == sorted(f"{id}:0" for id in runs)
    assert env.lag() == 0


@pytest.mark.integration
def test_what_fails_in_a_call_is_retried_alone_or_dead_lettered(env):
    env.produce(
        [
            with_id("ok-0"),
            with_id("flaky", **{"fail-times": "1"}),
            with_id("rejected", reject="1"),
            with_id("ok-1"),
            with_id("call-fails", partition=1, **{"fail-call": "1"}),
            with_id("ok-2", partition=1),
        ]
    )

    run = run_worker(env.settings("batch_mixed"), max_messages=6)

    assert env.runs() == {"ok-0": 1, "flaky": 1, "ok-1": 1, "call-fails": 1, "ok-2": 1}
    [letter] = env.dead_letters()
    assert letter[0]["dlq-reason"] == b"permanent_failure"
    assert letter[0]["message-id"] == b"rejected"
    # The retries ran one message at a time: flaky's, and both of the failed call's.
    retried = [call for call in env.calls() if len(call) == 1]
    assert len(retried) >= 3
    assert run.value("messages_processed_total", topic=env.input, outcome="success") == 5
    assert run.value("dead_lettered_total", topic=env.input, reason="permanent_failure") == 1
    assert env.output_ids() == ["call-fails:0", "flaky:0", "ok-0:0", "ok-1:0", "ok-2:0"]
    assert env.lag() == 0


def test_a_batch_route_needs_a_handler_of_one_argument():
    import_handler("tests.support.handlers:batch_mixed", "routes[0].handler", batch=True)
    with pytest.raises(ConfigError) as caught:
        import_handler("tests.support.handlers:ledger", "routes[0].handler", batch=True)
    assert caught.value.key == "routes[0].handler"
    assert "must accept (batch)" in caught.value.problem
    with pytest.raises(ConfigError) as caught:
        import_handler("tests.support.handlers:batch_mixed", "routes[0].handler")
    assert "must accept (message, ctx)" in caught.value.problem


def test_a_batch_handlers_result_is_read_per_message():
    failure = RuntimeError("no")
    assert per_message(None, 2) == [None, None]
    assert per_message([None, failure], 2) == [None, failure]
    assert per_message((failure,), 1) == [failure]
    for wrong, got in [([None], "a list of 1"), ("ab", "a str"), ([None, "x"], "a list of 2")]:
        problems = per_message(wrong, 2)
        assert len(problems) == 2 and all(isinstance(p, TypeError) for p in problems)
        assert f"it returned {got}" in str(problems[0])
