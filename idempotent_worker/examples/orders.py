"""Example handler: accept an order and announce it.

Input value: JSON ``{"order_id": "...", "amount": 12.5, "currency": "EUR"}``.
Output (to the route's ``output_topic``): JSON ``{"order_id": ..., "status": "accepted"}``.
"""

from __future__ import annotations

import json

from idempotent_worker import Context, Message, PermanentFailure


def handle(message: Message, ctx: Context) -> None:
    try:
        order = message.json()
        amount = float(order["amount"])
    except (ValueError, KeyError, TypeError) as exc:
        # Retrying cannot fix a malformed order: send it to the dead-letter topic now.
        raise PermanentFailure(f"malformed order: {exc}") from exc
    if amount < 0:
        raise PermanentFailure("negative amount")
    accepted = {"order_id": order.get("order_id", message.id), "status": "accepted"}
    ctx.emit(json.dumps(accepted), key=message.key)
    ctx.logger.debug("order accepted", amount=amount)
