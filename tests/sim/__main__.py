"""A long simulator run, with progress: ``python -m tests.sim SEEDS [FIRST] [JOBS]``.

Runs seeds FIRST to FIRST+SEEDS-1 (default first 0) in JOBS processes (default the
machine's cores), prints each failing seed's report as it is found and a progress line
every 1,000 seeds; exits 1 if any seed failed. ``make test`` runs a few hundred seeds
through tests/test_simulation.py; this is for the long runs between changes.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

from tests.sim.world import report_of


def main(argv: list[str]) -> int:
    seeds = int(argv[0])
    first = int(argv[1]) if len(argv) > 1 else 0
    jobs = int(argv[2]) if len(argv) > 2 else os.cpu_count() or 1
    started, failed = time.monotonic(), 0
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=500) as pool:
        reports = pool.imap_unordered(report_of, range(first, first + seeds), chunksize=20)
        for done, report in enumerate(reports, 1):
            if report:
                failed += 1
                print(report, flush=True)
            if done % 1000 == 0 or done == seeds:
                elapsed = time.monotonic() - started
                print(
                    f"{done} of {seeds} seeds from {first}, {failed} failing, "
                    f"{elapsed:.0f} s ({done / elapsed:.1f} seeds/s)",
                    flush=True,
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
