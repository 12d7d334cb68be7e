"""max_in_flight on a real broker and Redis: lanes by Kafka key run concurrently, each
in order, plain and ``async def`` handlers alike, and every id still runs once."""

import pytest

from tests.support.handlers import Lanes
from tests.support.harness import Run, make_settings
from tests.support.kafka import Record, group_lag, produce

pytestmark = pytest.mark.integration

KEYS, PER_KEY = 8, 15


@pytest.mark.parametrize("handler", ["in_lanes", "in_lanes_async"])
def test_lanes_run_concurrently_and_keep_each_keys_order(
    kafka_bootstrap, redis_url, unique_name, make_topics, ledger, handler
):
    topic, group = unique_name("in"), unique_name("group")
    make_topics({topic: 2, f"{topic}.dlq": 1})
    records = [
        Record(key=f"k{k}", headers={"message-id": f"k{k}-{n}"}, partition=k % 2)
        for n in range(PER_KEY)
        for k in range(KEYS)
    ]
    repeats = [Record(key=r.key, headers=r.headers, partition=r.partition) for r in records[:10]]
    produce(kafka_bootstrap, topic, records + repeats)
    route = {
        "topic": topic,
        "handler": f"tests.support.handlers:{handler}",
        "max_in_flight": 16,
    }
    Lanes.reset()
    run = Run(make_settings(kafka_bootstrap, redis_url, group, [route]), max_messages=130)
    run.run()
    assert ledger.runs() == {f"k{k}-{n}": 1 for k in range(KEYS) for n in range(PER_KEY)}
    for k in range(KEYS):
        assert Lanes.order[f"k{k}".encode()] == [f"k{k}-{n}" for n in range(PER_KEY)]
    assert Lanes.most > 1  # different keys did run at the same time
    assert run.value("duplicates_skipped_total", topic=topic, reason="duplicate") == 10
    assert group_lag(kafka_bootstrap, group, topic) == 0


@pytest.mark.parametrize(("first", "second"), [(1, 8), (8, 1), (8, 8)])
def test_ids_shared_by_two_routes_run_once_whatever_their_lanes(
    kafka_bootstrap, redis_url, unique_name, make_topics, ledger, first, second
):
    """Routes share one id space: the same ids on two topics, read in one poll, run once
    whichever route's lanes (on the loop's thread or a pool) meet them."""
    topics = [unique_name("in"), unique_name("in")]
    make_topics({topic: 1 for topic in topics} | {f"{t}.dlq": 1 for t in topics})
    ids = [f"shared-{n}" for n in range(40)]
    for topic in topics:
        produce(kafka_bootstrap, topic, [Record(key=id, headers={"message-id": id}) for id in ids])
    routes = [
        {"topic": topic, "handler": "tests.support.handlers:in_lanes", "max_in_flight": n}
        for topic, n in zip(topics, (first, second), strict=True)
    ]
    Lanes.reset()
    settings = make_settings(
        kafka_bootstrap, redis_url, unique_name("group"), routes, kafka={"poll_batch_size": 500}
    )
    run = Run(settings, max_messages=2 * len(ids))
    run.run()
    assert ledger.runs() == {id: 1 for id in ids}
    skipped = sum(
        run.value("duplicates_skipped_total", topic=t, reason=r)
        for t in topics
        for r in ("duplicate", "redelivery")
    )
    assert skipped == len(ids)


@pytest.mark.parametrize("handler", ["decorated_async", "async_callable", "async_partial"])
@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_handlers_returning_an_awaitable_are_awaited(
    kafka_bootstrap, redis_url, unique_name, make_topics, ledger, handler, max_in_flight
):
    """What a handler returns is awaited if it is awaitable, whatever the function looks
    like at start-up (a plain decorator, an object, a partial)."""
    topic = unique_name("in")
    make_topics({topic: 1, f"{topic}.dlq": 1})
    produce(kafka_bootstrap, topic, [Record(headers={"message-id": f"a{n}"}) for n in range(20)])
    route = {
        "topic": topic,
        "handler": f"tests.support.handlers:{handler}",
        "max_in_flight": max_in_flight,
    }
    Run(
        make_settings(kafka_bootstrap, redis_url, unique_name("group"), [route]), max_messages=20
    ).run()
    assert ledger.runs() == {f"a{n}": 1 for n in range(20)}
