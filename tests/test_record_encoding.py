"""The completed records' values (idempotent_worker/dedup/encoding.py): pure logic, no server."""

import pytest

from idempotent_worker.dedup.base import ClaimStatus, Completion
from idempotent_worker.dedup.encoding import RecordCodec, short_hash

FINGERPRINT = "9f86d081884c7d65"


def codec_naming(*topics):
    codec = RecordCodec()
    codec.learn({short_hash(topic): topic for topic in topics})
    return codec


@pytest.mark.parametrize(
    "origin",
    ["orders/3/12345678", "payments.v2/11/999999999999", "t/0/0", "orders/63/1099511627775"],
)
def test_a_compact_record_fits_28_characters_and_reads_back(origin):
    codec = codec_naming(origin.split("/")[0])
    record = codec.record(Completion("order-1", "host-1-abcdef01:7", origin, FINGERPRINT))
    assert len(record) <= 28 and "|" not in record
    claim = codec.claim(record)
    assert (claim.status, claim.origin, claim.fingerprint, claim.reply) == (
        ClaimStatus.COMPLETED,
        origin,
        FINGERPRINT,
        None,
    )


def test_a_kept_reply_follows_the_record():
    codec = codec_naming("orders")
    reply = '[{"topic":null,"value":"a|b"}]'
    record = codec.record(Completion("o", "t:1", "orders/0/5", FINGERPRINT, reply))
    assert codec.claim(record).reply == reply


@pytest.mark.parametrize(
    ("origin", "fingerprint"),
    [("orders/0/5", "fp"), ("not-an-origin", FINGERPRINT), ("unnamed/0/5", FINGERPRINT)],
)
def test_what_the_compact_form_cannot_hold_is_written_plain(origin, fingerprint):
    codec = codec_naming("orders")
    record = codec.record(Completion("o", "t:1", origin, fingerprint, "[]"))
    assert record.startswith("=")
    claim = codec.claim(record)
    assert (claim.origin, claim.fingerprint, claim.reply) == (origin, fingerprint, "[]")


def test_a_topic_whose_hash_another_topic_holds_is_not_registered():
    codec = RecordCodec()
    taken = short_hash("orders")
    codec.learn({taken: "orders"})
    assert codec.unregistered([Completion("o", "t", "refunds/0/1")]) == {
        short_hash("refunds"): "refunds"
    }
    assert codec.unregistered([Completion("o", "t", "orders/0/1")]) == {}


def test_the_same_completion_writes_the_same_record_and_another_token_another():
    codec = codec_naming("orders")
    done = Completion("o", "host-1-aa:1", "orders/0/5", FINGERPRINT)
    assert codec.record(done) == codec.record(done)
    other = Completion("o", "host-2-bb:1", "orders/0/5", FINGERPRINT)
    assert codec.record(other) != codec.record(done)


def test_records_of_the_previous_layout_and_claims_read_as_before():
    codec = RecordCodec()
    old = codec.claim("c|host-1:1|orders/0/5|f1|[1]")
    assert (old.status, old.origin, old.fingerprint, old.reply) == (
        ClaimStatus.COMPLETED,
        "orders/0/5",
        "f1",
        "[1]",
    )
    assert codec.claim("p|host-1:1|1795499233900|1").status is ClaimStatus.BUSY
    assert codec.claim("+1").attempt == 1


def test_an_unknown_topic_hash_is_asked_about_once_and_shown_as_a_hash():
    writer = codec_naming("orders")
    record = writer.record(Completion("o", "t:1", "orders/0/5", FINGERPRINT))
    reader = RecordCodec()
    assert reader.unknown([record]) and not reader.unknown([record])
    assert reader.claim(record).origin == f"#{short_hash('orders')}/0/5"
