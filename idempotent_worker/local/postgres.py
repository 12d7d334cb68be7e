"""A throw-away PostgreSQL server for the inbox tests and the benchmark (the demo does
not need one): Debian's server binaries, run as ordinary processes on a loopback port."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from idempotent_worker.local.embedded import LocalService, ServiceError, free_port


class Postgres:
    """A throw-away PostgreSQL server on a loopback port, with a ``postgres`` superuser
    that needs no password, for the inbox tests and the benchmark.

    Debian keeps the server's binaries outside PATH. The server refuses to run as root,
    so as root it runs as the ``postgres`` user, in a directory of its own (a test's
    temporary directory, private to root, would not be enterable). Data is not fsynced:
    the tests kill workers, never the database.
    """

    def __init__(self) -> None:
        self._bin = postgres_binaries()
        self._user = "postgres" if os.geteuid() == 0 else None
        self._dir = Path(tempfile.mkdtemp(prefix="idempotent-worker-pg-"))
        if self._user is not None:
            shutil.chown(self._dir, self._user, self._user)
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        argv = [
            str(self._bin / "postgres"),
            *("-D", str(self._dir / "data"), "-p", str(self.port), "-k", str(self._dir)),
            *("-h", "127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"),
        ]
        self.service = LocalService(
            "postgres", argv, self.port, self._dir / "postgres.log", self._user
        )

    def start(self) -> None:
        result = subprocess.run(
            [
                str(self._bin / "initdb"),
                *("-D", str(self._dir / "data"), "-U", "postgres", "--auth=trust"),
                *("--encoding=UTF8", "--no-sync", "--no-instructions"),
            ],
            capture_output=True,
            text=True,
            user=self._user,
            check=False,
        )
        if result.returncode != 0:
            raise ServiceError(f"initdb failed: {result.stdout}{result.stderr}")
        self.service.start()
        # The port answers a moment before the server accepts logins.
        deadline = time.monotonic() + 15
        ready = [str(self._bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]
        while subprocess.run(ready, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"postgres did not accept connections; see {self.service.log_path}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        self.service.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def postgres_binaries() -> Path:
    """The directory of the newest installed PostgreSQL's server binaries."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if versions:
        return versions[-1]
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise ServiceError("PostgreSQL not found: install it (Debian: apt-get install postgresql)")
