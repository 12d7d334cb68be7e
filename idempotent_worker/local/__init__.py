"""Local services for the demo and the tests: the embedded broker (Tansu) and Redis,
PostgreSQL, and the demo itself."""
