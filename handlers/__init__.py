"""Business handlers: the examples shipped with the worker, and the place for yours."""
