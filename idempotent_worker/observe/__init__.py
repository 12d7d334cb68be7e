"""Observability: Prometheus metrics, the HTTP server (``/metrics``, ``/healthz``,
``/readyz``) and structured logs."""
