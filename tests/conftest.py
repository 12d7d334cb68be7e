from __future__ import annotations

import itertools
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from idempotent_worker.local import topologies
from idempotent_worker.local.demo import create_topics
from tests.support import chaos, figures, services

pytest_plugins = ["tests.support.stores"]


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def kafka_bootstrap(service_dir: Path) -> Iterator[str]:
    with services.kafka_bootstrap(service_dir) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def redis_url(service_dir: Path) -> Iterator[str]:
    with services.redis_url(service_dir) as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster_url(service_dir: Path) -> Iterator[str]:
    """A Redis Cluster shared by the session's tests (each uses its own key prefix)."""
    with services.redis_cluster_url(service_dir) as url:
        yield url


@pytest.fixture(scope="session")
def redis_sentinel(service_dir: Path) -> Iterator[topologies.RedisSentinel]:
    """A primary, a replica and three Sentinels that require ``services.SENTINEL_PASSWORD``,
    shared by the session's tests (each uses its own key prefix)."""
    with topologies.RedisSentinel(
        service_dir / "sentinel", sentinel_password=services.SENTINEL_PASSWORD
    ) as sentinel:
        yield sentinel


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database shared by the session's tests (each uses its own tables)."""
    with services.postgres_url() as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


_names = itertools.count()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Names no other test uses: every test gets its own topics, group and key prefix."""
    test = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    run = uuid.uuid4().hex[:6]
    return lambda kind: f"{kind}-{test}-{run}-{next(_names)}"


@pytest.fixture
def make_topics(kafka_bootstrap: str) -> Callable[[dict[str, int]], None]:
    return lambda topics: create_topics(kafka_bootstrap, topics)


class Ledger:
    """The file the test handlers append each run's message id to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def runs(self) -> Counter[str]:
        return Counter(self.path.read_text().splitlines())  # (an id may hold a space)


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    path = tmp_path / "ledger.txt"
    monkeypatch.setenv("LEDGER_PATH", str(path))
    return Ledger(path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fault scenarios run in two queues, each one scenario at a time on a pytest-xdist
    worker (`make test` runs three): the process faults of test_chaos.py in one, the
    Redis topologies', the inbox's and the network partitions' in the other (about as
    long; one queue took longer than the whole suite should). Two scenarios at a time
    on two cores is as much as their timing allows. The image build and the package's
    tests have a queue each. The rest of the suite fills in."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("chaos"):
            process_faults = item.module is not None and item.module.__name__.endswith("test_chaos")
            item.add_marker(pytest.mark.xdist_group("faults" if process_faults else "faults-2"))
        elif item.get_closest_marker("image"):  # one image build, beside the fault scenarios
            item.add_marker(pytest.mark.xdist_group("image"))
        elif item.get_closest_marker("package"):
            # One build of the package: two at once in the checkout share setuptools'
            # sdist tree there (one removed a file the other was copying).
            item.add_marker(pytest.mark.xdist_group("package"))


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        handle, path = tempfile.mkstemp(prefix="fault-report-", suffix=".jsonl")
        os.close(handle)
        os.environ[chaos.REPORT_FILE] = path  # inherited by the xdist workers it starts
        handle, path = tempfile.mkstemp(prefix="test-figures-", suffix=".txt")
        os.close(handle)
        os.environ[figures.FIGURES_FILE] = path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if table := chaos.report_table():
        terminalreporter.section("fault scenarios")
        for line in table:
            terminalreporter.write_line(line)
    if lines := figures.recorded():
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        Path(os.environ.pop(chaos.REPORT_FILE)).unlink(missing_ok=True)
        Path(os.environ.pop(figures.FIGURES_FILE)).unlink(missing_ok=True)
