import io
import json

import pytest

from worker.context import HandlerContext, Output
from worker.errors import PermanentFailure
from worker.inbox import Inbox, decode_outputs, encode_outputs
from worker.logs import configure_logging, get_logger
from worker.settings import InboxSettings, LogSettings
from worker.types import Message


def context(default_topic="out"):
    message = Message("order-1", "in", 0, 5, b"k", b"{}")
    inbox = Inbox(InboxSettings(), "group", get_logger())
    return HandlerContext(message, 1, get_logger, default_topic, inbox, "fp", "in/0/5")


def test_stored_outputs_come_back_as_the_bytes_the_producer_sent():
    ctx = context()
    ctx.emit("é", key="k", headers={"bin": b"\x00\xff", "text": "t"})
    ctx.emit(None, topic="audit")
    stored = encode_outputs(ctx.outputs, limit=1000)
    assert decode_outputs(stored) == [
        Output(
            "out",
            "é".encode(),
            b"k",
            [("message-id", b"order-1:0"), ("bin", b"\x00\xff"), ("text", b"t")],
        ),
        Output("audit", None, None, [("message-id", b"order-1:1")]),
    ]
    assert decode_outputs(None) == []


def test_stored_outputs_over_the_limit_are_a_permanent_failure():
    ctx = context()
    ctx.emit(b"x" * 10, key=b"k")  # 10 + 1 + len("message-id") + len("order-1:0") = 30 bytes
    assert encode_outputs(ctx.outputs, limit=30)
    with pytest.raises(
        PermanentFailure, match=r"take 30 bytes, over inbox.max_output_bytes \(29\)"
    ):
        encode_outputs(ctx.outputs, limit=29)


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


def test_message_json():
    assert Message("i", "t", 0, 0, None, b'{"a": 1}').json() == {"a": 1}
    with pytest.raises(ValueError, match="no value"):
        Message("i", "t", 0, 0, None, None).json()
