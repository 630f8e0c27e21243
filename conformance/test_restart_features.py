"""Restarts and the queue features of test_queue_features.py: a quorum queue's
delivery counts and delivery limit survive a broker restart (an unacked
delivery held at the restart counts as one more delivery), and a durable
x-consistent-hash exchange still hashes consistently after it (on Warren it
also places every key as before).

Like test_restart.py, each test restarts the broker with AMQP_RESTART_CMD and
skips without it. For the RabbitMQ reference a restart that keeps the data is
  AMQP_RESTART_CMD='/work/shared/tools/rabbitmq-reference ctl 5673 stop_app &&
                    /work/shared/tools/rabbitmq-reference ctl 5673 start_app'"""

import datetime
import time

import pika
import pika.exceptions as pe
import pytest

from conftest import channel_error, connect, queue_depth
from test_restart import RESTART_CMD, RESTART_TIMEOUT, SETTLE, Clients

pytestmark = [
    pytest.mark.extension,
    pytest.mark.skipif(not RESTART_CMD,
                       reason="AMQP_RESTART_CMD not set: no way to restart the broker"),
    pytest.mark.timeout(2 * RESTART_TIMEOUT + 60),
]

PERSISTENT = pika.BasicProperties(delivery_mode=2)
QUORUM = {"x-queue-type": "quorum"}


@pytest.fixture
def clients():
    c = Clients()
    yield c
    c.close_all()


def get_one(ch, queue, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        m, p, body = ch.basic_get(queue)
        if m is not None:
            return m, p, body
        if time.monotonic() > deadline:
            pytest.fail("no message in %s within %.0f s" % (queue, timeout))
        time.sleep(0.02)


def delivery_count(p):
    return (p.headers or {}).get("x-delivery-count", 0)


def wait_depth(ch, queue, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        d = queue_depth(ch, queue)
        if d == n or time.monotonic() > deadline:
            return d
        time.sleep(0.05)


def test_quorum_delivery_count_survives_restart(clients, names):
    """Requeued twice before the restart: the next delivery after it has
    x-delivery-count 2 and redelivered set."""
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True, arguments={**QUORUM, "x-delivery-limit": 10})
    ch.basic_publish("", q, b"counted", PERSISTENT)
    for i in range(2):
        m, p, _b = get_one(ch, q)
        assert delivery_count(p) == i
        ch.basic_reject(m.delivery_tag, requeue=True)
    assert wait_depth(ch, q, 1) == 1
    clients.restart(settle=SETTLE)
    ch = clients.channel()
    m, p, body = get_one(ch, q)
    assert body == b"counted" and m.redelivered
    assert p.headers["x-delivery-count"] == 2
    ch.basic_ack(m.delivery_tag)


def test_quorum_unacked_at_restart_counts_as_delivery(clients, names):
    """A delivery still unacked when the broker restarts comes back with
    x-delivery-count one higher (like a channel close)."""
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True, arguments={**QUORUM, "x-delivery-limit": 10})
    ch.basic_publish("", q, b"held", PERSISTENT)
    m, _p, _b = get_one(ch, q)
    ch.basic_reject(m.delivery_tag, requeue=True)
    m, p, _b = get_one(ch, q)  # held unacked across the restart
    assert delivery_count(p) == 1
    clients.restart()
    ch = clients.channel()
    m, p, body = get_one(ch, q)
    assert body == b"held" and m.redelivered
    assert p.headers["x-delivery-count"] == 2
    ch.basic_ack(m.delivery_tag)


def test_quorum_delivery_limit_in_force_after_restart(clients, names):
    """x-delivery-limit 1 is kept (406 on a different redeclare) and still
    dead-letters: one requeue before the restart, one after."""
    q, dlx, dlq = names.queue(), names.exchange(), names.queue()
    args = {**QUORUM, "x-delivery-limit": 1, "x-dead-letter-exchange": dlx}
    ch = clients.confirm_channel()
    ch.exchange_declare(dlx, "fanout", durable=True)
    ch.queue_declare(dlq, durable=True)
    ch.queue_bind(dlq, dlx)
    ch.queue_declare(q, durable=True, arguments=args)
    ch.basic_publish("", q, b"limited", PERSISTENT)
    m, _p, _b = get_one(ch, q)
    ch.basic_reject(m.delivery_tag, requeue=True)
    assert wait_depth(ch, q, 1) == 1
    clients.restart(settle=SETTLE)
    conn = clients.connect()
    with channel_error(406) as ei:
        conn.channel().queue_declare(q, durable=True, arguments={**args, "x-delivery-limit": 2})
    assert "x-delivery-limit" in ei.value.reply_text
    ch = conn.channel()
    ch.queue_declare(q, durable=True, arguments=args)
    m, p, body = get_one(ch, q)
    assert body == b"limited" and p.headers["x-delivery-count"] == 1
    ch.basic_reject(m.delivery_tag, requeue=True)
    assert wait_depth(ch, dlq, 1) == 1
    m, p, body = ch.basic_get(dlq, auto_ack=True)
    assert body == b"limited"
    assert p.headers["x-death"][0]["reason"] == "delivery_limit"
    assert queue_depth(ch, q) == 0


def _placement(x, queues, keys):
    """Publish one message per key to x and report {key: queue}."""
    c = connect()
    try:
        ch = c.channel()
        for k in keys:
            ch.basic_publish(x, k, k.encode())
        deadline = time.monotonic() + 30
        while sum(queue_depth(ch, q) for q in queues) < len(keys):
            if time.monotonic() > deadline:
                pytest.fail("not all %d messages routed" % len(keys))
            time.sleep(0.05)
        where = {}
        for q in queues:
            while True:
                m, _p, body = ch.basic_get(q, auto_ack=True)
                if m is None:
                    break
                where[body.decode()] = q
        return where
    finally:
        c.close()


def _chx_setup(clients, names):
    probe = clients.channel()
    try:
        probe.exchange_declare(names.exchange(), "x-consistent-hash")
    except (pe.ChannelClosedByBroker, pe.ConnectionClosedByBroker) as e:
        if e.reply_code == 503:
            pytest.skip("x-consistent-hash not available: %s" % e.reply_text)
        raise
    x = names.exchange()
    queues = [names.queue() for _ in range(3)]
    ch = clients.channel()
    ch.exchange_declare(x, "x-consistent-hash", durable=True)
    for q, w in zip(queues, ("1", "2", "1")):
        ch.queue_declare(q, durable=True)
        ch.queue_bind(q, x, w)
    return x, queues


def test_consistent_hash_still_hashes_after_restart(clients, names):
    """A durable x-consistent-hash exchange with its bindings comes back: every
    key still reaches exactly one queue, the same one each time, all queues get
    keys."""
    x, queues = _chx_setup(clients, names)
    keys = ["key-%d" % i for i in range(300)]
    before = _placement(x, queues, keys)
    assert len(set(before.values())) == 3
    clients.restart()
    after = _placement(x, queues, keys)
    assert sorted(after) == sorted(keys)
    assert len(set(after.values())) == 3
    assert _placement(x, queues, keys) == after  # stable once recovered
    # weight 2 of 4: the middle queue has about half of the keys
    assert 0.3 * len(keys) <= list(after.values()).count(queues[1]) <= 0.7 * len(keys)


def test_warren_consistent_hash_placement_survives_restart(clients, names):
    """Warren: after a restart every key goes to the same queue as before.
    (RabbitMQ 3.10 rebuilds its ring at boot from the bindings in an order of its
    own, so its placement can change: observed.)"""
    c = clients.connect()
    if c._impl.server_properties.get("product") not in (b"Warren", "Warren"):
        pytest.skip("Warren-only: RabbitMQ 3.10 does not keep the placement")
    x, queues = _chx_setup(clients, names)
    keys = ["key-%d" % i for i in range(300)]
    before = _placement(x, queues, keys)
    clients.restart()
    assert _placement(x, queues, keys) == before


def test_message_ttl_counts_from_the_publish_across_a_restart(clients, names):
    """x-message-ttl and a per-message expiration count from the original
    enqueue: a restart does not give a message its whole TTL again (Warren
    once restarted both when it read a message back from disk)."""
    q_ttl, q_exp, q_keep = names.queue(), names.queue(), names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q_ttl, durable=True, arguments={"x-message-ttl": 4000})
    ch.queue_declare(q_exp, durable=True)
    ch.queue_declare(q_keep, durable=True, arguments={"x-message-ttl": 600000})
    published = time.monotonic()
    ch.basic_publish("", q_ttl, b"ttl", PERSISTENT)
    ch.basic_publish("", q_exp, b"exp", pika.BasicProperties(delivery_mode=2,
                                                             expiration="4000"))
    ch.basic_publish("", q_keep, b"keep", PERSISTENT)
    time.sleep(2.0)
    clients.restart()
    ch = clients.channel()
    # Still there right after the restart (unless the restart itself took
    # longer than the TTL) ...
    if time.monotonic() - published < 3.0:
        assert queue_depth(ch, q_ttl) == 1
    # ... and gone 4 s after the publish, not 4 s after the restart.
    time.sleep(max(0.0, published + 4.6 - time.monotonic()))
    assert ch.basic_get(q_ttl, auto_ack=True)[0] is None
    assert ch.basic_get(q_exp, auto_ack=True)[0] is None
    m, _p, body = ch.basic_get(q_keep, auto_ack=True)
    assert body == b"keep"


def _warren_only(clients):
    c = clients.connect()
    if c._impl.server_properties.get("product") not in (b"Warren", "Warren"):
        pytest.skip("Warren-only: deduplication is a plugin RabbitMQ does not ship")


def _dedup_props(key):
    return pika.BasicProperties(delivery_mode=2, headers={"x-deduplication-header": key})


def test_warren_exchange_dedup_keys_survive_a_crash(clients, names):
    """A durable x-message-deduplication exchange: keys seen before the
    restart are still duplicates after it (the plugin keeps them only with
    x-cache-persistence: disk, LavinMQ not at all)."""
    _warren_only(clients)
    x, q = names.exchange(), names.queue()
    ch = clients.confirm_channel()
    ch.exchange_declare(x, "x-message-deduplication", durable=True,
                        arguments={"x-cache-size": 100})
    ch.queue_declare(q, durable=True)
    ch.queue_bind(q, x)
    ch.basic_publish(x, "", b"first", _dedup_props("pay-1"))
    clients.restart()
    ch = clients.confirm_channel()
    ch.basic_publish(x, "", b"again", _dedup_props("pay-1"))  # acked, dropped
    ch.basic_publish(x, "", b"other", _dedup_props("pay-2"))
    assert wait_depth(ch, q, 2) == 2
    bodies = [ch.basic_get(q, auto_ack=True)[2] for _ in range(2)]
    assert bodies == [b"first", b"other"]


def test_warren_queue_dedup_keys_survive_a_crash(clients, names):
    """A durable queue with x-message-deduplication: a key held by a message
    still in the queue is a duplicate after a restart too (the plugin loses
    queue-level keys, rabbitmq-message-deduplication#92); once that message
    is acked, the key is free."""
    _warren_only(clients)
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True, arguments={"x-message-deduplication": True})
    ch.basic_publish("", q, b"held", _dedup_props("k1"))
    clients.restart()
    ch = clients.confirm_channel()
    ch.basic_publish("", q, b"dup", _dedup_props("k1"))
    assert wait_depth(ch, q, 1) == 1
    m, _p, body = get_one(ch, q)
    assert body == b"held"
    ch.basic_ack(m.delivery_tag)
    ch.basic_publish("", q, b"new", _dedup_props("k1"))
    assert wait_depth(ch, q, 1) == 1
    assert ch.basic_get(q, auto_ack=True)[2] == b"new"


def test_warren_delayed_messages_survive_a_crash_and_arrive_on_time(clients, names):
    """Persistent messages delayed on a durable x-delayed-message exchange are
    stored (confirmed after the sync): after a restart they still arrive at
    their due time, in due order, and none early (the plugin loses them)."""
    _warren_only(clients)
    x, q = names.exchange(), names.queue()
    ch = clients.confirm_channel()
    ch.exchange_declare(x, "x-delayed-message", durable=True,
                        arguments={"x-delayed-type": "direct"})
    ch.queue_declare(q, durable=True)
    ch.queue_bind(q, x, "k")
    start = time.monotonic()
    for body, delay in ((b"late", 4000), (b"early", 2500)):
        ch.basic_publish(x, "k", body, pika.BasicProperties(
            delivery_mode=2, headers={"x-delay": delay}))
    clients.restart()
    ch = clients.channel()
    got = []
    deadline = start + 10
    while len(got) < 2 and time.monotonic() < deadline:
        m, _p, body = ch.basic_get(q, auto_ack=True)
        if m is None:
            time.sleep(0.02)
            continue
        got.append((body, time.monotonic() - start))
    assert [b for b, _ in got] == [b"early", b"late"]
    # Not before the due time (the clock of this test starts before the
    # publish, so a message can only look late here, never early).
    assert got[0][1] >= 2.5 - 0.05 and got[1][1] >= 4.0 - 0.05, got


# ------------------------------------------------------------ streams

STREAM = {"x-queue-type": "stream"}


def read_stream(conn, q, offset, n, timeout=10.0):
    """(offset, body) of up to n deliveries from x-stream-offset `offset`,
    acked; waits up to `timeout` for the n-th, then a little for more."""
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1000)
    got = []

    def on_msg(c, m, p, b):
        got.append((p.headers["x-stream-offset"], b))
        c.basic_ack(m.delivery_tag)

    ch.basic_consume(q, on_msg, arguments={"x-stream-offset": offset})
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        conn.process_data_events(time_limit=0.05)
    ch.close()
    return got


def stream_back(clients, q, timeout=30.0):
    """After a restart RabbitMQ brings a stream's replica back a moment
    after it accepts connections (404 "home node ... is down" meanwhile):
    wait until a consumer can attach."""
    deadline = time.monotonic() + timeout
    while True:
        conn = clients.connect()
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=1)
            ch.basic_consume(q, lambda *a: None, arguments={"x-stream-offset": "next"})
            ch.close()
            return conn
        except pe.ChannelClosedByBroker as e:
            if e.reply_code != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_stream_keeps_its_messages_and_offsets_across_a_restart(clients, names):
    """Transient and persistent messages alike: a stream stores everything.
    After the restart each message has the offset it had, and new ones
    continue after the last."""
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True, arguments=STREAM)
    for i in range(300):
        ch.basic_publish("", q, b"s%d" % i, PERSISTENT if i % 2 else None)
    before = read_stream(clients.connect(), q, "first", 300)
    assert [b for _o, b in before] == [b"s%d" % i for i in range(300)]
    clients.restart(settle=SETTLE)
    conn = stream_back(clients, q)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(q, durable=True, arguments=STREAM)
    assert read_stream(conn, q, "first", 300) == before
    ch.basic_publish("", q, b"after")
    last = read_stream(conn, q, "last", 1)
    assert last[-1][1] == b"after" and last[-1][0] > before[-1][0]


def test_a_stream_timestamp_offset_works_after_a_restart(clients, names):
    """Nothing of the stream is in memory after a restart: starting by
    time finds the place from what is stored."""
    q = names.queue()
    ch = clients.confirm_channel()
    ch.queue_declare(q, durable=True, arguments=STREAM)
    for i in range(50):
        ch.basic_publish("", q, b"early%d" % i)
    time.sleep(2.2)
    cut = datetime.datetime.fromtimestamp(time.time() - 1)
    for i in range(50):
        ch.basic_publish("", q, b"late%d" % i)
    clients.restart(settle=SETTLE)
    got = read_stream(stream_back(clients, q), q, cut, 50)
    assert [b for _o, b in got] == [b"late%d" % i for i in range(50)]
