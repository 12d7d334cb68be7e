import hashlib

import pytest

from idempotent_worker.config.ids import MAX_ID_LENGTH, parse_id_spec, parse_position_specs
from idempotent_worker.errors import MessageIdError


def extract(spec, *, key=None, value=None, headers=None, topic="t", partition=1, offset=7):
    return parse_id_spec(spec)(topic, partition, offset, key, value, headers or {})


def test_header_id():
    assert extract("header:message-id", headers={"message-id": b"abc"}) == "abc"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "id_missing"),
        ({"message-id": b""}, "id_missing"),
        ({"message-id": b"\xff"}, "id_not_utf8"),
    ],
)
def test_header_id_errors(headers, reason):
    with pytest.raises(MessageIdError) as caught:
        extract("header:message-id", headers=headers)
    assert caught.value.reason == reason


def test_key_id():
    assert extract("key", key=b"k-1") == "k-1"
    with pytest.raises(MessageIdError, match="id_missing"):
        extract("key")


def test_json_id_follows_dotted_path():
    assert extract("json:order.id", value=b'{"order": {"id": 42}}') == "42"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "id_missing"),
        (b"not json", "value_not_json"),
        (b"\xff\xfe", "value_not_json"),
        (b'{"order": {}}', "id_missing"),
        (b'{"order": 3}', "id_missing"),
        (b'{"order": {"id": true}}', "id_invalid"),
        (b'{"order": {"id": [1]}}', "id_invalid"),
        (b'{"order": {"id": ""}}', "id_missing"),
    ],
)
def test_json_id_errors(value, reason):
    with pytest.raises(MessageIdError) as caught:
        extract("json:order.id", value=value)
    assert caught.value.reason == reason


def test_hash_distinguishes_where_key_ends_and_missing_from_empty():
    assert extract("hash", key=b"ab", value=b"c") != extract("hash", key=b"a", value=b"bc")
    assert extract("hash", key=None, value=b"x") != extract("hash", key=b"", value=b"x")
    expected = hashlib.sha256((2).to_bytes(8, "big") + b"ab" + (1).to_bytes(8, "big") + b"c")
    assert extract("hash", key=b"ab", value=b"c") == expected.hexdigest()


def test_coordinates_id():
    assert extract("coordinates", topic="orders", partition=3, offset=99) == "orders/3/99"


def test_overlong_id_is_invalid():
    with pytest.raises(MessageIdError, match="id_invalid"):
        extract("key", key=b"x" * (MAX_ID_LENGTH + 1))


@pytest.mark.parametrize("spec", ["", "header:", "json:", "json:a..b", "keys", "header"])
def test_bad_specs_are_rejected(spec):
    with pytest.raises(ValueError, match="is not an id spec"):
        parse_id_spec(spec)


def position(entity, sequence, *, key=None, value=None, headers=None):
    extract = parse_position_specs(entity, sequence)
    return extract("t", 0, 1, key, value, headers or {})


def test_entity_and_sequence_from_key_header_or_json():
    assert position("key", "header:version", key=b"o-1", headers={"version": b"7"}) == ("o-1", 7)
    value = b'{"order": {"id": "o-2", "version": 12}}'
    assert position("json:order.id", "json:order.version", value=value) == ("o-2", 12)
    assert position("header:e", "json:v", headers={"e": b"o-3"}, value=b'{"v": "0042"}') == (
        "o-3",
        42,
    )
    assert position("key", "header:v", key=b"o", headers={"v": b"18446744073709551615"}) == (
        "o",
        2**64 - 1,
    )


@pytest.mark.parametrize(
    ("key", "headers", "value", "reason"),
    [
        (None, {"v": b"1"}, None, "entity_missing"),
        (b"\xff", {"v": b"1"}, None, "entity_not_utf8"),
        (b"a\x1fb", {"v": b"1"}, None, "entity_invalid"),
        (b"o", {}, None, "sequence_missing"),
        (b"o", {"v": b"-1"}, None, "sequence_invalid"),
        (b"o", {"v": b"1.5"}, None, "sequence_invalid"),
        (b"o", {"v": b"\xd9\xa3"}, None, "sequence_invalid"),  # a non-ASCII digit
        (b"o", {"v": b"1" * 21}, None, "sequence_invalid"),
    ],
)
def test_entity_and_sequence_errors(key, headers, value, reason):
    with pytest.raises(MessageIdError) as caught:
        position("key", "header:v", key=key, headers=headers, value=value)
    assert caught.value.reason == reason


@pytest.mark.parametrize("value", [b'{"v": -3}', b'{"v": true}', b'{"v": 2.0}', b'{"v": "x"}'])
def test_a_json_sequence_is_a_non_negative_integer(value):
    with pytest.raises(MessageIdError) as caught:
        position("key", "json:v", key=b"o", value=value)
    assert caught.value.reason == "sequence_invalid"


def test_an_id_may_not_hold_the_separator_of_entity_claims():
    with pytest.raises(MessageIdError) as caught:
        extract("key", key=b"orders\x1f42")
    assert caught.value.reason == "id_invalid"


CE = {"ce_specversion": b"1.0", "ce_type": b"order.placed"}
STRUCTURED = {"content-type": b"application/cloudevents+json; charset=UTF-8"}


def test_a_cloudevent_is_named_by_its_source_and_id_in_either_mode():
    binary = extract("cloudevents", headers={**CE, "ce_source": b"/shop", "ce_id": b"A-1"})
    value = b'{"specversion": "1.0", "source": "/shop", "id": "A-1", "data": {}}'
    structured = extract("cloudevents", value=value, headers=STRUCTURED)
    assert binary == structured == "/shop A-1"
    # The same id from another source is another event.
    assert extract("cloudevents", headers={"ce_source": b"/stock", "ce_id": b"A-1"}) != binary


@pytest.mark.parametrize(
    ("headers", "value", "reason"),
    [
        ({}, b'{"source": "/shop", "id": "A-1"}', "id_missing"),  # neither mode
        ({"ce_id": b"A-1"}, None, "id_missing"),
        ({"ce_source": b"/shop"}, None, "id_missing"),
        ({"ce_source": b"/my shop", "ce_id": b"A-1"}, None, "id_invalid"),
        ({"ce_source": b"/shop", "ce_id": b"\xff"}, None, "id_not_utf8"),
        (STRUCTURED, b'{"id": "A-1"}', "id_missing"),
        (STRUCTURED, b'{"source": "/shop", "id": 7}', "id_invalid"),
        (STRUCTURED, b"[1]", "id_invalid"),
        (STRUCTURED, b"not json", "value_not_json"),
        (STRUCTURED, None, "id_missing"),
    ],
)
def test_what_is_not_a_cloudevent_is_refused_with_its_reason(headers, value, reason):
    with pytest.raises(MessageIdError) as caught:
        extract("cloudevents", value=value, headers=headers)
    assert caught.value.reason == reason


def test_a_cloudevent_id_is_not_an_entity():
    with pytest.raises(ValueError, match="not an entity spec"):
        parse_position_specs("cloudevents", "header:seq")
