"""Configuration: the settings models (the TOML file and the WORKER_* variables), the
``[redis]`` and ``[[routes]]`` sections, id extraction specs, and the routes resolved to
their handlers."""
