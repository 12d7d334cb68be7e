import hashlib

import pytest

from worker.errors import MessageIdError
from worker.ids import MAX_ID_LENGTH, parse_id_spec


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
