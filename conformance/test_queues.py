"""Queues: declare, equivalence, counts, bind/unbind, purge, delete, exclusive
and auto-delete lifecycles, reserved names."""

import time

import pika.exceptions as pe
import pytest

from conftest import (channel_error, connect, drain, publish_confirmed, queue_depth,
                      uname)


def _wait_gone(queue, timeout=5.0):
    """True once a passive declare of queue gives 404."""
    deadline = time.monotonic() + timeout
    c = connect()
    try:
        while time.monotonic() < deadline:
            ch = c.channel()
            try:
                ch.queue_declare(queue, passive=True)
                ch.close()
            except pe.ChannelClosedByBroker as e:
                assert e.reply_code == 404
                return True
            time.sleep(0.05)
        return False
    finally:
        c.close()


def test_declare_and_passive(ch, names):
    q = names.queue()
    ok = ch.queue_declare(q)
    assert ok.method.queue == q
    assert (ok.method.message_count, ok.method.consumer_count) == (0, 0)
    ok = ch.queue_declare(q, passive=True)
    assert ok.method.queue == q


def test_passive_missing_404(ch, names):
    with channel_error(404) as ei:
        ch.queue_declare(names.queue(), passive=True)
    assert "no queue" in str(ei.value)


def test_server_named_queue(ch):
    ok = ch.queue_declare("", exclusive=True)
    name = ok.method.queue
    assert name.startswith("amq.gen-"), name
    other = ch.queue_declare("", exclusive=True).method.queue
    assert other != name
    ch.queue_declare(name, passive=True)


def test_declare_counts(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    for i in range(3):
        publish_confirmed(conn, "", q, b"%d" % i)
    c2 = conn.channel()
    c2.basic_consume(q, lambda *a: None)
    c3 = conn.channel()
    c3.basic_qos(prefetch_count=1)
    c3.basic_consume(q, lambda *a: None)
    ok = ch.queue_declare(q, passive=True)
    # c2 has no prefetch limit and took all three; ready count excludes unacked
    assert ok.method.consumer_count == 2
    assert ok.method.message_count == 0
    c2.close()
    c3.close()
    ok = ch.queue_declare(q)
    assert ok.method.consumer_count == 0
    assert ok.method.message_count == 3


@pytest.mark.parametrize("first,second,arg", [
    ({"durable": False}, {"durable": True}, "durable"),
    ({"durable": True}, {"durable": False}, "durable"),
    ({"auto_delete": False}, {"auto_delete": True}, "auto_delete"),
    ({"arguments": {"x-max-length": 10}}, {"arguments": {"x-max-length": 20}}, "x-max-length"),
    ({"arguments": {"x-max-length": 10}}, {}, "x-max-length"),
    ({}, {"arguments": {"x-message-ttl": 1000}}, "x-message-ttl"),
])
def test_redeclare_inequivalent_406(conn, names, first, second, arg):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q, **first)
    with channel_error(406) as ei:
        ch.queue_declare(q, **second)
    assert "inequivalent arg '%s'" % arg in str(ei.value), ei.value


@pytest.mark.parametrize("first,second", [(True, False), (False, True)])
def test_redeclare_exclusive_mismatch_same_connection(conn, names, first, second):
    # RabbitMQ answers an exclusive-flag mismatch, even from the owner, with
    # 405 RESOURCE_LOCKED (not 406 inequivalent arg)
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q, exclusive=first)
    with channel_error(405):
        ch.queue_declare(q, exclusive=second)


def test_redeclare_equivalent_ok(ch, names):
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments={"x-max-length": 5})
    ch.queue_declare(q, durable=True, arguments={"x-max-length": 5})
    ch.queue_delete(q)


def test_passive_ignores_attributes(ch, names):
    q = names.queue()
    ch.queue_declare(q)
    ch.queue_declare(q, passive=True, durable=True, auto_delete=True)


def test_amq_prefix_reserved_403(ch):
    with channel_error(403):
        ch.queue_declare("amq.conformance-" + uname())


def test_amq_prefix_passive_missing_404(ch):
    with channel_error(404):
        ch.queue_declare("amq.conformance-" + uname(), passive=True)


def test_bind_unbind(conn, ch, names):
    q, x = names.queue(), names.exchange()
    ch.exchange_declare(x, "direct")
    ch.queue_declare(q)
    ch.queue_bind(q, x, "rk")
    publish_confirmed(conn, x, "rk", b"bound")
    ch.queue_unbind(q, x, "rk")
    publish_confirmed(conn, x, "rk", b"unbound")
    assert drain(ch, q) == [b"bound"]
    ch.queue_unbind(q, x, "never-bound")  # unbinding a missing binding is ok


def test_unbind_what_is_gone_is_ok(ch, names):
    # RabbitMQ 3.10 answers unbind-ok when the queue, the exchange or both
    # are missing; an RPC client's reply queue may auto-delete before it
    # unbinds it.
    q, x = names.queue(), names.exchange()
    ch.exchange_declare(x, "direct")
    ch.queue_declare(q)
    ch.queue_unbind(names.queue(), x, "k")
    ch.queue_unbind(q, names.exchange(), "k")
    ch.queue_unbind(names.queue(), names.exchange(), "k")
    ch.queue_declare(q, passive=True)  # the channel is still open


def test_bind_missing_exchange_404(ch, names):
    q = names.queue()
    ch.queue_declare(q)
    with channel_error(404):
        ch.queue_bind(q, names.exchange(), "k")


def test_bind_missing_queue_404(ch, names):
    x = names.exchange()
    ch.exchange_declare(x, "direct")
    with channel_error(404):
        ch.queue_bind(names.queue(), x, "k")


def test_bind_to_default_exchange_403(ch, names):
    q = names.queue()
    ch.queue_declare(q)
    with channel_error(403):
        ch.queue_bind(q, "", "other")


def test_unbind_from_default_exchange_403(ch, names):
    q = names.queue()
    ch.queue_declare(q)
    with channel_error(403):
        ch.queue_unbind(q, "", q)


def test_purge_returns_count(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    for i in range(5):
        publish_confirmed(conn, "", q, b"%d" % i)
    assert ch.queue_purge(q).method.message_count == 5
    assert queue_depth(ch, q) == 0
    assert ch.queue_purge(q).method.message_count == 0


def test_purge_keeps_unacked(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"held")
    publish_confirmed(conn, "", q, b"ready")
    m, _p, body = ch.basic_get(q)
    assert body == b"held"
    assert conn.channel().queue_purge(q).method.message_count == 1
    ch.basic_reject(m.delivery_tag, requeue=True)
    assert drain(ch, q) == [b"held"]


def test_purge_missing_404(ch, names):
    with channel_error(404):
        ch.queue_purge(names.queue())


def test_delete_returns_message_count(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    for i in range(4):
        publish_confirmed(conn, "", q, b"%d" % i)
    assert ch.queue_delete(q).method.message_count == 4
    with channel_error(404):
        ch.queue_declare(q, passive=True)


def test_delete_missing_queue_succeeds(ch, names):
    ok = ch.queue_delete(names.queue())
    assert ok.method.message_count == 0


def test_delete_if_empty_406(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"x")
    with channel_error(406):
        ch.queue_delete(q, if_empty=True)
    ch = conn.channel()
    ch.queue_purge(q)
    ch.queue_delete(q, if_empty=True)


def test_delete_if_unused_406(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    cons = conn.channel()
    tag = cons.basic_consume(q, lambda *a: None)
    with channel_error(406):
        ch.queue_delete(q, if_unused=True)
    cons.basic_cancel(tag)
    conn.channel().queue_delete(q, if_unused=True)


def test_exclusive_queue_locked_for_other_connections(conn, conn2, names):
    q = names.queue()
    conn.channel().queue_declare(q, exclusive=True)
    other = conn2.channel()
    with channel_error(405):
        other.queue_declare(q, passive=True)
    for op in (lambda c: c.queue_declare(q, exclusive=True),
               lambda c: c.queue_declare(q),
               lambda c: c.basic_consume(q, lambda *a: None),
               lambda c: c.basic_get(q),
               lambda c: c.queue_purge(q),
               lambda c: c.queue_delete(q),
               lambda c: c.queue_bind(q, "amq.direct", "k")):
        with channel_error(405):
            op(conn2.channel())
    # the owner still uses it
    conn.channel().queue_declare(q, passive=True)


def test_exclusive_queue_disappears_with_its_connection(names):
    q = names.queue()
    c = connect()
    c.channel().queue_declare(q, exclusive=True)
    c.close()
    assert _wait_gone(q)


def test_exclusive_queue_survives_channel_close(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q, exclusive=True)
    ch.close()
    conn.channel().queue_declare(q, passive=True)


def test_auto_delete_after_last_consumer_cancels(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q, auto_delete=True)
    t1 = ch.basic_consume(q, lambda *a: None)
    t2 = ch.basic_consume(q, lambda *a: None)
    ch.basic_cancel(t1)
    conn.channel().queue_declare(q, passive=True)  # one consumer left
    ch.basic_cancel(t2)
    assert _wait_gone(q)


def test_auto_delete_without_consumers_stays(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q, auto_delete=True)
    time.sleep(0.2)
    ch.queue_declare(q, passive=True)


def test_auto_delete_after_consumer_channel_closes(conn, names):
    q = names.queue()
    conn.channel().queue_declare(q, auto_delete=True)
    cons = conn.channel()
    cons.basic_consume(q, lambda *a: None)
    cons.close()
    assert _wait_gone(q)


def test_queue_name_too_long_is_rejected(ch):
    # pika refuses names over 255 bytes client side; 255 is the limit that works
    q = "q" * 255
    ch.queue_declare(q, auto_delete=True)
    ch.queue_delete(q)


def test_an_unknown_queue_type_is_refused(ch, names):
    with pytest.raises(pe.ChannelClosedByBroker) as e:
        ch.queue_declare(names.queue(), durable=True, arguments={"x-queue-type": "foo"})
    assert e.value.reply_code == 406
    assert "unsupported queue type 'foo'" in e.value.reply_text


def test_a_queue_type_that_is_not_a_string_is_refused(conn, names):
    ch = conn.channel()
    with pytest.raises(pe.ChannelClosedByBroker) as e:
        ch.queue_declare(names.queue(), durable=True, arguments={"x-queue-type": 5})
    assert e.value.reply_code == 406
    assert "unacceptable_type" in e.value.reply_text


def test_a_classic_queue_type_is_a_queue(ch, names):
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments={"x-queue-type": "classic"})
    ch.basic_publish("", q, b"x")
    assert ch.queue_declare(q, passive=True).method.message_count in (0, 1)
