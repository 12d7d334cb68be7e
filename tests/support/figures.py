"""Figures the tests measure (image size, build time, counts), printed in their own
section at the end of the run: the tests may run in pytest-xdist's worker processes, so
they travel through a file, as the fault table does."""

from __future__ import annotations

import os
from pathlib import Path

FIGURES_FILE = "TEST_FIGURES_FILE"


def record(line: str) -> None:
    with Path(os.environ[FIGURES_FILE]).open("a") as file:
        file.write(line.rstrip("\n") + "\n")


def recorded() -> list[str]:
    path = Path(os.environ.get(FIGURES_FILE, "/nonexistent"))
    return path.read_text().splitlines() if path.exists() else []
