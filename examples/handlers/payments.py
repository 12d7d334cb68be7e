"""The README's handler: validates a payment, emits one output per payment charged.

Run from this folder (the working directory is on the import path):

    idempotent-worker check-config --config worker.toml
    idempotent-worker run --config worker.toml
"""

import json

from idempotent_worker import Context, Message, PermanentFailure, RetryLater

LEDGER_UP = True
"""Stands for a health check of the service the payment is charged to."""


def handle(message: Message, ctx: Context) -> None:
    payment = message.json()  # or message.value / message.key / message.headers
    if "amount" not in payment:
        raise PermanentFailure("no amount")  # dead-letter now, no retry
    if not LEDGER_UP:
        raise RetryLater("ledger down", delay=5)  # retry after 5 s (counts as an attempt)
    ctx.emit(json.dumps({"payment": message.id, "status": "charged"}))  # to output_topic
    ctx.logger.info("charged", amount=payment["amount"])
