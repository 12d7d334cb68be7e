"""The worker's exception tree.

Everything the worker raises derives from :class:`WorkerError`. Handlers use
:class:`RetryLater` and :class:`PermanentFailure` to steer what happens to a
message; any other exception from a handler counts as a retryable failure.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Root of every error the worker raises on purpose."""


class ConfigError(WorkerError):
    """The configuration is invalid; ``key`` names the offending setting."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class StoreUnavailable(WorkerError):
    """The dedup store could not be reached or answered with an error.

    The worker fails closed on this error: it runs no handler and commits nothing
    until the store answers again.
    """


class KafkaOperationError(WorkerError):
    """A Kafka operation failed; ``code`` keeps librdkafka's error code."""

    def __init__(self, operation: str, error: object, code: int | None = None) -> None:
        super().__init__(f"{operation} failed: {error}")
        self.operation = operation
        self.code = code


class LeaseLost(WorkerError):
    """Another replica took the message's claim while this one ran the handler."""


class Interrupted(WorkerError):
    """The worker is stopping before the message's outputs were confirmed; ``token`` is
    the claim that holds the message's id."""

    def __init__(self, token: str | None) -> None:
        super().__init__("stopping before the outputs were confirmed")
        self.token = token


class MessageIdError(WorkerError):
    """The message id could not be extracted; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class HandlerControl(WorkerError):
    """Base of the exceptions a handler raises to steer its message."""


class RetryLater(HandlerControl):
    """Raise from a handler to have the message retried, after ``delay`` seconds if given."""

    def __init__(self, message: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentFailure(HandlerControl):
    """Raise from a handler to send the message to the dead-letter topic without retrying."""
