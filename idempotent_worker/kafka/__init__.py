"""Kafka: the group consumer (offsets, pauses, rebalances), the idempotent producer of
outputs and dead letters, and record accessors."""
