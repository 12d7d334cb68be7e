"""The records' values, as the scripts (idempotent_worker/dedup/scripts.py) store them.

- In progress: ``p|<token>|<lease end>|<runs>``, read by the scripts: the claim's owner,
  the end of its lease in Redis's clock (ms), and the runs of the handler begun, over
  every replica. The lease end is odd once a run was counted under this claim by BEGIN.
- Completed, compact (what nearly every record is): ``<tag><fingerprint><topic>
  <partition>/<offset>`` without spaces, 25 characters for ``orders/3/12345678``, so that
  its value fits Redis's 32-byte allocation. The tag (4 characters) is a hash of the
  claim's token: a completion repeated after an ambiguous failure writes the same value,
  and the script takes an equal value as its own. The fingerprint is the payload's 8
  bytes in URL-safe base64 (11 characters), the topic a 4-character hash of the origin's
  topic that the store's topic names resolve (``TOPICS``), the partition and the offset
  in base-64 digits.
- Completed, plain, when the compact form does not apply (a fingerprint that is not 16
  hex digits, an origin not ``<topic>/<partition>/<offset>``, a topic whose hash another
  topic has): ``=<tag>|<origin>|<fingerprint>``.
- Either is followed by ``|<reply>`` when the completion kept one (processing/replies.py).
- Completed by the previous layout, read during an upgrade: ``c|<token>|<origin>|
  <fingerprint>`` (and ``|<reply>``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from idempotent_worker.dedup.base import (
    BUSY,
    CLAIMED,
    FIRST_CLAIM,
    Claim,
    ClaimStatus,
    Completion,
    Inspection,
    State,
)

_COMPACT = re.compile(
    r"([\w-]{4})([\w-]{11})([\w-]{4})([\w-]+)/([\w-]+)(?:\|(.*))?", re.DOTALL | re.ASCII
)
_HEX_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def short_hash(text: str) -> str:
    """4 characters: 3 bytes of BLAKE2b in URL-safe base64."""
    digest = hashlib.blake2b(text.encode(), digest_size=3).digest()
    return base64.urlsafe_b64encode(digest).decode()


DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
"""The URL-safe base64 alphabet, as the digits of a partition."""

_PARTITIONS = [DIGITS[n // 64] + DIGITS[n % 64] if n >= 64 else DIGITS[n] for n in range(4096)]


def partition_digits(number: int) -> str:
    """``number`` in base-64 digits: one below 64, two below 4096."""
    if number < len(_PARTITIONS):
        return _PARTITIONS[number]
    return partition_digits(number // 64) + DIGITS[number % 64]


def from_partition_digits(text: str) -> int:
    number = 0
    for char in text:
        number = number * 64 + DIGITS.index(char)
    return number


def offset_digits(number: int) -> str:
    """``number``'s big-endian bytes in URL-safe base64 without padding: 4 characters
    below 2^24, 7 below 2^40."""
    data = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def from_offset_digits(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def split_origin(origin: str) -> tuple[str, int, int] | None:
    """``<topic>/<partition>/<offset>`` (a Kafka topic holds no ``/``), else None."""
    topic, _, rest = origin.partition("/")
    partition, _, offset = rest.partition("/")
    if not (partition.isdigit() and offset.isdigit()):
        return None
    return topic, int(partition), int(offset)


TopicNames = Callable[[Mapping[str, str]], Mapping[str, str]]
"""A store's ``TOPICS`` call: register these topics by short hash (unless the hash is
taken), and return every hash and topic the store names."""


class RecordCodec:
    """Writes completed records and reads the scripts' replies. It knows the topics
    behind the short hashes as the store's topic names do: ``names`` registers the
    topics it writes and is asked again for a hash another replica registered (without
    it, the codec knows what it is told with ``learn``)."""

    def __init__(self, names: TopicNames | None = None) -> None:
        self._names = names
        self._topics: dict[str, str] = {}  # short hash: topic, as the store names them
        self._hashes: dict[str, str] = {}  # topic: its short hash, if the store names it so
        self._asked: set[str] = set()
        self._tag = ("", "")  # the last token and its tag: a batch's completions share one

    def learn(self, topics: Mapping[str, str]) -> None:
        """Short hashes and their topics, as the store holds them."""
        self._topics.update(topics)
        self._hashes = {topic: hashed for hashed, topic in self._topics.items()}

    def records(self, completions: Sequence[Completion]) -> list[str]:
        """The completed records of ``completions``, their topics registered first."""
        if self._names is not None and (new := self.unregistered(completions)):
            self.learn(self._names(new))
        return [self.record(completion) for completion in completions]

    def claims(self, replies: Sequence[str]) -> list[Claim]:
        """CLAIM's replies, asking the store's names about hashes met for the first time."""
        self._resolve(replies)
        return [self.claim(reply) for reply in replies]

    def _resolve(self, replies: Iterable[Any]) -> None:
        if self._names is not None and self.unknown(replies):
            self.learn(self._names({}))

    def unregistered(self, completions: Iterable[Completion]) -> dict[str, str]:
        """The topics of ``completions``' origins the store does not name yet, by hash
        (a topic whose hash another topic has is left out: its records are plain)."""
        new = {}
        for completion in completions:
            topic = completion.origin.partition("/")[0]
            if topic not in self._hashes and split_origin(completion.origin):
                hashed = short_hash(topic)
                if hashed not in self._topics:
                    new[hashed] = topic
        return new

    def unknown(self, replies: Iterable[Any]) -> bool:
        """Whether a reply names a topic by a hash not learnt and not asked about yet
        (another replica registered it): the caller learns the names again, once."""
        found = False
        for reply in replies:
            compact = isinstance(reply, str) and len(reply) > 20  # not "+1", "?", a claim's
            match = _COMPACT.fullmatch(reply) if compact else None
            if match and match[3] not in self._topics and match[3] not in self._asked:
                self._asked.add(match[3])
                found = True
        return found

    def record(self, completion: Completion) -> str:
        """The completed record of ``completion``."""
        token, tag = self._tag
        if token != completion.token:
            token, tag = completion.token, short_hash(completion.token)
            self._tag = (token, tag)
        origin = split_origin(completion.origin)
        topic_hash = origin and self._hashes.get(origin[0])
        if origin and topic_hash and _HEX_FINGERPRINT.fullmatch(completion.fingerprint):
            fingerprint = base64.urlsafe_b64encode(bytes.fromhex(completion.fingerprint))
            value = (
                f"{tag}{fingerprint[:11].decode()}{topic_hash}"
                f"{partition_digits(origin[1])}/{offset_digits(origin[2])}"
            )
        else:
            if "|" in completion.origin or "|" in completion.fingerprint:
                raise ValueError("an origin or a fingerprint contains '|'")
            value = f"={tag}|{completion.origin}|{completion.fingerprint}"
        return f"{value}|{completion.reply}" if completion.reply else value

    def claim(self, reply: str) -> Claim:
        """A reply of CLAIM: a claim taken, or the record that stops it."""
        if reply == "+1":
            return FIRST_CLAIM
        if reply == "?":
            return CLAIMED
        if reply.startswith("p|"):
            return BUSY
        return self._completed(reply)

    def _completed(self, value: str) -> Claim:
        if value.startswith(("c|", "=")):
            # plain: =<tag>|origin|fingerprint; previous layout: c|<token>|origin|fingerprint
            parts = (value[2:] if value.startswith("c|") else value[1:]).split("|", 3)
            parts += [""] * (3 - len(parts))
            reply = parts[3] if len(parts) > 3 else None
            return Claim(ClaimStatus.COMPLETED, parts[1] or None, parts[2] or None, reply)
        match = _COMPACT.fullmatch(value)
        if match is None:
            return BUSY  # nothing this version wrote: wait, as for a claim
        _, fingerprint, topic_hash, partition, offset, reply = match.groups()
        topic = self._topics.get(topic_hash, f"#{topic_hash}")  # not named: shown as such
        origin = f"{topic}/{from_partition_digits(partition)}/{from_offset_digits(offset)}"
        fingerprint_hex = base64.urlsafe_b64decode(fingerprint + "=").hex()
        return Claim(ClaimStatus.COMPLETED, origin, fingerprint_hex, reply)

    def inspection(self, reply: list[Any]) -> Inspection:
        """A reply of INSPECT."""
        value, ttl, now = reply
        self._resolve([value])
        if not value:
            return Inspection(State.ABSENT)
        if not value.startswith("p|"):
            done = self._completed(value)
            return Inspection(
                State.COMPLETED, origin=done.origin, fingerprint=done.fingerprint, ttl_left_ms=ttl
            )
        _, token, lease, runs = [*value.split("|"), "", "", ""][:4]
        left = int(lease or 0) - int(now)
        if not token or left <= 0:  # let go or expired: free to claim, its runs counted
            return Inspection(State.ABSENT, runs=int(runs or 0), ttl_left_ms=ttl)
        return Inspection(
            State.IN_PROGRESS,
            runs=int(runs or 0),
            owner=token,
            lease_left_ms=left,
            ttl_left_ms=ttl,
        )


def parse_position_claim(reply: str) -> Claim:
    """A reply of SEQUENCE_CLAIM."""
    kind, _, position = reply.partition("|")
    known = int(position) if position.isdigit() else None
    if kind == "s":
        return Claim(ClaimStatus.COMPLETED, position=known)
    if kind == "+1":
        return Claim(ClaimStatus.CLAIMED, position=known, attempt=1)
    if kind == "?":
        return Claim(ClaimStatus.CLAIMED, position=known)
    return BUSY
