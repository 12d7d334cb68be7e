"""OpenTelemetry traces of the messages (``[tracing]``; the ``[otel]`` extra, imported
only when tracing is enabled).

A poll batch is a ``receive`` span, with a ``claim`` child (the batch's claim round
trip); each message a ``process <topic>`` span (kind consumer) that continues the trace
of the W3C ``traceparent``/``tracestate`` headers it carries and links to its batch's
``receive``. Its children: ``handler`` (current while the handler runs, so that its own
instrumentation nests under it, async handlers included), ``inbox`` (a ``ctx.inbox()``
block) and ``deliver`` (from handing the outputs to the producer to their
acknowledgement). Every output carries the message span's context in its headers. The
span ends when the message does, with what dedup decided in ``idempotent_worker.*``
attributes (see docs/tracing.md); its status is an error only when the message failed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from idempotent_worker.config.settings import TracingSettings
from idempotent_worker.errors import ConfigError

NAMESPACE = "idempotent_worker."
FAILED = frozenset({"dead_lettered"})
"""Outcomes whose span status is an error."""


def start_tracing(settings: TracingSettings, group: str) -> Tracing | None:
    """The replica's tracing, or None when ``tracing.enabled`` is off."""
    if not settings.enabled:
        return None
    return Tracing(settings, group)


def require_otel() -> None:
    """Raise ConfigError naming ``tracing.enabled`` if the ``[otel]`` extra is missing."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise ConfigError(
            "tracing.enabled", "needs the otel extra: pip install 'idempotent-worker[otel]'"
        ) from None


class Tracing:
    def __init__(self, settings: TracingSettings, group: str) -> None:
        require_otel()
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._group = group
        resource = Resource.create(
            {"service.name": settings.service_name, **settings.resource_attributes}
        )
        self._provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sampler_ratio))
        )
        headers = {name: value.get_secret_value() for name, value in settings.headers.items()}
        exporter = OTLPSpanExporter(endpoint=settings.endpoint, headers=headers)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        # Handlers trace through the global provider (trace.get_tracer): this one, unless
        # the process set its own first (then their spans go where it says).
        trace.set_tracer_provider(self._provider)
        self.tracer = self._provider.get_tracer("idempotent_worker")
        self._propagator = TraceContextTextMapPropagator()

    def receive(self, records: int) -> Any:
        """The span of one poll batch."""
        kind = self._trace.SpanKind.CONSUMER
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation": "receive",
            "messaging.operation.type": "receive",
            "messaging.consumer.group.name": self._group,
            "messaging.batch.message_count": records,
        }
        return self.tracer.start_span("receive", kind=kind, attributes=attributes)

    def message(
        self,
        receive: Any,
        topic: str,
        partition: int,
        offset: int,
        id: str,
        headers: Mapping[str, bytes],
    ) -> MessageSpan:
        """The span of one message, in the trace its headers carry."""
        carrier = {
            name: value.decode("latin-1")
            for name in ("traceparent", "tracestate")
            if (value := headers.get(name)) is not None
        }
        parent = self._propagator.extract(carrier)
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
            "messaging.destination.partition.id": str(partition),
            "messaging.kafka.offset": offset,
            "messaging.consumer.group.name": self._group,
            "messaging.message.id": id,
        }
        span = self.tracer.start_span(
            f"process {topic}",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            attributes=attributes,
            links=[self._trace.Link(receive.get_span_context())],
        )
        return MessageSpan(self, span)

    def timed(self, parent: Any, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        """A child of ``parent`` for what happened between ``start_ns`` and ``end_ns``."""
        child = self.tracer.start_span(
            name,
            context=self._trace.set_span_in_context(parent),
            start_time=start_ns,
            attributes={NAMESPACE + key: value for key, value in attributes.items()},
        )
        child.end(end_time=end_ns)

    def close(self) -> None:
        """Export what is left (at most a few seconds)."""
        self._provider.shutdown()


class MessageSpan:
    """One message's span, from its reading to its end (``end``)."""

    __slots__ = ("_sent", "_tracing", "recording", "span")

    def __init__(self, tracing: Tracing, span: Any) -> None:
        self._tracing = tracing
        self.span = span
        self.recording: bool = span.is_recording()
        """Sampled. An unsampled message's span makes no children and keeps nothing (its
        context still goes on with the outputs, so that downstream follows the decision)."""
        self._sent = 0
        """When its outputs went to the producer (ns), 0 before."""

    def set(self, **attributes: Any) -> None:
        if self.recording:
            attributes = {NAMESPACE + key: value for key, value in attributes.items()}
            self.span.set_attributes(attributes)

    def timed(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        """A child span of what happened between ``start_ns`` and ``end_ns``."""
        if self.recording:
            self._tracing.timed(self.span, name, start_ns, end_ns, **attributes)

    @contextmanager
    def child(self, name: str) -> Iterator[None]:
        """A child span, current in this thread (and the tasks started from it) while
        the block runs."""
        if not self.recording:
            yield
            return
        context = self._tracing._trace.set_span_in_context(self.span)
        with self._tracing.tracer.start_as_current_span(name, context=context):
            yield

    def headers(self) -> list[tuple[str, str]]:
        """The span's context as W3C headers, for an output."""
        carrier: dict[str, str] = {}
        context = self._tracing._trace.set_span_in_context(self.span)
        self._tracing._propagator.inject(carrier, context=context)
        return list(carrier.items())

    def exemplar(self) -> dict[str, str] | None:
        """The trace id to attach to a metric sample of this message (sampled only)."""
        if not self.recording:
            return None
        return {"trace_id": format(self.span.get_span_context().trace_id, "032x")}

    def outputs_sent(self) -> None:
        if self.recording:
            self._sent = time.time_ns()

    def end(self, outcome: str, **attributes: Any) -> None:
        """End the span with the message's outcome (once: later calls do nothing)."""
        if not self.recording or not self.span.is_recording():
            return
        if self._sent:
            self.timed("deliver", self._sent, time.time_ns())
        self.set(outcome=outcome, **{k: v for k, v in attributes.items() if v is not None})
        if outcome in FAILED:
            status = self._tracing._trace.Status(self._tracing._trace.StatusCode.ERROR)
            self.span.set_status(status)
        self.span.end()
