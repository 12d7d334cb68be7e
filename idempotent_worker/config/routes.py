"""A route's settings: which topic, which handler, and how its messages are deduplicated
(part of :mod:`idempotent_worker.config.settings`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from idempotent_worker.config.ids import parse_entity_spec, parse_id_spec, parse_sequence_spec


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CombinationError(ValueError):
    """Settings that are valid one by one and not together; ``key`` names the one to
    change (relative to the section whose check raised it if it has no dot)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


TopicName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")]
"""What Kafka accepts as a topic name."""


class CloudEventsOutputs(Section):
    source: str = Field(pattern=r"^\S+$")
    """The outputs' ``ce_source``: a URI-reference naming this producer (no whitespace)."""
    type: str = Field(min_length=1)
    """The outputs' ``ce_type`` (an output may set its own in its headers)."""


class Route(Section):
    topic: TopicName
    """The input topic."""
    handler: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """``package.module:function``, found from the working directory, ``paths`` and the
    installed packages."""
    id: str = "header:message-id"
    """Where the message id comes from: ``header:<name>``, ``key``, ``json:<dotted.path>``,
    ``hash`` (of key and value), ``coordinates`` (topic/partition/offset) or
    ``cloudevents`` (a CloudEvent's source and id, binary or structured mode)."""
    output_topic: TopicName | None = None
    """Where ``ctx.emit`` produces by default."""
    dlq_topic: TopicName | None = None
    """The dead-letter topic; default: ``<topic>.dlq``."""
    max_in_flight: int = Field(default=1, ge=1, le=1024)
    """Messages of this route handled at once. Messages with the same Kafka key (or id)
    still run one after another, in order."""
    timeout_seconds: float | None = Field(default=None, gt=0)
    """A handler running longer ends the process (see processing/leases.py); default: 90% of
    max.poll.interval.ms."""
    dedup: Literal["id", "shadow", "sequence"] = "id"
    """``id``: a completed id's duplicates are not handled. ``shadow``: they are detected
    and counted, and handled all the same. ``sequence``: a message at or below its
    entity's recorded position is not handled (see processing/modes/sequence.py)."""
    entity: str | None = None
    """``sequence`` routes: ``key``, ``header:<name>`` or ``json:<path>``."""
    sequence: str | None = None
    """``sequence`` routes: ``header:<name>`` or ``json:<path>``, a non-negative integer."""
    on_gap: Literal["process", "dead_letter"] = "process"
    """``sequence`` routes: a message more than one above its entity's position is
    handled and counted, or dead-lettered (reason sequence_gap)."""
    on_duplicate: Literal["skip", "replay"] = "skip"
    """``replay``: a duplicate produces again the outputs its id's first run emitted."""
    reply_to: str | None = Field(default=None, pattern=r"^header:.+$")
    """``header:<name>``: outputs that name no topic go to the topic in this header of
    the message (then to ``output_topic`` if it has none)."""
    correlation_header: str | None = Field(default=None, min_length=1)
    """A header of the message copied onto each output that names no topic."""
    batch: bool = False
    """The handler takes a list of ``(message, ctx)``: a poll batch's claimed messages of
    one partition, in order, in one call (see processing/handling.py)."""
    emit_cloudevents: CloudEventsOutputs | None = None
    """Outputs are CloudEvents in binary mode: ``ce_specversion`` 1.0, ``ce_id`` (the
    output's message id), ``ce_source`` and ``ce_type`` headers, so that a consumer with
    ``id = "cloudevents"`` dedups them."""

    @model_validator(mode="after")
    def _check_modes(self) -> Route:
        if self.dedup == "shadow" and self.on_duplicate == "replay":
            raise CombinationError(
                "on_duplicate", "a shadow route runs every duplicate: it has nothing to replay"
            )
        if self.dedup != "sequence":
            defaults = {"entity": None, "sequence": None, "on_gap": "process"}
            for key, default in defaults.items():
                if getattr(self, key) != default:
                    raise CombinationError(key, 'is only for routes with dedup = "sequence"')
            return self
        for key in ("entity", "sequence"):
            if getattr(self, key) is None:
                raise CombinationError(key, 'is required with dedup = "sequence"')
        if self.on_duplicate == "replay":
            raise CombinationError(
                "on_duplicate", "a sequence route keeps positions, not replies: nothing to replay"
            )
        return self

    @field_validator("entity")
    @classmethod
    def _check_entity(cls, spec: str | None) -> str | None:
        if spec is not None:
            parse_entity_spec(spec)
        return spec

    @field_validator("sequence")
    @classmethod
    def _check_sequence(cls, spec: str | None) -> str | None:
        if spec is not None:
            parse_sequence_spec(spec)
        return spec

    @field_validator("id")
    @classmethod
    def _check_id(cls, spec: str) -> str:
        parse_id_spec(spec)
        return spec

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"
