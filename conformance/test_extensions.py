"""RabbitMQ extensions that clients rely on and Warren advertises or is expected
to honour: per-queue TTL/length/expiry arguments, dead-lettering, reject-publish
(the one way to see a basic.nack), priority queues, consumer priorities
(capability consumer_priorities) and direct reply-to (capability direct_reply_to)."""

import time

import pika
import pika.exceptions as pe
import pytest

from conftest import drain, publish_confirmed, queue_depth

pytestmark = pytest.mark.extension


def test_message_ttl_expires(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q, arguments={"x-message-ttl": 50})
    publish_confirmed(conn, "", q, b"short-lived")
    time.sleep(0.3)
    assert drain(ch, q) == []


def test_max_length_drops_head(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q, arguments={"x-max-length": 2})
    for i in range(4):
        publish_confirmed(conn, "", q, b"%d" % i)
    assert drain(ch, q) == [b"2", b"3"]


def test_rejected_to_dead_letter_exchange(conn, ch, names):
    q, dlx, dlq = names.queue(), names.exchange(), names.queue()
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx})
    publish_confirmed(conn, "", q, b"dead")
    m, _p, _b = ch.basic_get(q)
    ch.basic_reject(m.delivery_tag, requeue=False)
    deadline = time.monotonic() + 5
    while queue_depth(ch, dlq) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    m, p, body = ch.basic_get(dlq, auto_ack=True)
    assert body == b"dead"
    death = p.headers["x-death"][0]
    assert death["reason"] == "rejected" and death["queue"] == q


def test_consumer_priorities(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    got = {"low": 0, "high": 0}
    low, high = conn.channel(), conn.channel()
    low.basic_consume(q, lambda *a: got.__setitem__("low", got["low"] + 1), auto_ack=True,
                      arguments={"x-priority": 0})
    high.basic_consume(q, lambda *a: got.__setitem__("high", got["high"] + 1),
                       auto_ack=True, arguments={"x-priority": 10})
    pub = conn.channel()
    pub.confirm_delivery()
    for i in range(6):
        pub.basic_publish("", q, b"%d" % i)
    deadline = time.monotonic() + 5
    while got["low"] + got["high"] < 6 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert got == {"low": 0, "high": 6}


def test_queue_max_priority_orders_messages(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q, arguments={"x-max-priority": 10})
    pub = conn.channel()
    pub.confirm_delivery()
    for body, prio in ((b"p1", 1), (b"p9", 9), (b"p5", 5), (b"none", None)):
        pub.basic_publish("", q, body, pika.BasicProperties(priority=prio))
    assert drain(ch, q) == [b"p9", b"p5", b"p1", b"none"]


def test_direct_reply_to(conn, names):
    server_q = names.queue()
    srv = conn.channel()
    srv.queue_declare(server_q)
    client = conn.channel()
    replies = []
    client.basic_consume("amq.rabbitmq.reply-to",
                         lambda c, m, p, b: replies.append((b, p.correlation_id)),
                         auto_ack=True)
    client.basic_publish("", server_q, b"ping", pika.BasicProperties(
        reply_to="amq.rabbitmq.reply-to", correlation_id="c-1"))
    deadline = time.monotonic() + 5
    req = (None, None, None)
    while req[0] is None and time.monotonic() < deadline:
        req = srv.basic_get(server_q, auto_ack=True)
    m, p, body = req
    assert body == b"ping"
    assert p.reply_to.startswith("amq.rabbitmq.reply-to."), p.reply_to
    srv.basic_publish("", p.reply_to, b"pong", pika.BasicProperties(
        correlation_id=p.correlation_id))
    while not replies and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert replies == [(b"pong", "c-1")]


def test_queue_expires_when_unused(conn, names):
    q = names.queue()
    conn.channel().queue_declare(q, arguments={"x-expires": 200})
    # a passive declare counts as use and restarts the timer: poll slowly
    gone = False
    for _ in range(5):
        time.sleep(0.6)
        ch = conn.channel()
        try:
            ch.queue_declare(q, passive=True)
            ch.close()
        except pe.ChannelClosedByBroker as e:
            assert e.reply_code == 404
            gone = True
            break
    assert gone


def test_reject_publish_overflow_nacks(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"fits")
    with pytest.raises(pe.NackError):
        ch.basic_publish("", q, b"overflows")
    assert drain(ch, q) == [b"fits"]


def test_single_active_consumer(conn, names):
    """x-single-active-consumer: only the first consumer gets messages; when
    it cancels, the next registered one takes over. An exclusive consumer
    is refused (403), and a value that is not a boolean is 406."""
    q = names.queue()
    ch_a, ch_b = conn.channel(), conn.channel()
    ch_a.queue_declare(q, arguments={"x-single-active-consumer": True})
    got = {"a": [], "b": []}
    tag_a = ch_a.basic_consume(q, lambda c, m, p, b: got["a"].append(b), auto_ack=True)
    ch_b.basic_consume(q, lambda c, m, p, b: got["b"].append(b), auto_ack=True)
    pub = conn.channel()
    for i in range(5):
        pub.basic_publish("", q, b"first-%d" % i)
    deadline = time.time() + 5
    while len(got["a"]) < 5 and time.time() < deadline:
        conn.process_data_events(0.05)
    conn.process_data_events(0.2)
    assert len(got["a"]) == 5 and got["b"] == []
    ch_a.basic_cancel(tag_a)
    for i in range(3):
        pub.basic_publish("", q, b"then-%d" % i)
    deadline = time.time() + 5
    while len(got["b"]) < 3 and time.time() < deadline:
        conn.process_data_events(0.05)
    assert got["b"] == [b"then-0", b"then-1", b"then-2"]
    assert len(got["a"]) == 5
    ch_x = conn.channel()
    with pytest.raises(pe.ChannelClosedByBroker) as e:
        ch_x.basic_consume(q, lambda *a: None, exclusive=True)
        conn.process_data_events(0.2)
    assert e.value.reply_code == 403
    ch_y = conn.channel()
    with pytest.raises(pe.ChannelClosedByBroker) as e:
        ch_y.queue_declare(names.queue(), arguments={"x-single-active-consumer": 1})
    assert e.value.reply_code == 406
    assert "unacceptable_type" in e.value.reply_text


@pytest.mark.parametrize("expiration,reason", [
    ("abc", "no_integer"),
    ("-5", "{value_negative,-5}"),
    ("1.5", '{leftover_string,".5"}'),
])
def test_an_invalid_expiration_is_refused(conn, expiration, reason):
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    with pytest.raises(pe.ChannelClosedByBroker) as e:
        ch.basic_publish("", q, b"x", pika.BasicProperties(expiration=expiration))
        ch.queue_declare(q, passive=True)
    assert e.value.reply_code == 406
    assert e.value.reply_text == "PRECONDITION_FAILED - invalid expiration '%s': %s" % (expiration, reason)
