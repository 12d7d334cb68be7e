"""Whether throughput holds over a long run, as the dedup store fills.

    .venv/bin/python bench/soak.py [MESSAGES [TTL]]   # default 2,000,000; about 2 minutes

On the local broker and a Redis with AOF (fsync always): one replica, the no-op
handler, ``MESSAGES`` unique ids. Every second a sampler notes how many ids ran, this
process's CPU time and Redis's; the script prints msg/s and the worker's and Redis's
CPU per message for each eighth of the run, and the last eighth's rate as a share of
the first's (the issue's target: at least 0.9). Every id must be handled exactly once
(exit 1 otherwise), as in bench/run.py.

``TTL`` sets ``dedup.ttl_seconds`` (default the worker's, 7 days): a short one (60) makes
the store open a window every quarter of it and drop the oldest, so that a run of a few
minutes works against a full set of windows, as a store does in its second week.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import handlers
from bench.run import publish, store_cpu_seconds, the_worker
from idempotent_worker.local import embedded

PARTS = 8
TARGET = 0.9

Sample = tuple[float, int, float, float]
"""(monotonic time, ids run, this process's CPU seconds, Redis's CPU seconds)"""


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
    dedup = {"ttl_seconds": int(sys.argv[2])} if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with embedded.broker(workdir) as broker, embedded.redis(workdir, appendonly=True) as server:
            bootstrap = f"127.0.0.1:{broker.port}"
            topic = f"bench-soak-{uuid.uuid4().hex[:8]}"
            publish(bootstrap, topic, count)
            samples: list[Sample] = []
            done = threading.Event()

            def sample() -> None:
                while not done.wait(1.0):
                    cpu = store_cpu_seconds(server.port)
                    samples.append(
                        (time.monotonic(), handlers.tally.total, time.process_time(), cpu)
                    )

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            url = f"redis://127.0.0.1:{server.port}/0"
            the_worker(bootstrap, url, topic, count, "noop", dedup=dedup)
            done.set()
            sampler.join()
    rates = []
    for start, end in parts(samples, count):
        ran = end[1] - start[1]
        rates.append(ran / (end[0] - start[0]))
        print(
            f"{start[1]:>10,} .. {end[1]:>10,}  {rates[-1]:8,.0f} msg/s  "
            f"worker {(end[2] - start[2]) * 1e6 / ran:5.1f} us/msg  "
            f"redis {(end[3] - start[3]) * 1e6 / ran:5.1f} us/msg"
        )
    share = rates[-1] / rates[0]
    verdict = "met" if share >= TARGET else "NOT met"
    print(f"last eighth x{share:.2f} of the first's rate (target at least x{TARGET}: {verdict})")
    return 0


def parts(samples: list[Sample], count: int) -> list[tuple[Sample, Sample]]:
    """The samples that open each ``PARTS``-th of the run, paired with the next one."""
    ran = [s for s in samples if 0 < s[1] < count]
    marks = [next(s for s in ran if s[1] >= count * k // PARTS) for k in range(PARTS)]
    return list(zip(marks, [*marks[1:], ran[-1]], strict=True))


if __name__ == "__main__":
    sys.exit(main())
