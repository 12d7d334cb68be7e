"""OpenTelemetry traces, exported by a worker on the real broker and Redis to an OTLP/HTTP
endpoint that decodes them (tests/support/otlp.py)."""

import contextlib
import time
import uuid

import pytest
import structlog
from prometheus_client.openmetrics.exposition import generate_latest

from idempotent_worker.config.settings import InboxSettings, TracingSettings
from idempotent_worker.dedup.redis import RedisDedupStore
from idempotent_worker.inbox import AlreadyApplied, Inbox
from idempotent_worker.local.demo import read_all
from idempotent_worker.observe.tracing import Tracing
from idempotent_worker.processing.context import HandlerContext
from idempotent_worker.types import Message
from tests.support.harness import make_settings, run_worker
from tests.support.kafka import Record, group_lag, produce, with_id
from tests.support.otlp import Receiver

pytestmark = pytest.mark.integration

LOG = structlog.get_logger()
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CONSUMER = 5  # SpanKind.CONSUMER in OTLP's numbering (SPAN_KIND_CONSUMER)
ERROR = 2  # STATUS_CODE_ERROR


@pytest.fixture(scope="session")
def receiver():
    """One endpoint per test process. Handlers trace through the process's global
    provider: set here first, exporting to the endpoint, so that it outlives the
    workers (each shuts its own provider down when it closes)."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    receiver = Receiver()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.url)))
    trace.set_tracer_provider(provider)
    yield receiver
    provider.shutdown()
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

        def settings(self, handler, tracing, **route):
            route = {
                "topic": topic,
                "handler": f"tests.support.handlers:{handler}",
                "output_topic": self.output,
                **route,
            }
            return make_settings(kafka_bootstrap, redis_url, self.group, [route], tracing=tracing)

        def store(self):
            return RedisDedupStore.from_url(redis_url, f"test:{self.group}")

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


def test_a_replayed_reply_and_a_run_taken_over_say_so(env, receiver):
    trace = "8bf92f3577b34da6a3ce929d0e0e4736"
    store = env.store()
    [claim] = store.claim(["late"], "a-replica-that-died", 1.0)  # its run 1 began
    assert claim.attempt == 1
    store.close()
    time.sleep(1.2)  # its lease runs out
    total = env.produce(
        [traced("ask", trace=trace), traced("ask", trace=trace), traced("late", trace=trace)]
    )
    tracing = {"enabled": True, "endpoint": receiver.url}

    run_worker(env.settings("reply_once", tracing, on_duplicate="replay"), max_messages=total)

    spans = sorted(
        (s for s in receiver.in_trace(trace) if s.name.startswith("process")),
        key=lambda s: s.attributes["messaging.kafka.offset"],
    )
    outcomes = [s.attributes["idempotent_worker.outcome"] for s in spans]
    assert outcomes == ["processed", "replayed", "processed"]
    assert spans[1].attributes["idempotent_worker.first_origin"] == f"{env.input}/0/0"
    assert spans[2].attributes["idempotent_worker.taken_over"] is True
    assert spans[2].attributes["idempotent_worker.attempt"] == 2
    assert "idempotent_worker.taken_over" not in spans[0].attributes


def test_an_inbox_block_is_a_child_span_saying_whether_it_found_the_id_applied(
    receiver, postgres_url
):
    import psycopg

    tracing = Tracing(TracingSettings(enabled=True, endpoint=receiver.url), "g")
    inbox = Inbox(InboxSettings(table=f"inbox_{uuid.uuid4().hex[:12]}"), "g", LOG)
    id = f"inbox-{uuid.uuid4().hex}"
    message = Message(id, "orders", 0, 7, b"k", b"v")
    spans = []
    with psycopg.connect(postgres_url) as conn:
        for _ in range(2):  # the first run commits, the second finds it applied
            receive = tracing.receive(1)
            span = tracing.message(receive, "orders", 0, 7, id, {})
            ctx = HandlerContext(
                message, 1, lambda: LOG, "out", inbox, "fp", "orders/0/7", span=span
            )
            with contextlib.suppress(AlreadyApplied), ctx.inbox(conn):
                ctx.emit(b"done")
            span.end("processed")
            receive.end()
            spans.append(format(span.span.get_span_context().span_id, "016x"))
    tracing.close()

    found = {s.parent_id: s for s in receiver.spans if s.name == "inbox"}
    assert [found[parent].attributes["idempotent_worker.applied"] for parent in spans] == [
        False,
        True,
    ]
