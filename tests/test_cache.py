"""The local cache of completed ids: pure logic, on a fake clock."""

from idempotent_worker.dedup import ClaimStatus
from idempotent_worker.dedup.base import Claim
from idempotent_worker.processing.cache import CompletedIds


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def done(origin):
    return Claim(ClaimStatus.COMPLETED, origin, "f")


def test_the_least_recently_seen_id_is_forgotten_first():
    cache = CompletedIds(2, ttl_seconds=60, clock=Clock())
    cache.put_each([("a", done("t/0/1")), ("b", done("t/0/2"))])
    assert cache.get("a") == done("t/0/1")  # a is now the most recently seen
    cache.put("c", done("t/0/3"))
    assert cache.get_each(["a", "b", "c", "d"]) == {"a": done("t/0/1"), "c": done("t/0/3")}


def test_an_entry_lives_at_most_the_ttl():
    clock = Clock()
    cache = CompletedIds(10, ttl_seconds=60, clock=clock)
    cache.put("a", done("t/0/1"))
    clock.now = 59.9
    assert cache.get("a") is not None  # seeing it does not extend its life,
    cache.put("a", done("t/0/1"))  # nor does skipping a duplicate of it
    clock.now = 60.0
    assert cache.get("a") is None


def test_size_zero_remembers_nothing():
    cache = CompletedIds(0, ttl_seconds=60, clock=Clock())
    cache.put_each([("a", done("t/0/1"))])
    assert cache.get_each(["a"]) == {}
