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
