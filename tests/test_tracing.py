"""OpenTelemetry traces, exported by a worker on the real broker and Redis to an OTLP/HTTP
endpoint that decodes them (tests/support/otlp.py)."""

import pytest
from prometheus_client.openmetrics.exposition import generate_latest

from idempotent_worker.local.demo import read_all
from tests.support.harness import make_settings, run_worker
from tests.support.kafka import Record, group_lag, produce, with_id
from tests.support.otlp import Receiver

pytestmark = pytest.mark.integration

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CONSUMER = 5  # SpanKind.CONSUMER in OTLP's numbering (SPAN_KIND_CONSUMER)
ERROR = 2  # STATUS_CODE_ERROR


@pytest.fixture(scope="session")
def receiver():
    """One endpoint per test process: handlers trace through the process's global
    provider, which the first tracing worker of the process sets."""
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def env(kafka_bootstrap, redis_url, unique_name, make_topics, ledger):
    topic = unique_name("in")
    make_topics({topic: 1, f"{topic}.out": 1, f"{topic}.dlq": 1})

    class Env:
        input, output, dlq = topic, f"{topic}.out", f"{topic}.dlq"
        bootstrap = kafka_bootstrap
        group = unique_name("group")
        runs = ledger.runs

        def settings(self, handler, tracing):
            route = {
                "topic": topic,
                "handler": f"tests.support.handlers:{handler}",
                "output_topic": self.output,
            }
            return make_settings(kafka_bootstrap, redis_url, self.group, [route], tracing=tracing)

        def produce(self, records):
            return produce(kafka_bootstrap, topic, records)

    return Env()


def traced(id, trace=TRACE, parent=PARENT, **headers):
    return with_id(id, traceparent=f"00-{trace}-{parent}-01", **headers)


def test_a_message_and_its_duplicate_in_one_trace_with_what_dedup_decided(env, receiver):
    total = env.produce([traced("pay-1"), traced("pay-1", parent="00f067aa0ba902b8")])
    tracing = {"enabled": True, "endpoint": receiver.url, "headers": {"api-key": "s3cret"}}

    run = run_worker(env.settings("traced_async", tracing), max_messages=total)

    spans = {s.span_id: s for s in receiver.in_trace(TRACE)}
    first, second = sorted(
        (s for s in spans.values() if s.name == f"process {env.input}"),
        key=lambda s: s.attributes["messaging.kafka.offset"],
    )
    # The producer's trace goes on through the worker: each message's span is a child
    # of the span its traceparent named.
    assert (first.parent_id, second.parent_id) == (PARENT, "00f067aa0ba902b8")
    assert first.kind == second.kind == CONSUMER
    assert first.attributes["messaging.system"] == "kafka"
    assert first.attributes["messaging.destination.name"] == env.input
    assert first.attributes["messaging.message.id"] == "pay-1"
    assert first.attributes["messaging.consumer.group.name"] == env.group
    assert first.attributes["idempotent_worker.outcome"] == "processed"
    assert first.attributes["idempotent_worker.attempt"] == 1
    assert second.attributes["idempotent_worker.outcome"] == "duplicate"
    assert second.attributes["idempotent_worker.first_origin"] == f"{env.input}/0/0"
    assert first.status != ERROR and second.status != ERROR
    assert first.resource["service.name"] == "idempotent-worker"
    # Its children: the handler (under which the handler's own span nests, across the
    # await) and the outputs' delivery.
    children = {s.name: s for s in spans.values() if s.parent_id == first.span_id}
    assert children.keys() == {"handler", "deliver"}
    [user] = [s for s in spans.values() if s.name == "user-work"]
    assert user.parent_id == children["handler"].span_id
    assert first.attributes["idempotent_worker.claim"] == "claimed"
    # Each message links to its poll batch's receive span, whose child is the claim.
    [link] = first.links
    [receive] = [s for s in receiver.spans if (s.trace_id, s.span_id) == link]
    assert receive.name == "receive"
    claims = [s for s in receiver.spans if s.name == "claim" and s.parent_id == receive.span_id]
    assert [c.attributes["idempotent_worker.ids"] for c in claims] == [1]
    # The output carries the message span's context: the next consumer continues it.
    [(headers, _)] = read_all(env.bootstrap, env.output)
    assert headers["traceparent"].decode() == f"00-{TRACE}-{first.span_id}-01"
    assert env.runs() == {"pay-1": 1}
    # The handler-duration histogram's sample carries the trace id (an exemplar).
    exposition = generate_latest(run.registry).decode()
    assert f'trace_id="{TRACE}"' in exposition


def test_a_dead_lettered_message_is_an_error_and_a_malformed_one_has_no_span(env, receiver):
    trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    total = env.produce([traced("bad", trace=trace), Record(value=b"no id", headers={})])
    tracing = {"enabled": True, "endpoint": receiver.url}

    run_worker(env.settings("rejects", tracing), max_messages=total)

    [span] = [s for s in receiver.in_trace(trace) if s.name.startswith("process")]
    assert span.attributes["idempotent_worker.outcome"] == "dead_lettered"
    assert span.attributes["idempotent_worker.reason"] == "permanent_failure"
    assert span.status == ERROR
    assert group_lag(env.bootstrap, env.group, env.input) == 0


def test_nothing_is_exported_when_tracing_is_off(env, receiver):
    trace = "6bf92f3577b34da6a3ce929d0e0e4736"
    total = env.produce([traced("quiet", trace=trace)])

    run_worker(env.settings("ledger_and_emit", {"endpoint": receiver.url}), max_messages=total)

    assert env.runs() == {"quiet": 1}
    assert receiver.in_trace(trace) == []
    [(headers, _)] = read_all(env.bootstrap, env.output)
    assert "traceparent" not in headers


def test_a_sampler_ratio_of_zero_starts_no_trace_and_follows_a_sampled_producer(env, receiver):
    trace = "7bf92f3577b34da6a3ce929d0e0e4736"
    total = env.produce([with_id("unsampled"), traced("sampled", trace=trace)])
    before = len(receiver.spans)
    tracing = {"enabled": True, "endpoint": receiver.url, "sampler_ratio": 0.0}

    run_worker(env.settings("ledger", tracing), max_messages=total)

    assert env.runs() == {"unsampled": 1, "sampled": 1}
    ids = {s.attributes.get("messaging.message.id") for s in receiver.spans[before:]}
    assert "sampled" in ids and "unsampled" not in ids
