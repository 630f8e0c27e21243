"""basic.*: publish/consume/get, properties, bodies, acks, redelivery, prefetch,
consumers, returns, recover."""

import datetime
import decimal
import os
import time

import pika
import pytest

from conftest import (AMQP_URL, channel_error, connect, connection_error, consume_n,
                      drain, publish_confirmed, queue_depth, sync)
import amqp_raw

USER = amqp_raw.url_parts(AMQP_URL)[2]

HEADERS = {
    "str": "hello",
    "utf8": "h\u00e9llo \u2713",
    "empty-str": "",
    "bytes": b"\x00\x01\xfe\xff",
    "int": 42,
    "neg-int": -7,
    "big": 2 ** 40,
    "neg-big": -(2 ** 40),
    "true": True,
    "false": False,
    "nested": {"a": 1, "b": {"c": "deep", "d": [1, 2]}, "e": {}},
    "array": [1, "two", True, {"x": 1}, [3, [4]], None, b"\x07"],
    "empty-array": [],
    "decimal": decimal.Decimal("3.14"),
    "timestamp": datetime.datetime(2021, 6, 7, 8, 9, 10),
    "void": None,
}


def _full_props():
    return pika.BasicProperties(
        content_type="application/json", content_encoding="gzip", headers=HEADERS,
        delivery_mode=2, priority=5, correlation_id="corr-1", reply_to="reply-queue",
        expiration="600000", message_id="msg-1", timestamp=1700000000,
        type="conformance.type", user_id=USER, app_id="conformance-app")


def _assert_props(p):
    assert p.content_type == "application/json"
    assert p.content_encoding == "gzip"
    assert p.headers == HEADERS
    assert p.delivery_mode == 2
    assert p.priority == 5
    assert p.correlation_id == "corr-1"
    assert p.reply_to == "reply-queue"
    assert p.expiration == "600000"
    assert p.message_id == "msg-1"
    assert p.timestamp == 1700000000
    assert p.type == "conformance.type"
    assert p.user_id == USER
    assert p.app_id == "conformance-app"


def test_properties_round_trip_consume(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"props", _full_props())
    [(m, p, body)] = consume_n(conn, ch, q, 1, auto_ack=True)
    assert body == b"props"
    assert m.exchange == "" and m.routing_key == q and m.redelivered is False
    _assert_props(p)


def test_properties_round_trip_get(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"props", _full_props())
    m, p, body = ch.basic_get(q, auto_ack=True)
    assert body == b"props"
    _assert_props(p)


def test_no_properties_round_trip(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"bare")
    m, p, body = ch.basic_get(q, auto_ack=True)
    assert body == b"bare"
    assert p.headers is None and p.content_type is None and p.delivery_mode is None


def test_user_id_mismatch_406(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.confirm_delivery()
    with channel_error(406) as ei:
        ch.basic_publish("", q, b"x", pika.BasicProperties(user_id="not-" + USER))
    assert "user_id" in str(ei.value)


@pytest.mark.parametrize("size", [0, 1, 131064, 131065, 300 * 1024, 1024 * 1024])
def test_body_sizes_round_trip(conn, ch, names, size):
    q = names.queue()
    ch.queue_declare(q)
    body = os.urandom(size)
    publish_confirmed(conn, "", q, body)
    [(m, p, got)] = consume_n(conn, ch, q, 1, auto_ack=True, timeout=10)
    assert got == body
    if size:
        publish_confirmed(conn, "", q, body)
        m, p, got = ch.basic_get(q, auto_ack=True)
        assert got == body


def test_many_messages_keep_order(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    pub = conn.channel()
    pub.confirm_delivery()
    for i in range(500):
        pub.basic_publish("", q, b"%d" % i)
    got = consume_n(conn, ch, q, 500, auto_ack=True, timeout=10)
    assert [b for _m, _p, b in got] == [b"%d" % i for i in range(500)]


def test_get_and_get_empty_message_count(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    for i in range(3):
        publish_confirmed(conn, "", q, b"%d" % i)
    counts = []
    for i in range(3):
        m, p, body = ch.basic_get(q, auto_ack=True)
        assert body == b"%d" % i
        assert m.redelivered is False and m.routing_key == q and m.exchange == ""
        counts.append(m.message_count)
    assert counts == [2, 1, 0]
    assert ch.basic_get(q) == (None, None, None)


def test_get_missing_queue_404(ch, names):
    with channel_error(404):
        ch.basic_get(names.queue())


def test_consume_missing_queue_404(ch, names):
    with channel_error(404):
        ch.basic_consume(names.queue(), lambda *a: None)


def test_delivery_tags_increase_per_channel(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    for i in range(3):
        publish_confirmed(conn, "", q, b"%d" % i)
    tags = [ch.basic_get(q)[0].delivery_tag for _ in range(3)]
    assert tags == [1, 2, 3]
    ch.basic_ack(0, multiple=True)  # tag 0 + multiple: everything outstanding
    sync(ch)
    ch.close()
    assert queue_depth(conn.channel(), q) == 0


def test_ack_removes_message(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"a")
    m, _p, _b = ch.basic_get(q)
    ch.basic_ack(m.delivery_tag)
    sync(ch)
    ch.close()
    assert queue_depth(conn.channel(), q) == 0


def test_multiple_ack(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    for i in range(4):
        publish_confirmed(conn, "", q, b"%d" % i)
    tags = [ch.basic_get(q)[0].delivery_tag for _ in range(4)]
    ch.basic_ack(tags[2], multiple=True)  # acks 1..3, leaves 4
    sync(ch)
    ch.close()
    c2 = conn.channel()
    assert drain(c2, q) == [b"3"]


@pytest.mark.parametrize("how", ["reject", "nack"])
def test_requeue_true_sets_redelivered(conn, ch, names, how):
    q = names.queue()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"again")
    m, _p, _b = ch.basic_get(q)
    assert m.redelivered is False
    if how == "reject":
        ch.basic_reject(m.delivery_tag, requeue=True)
    else:
        ch.basic_nack(m.delivery_tag, requeue=True)
    m, _p, body = ch.basic_get(q, auto_ack=True)
    assert body == b"again" and m.redelivered is True


@pytest.mark.parametrize("how", ["reject", "nack"])
def test_requeue_false_discards(conn, ch, names, how):
    q = names.queue()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"gone")
    m, _p, _b = ch.basic_get(q)
    if how == "reject":
        ch.basic_reject(m.delivery_tag, requeue=False)
    else:
        ch.basic_nack(m.delivery_tag, requeue=False)
    assert ch.basic_get(q) == (None, None, None)


def test_nack_multiple_requeues_in_order(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    for i in range(4):
        publish_confirmed(conn, "", q, b"%d" % i)
    tags = [ch.basic_get(q)[0].delivery_tag for _ in range(3)]
    ch.basic_nack(tags[-1], multiple=True, requeue=True)
    got = []
    while True:
        m, _p, body = ch.basic_get(q, auto_ack=True)
        if m is None:
            break
        got.append((body, m.redelivered))
    assert got == [(b"0", True), (b"1", True), (b"2", True), (b"3", False)]


def test_double_ack_406(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"x")
    m, _p, _b = ch.basic_get(q)
    ch.basic_ack(m.delivery_tag)
    with channel_error(406) as ei:
        ch.basic_ack(m.delivery_tag)
        sync(ch)
    assert "unknown delivery tag" in str(ei.value)
    assert conn.is_open


def test_unknown_delivery_tag_406(conn):
    ch = conn.channel()
    with channel_error(406):
        ch.basic_ack(12345)
        sync(ch)


def test_reject_unknown_tag_406(conn):
    ch = conn.channel()
    with channel_error(406):
        ch.basic_reject(7, requeue=True)
        sync(ch)


def test_ack_on_other_channel_406(conn, names):
    q = names.queue()
    a = conn.channel()
    a.queue_declare(q)
    publish_confirmed(conn, "", q, b"x")
    m, _p, _b = a.basic_get(q)
    b = conn.channel()
    with channel_error(406):
        b.basic_ack(m.delivery_tag)
        sync(b)
    a.basic_ack(m.delivery_tag)


def test_channel_close_requeues_in_order_redelivered(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    pub = conn.channel()
    pub.confirm_delivery()
    for i in range(6):
        pub.basic_publish("", q, b"%d" % i)
    held = conn.channel()
    tags = [held.basic_get(q)[0].delivery_tag for _ in range(4)]
    held.basic_ack(tags[1])  # "1" is done
    sync(held)
    held.close()
    got = []
    while True:
        m, _p, body = ch.basic_get(q, auto_ack=True)
        if m is None:
            break
        got.append((body, m.redelivered))
    assert got == [(b"0", True), (b"2", True), (b"3", True), (b"4", False), (b"5", False)]


def test_connection_close_requeues_unacked(names):
    q = names.queue()
    c1 = connect()
    ch = c1.channel()
    ch.queue_declare(q)
    ch.confirm_delivery()
    for i in range(3):
        ch.basic_publish("", q, b"%d" % i)
    got = consume_n(c1, ch, q, 3)
    assert len(got) == 3
    c1.close()
    c2 = connect()
    try:
        ch2 = c2.channel()
        deadline = time.monotonic() + 5
        while queue_depth(ch2, q) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        res = []
        for _ in range(3):
            m, _p, body = ch2.basic_get(q, auto_ack=True)
            res.append((body, m.redelivered))
        assert res == [(b"0", True), (b"1", True), (b"2", True)]
    finally:
        c2.close()


def test_round_robin_between_consumers(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    got = {"a": [], "b": []}
    ca, cb = conn.channel(), conn.channel()
    ca.basic_consume(q, lambda c, m, p, b: got["a"].append(int(b)), auto_ack=True)
    cb.basic_consume(q, lambda c, m, p, b: got["b"].append(int(b)), auto_ack=True)
    pub = conn.channel()
    pub.confirm_delivery()
    for i in range(10):
        pub.basic_publish("", q, b"%d" % i)
    deadline = time.monotonic() + 5
    while len(got["a"]) + len(got["b"]) < 10 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert len(got["a"]) == 5 and len(got["b"]) == 5, got
    assert sorted(got["a"] + got["b"]) == list(range(10))
    # strict alternation: each consumer gets every other message
    assert {tuple(x % 2 for x in got["a"]), tuple(x % 2 for x in got["b"])} == \
        {(0,) * 5, (1,) * 5}, got


def _deliveries_after(conn, got, expect, settle=0.3):
    deadline = time.monotonic() + 5
    while len(got) < expect and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    conn.process_data_events(time_limit=settle)  # nothing more may arrive
    return len(got)


def test_prefetch_count_limits_unacked(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    for i in range(5):
        publish_confirmed(conn, "", q, b"%d" % i)
    ch.basic_qos(prefetch_count=2)
    got = []
    ch.basic_consume(q, lambda c, m, p, b: got.append(m.delivery_tag))
    assert _deliveries_after(conn, got, 2) == 2
    ch.basic_ack(got[0])
    assert _deliveries_after(conn, got, 3) == 3
    ch.basic_ack(got[2], multiple=True)
    assert _deliveries_after(conn, got, 5) == 5


def test_prefetch_per_consumer(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    for i in range(6):
        publish_confirmed(conn, "", q, b"%d" % i)
    ch.basic_qos(prefetch_count=1)  # global=False: each new consumer gets 1
    got = []
    ch.basic_consume(q, lambda c, m, p, b: got.append(b))
    ch.basic_consume(q, lambda c, m, p, b: got.append(b))
    assert _deliveries_after(conn, got, 2) == 2


def test_prefetch_with_auto_ack_is_unlimited(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    for i in range(5):
        publish_confirmed(conn, "", q, b"%d" % i)
    ch.basic_qos(prefetch_count=1)
    got = []
    ch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    assert _deliveries_after(conn, got, 5, settle=0.05) == 5


def test_prefetch_size_not_implemented_540(conn):
    # RabbitMQ: connection.close 540 NOT_IMPLEMENTED "prefetch_size!=0 (1000)"
    ch = conn.channel()
    with connection_error(540):
        ch.basic_qos(prefetch_size=1000, prefetch_count=1)


def test_exclusive_consumer_blocks_second_403(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_consume(q, lambda *a: None, exclusive=True)
    with channel_error(403):
        conn.channel().basic_consume(q, lambda *a: None)


def test_exclusive_consume_on_queue_with_consumer_403(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_consume(q, lambda *a: None)
    with channel_error(403):
        conn.channel().basic_consume(q, lambda *a: None, exclusive=True)


def test_duplicate_consumer_tag_530(conn, names):
    # RabbitMQ: connection.close 530 NOT_ALLOWED "attempt to reuse consumer tag"
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_consume(q, lambda *a: None, consumer_tag="dup-tag")
    with connection_error(530):
        # pika rejects the duplicate client-side, so send the method itself
        ch._impl._send_method(pika.spec.Basic.Consume(queue=q, consumer_tag="dup-tag"))
        conn.process_data_events(time_limit=2)
        ch.basic_qos(prefetch_count=0)


def test_same_consumer_tag_on_two_channels_ok(conn, names):
    q = names.queue()
    conn.channel().queue_declare(q)
    conn.channel().basic_consume(q, lambda *a: None, consumer_tag="shared-tag")
    conn.channel().basic_consume(q, lambda *a: None, consumer_tag="shared-tag")
    assert conn.channel().queue_declare(q, passive=True).method.consumer_count == 2


def test_server_generated_consumer_tag(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    # pika always names its consumers; send an empty tag so the broker picks one
    ok = []
    ch._impl._rpc(pika.spec.Basic.Consume(queue=q, consumer_tag=""),
                  lambda f: ok.append(f), [pika.spec.Basic.ConsumeOk])
    deadline = time.monotonic() + 5
    while not ok and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert ok and ok[0].method.consumer_tag.startswith("amq.ctag-"), ok
    assert ch.queue_declare(q, passive=True).method.consumer_count == 1


def test_cancel_stops_deliveries_and_keeps_unacked(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_qos(prefetch_count=1)
    got = []
    tag = ch.basic_consume(q, lambda c, m, p, b: got.append(m))
    publish_confirmed(conn, "", q, b"1")
    publish_confirmed(conn, "", q, b"2")
    assert _deliveries_after(conn, got, 1, settle=0.1) == 1
    ch.basic_cancel(tag)
    ch.basic_ack(got[0].delivery_tag)  # acking after cancel is fine
    conn.process_data_events(time_limit=0.2)
    assert len(got) == 1
    assert queue_depth(ch, q) == 1
    assert ch.queue_declare(q, passive=True).method.consumer_count == 0


def test_cancel_unknown_tag_is_ok(conn):
    ch = conn.channel()
    # pika would short-cut an unknown tag; send the method and wait for cancel-ok
    ok = []
    ch._impl._rpc(pika.spec.Basic.Cancel(consumer_tag="never-existed"),
                  lambda f: ok.append(f), [pika.spec.Basic.CancelOk])
    deadline = time.monotonic() + 5
    while not ok and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert ok and ok[0].method.consumer_tag == "never-existed"
    assert ch.is_open


def test_server_cancel_when_queue_deleted(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    cancels = []
    ch.add_on_cancel_callback(lambda frame: cancels.append(frame))
    tag = ch.basic_consume(q, lambda *a: None)
    conn.channel().queue_delete(q)
    deadline = time.monotonic() + 5
    while not cancels and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert cancels, "no basic.cancel from the broker"
    assert cancels[0].method.consumer_tag == tag
    assert tag not in ch.consumer_tags
    assert ch.is_open


def test_immediate_not_implemented_540(conn, names):
    # RabbitMQ: connection.close 540 NOT_IMPLEMENTED "immediate=true"
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    with connection_error(540):
        ch._impl._send_method(pika.spec.Basic.Publish(exchange="", routing_key=q,
                                                      immediate=True),
                              (pika.BasicProperties(), b"now"))
        conn.process_data_events(time_limit=2)
        ch.basic_qos(prefetch_count=0)


def test_mandatory_unroutable_returned_312(conn, names):
    ch = conn.channel()
    returned = []
    ch.add_on_return_callback(lambda c, m, p, b: returned.append((m, p, b)))
    ch.basic_publish("", names.queue(), b"lost", pika.BasicProperties(message_id="r1"),
                     mandatory=True)
    deadline = time.monotonic() + 5
    while not returned and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    [(m, p, body)] = returned
    assert m.reply_code == 312 and m.reply_text == "NO_ROUTE"
    assert body == b"lost" and p.message_id == "r1"


def test_not_mandatory_unroutable_dropped_silently(conn, names):
    ch = conn.channel()
    returned = []
    ch.add_on_return_callback(lambda *a: returned.append(a))
    ch.basic_publish("", names.queue(), b"dropped")
    conn.process_data_events(time_limit=0.3)
    assert returned == [] and ch.is_open


def test_publish_to_missing_exchange_404(conn, names):
    ch = conn.channel()
    ch.confirm_delivery()
    with channel_error(404):
        ch.basic_publish(names.exchange(), "k", b"x")
        sync(ch)


def test_recover_requeue_redelivers(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"r1")
    publish_confirmed(conn, "", q, b"r2")
    got = []
    ch.basic_consume(q, lambda c, m, p, b: got.append((b, m.redelivered)))
    assert _deliveries_after(conn, got, 2, settle=0.05) == 2
    ch.basic_recover(requeue=True)
    assert _deliveries_after(conn, got, 4, settle=0.05) == 4
    assert got == [(b"r1", False), (b"r2", False), (b"r1", True), (b"r2", True)]


def test_recover_requeue_false_not_implemented_540(conn):
    # RabbitMQ: connection.close 540 NOT_IMPLEMENTED "requeue=false"
    ch = conn.channel()
    with connection_error(540):
        ch.basic_recover(requeue=False)


def test_channel_flow_active_false_not_implemented(conn):
    # RabbitMQ: connection.close 540 NOT_IMPLEMENTED "active=false"
    ch = conn.channel()
    with connection_error(540):
        ch.flow(False)


def test_channel_flow_active_true_ok(conn):
    ch = conn.channel()
    assert ch.flow(True) is True


def test_max_message_size():
    limit = os.environ.get("AMQP_MAX_MESSAGE_SIZE")
    if not limit:
        pytest.skip("set AMQP_MAX_MESSAGE_SIZE to the broker's limit (RabbitMQ 3.10: 128 MiB, "
                    "4.x: 16 MiB) to test it")
    limit = int(limit)
    c = connect()
    try:
        ch = c.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.confirm_delivery()
        ch.basic_publish("", q, b"\0" * limit)
        assert queue_depth(ch, q) == 1
        ch.queue_purge(q)
        with channel_error(406):
            ch.basic_publish("", q, b"\0" * (limit + 1))
            sync(ch)
    finally:
        if c.is_open:
            c.close()
