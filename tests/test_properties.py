"""Properties of the pure parts, over generated inputs (hypothesis): the record codec
reads back what it wrote and never writes two origins alike; id extraction gives an id
or a clear reason, never anything else."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from idempotent_worker.config.ids import MAX_ID_LENGTH, SEPARATOR, parse_id_spec
from idempotent_worker.dedup.base import ClaimStatus, Completion
from idempotent_worker.dedup.encoding import RecordCodec, short_hash
from idempotent_worker.errors import MessageIdError

TOPICS = st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True)
PARTITIONS = st.integers(min_value=0, max_value=100_000)
OFFSETS = st.integers(min_value=0, max_value=2**63 - 1)
FINGERPRINTS = st.one_of(
    st.from_regex(r"[0-9a-f]{16}", fullmatch=True),  # the worker's own (blake2b, 8 bytes)
    st.from_regex(r"[0-9A-Za-z]{0,20}", fullmatch=True),  # anything else: plain records
)
TOKENS = st.from_regex(r"[a-z0-9-]{1,20}:[0-9]{1,6}", fullmatch=True)
REPLIES = st.one_of(st.none(), st.text(min_size=1, max_size=60))


def codec_knowing(topics: list[str]) -> RecordCodec:
    """A codec that learned its topics' short hashes as a store registers them: the first
    topic with a hash takes it; a later one with the same hash is written plain."""
    names: dict[str, str] = {}
    for topic in topics:
        names.setdefault(short_hash(topic), topic)
    codec = RecordCodec()
    codec.learn(names)
    return codec


@settings(max_examples=300)
@given(
    topics=st.lists(TOPICS, min_size=1, max_size=5),
    pick=st.integers(min_value=0, max_value=4),
    partition=PARTITIONS,
    offset=OFFSETS,
    fingerprint=FINGERPRINTS,
    token=TOKENS,
    reply=REPLIES,
)
def test_a_record_reads_back_as_written(topics, pick, partition, offset, fingerprint, token, reply):
    codec = codec_knowing(topics)
    origin = f"{topics[pick % len(topics)]}/{partition}/{offset}"
    record = codec.record(Completion("id", token, origin, fingerprint, reply or ""))
    claim = codec.claim(record)
    assert claim.status is ClaimStatus.COMPLETED
    assert claim.origin == origin
    assert (claim.fingerprint or "") == fingerprint
    assert claim.reply == reply


@settings(max_examples=300)
@given(
    topics=st.lists(TOPICS, min_size=2, max_size=6, unique=True),
    first=st.tuples(st.integers(0, 5), PARTITIONS, OFFSETS),
    second=st.tuples(st.integers(0, 5), PARTITIONS, OFFSETS),
    fingerprint=FINGERPRINTS,
)
def test_two_origins_never_encode_alike(topics, first, second, fingerprint):
    codec = codec_knowing(topics)
    origins = [f"{topics[t % len(topics)]}/{p}/{o}" for t, p, o in (first, second)]
    records = [codec.record(Completion("id", "h:1", o, fingerprint)) for o in origins]
    assert (records[0] == records[1]) == (origins[0] == origins[1])


HEADER_VALUES = st.one_of(st.none(), st.binary(max_size=300))


@settings(max_examples=300)
@given(
    spec=st.sampled_from(["header:message-id", "key", "json:order.id", "hash", "coordinates"]),
    key=st.one_of(st.none(), st.binary(max_size=300)),
    value=st.one_of(
        st.none(),
        st.binary(max_size=300),
        st.builds(
            lambda node: json.dumps({"order": {"id": node}}).encode(),
            st.one_of(st.text(max_size=300), st.integers(), st.booleans(), st.none()),
        ),
    ),
    header=HEADER_VALUES,
)
def test_an_id_is_a_usable_string_or_a_reason(spec, key, value, header):
    extract = parse_id_spec(spec)
    try:
        id = extract("t", 1, 2, key, value, {"message-id": header})
    except MessageIdError as exc:
        assert exc.reason in {"id_missing", "id_invalid", "id_not_utf8", "value_not_json"}
        assert exc.detail
        return
    assert isinstance(id, str) and len(id) > 0
    assert len(id) <= MAX_ID_LENGTH or spec in {"hash", "coordinates"}
    assert SEPARATOR not in id


@given(key=st.binary(max_size=50), value=st.binary(max_size=50))
def test_hash_ids_differ_when_key_and_value_split_differently(key, value):
    extract = parse_id_spec("hash")
    whole = key + value
    moved = (whole[:1], whole[1:]) if len(whole) > 1 else (b"", whole)
    same = moved == (key, value)
    assert (extract("t", 0, 0, *moved, {}) == extract("t", 0, 0, key, value, {})) == same
