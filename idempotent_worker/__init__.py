"""idempotent-worker: a Kafka consumer that runs each message id's handler at most once."""

from idempotent_worker.errors import PermanentFailure, RetryLater, WorkerError
from idempotent_worker.types import BatchHandler, Context, Handler, Message

__all__ = [
    "BatchHandler",
    "Context",
    "Handler",
    "Message",
    "PermanentFailure",
    "RetryLater",
    "WorkerError",
]
