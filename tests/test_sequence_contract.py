"""The entity-position part of the dedup store contract (sequence routes), on every
store: the in-memory one, Redis, Redis through Sentinel and a Redis Cluster."""

import pytest

from idempotent_worker.dedup import ClaimStatus, State
from idempotent_worker.dedup.base import Completion
from tests.support.stores import LEASE, prefix_keys

ENTITY = "orders\x1f42"


def raise_to(store, entity, token, sequence, ttl=None):
    """Complete ``entity``'s claim under ``token`` at ``sequence``."""
    completion = Completion(entity, token, "t/0/1", sequence=sequence)
    return store.complete([completion], 60, ttl)[0]


def test_an_entity_without_a_position_is_claimed_whatever_its_first_sequence(store):
    (claim,) = store.claim_positions([(ENTITY, 7)], "t1", LEASE)
    assert (claim.status, claim.position, claim.attempt) == (ClaimStatus.CLAIMED, None, 1)
    assert store.state(ENTITY) is State.IN_PROGRESS


def test_completion_raises_the_position_and_ends_the_claim(store):
    store.claim_positions([(ENTITY, 7)], "t1", LEASE)
    assert raise_to(store, ENTITY, "t1", 7)
    assert store.state(ENTITY) is State.ABSENT  # the claim is gone, the position stays
    stale = store.claim_positions([(ENTITY, 7), ("orders\x1f43", 1)], "t2", LEASE)
    assert [(c.status, c.position) for c in stale] == [
        (ClaimStatus.COMPLETED, 7),
        (ClaimStatus.CLAIMED, None),
    ]
    (above,) = store.claim_positions([(ENTITY, 9)], "t2", LEASE)
    assert (above.status, above.position) == (ClaimStatus.CLAIMED, 7)


def test_one_claim_per_entity_whatever_the_sequence(store):
    store.claim_positions([(ENTITY, 1)], "t1", LEASE)
    (other,) = store.claim_positions([(ENTITY, 2)], "t2", LEASE)
    assert other.status is ClaimStatus.BUSY


def test_a_position_is_never_lowered(store):
    store.claim_positions([(ENTITY, 9)], "t1", LEASE)
    assert raise_to(store, ENTITY, "t1", 9)
    # A completion of a lower sequence (its claim taken before 9 was applied, say) is
    # accepted and changes nothing.
    assert raise_to(store, ENTITY, "t-late", 4)
    (claim,) = store.claim_positions([(ENTITY, 9)], "t2", LEASE)
    assert (claim.status, claim.position) == (ClaimStatus.COMPLETED, 9)


def test_another_holders_claim_fences_a_completion_unless_already_applied(store_and_wait):
    store, wait = store_and_wait
    store.claim_positions([(ENTITY, 3)], "t1", LEASE)
    wait(LEASE * 1.5)  # t1's lease runs out; t2 takes the entity
    assert store.claim_positions([(ENTITY, 3)], "t2", LEASE)[0].status is ClaimStatus.CLAIMED
    assert not raise_to(store, ENTITY, "t1", 3)  # the lease was lost
    assert raise_to(store, ENTITY, "t2", 3)
    assert raise_to(store, ENTITY, "t2", 3)  # an ambiguous completion repeated
    store.claim_positions([(ENTITY, 4)], "t3", LEASE)
    assert raise_to(store, ENTITY, "t2", 3)  # at or below the position: applied already


def test_runs_are_counted_per_entity_claim(store):
    (first,) = store.claim_positions([(ENTITY, 5)], "t1", LEASE)
    assert first.attempt == 1
    store.release([ENTITY], "t1", "keep")  # failed: retried later
    (again,) = store.claim_positions([(ENTITY, 5)], "t2", LEASE)
    assert (again.status, again.attempt) == (ClaimStatus.CLAIMED, 0)
    assert store.begin(ENTITY, "t2") == 2


def test_sequences_compare_exactly_beyond_double_precision(store):
    big = 2**63 - 1
    store.claim_positions([(ENTITY, big - 1)], "t1", LEASE)
    assert raise_to(store, ENTITY, "t1", big - 1)
    assert store.claim_positions([(ENTITY, big - 1)], "t2", LEASE)[0].position == big - 1
    assert store.claim_positions([(ENTITY, big)], "t2", LEASE)[0].status is ClaimStatus.CLAIMED
    # Fewer digits is lower, though "1000..." sorts after "9223..." as text; more is higher.
    assert store.claim_positions([(ENTITY, 10**18)], "t3", LEASE)[0].status is ClaimStatus.COMPLETED
    assert store.claim_positions([(ENTITY, 10**19)], "t3", LEASE)[0].status is ClaimStatus.BUSY


def test_positions_and_ids_live_side_by_side(store):
    store.claim(["a"], "t1", LEASE)
    store.claim_positions([(ENTITY, 1)], "t1", LEASE)
    done = store.complete(
        [Completion("a", "t1", "t/0/1", "f"), Completion(ENTITY, "t1", "t/0/2", sequence=1)], 60
    )
    assert done == [True, True]
    assert store.state("a") is State.COMPLETED
    assert store.claim_positions([(ENTITY, 1)], "t2", LEASE)[0].status is ClaimStatus.COMPLETED


@pytest.mark.parametrize("kind", ["redis", "cluster"])
def test_an_entity_at_rest_is_one_key_without_expiry_unless_given_a_ttl(request, kind):
    store, client, prefix = request.getfixturevalue(f"{kind}_store")
    entities = [f"orders\x1f{n}" for n in range(50)]
    store.claim_positions([(e, 1) for e in entities], "t1", LEASE)
    completions = [Completion(e, "t1", "t/0/1", sequence=1) for e in entities]
    assert all(store.complete(completions[:25], 60))
    assert all(store.complete(completions[25:], 60, 3600))
    keys = [key for key in prefix_keys(client, prefix) if b"=" in key]  # not windows, index
    assert len(keys) == 50
    ttls = sorted(client.ttl(key) for key in keys)
    assert ttls[:25] == [-1] * 25 and 3500 < ttls[25] <= 3600
