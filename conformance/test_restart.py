"""Restarts: what survives a broker restart, as clients see it. Durable queues,
exchanges and bindings come back with their arguments; persistent messages in
durable queues come back in order with properties and bodies, unacked ones marked
redelivered; everything transient is gone.

Each test restarts the broker with the shell command in AMQP_RESTART_CMD, which
must return once the broker accepts connections again (connections are dropped by
it). Without it every test here is skipped. conformance/run sets it when it starts
Warren itself (SIGKILL and restart on the same port and data dir)."""

import contextlib
import datetime
import decimal
import os
import subprocess
import time

import pika
import pika.exceptions as pe
import pytest

from conftest import AMQP_URL, channel_error, connect, drain, queue_depth
import amqp_raw

RESTART_CMD = os.environ.get("AMQP_RESTART_CMD", "")
RESTART_TIMEOUT = 120  # seconds for the command, and again for the broker to serve
# Acks, nacks and purges get no confirmation that they are on disk, and a broker
# may lose the last instant of them in a crash (RabbitMQ too). Tests that check
# they held wait this long before the restart.
SETTLE = 0.5

pytestmark = [
    pytest.mark.skipif(not RESTART_CMD,
                       reason="AMQP_RESTART_CMD not set: no way to restart the broker"),
    # two restarts of RabbitMQ take well over the suite's default 30 s
    pytest.mark.timeout(2 * RESTART_TIMEOUT + 60),
]

USER = amqp_raw.url_parts(AMQP_URL)[2]
PERSISTENT = pika.BasicProperties(delivery_mode=2)
TRANSIENT = pika.BasicProperties(delivery_mode=1)

HEADERS = {
    "str": "hello",
    "utf8": "h\u00e9llo \u2713",
    "bytes": b"\x00\x01\xfe\xff",
    "int": 42,
    "big": -(2 ** 40),
    "bool": True,
    "nested": {"a": 1, "b": {"c": "deep", "d": [1, 2]}},
    "array": [1, "two", False, None],
    "decimal": decimal.Decimal("3.14"),
    "timestamp": datetime.datetime(2021, 6, 7, 8, 9, 10),
    "void": None,
}


def _full_props(i):
    return pika.BasicProperties(
        content_type="application/json", content_encoding="gzip", headers=HEADERS,
        delivery_mode=2, priority=5, correlation_id="corr-%d" % i,
        reply_to="reply-queue", expiration="3600000", message_id="msg-%d" % i,
        timestamp=1700000000 + i, type="conformance.type", user_id=USER,
        app_id="conformance-app")


def _assert_full_props(p, i):
    assert p.content_type == "application/json"
    assert p.content_encoding == "gzip"
    assert p.headers == HEADERS
    assert p.delivery_mode == 2
    assert p.priority == 5
    assert p.correlation_id == "corr-%d" % i
    assert p.reply_to == "reply-queue"
    assert p.expiration == "3600000"
    assert p.message_id == "msg-%d" % i
    assert p.timestamp == 1700000000 + i
    assert p.type == "conformance.type"
    assert p.user_id == USER
    assert p.app_id == "conformance-app"


class Clients:
    """Connections opened before a restart; restart() runs AMQP_RESTART_CMD,
    abandons them (the broker dropped them) and waits until a new connection
    works."""

    def __init__(self):
        self.conns = []

    def connect(self):
        c = connect()
        self.conns.append(c)
        return c

    def channel(self):
        return self.connect().channel()

    def confirm_channel(self):
        ch = self.channel()
        ch.confirm_delivery()
        return ch

    def close_all(self):
        for c in self.conns:
            with contextlib.suppress(Exception):
                if c.is_open:
                    c.close()
        self.conns = []

    def restart(self, settle=0.0):
        time.sleep(settle)
        try:
            r = subprocess.run(RESTART_CMD, shell=True, capture_output=True, text=True,
                               timeout=RESTART_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            pytest.fail("AMQP_RESTART_CMD did not return within %d s: %s" % (e.timeout, e))
        assert r.returncode == 0, "AMQP_RESTART_CMD failed (%d):\n%s\n%s" % (
            r.returncode, r.stdout, r.stderr)
        self.close_all()
        deadline = time.monotonic() + RESTART_TIMEOUT
        while True:
            try:
                connect().close()
                return
            except pe.AMQPError as e:
                if time.monotonic() > deadline:
                    pytest.fail("broker does not accept connections after restart: %r" % e)
                time.sleep(0.2)


@pytest.fixture
def clients():
    c = Clients()
    yield c
    c.close_all()


def _publish(ch, exchange, key, bodies, props=PERSISTENT):
    for b in bodies:
        ch.basic_publish(exchange, key, b, props)


def _get_all(ch, queue):
    """[(method, props, body)] via basic.get, acked."""
    out = []
    while True:
        m, p, body = ch.basic_get(queue, auto_ack=True)
        if m is None:
            return out
        out.append((m, p, body))


def _exists(clients, kind, name):
    ch = clients.channel()
    try:
        if kind == "queue":
            ch.queue_declare(name, passive=True)
        else:
            ch.exchange_declare(name, passive=True)
        return True
    except pe.ChannelClosedByBroker as e:
        assert e.reply_code == 404, e
        return False


# ---- messages


def test_persistent_messages_survive_in_order_with_properties(clients, names):
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True)
    bodies = [b"", b"small", bytes(range(256)) * 800]  # 200 KiB: several frames
    bodies += [b"m%03d" % i for i in range(50)]
    for i, b in enumerate(bodies):
        ch.basic_publish("", q, b, _full_props(i))
    clients.restart()
    ch = clients.channel()
    got = _get_all(ch, q)
    assert [b for _m, _p, b in got] == bodies
    for i, (m, p, _b) in enumerate(got):
        _assert_full_props(p, i)
        assert m.exchange == "" and m.routing_key == q


def test_transient_messages_in_durable_queue_are_lost(clients, names):
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True)
    ch.basic_publish("", q, b"p1", PERSISTENT)
    ch.basic_publish("", q, b"t1", TRANSIENT)
    ch.basic_publish("", q, b"t2")  # no delivery_mode at all: transient
    ch.basic_publish("", q, b"p2", PERSISTENT)
    assert queue_depth(ch, q) == 4
    clients.restart()
    assert drain(clients.channel(), q) == [b"p1", b"p2"]


def test_declare_ok_counts_after_restart(clients, names):
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True)
    _publish(ch, "", q, [b"p%d" % i for i in range(7)])
    _publish(ch, "", q, [b"t%d" % i for i in range(3)], TRANSIENT)
    ch.basic_consume(q, lambda *a: None, auto_ack=False)  # holds all 10 unacked
    clients.restart()
    ch = clients.channel()
    ok = ch.queue_declare(q, durable=True)
    assert (ok.method.message_count, ok.method.consumer_count) == (7, 0)
    ok = ch.queue_declare(q, passive=True)
    assert (ok.method.message_count, ok.method.consumer_count) == (7, 0)


def test_unacked_deliveries_come_back_redelivered(clients, names):
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True)
    _publish(ch, "", q, [b"a", b"b", b"c", b"d"])
    got = []
    ch.basic_qos(prefetch_count=2)
    ch.basic_consume(q, lambda _c, m, _p, b: got.append((m, b)), auto_ack=False)
    conn = ch.connection
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert [b for _m, b in got] == [b"a", b"b"]
    assert not any(m.redelivered for m, _b in got)
    clients.restart()
    ch = clients.channel()
    back = _get_all(ch, q)
    assert [b for _m, _p, b in back] == [b"a", b"b", b"c", b"d"]
    # delivered before the restart: must be flagged. (c and d were never
    # delivered; RabbitMQ gives redelivered=false for them, Warren may flag them
    # too, which the spec allows, so they are not checked.)
    assert back[0][0].redelivered and back[1][0].redelivered


def test_acked_messages_do_not_come_back(clients, names):
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True)
    _publish(ch, "", q, [b"%d" % i for i in range(6)])
    m, _p, body = ch.basic_get(q, auto_ack=True)
    assert body == b"0"
    m1, _p, _b = ch.basic_get(q)
    m2, _p, _b = ch.basic_get(q)
    ch.basic_ack(m2.delivery_tag, multiple=True)  # 1 and 2
    m3, _p, _b = ch.basic_get(q)
    ch.basic_nack(m3.delivery_tag, requeue=False)  # 3 dropped
    m4, _p, _b = ch.basic_get(q)
    ch.basic_reject(m4.delivery_tag, requeue=True)  # 4 back in the queue
    # RabbitMQ requeues asynchronously: a passive declare may not count 4 yet
    deadline = time.monotonic() + 5
    while queue_depth(ch, q) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue_depth(ch, q) == 2
    clients.restart(settle=SETTLE)
    assert drain(clients.channel(), q) == [b"4", b"5"]


def test_acks_after_recovery_are_durable(clients, names):
    """A second restart: recovered messages acked in between stay gone, the rest
    and new ones come back, nothing is duplicated."""
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True)
    _publish(ch, "", q, [b"a", b"b", b"c", b"d"])
    clients.restart(settle=SETTLE)
    ch = clients.confirm_channel()
    m, _p, body = ch.basic_get(q)
    assert body == b"a"
    ch.basic_ack(m.delivery_tag)
    m, _p, body = ch.basic_get(q, auto_ack=True)
    assert body == b"b"
    _publish(ch, "", q, [b"e"])
    clients.restart(settle=SETTLE)
    ch = clients.channel()
    assert drain(ch, q) == [b"c", b"d", b"e"]


def test_many_messages_some_acked(clients, names):
    """500 confirmed messages, every third acked one by one, the rest still
    unacked at the restart: exactly the rest come back, in order, redelivered."""
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True)
    n = 500
    _publish(ch, "", q, [b"m%04d" % i for i in range(n)])
    got = []
    ch.basic_consume(q, lambda _c, m, _p, b: got.append((m, b)), auto_ack=False)
    deadline = time.monotonic() + 20
    while len(got) < n and time.monotonic() < deadline:
        ch.connection.process_data_events(time_limit=0.05)
    assert [b for _m, b in got] == [b"m%04d" % i for i in range(n)]
    for i, (m, _b) in enumerate(got):
        if i % 3 == 0:
            ch.basic_ack(m.delivery_tag)
    assert queue_depth(clients.channel(), q) == 0  # the rest are unacked, not ready
    clients.restart(settle=SETTLE)
    ch = clients.channel()
    back = _get_all(ch, q)
    assert [b for _m, _p, b in back] == [b"m%04d" % i for i in range(n) if i % 3]
    assert all(m.redelivered for m, _p, _b in back)


def test_tx_committed_persistent_messages_survive(clients, names):
    q = names.queue()
    ch = clients.channel()
    ch.queue_declare(q, durable=True)
    ch.tx_select()
    _publish(ch, "", q, [b"t1", b"t2"])
    ch.tx_commit()
    _publish(ch, "", q, [b"rolled-back"])
    ch.tx_rollback()
    clients.restart()
    assert drain(clients.channel(), q) == [b"t1", b"t2"]


def test_purged_queue_stays_empty(clients, names):
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True)
    _publish(ch, "", q, [b"1", b"2", b"3"])
    assert ch.queue_purge(q).method.message_count == 3
    clients.restart(settle=SETTLE)
    ch = clients.channel()
    ok = ch.queue_declare(q, durable=True)
    assert ok.method.message_count == 0
    assert drain(ch, q) == []


def test_persistent_message_routed_to_several_durable_queues(clients, names):
    x, q1, q2 = names.exchange(), names.queue(), names.queue()
    ch = clients.confirm_channel()
    ch.exchange_declare(x, "fanout", durable=True)
    for q in (q1, q2):
        ch.queue_declare(q, durable=True)
        ch.queue_bind(q, x)
    _publish(ch, x, "", [b"one", b"two"])
    ch.basic_get(q1, auto_ack=True)  # consumed from q1 only
    clients.restart(settle=SETTLE)
    ch = clients.channel()
    assert drain(ch, q1) == [b"two"]
    assert drain(ch, q2) == [b"one", b"two"]


# ---- queues


def test_transient_queues_are_gone(clients, names):
    plain, excl, excl_durable, autodel = (names.queue() for _ in range(4))
    ch = clients.confirm_channel()
    ch.queue_declare(plain, durable=False)
    ch.queue_declare(excl, exclusive=True)
    ch.queue_declare(excl_durable, durable=True, exclusive=True)
    ch.queue_declare(autodel, auto_delete=True)
    ch.basic_consume(autodel, lambda *a: None)  # in use until the restart
    for q in (plain, excl, excl_durable, autodel):
        ch.basic_publish("", q, b"lost", PERSISTENT)
    clients.restart()
    for q in (plain, excl, excl_durable, autodel):
        assert not _exists(clients, "queue", q), q


def test_durable_queue_survives_restart_while_in_use(clients, names):
    q = names.queue()
    ch = clients.channel()
    ch.queue_declare(q, durable=True)
    ch.basic_consume(q, lambda *a: None)
    clients.restart()
    ok = clients.channel().queue_declare(q, passive=True)
    assert ok.method.consumer_count == 0  # the consumer went with its connection


def test_deleted_durable_queue_stays_deleted(clients, names):
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True)
    _publish(ch, "", q, [b"gone"])
    ch.queue_delete(q)
    clients.restart()
    assert not _exists(clients, "queue", q)
    # declared again it is a new, empty queue
    ok = clients.channel().queue_declare(q, durable=True)
    assert ok.method.message_count == 0


@pytest.mark.extension
def test_queue_arguments_are_kept(clients, names):
    q, dlx, dlq = names.queue(), names.exchange(), names.queue()
    args = {"x-max-length": 3, "x-dead-letter-exchange": dlx}
    ch = clients.confirm_channel()
    ch.exchange_declare(dlx, "fanout", durable=True)
    ch.queue_declare(dlq, durable=True)
    ch.queue_bind(dlq, dlx)
    ch.queue_declare(q, durable=True, arguments=args)
    clients.restart()
    conn = clients.connect()
    ch = conn.channel()
    with channel_error(406) as ei:
        ch.queue_declare(q, durable=True, arguments={"x-max-length": 5,
                                                     "x-dead-letter-exchange": dlx})
    assert "x-max-length" in str(ei.value)
    ch = conn.channel()
    with channel_error(406):
        ch.queue_declare(q, durable=True)  # arguments left out
    ch = conn.channel()
    with channel_error(406):
        ch.queue_declare(q, durable=False, arguments=args)
    ch = conn.channel()
    ch.queue_declare(q, durable=True, arguments=args)  # equivalent: fine
    # and still in force: max-length drops from the head into the DLX
    ch.confirm_delivery()
    _publish(ch, "", q, [b"1", b"2", b"3", b"4", b"5"])
    assert drain(ch, q) == [b"3", b"4", b"5"]
    deadline = time.monotonic() + 5
    while queue_depth(ch, dlq) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert drain(ch, dlq) == [b"1", b"2"]


# ---- exchanges and bindings


def test_durable_exchanges_and_bindings_still_route(clients, names):
    direct, topic, fan, hdr = (names.exchange() for _ in range(4))
    q_direct, q_topic, q_fan, q_hdr = (names.queue() for _ in range(4))
    ch = clients.channel()
    ch.exchange_declare(direct, "direct", durable=True)
    ch.exchange_declare(topic, "topic", durable=True)
    ch.exchange_declare(fan, "fanout", durable=True)
    ch.exchange_declare(hdr, "headers", durable=True)
    for q in (q_direct, q_topic, q_fan, q_hdr):
        ch.queue_declare(q, durable=True)
    ch.queue_bind(q_direct, direct, "key")
    ch.queue_bind(q_topic, topic, "a.*.c")
    ch.queue_bind(q_topic, topic, "x.#")
    ch.queue_bind(q_fan, fan)
    ch.queue_bind(q_hdr, hdr, arguments={"x-match": "all", "h": "v", "n": 1})
    ch.queue_bind(q_direct, direct, "unbound")
    ch.queue_unbind(q_direct, direct, "unbound")  # unbinds are durable too
    clients.restart()
    ch = clients.confirm_channel()
    for x in (direct, topic, fan, hdr):
        assert _exists(clients, "exchange", x), x
    ch.basic_publish(direct, "key", b"d1")
    ch.basic_publish(direct, "other", b"d-no")
    ch.basic_publish(direct, "unbound", b"d-unbound")
    ch.basic_publish(topic, "a.b.c", b"t1")
    ch.basic_publish(topic, "x.y.z", b"t2")
    ch.basic_publish(topic, "a.b", b"t-no")
    ch.basic_publish(fan, "whatever", b"f1")
    ch.basic_publish(hdr, "", b"h1", pika.BasicProperties(headers={"h": "v", "n": 1}))
    ch.basic_publish(hdr, "", b"h-no", pika.BasicProperties(headers={"h": "v"}))
    assert drain(ch, q_direct) == [b"d1"]
    assert drain(ch, q_topic) == [b"t1", b"t2"]
    assert drain(ch, q_fan) == [b"f1"]
    assert drain(ch, q_hdr) == [b"h1"]


def test_exchange_to_exchange_bindings_survive(clients, names):
    src, mid, q = names.exchange(), names.exchange(), names.queue()
    ch = clients.channel()
    ch.exchange_declare(src, "topic", durable=True)
    ch.exchange_declare(mid, "direct", durable=True)
    ch.queue_declare(q, durable=True)
    ch.exchange_bind(destination=mid, source=src, routing_key="a.*")
    ch.queue_bind(q, mid, "a.b")
    clients.restart()
    ch = clients.confirm_channel()
    ch.basic_publish(src, "a.b", b"e2e")
    ch.basic_publish(src, "a.c", b"no-queue-binding")
    ch.basic_publish(src, "b.b", b"no-e2e-binding")
    assert drain(ch, q) == [b"e2e"]


def test_exchange_type_and_flags_are_kept(clients, names):
    x, internal = names.exchange(), names.exchange()
    ch = clients.channel()
    ch.exchange_declare(x, "topic", durable=True)
    ch.exchange_declare(internal, "fanout", durable=True, internal=True)
    clients.restart()
    conn = clients.connect()
    with channel_error(406):
        conn.channel().exchange_declare(x, "direct", durable=True)
    with channel_error(406):
        conn.channel().exchange_declare(x, "topic", durable=False)
    conn.channel().exchange_declare(x, "topic", durable=True)  # equivalent: fine
    ch = conn.channel()
    with channel_error(403):  # still internal: clients cannot publish to it
        ch.basic_publish(internal, "", b"x")
        ch.basic_qos(prefetch_count=0)


def test_transient_exchanges_and_their_bindings_are_gone(clients, names):
    x, durable_x, q = names.exchange(), names.exchange(), names.queue()
    ch = clients.channel()
    ch.exchange_declare(x, "fanout", durable=False)
    ch.exchange_declare(durable_x, "fanout", durable=True)
    ch.queue_declare(q, durable=True)
    ch.queue_bind(q, x)
    # a binding from a durable exchange to a transient one is transient too
    ch.exchange_bind(destination=x, source=durable_x)
    clients.restart()
    assert not _exists(clients, "exchange", x)
    assert _exists(clients, "exchange", durable_x)
    ch = clients.confirm_channel()
    ch.exchange_declare(x, "fanout", durable=False)  # same name, a new exchange
    ch.basic_publish(x, "", b"no-binding")
    ch.basic_publish(durable_x, "", b"no-e2e-binding")
    assert queue_depth(ch, q) == 0


def test_deleted_durable_exchange_stays_deleted(clients, names):
    x, q = names.exchange(), names.queue()
    ch = clients.channel()
    ch.exchange_declare(x, "fanout", durable=True)
    ch.queue_declare(q, durable=True)
    ch.queue_bind(q, x)
    ch.exchange_delete(x)
    clients.restart()
    assert not _exists(clients, "exchange", x)
    ch = clients.confirm_channel()
    ch.exchange_declare(x, "fanout", durable=True)  # no binding came back with it
    ch.basic_publish(x, "", b"nobody")
    assert queue_depth(ch, q) == 0


def test_deleted_queue_bindings_do_not_come_back(clients, names):
    x, q = names.exchange(), names.queue()
    ch = clients.channel()
    ch.exchange_declare(x, "fanout", durable=True)
    ch.queue_declare(q, durable=True)
    ch.queue_bind(q, x)
    ch.queue_delete(q)
    ch.queue_declare(q, durable=True)  # same name, no binding
    clients.restart()
    ch = clients.confirm_channel()
    ch.basic_publish(x, "", b"nobody")
    assert queue_depth(ch, q) == 0
