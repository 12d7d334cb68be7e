import io
import json

import pytest

from idempotent_worker.config.settings import InboxSettings, LogSettings
from idempotent_worker.errors import PermanentFailure
from idempotent_worker.inbox import Inbox
from idempotent_worker.observe.logs import configure_logging, get_logger
from idempotent_worker.processing.context import HandlerContext
from idempotent_worker.replies import Kept, Output, decode, encode, resolve, size
from idempotent_worker.types import Message


def context(default_topic="out"):
    message = Message("order-1", "in", 0, 5, b"k", b"{}")
    inbox = Inbox(InboxSettings(), "group", get_logger())
    return HandlerContext(message, 1, get_logger, default_topic, inbox, "fp", "in/0/5")


def test_kept_outputs_come_back_as_the_bytes_the_producer_sent():
    ctx = context()
    ctx.emit("é", key="k", headers={"bin": b"\x00\xff", "text": "t"})
    ctx.emit(None, topic="audit")
    kept = decode(encode(ctx.kept()))
    assert kept == [
        Kept(
            None,
            "é".encode(),
            b"k",
            [("message-id", b"order-1:0"), ("bin", b"\x00\xff"), ("text", b"t")],
        ),
        Kept("audit", None, None, [("message-id", b"order-1:1")]),
    ]
    assert size(kept) == 2 + 1 + 10 + 9 + 3 + 2 + 4 + 1 + 10 + 9
    assert decode(None) == []


def test_a_reply_goes_to_the_topic_and_correlation_of_the_message_that_produces_it():
    message = Message("order-1", "in", 0, 5, b"k", b"{}")
    inbox = Inbox(InboxSettings(), "group", get_logger())
    first = HandlerContext(
        message, 1, get_logger, "replies-a", inbox, "fp", "in/0/5", ("cid", b"c1")
    )
    first.emit(b"reply")
    first.emit(b"audit", topic="audit")
    assert first.outputs == [
        Output("replies-a", b"reply", None, [("message-id", "order-1:0"), ("cid", b"c1")]),
        Output("audit", b"audit", None, [("message-id", "order-1:1")]),
    ]
    replayed = resolve(first.kept(), "replies-b", ("cid", b"c2"))
    assert replayed == [
        Output("replies-b", b"reply", None, [("message-id", b"order-1:0"), ("cid", b"c2")]),
        Output("audit", b"audit", None, [("message-id", b"order-1:1")]),
    ]
    assert resolve(first.kept(), None, None) == replayed[1:]  # nowhere to send the reply


def test_outputs_get_deterministic_ids_from_input_id_and_position():
    for _ in range(2):  # a re-run emits the same ids
        ctx = context()
        assert ctx.emit(b"a") == "order-1:0"
        assert ctx.emit(b"b", topic="audit", key="k2", headers={"x": "1"}) == "order-1:1"
        assert ctx.outputs == [
            Output("out", b"a", None, [("message-id", "order-1:0")]),
            Output("audit", b"b", "k2", [("message-id", "order-1:1"), ("x", "1")]),
        ]


def test_emit_without_any_topic_is_a_permanent_failure():
    with pytest.raises(PermanentFailure, match="output_topic"):
        context(default_topic=None).emit(b"a")


def test_json_logs_mask_secrets():
    stream = io.StringIO()
    configure_logging(LogSettings(level="DEBUG", format="json"), ["hunter2"], stream=stream)
    get_logger(topic="t").error("auth failed", error="SASL password hunter2 rejected")
    line = json.loads(stream.getvalue())
    assert line["error"] == "SASL password *** rejected"
    assert line["topic"] == "t"
    assert line["level"] == "error"
    assert "hunter2" not in stream.getvalue()


def test_log_level_filters():
    stream = io.StringIO()
    configure_logging(LogSettings(level="WARNING"), stream=stream)
    get_logger().info("hidden")
    assert stream.getvalue() == ""
    get_logger().warning("shown")
    assert "shown" in stream.getvalue()


def test_message_json():
    assert Message("i", "t", 0, 0, None, b'{"a": 1}').json() == {"a": 1}
    with pytest.raises(ValueError, match="no value"):
        Message("i", "t", 0, 0, None, None).json()
