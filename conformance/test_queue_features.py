"""Queue and exchange features beyond the core protocol: quorum queue delivery
limits (x-delivery-count, dead-lettering with reason delivery_limit), what a
quorum queue declare refuses, the x-consistent-hash exchange (RabbitMQ plugin),
and Warren-only features modelled on RabbitMQ plugins: the delayed-message
exchange, message deduplication (exchange and queue level) and consumer
timeouts that cancel the consumer.

Tests of behaviour RabbitMQ 3.10 has pass against it (with the
rabbitmq_consistent_hash_exchange plugin enabled; they skip on a RabbitMQ
without it). Warren-only tests skip on RabbitMQ, and skip on Warren while it
answers a declare of the exchange type with 503 (type not implemented)."""

import time
import uuid

import pika
import pika.exceptions as pe
import pytest

from conftest import (channel_error, connect, consume_n, publish_confirmed, queue_depth,
                      sync)

pytestmark = pytest.mark.extension

QUORUM = {"x-queue-type": "quorum"}


def is_warren(conn):
    """The broker says it is Warren (server-properties "product")."""
    product = conn._impl.server_properties.get("product")
    return product in (b"Warren", "Warren")


def warren_only(conn):
    if not is_warren(conn):
        pytest.skip("Warren-only behaviour (the RabbitMQ reference does not have it)")


# Exchange types Warren implements: on Warren their tests never skip.
WARREN_HAS = {"x-consistent-hash", "x-message-deduplication", "x-delayed-message"}


def require_exchange_type(conn, names, exchange_type, arguments=None):
    """Skip unless the broker can declare an exchange of this type (503 means the
    type is unknown: plugin not enabled or not implemented)."""
    c = connect()  # RabbitMQ closes the connection (503 COMMAND_INVALID)
    try:
        ch = c.channel()
        x = names.exchange()
        try:
            ch.exchange_declare(x, exchange_type, arguments=arguments)
        except (pe.ChannelClosedByBroker, pe.ConnectionClosedByBroker) as e:
            if e.reply_code == 503 and not (is_warren(conn)
                                            and exchange_type in WARREN_HAS):
                pytest.skip("exchange type %s not available: %s"
                            % (exchange_type, e.reply_text))
            raise
        ch.exchange_delete(x)
    finally:
        if c.is_open:
            c.close()


def wait_depth(ch, queue, n, timeout=10.0):
    """Poll until the queue holds n ready messages; return the last count."""
    deadline = time.monotonic() + timeout
    while True:
        d = queue_depth(ch, queue)
        if d == n or time.monotonic() > deadline:
            return d
        time.sleep(0.02)


def get_one(ch, queue, timeout=5.0, auto_ack=False):
    """basic.get, polled until a message is there (requeues are asynchronous on
    RabbitMQ)."""
    deadline = time.monotonic() + timeout
    while True:
        m, p, body = ch.basic_get(queue, auto_ack=auto_ack)
        if m is not None:
            return m, p, body
        if time.monotonic() > deadline:
            pytest.fail("no message in %s within %.0f s" % (queue, timeout))
        time.sleep(0.02)


def headers_of(p):
    return p.headers or {}


def delivery_count(p):
    """x-delivery-count of a delivery; absent counts as 0 (a first delivery)."""
    return headers_of(p).get("x-delivery-count", 0)


def assert_empty_after_marker(ch, queue):
    """Publish a marker on ch (a confirm channel) after what ch did before, and
    check that the marker is the only message left: whatever ch rejected before
    was not requeued. ch's own commands reach the queue in order."""
    ch.basic_publish("", queue, b"marker")
    m, _p, body = get_one(ch, queue, auto_ack=True)
    assert body == b"marker"
    m, _p, _b = ch.basic_get(queue, auto_ack=True)
    assert m is None


def dead_letter_setup(ch, names):
    """A fanout DLX with one queue bound; returns (dlx, dlq)."""
    dlx, dlq = names.exchange(), names.queue()
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    return dlx, dlq


def assert_delivery_limit_dead_letter(ch, dlq, q, body, extra_headers=None):
    assert wait_depth(ch, dlq, 1) == 1
    m, p, got = ch.basic_get(dlq, auto_ack=True)
    assert got == body
    h = headers_of(p)
    assert m.exchange != "" and m.routing_key == q
    [death] = h["x-death"]
    assert death["reason"] == "delivery_limit"
    assert death["queue"] == q
    assert death["count"] == 1
    assert death["exchange"] == ""
    assert death["routing-keys"] == [q]
    assert h["x-first-death-reason"] == "delivery_limit"
    assert h["x-first-death-queue"] == q
    assert h["x-first-death-exchange"] == ""
    # RabbitMQ 3.10 does not carry x-delivery-count into the dead-lettered copy
    assert "x-delivery-count" not in h
    for k, v in (extra_headers or {}).items():
        assert h[k] == v


# ---------------------------------------------------------------- delivery limit


@pytest.mark.parametrize("settle", ["reject", "nack"])
def test_quorum_delivery_limit_dead_letters_after_limit_plus_one_deliveries(
        conn, names, settle):
    """x-delivery-limit 2: delivered 3 times (x-delivery-count 0/absent, 1, 2),
    the 3rd requeue dead-letters it with reason delivery_limit."""
    ch = conn.channel()
    dlx, dlq = dead_letter_setup(ch, names)
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments={
        **QUORUM, "x-delivery-limit": 2, "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"limited", pika.BasicProperties(headers={"app": "kept"}))
    for i in range(3):
        m, p, body = get_one(ch, q)
        assert body == b"limited"
        assert m.redelivered == (i > 0)
        assert delivery_count(p) == i
        if i > 0:
            assert isinstance(headers_of(p)["x-delivery-count"], int)
        assert headers_of(p)["app"] == "kept"
        if settle == "reject":
            ch.basic_reject(m.delivery_tag, requeue=True)
        else:
            ch.basic_nack(m.delivery_tag, requeue=True)
    assert_delivery_limit_dead_letter(ch, dlq, q, b"limited", {"app": "kept"})
    assert queue_depth(ch, q) == 0


def requeue_until_dropped(ch, q, limit):
    """Publish one message to q, get and requeue it limit + 1 times (each
    delivery carrying the count so far); then it is gone."""
    ch.confirm_delivery()
    ch.basic_publish("", q, b"doomed")
    for i in range(limit + 1):
        m, p, body = get_one(ch, q)
        assert body == b"doomed" and delivery_count(p) == i
        ch.basic_reject(m.delivery_tag, requeue=True)
    assert_empty_after_marker(ch, q)


def test_quorum_delivery_limit_without_dlx_drops(conn, names):
    """x-delivery-limit 1 and no DLX: after the 2nd requeue the message is gone."""
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments={**QUORUM, "x-delivery-limit": 1})
    requeue_until_dropped(ch, q, limit=1)


def test_quorum_delivery_limit_zero_drops_on_first_requeue(conn, names):
    """x-delivery-limit 0: the first requeue already drops the message."""
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments={**QUORUM, "x-delivery-limit": 0})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"once")
    m, p, body = get_one(ch, q)
    assert body == b"once" and not m.redelivered
    ch.basic_nack(m.delivery_tag, requeue=True)
    assert_empty_after_marker(ch, q)


def test_quorum_consumer_redeliveries_carry_delivery_count(conn, names):
    """Consumed: the first delivery has no x-delivery-count, the n-th redelivery
    has x-delivery-count n."""
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments={**QUORUM, "x-delivery-limit": 5})
    publish_confirmed(conn, "", q, b"c")
    for i in range(3):
        [(m, p, body)] = consume_n(conn, ch, q, 1, timeout=10)
        assert body == b"c" and m.redelivered == (i > 0)
        if i == 0:
            assert "x-delivery-count" not in headers_of(p)
        else:
            assert headers_of(p)["x-delivery-count"] == i
        ch.basic_reject(m.delivery_tag, requeue=True)


def test_quorum_delivery_count_without_limit_keeps_requeueing(conn, names):
    """No x-delivery-limit: x-delivery-count still counts, 5 requeues keep the
    message (RabbitMQ 3.10 has no default limit; Warren's default is 20)."""
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments=QUORUM)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"again")
    for i in range(6):
        m, p, body = get_one(ch, q)
        assert body == b"again" and delivery_count(p) == i
        if i < 5:
            ch.basic_reject(m.delivery_tag, requeue=True)
        else:
            ch.basic_ack(m.delivery_tag)
    assert_empty_after_marker(ch, q)


def test_quorum_channel_close_counts_as_delivery(conn, names):
    """Unacked deliveries returned by a channel close count: limit 1, two
    consumer channels closed with the message unacked dead-letter it."""
    ch = conn.channel()
    dlx, dlq = dead_letter_setup(ch, names)
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments={
        **QUORUM, "x-delivery-limit": 1, "x-dead-letter-exchange": dlx})
    publish_confirmed(conn, "", q, b"closed-on")
    for i in range(2):
        c = conn.channel()
        [(m, p, body)] = consume_n(conn, c, q, 1, timeout=10)
        assert body == b"closed-on" and m.redelivered == (i > 0)
        if i > 0:
            assert headers_of(p)["x-delivery-count"] == i
        c.close()
    assert_delivery_limit_dead_letter(ch, dlq, q, b"closed-on")
    assert queue_depth(ch, q) == 0


def test_quorum_ack_after_redeliveries_removes_message(conn, names):
    """A message acked on its last allowed delivery is not dead-lettered."""
    ch = conn.channel()
    dlx, dlq = dead_letter_setup(ch, names)
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments={
        **QUORUM, "x-delivery-limit": 1, "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"acked")
    m, _p, _b = get_one(ch, q)
    ch.basic_reject(m.delivery_tag, requeue=True)
    m, p, body = get_one(ch, q)
    assert body == b"acked" and delivery_count(p) == 1
    ch.basic_ack(m.delivery_tag)
    assert_empty_after_marker(ch, q)
    assert queue_depth(ch, dlq) == 0


def test_warren_classic_queue_delivery_limit(conn, names):
    """Warren: x-delivery-limit on a classic queue works as on a quorum queue
    (RabbitMQ 3.10 refuses it with 406)."""
    warren_only(conn)
    ch = conn.channel()
    dlx, dlq = dead_letter_setup(ch, names)
    q = names.queue()
    ch.queue_declare(q, arguments={"x-delivery-limit": 2, "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"classic", pika.BasicProperties(headers={"app": "kept"}))
    for i in range(3):
        m, p, body = get_one(ch, q)
        assert body == b"classic" and m.redelivered == (i > 0)
        assert delivery_count(p) == i
        ch.basic_reject(m.delivery_tag, requeue=True)
    assert_delivery_limit_dead_letter(ch, dlq, q, b"classic", {"app": "kept"})
    assert queue_depth(ch, q) == 0


def test_warren_classic_queue_delivery_limit_without_dlx_drops(conn, names):
    """Warren: classic queue x-delivery-limit 1 without DLX drops after 2 requeues."""
    warren_only(conn)
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q, arguments={"x-delivery-limit": 1})
    requeue_until_dropped(ch, q, limit=1)


def test_warren_quorum_default_delivery_limit_is_20(conn, names):
    """Warren (like RabbitMQ 4): a quorum queue without x-delivery-limit
    dead-letters a message on its 21st requeue."""
    warren_only(conn)
    ch = conn.channel()
    dlx, dlq = dead_letter_setup(ch, names)
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments={**QUORUM, "x-dead-letter-exchange": dlx})
    ch.confirm_delivery()
    ch.basic_publish("", q, b"twenty")
    for i in range(21):
        m, p, body = get_one(ch, q)
        assert body == b"twenty" and delivery_count(p) == i
        ch.basic_reject(m.delivery_tag, requeue=True)
    assert_delivery_limit_dead_letter(ch, dlq, q, b"twenty")
    assert queue_depth(ch, q) == 0


# ---------------------------------------------------------- quorum queue declare

REFUSED = [
    ("non-durable", dict(durable=False, arguments=QUORUM),
     "PRECONDITION_FAILED - invalid property 'non-durable' for queue '{q}' in vhost '/'"),
    ("exclusive", dict(durable=True, exclusive=True, arguments=QUORUM),
     "PRECONDITION_FAILED - invalid property 'exclusive-owner' for queue '{q}' in vhost '/'"),
    ("auto-delete", dict(durable=True, auto_delete=True, arguments=QUORUM),
     "PRECONDITION_FAILED - invalid property 'auto-delete' for queue '{q}' in vhost '/'"),
    ("x-max-priority", dict(durable=True, arguments={**QUORUM, "x-max-priority": 10}),
     "PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue '{q}' in vhost '/' "
     "of queue type rabbit_quorum_queue"),
    ("x-queue-mode lazy", dict(durable=True, arguments={**QUORUM, "x-queue-mode": "lazy"}),
     "PRECONDITION_FAILED - invalid arg 'x-queue-mode' for queue '{q}' in vhost '/' "
     "of queue type rabbit_quorum_queue"),
    ("x-queue-mode default", dict(durable=True,
                                  arguments={**QUORUM, "x-queue-mode": "default"}),
     "PRECONDITION_FAILED - invalid arg 'x-queue-mode' for queue '{q}' in vhost '/' "
     "of queue type rabbit_quorum_queue"),
    ("x-queue-master-locator", dict(durable=True, arguments={
        **QUORUM, "x-queue-master-locator": "min-masters"}),
     "PRECONDITION_FAILED - invalid arg 'x-queue-master-locator' for queue '{q}' in "
     "vhost '/' of queue type rabbit_quorum_queue"),
    ("x-dead-letter-strategy bad", dict(durable=True, arguments={
        **QUORUM, "x-dead-letter-strategy": "sometimes"}),
     "PRECONDITION_FAILED - invalid arg 'x-dead-letter-strategy' for queue '{q}' in "
     "vhost '/': invalid_dlx_strategy"),
    ("x-queue-type unknown", dict(durable=True, arguments={"x-queue-type": "foo"}),
     "PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue '{q}' in vhost '/': "
     "\"unsupported queue type 'foo'\""),
    ("x-queue-type not a string", dict(durable=True, arguments={"x-queue-type": 1}),
     "PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue '{q}' in vhost '/': "
     "{unacceptable_type,signedint}"),
]


@pytest.mark.parametrize("kw,text", [(kw, t) for _n, kw, t in REFUSED],
                         ids=[n for n, _kw, _t in REFUSED])
def test_quorum_declare_refused(conn, names, kw, text):
    """These quorum queue declares are refused with 406 and RabbitMQ's text."""
    q = names.queue()
    with channel_error(406) as ei:
        conn.channel().queue_declare(q, **kw)
    assert ei.value.reply_text == text.replace("{q}", q)
    ch = conn.channel()
    with channel_error(404):
        ch.queue_declare(q, passive=True)


def test_quorum_server_named_refused(conn):
    """A quorum queue cannot be server-named (empty name): 406."""
    with channel_error(406) as ei:
        conn.channel().queue_declare("", durable=True, arguments=QUORUM)
    assert ei.value.reply_text == (
        "PRECONDITION_FAILED - Cannot declare a server-named queue for type "
        "rabbit_quorum_queue")


ACCEPTED = [
    ("x-delivery-limit", {"x-delivery-limit": 3}),
    ("x-delivery-limit 0", {"x-delivery-limit": 0}),
    ("x-message-ttl", {"x-message-ttl": 60000}),
    ("x-max-length", {"x-max-length": 10}),
    ("x-max-length-bytes", {"x-max-length-bytes": 10000}),
    ("x-overflow drop-head", {"x-overflow": "drop-head"}),
    ("x-overflow reject-publish", {"x-overflow": "reject-publish"}),
    # accepted in 3.10 (logs a warning and uses drop-head)
    ("x-overflow reject-publish-dlx", {"x-overflow": "reject-publish-dlx"}),
    ("x-single-active-consumer", {"x-single-active-consumer": True}),
    ("x-expires", {"x-expires": 600000}),
    ("x-dead-letter-exchange", {"x-dead-letter-exchange": "amq.fanout",
                                "x-dead-letter-routing-key": "rk"}),
    ("x-dead-letter-strategy", {"x-dead-letter-strategy": "at-most-once"}),
    ("x-queue-leader-locator", {"x-queue-leader-locator": "client-local"}),
    ("x-quorum-initial-group-size", {"x-quorum-initial-group-size": 1}),
]


@pytest.mark.parametrize("args", [a for _n, a in ACCEPTED], ids=[n for n, _a in ACCEPTED])
def test_quorum_declare_accepted(conn, names, args):
    """A durable quorum queue accepts these arguments; redeclaring the same is fine."""
    q = names.queue()
    ch = conn.channel()
    ok = ch.queue_declare(q, durable=True, arguments={**QUORUM, **args})
    assert ok.method.queue == q
    assert (ok.method.message_count, ok.method.consumer_count) == (0, 0)
    ch.queue_declare(q, durable=True, arguments={**QUORUM, **args})
    ch.queue_declare(q, passive=True)


def test_quorum_message_ttl_expires(conn, names):
    """x-message-ttl works on a quorum queue (3.10+)."""
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q, durable=True, arguments={**QUORUM, "x-message-ttl": 50})
    publish_confirmed(conn, "", q, b"short-lived")
    assert wait_depth(ch, q, 0, timeout=5) == 0
    m, _p, _b = ch.basic_get(q, auto_ack=True)
    assert m is None


INEQUIVALENT = [
    ("as classic", dict(durable=True, arguments={"x-queue-type": "classic",
                                                 "x-delivery-limit": 3}),
     "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{q}' in vhost "
     "'/': received 'classic' but current is 'quorum'"),
    ("no arguments", dict(durable=True),
     "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{q}' in vhost "
     "'/': received none but current is the value 'quorum' of type 'longstr'"),
    ("other delivery limit", dict(durable=True, arguments={**QUORUM, "x-delivery-limit": 4}),
     "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue '{q}' in vhost "
     "'/': received '4' but current is '3'"),
    ("no delivery limit", dict(durable=True, arguments=QUORUM),
     "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue '{q}' in vhost "
     "'/': received none but current is the value '3' of type 'signedint'"),
    ("non-durable", dict(durable=False, arguments={**QUORUM, "x-delivery-limit": 3}),
     "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{q}' in vhost '/': "
     "received 'false' but current is 'true'"),
]


@pytest.mark.parametrize("kw,text", [(kw, t) for _n, kw, t in INEQUIVALENT],
                         ids=[n for n, _kw, _t in INEQUIVALENT])
def test_quorum_redeclare_inequivalent(conn, names, kw, text):
    """Redeclaring a quorum queue differently is 406 with RabbitMQ's text."""
    q = names.queue()
    conn.channel().queue_declare(q, durable=True,
                                 arguments={**QUORUM, "x-delivery-limit": 3})
    with channel_error(406) as ei:
        conn.channel().queue_declare(q, **kw)
    assert ei.value.reply_text == text.replace("{q}", q)


def test_classic_redeclared_as_quorum_inequivalent(conn, names):
    """A classic queue redeclared with x-queue-type quorum is 406."""
    q = names.queue()
    conn.channel().queue_declare(q, durable=True)
    with channel_error(406) as ei:
        conn.channel().queue_declare(q, durable=True, arguments=QUORUM)
    assert ei.value.reply_text == (
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '%s' in vhost "
        "'/': received the value 'quorum' of type 'longstr' but current is none" % q)
    conn.channel().queue_declare(q, durable=True, arguments={"x-queue-type": "classic"})


# ------------------------------------------------------- consistent-hash exchange

CHX = "x-consistent-hash"


@pytest.fixture
def chx(conn, names):
    """Skips unless x-consistent-hash exists (RabbitMQ needs the plugin)."""
    require_exchange_type(conn, names, CHX)


def chx_setup(ch, names, weights, arguments=None):
    """A consistent-hash exchange with one queue per weight; returns (x, queues)."""
    x = names.exchange()
    ch.exchange_declare(x, CHX, arguments=arguments)
    queues = []
    for w in weights:
        q = names.queue()
        ch.queue_declare(q)
        ch.queue_bind(q, x, str(w))
        queues.append(q)
    return x, queues


def publish_all(conn, ch, x, queues, messages):
    """Publish [(routing_key, body, props)] to x, wait until the queues hold all
    of them, then consume them: {body: [queue, ...]}."""
    pub = conn.channel()
    for rk, body, props in messages:
        pub.basic_publish(x, rk, body, props)
    deadline = time.monotonic() + 30
    while True:
        depths = [queue_depth(ch, q) for q in queues]
        if sum(depths) >= len(messages) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sum(depths) == len(messages), "routed %d of %d" % (sum(depths), len(messages))
    where = {}
    for q, d in zip(queues, depths):
        if d:
            for _m, _p, body in consume_n(conn, ch, q, d, timeout=30, auto_ack=True):
                where.setdefault(body, []).append(q)
    pub.close()
    return where


def key_messages(keys):
    return [(k, k.encode(), None) for k in keys]


def test_chx_same_routing_key_same_queue(conn, ch, names, chx):
    """Every message with a given routing key goes to the same one queue."""
    x, queues = chx_setup(ch, names, [1, 1, 1])
    keys = ["order-%d" % i for i in range(60)]
    msgs = [(k, b"%s|%d" % (k.encode(), r), None) for r in range(3) for k in keys]
    where = publish_all(conn, ch, x, queues, msgs)
    by_key = {}
    for body, qs in where.items():
        assert len(qs) == 1
        by_key.setdefault(body.split(b"|")[0], set()).update(qs)
    assert len(by_key) == len(keys)
    assert all(len(qs) == 1 for qs in by_key.values())
    assert len(set().union(*by_key.values())) == 3  # 60 keys reach all 3 queues


def test_chx_weights_split_keys(conn, ch, names, chx):
    """Weights 1 and 3 over 4000 distinct keys: the weight-1 queue gets about a
    quarter (between 15% and 35%)."""
    x, (light, heavy) = chx_setup(ch, names, [1, 3])
    pub = conn.channel()
    n = 4000
    for i in range(n):
        pub.basic_publish(x, "k-%s-%d" % (uuid.uuid4().hex[:6], i), b"")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        a, b = queue_depth(ch, light), queue_depth(ch, heavy)
        if a + b == n:
            break
        time.sleep(0.05)
    assert a + b == n
    assert 0.15 * n <= a <= 0.35 * n, (a, b)


def test_chx_new_queue_takes_keys_only_for_itself(conn, ch, names, chx):
    """Binding a third queue moves keys only to it (the others keep theirs);
    unbinding it restores the previous placement."""
    x, (q1, q2) = chx_setup(ch, names, [1, 1])
    keys = ["user-%d" % i for i in range(1000)]
    before = publish_all(conn, ch, x, [q1, q2], key_messages(keys))
    q3 = names.queue()
    ch.queue_declare(q3)
    ch.queue_bind(q3, x, "1")
    after = publish_all(conn, ch, x, [q1, q2, q3], key_messages(keys))
    moved = 0
    for k in keys:
        b = k.encode()
        [old], [new] = before[b], after[b]
        assert new in (old, q3), (k, old, new)
        moved += new == q3
    assert 0.15 * len(keys) <= moved <= 0.55 * len(keys), moved
    ch.queue_unbind(q3, x, "1")
    again = publish_all(conn, ch, x, [q1, q2, q3], key_messages(keys))
    assert again == before


@pytest.mark.parametrize("how", ["header", "message_id", "correlation_id", "timestamp"])
def test_chx_hash_on_header_or_property(conn, ch, names, chx, how):
    """hash-header / hash-property: the value decides the queue, whatever the
    routing key."""
    args = {"hash-header": "user"} if how == "header" else {"hash-property": how}
    x, queues = chx_setup(ch, names, [1, 1], arguments=args)

    def props(i):
        if how == "header":
            return pika.BasicProperties(headers={"user": "u-%d" % i})
        if how == "timestamp":
            return pika.BasicProperties(timestamp=1700000000 + i)
        return pika.BasicProperties(**{how: "v-%d" % i})

    msgs = [(uuid.uuid4().hex, b"%d|%d" % (i, r), props(i))
            for r in range(3) for i in range(50)]
    where = publish_all(conn, ch, x, queues, msgs)
    by_value = {}
    for body, qs in where.items():
        by_value.setdefault(body.split(b"|")[0], set()).update(qs)
    assert len(by_value) == 50
    assert all(len(qs) == 1 for qs in by_value.values())
    assert len(set().union(*by_value.values())) == 2


@pytest.mark.parametrize("args", [{"hash-header": "user"}, {"hash-property": "message_id"}],
                         ids=["header", "property"])
def test_chx_missing_hash_value_all_to_one_queue(conn, ch, names, chx, args):
    """Messages without the hashed header/property are not dropped: they all go
    to one (the same) queue, whatever their routing keys."""
    x, queues = chx_setup(ch, names, [1, 1, 1], arguments=args)
    msgs = [(uuid.uuid4().hex, b"m%d" % i, None) for i in range(40)]
    where = publish_all(conn, ch, x, queues, msgs)
    assert len(where) == 40
    assert len({qs[0] for qs in where.values()}) == 1


def test_chx_without_bindings_is_unroutable(conn, names, chx):
    """No bindings: a mandatory message comes back 312 NO_ROUTE."""
    x = names.exchange()
    ch = conn.channel()
    ch.exchange_declare(x, CHX)
    ch.confirm_delivery()
    with pytest.raises(pe.UnroutableError) as ei:
        ch.basic_publish(x, "any", b"none", mandatory=True)
    [ret] = ei.value.messages
    assert ret.method.reply_code == 312 and ret.method.reply_text == "NO_ROUTE"


def test_chx_plus_sign_weight_accepted(conn, ch, names, chx):
    """A binding key "+5" parses as the integer 5 (accepted) and routes."""
    x, [q] = chx_setup(ch, names, ["+5"])
    publish_confirmed(conn, x, "k", b"plus")
    assert wait_depth(ch, q, 1) == 1


@pytest.mark.parametrize("key,text", [
    ("abc", 'PRECONDITION_FAILED - The binding key must be an integer: <<"abc">>'),
    ("", "PRECONDITION_FAILED - The binding key must be an integer: <<>>"),
    ("1.5", 'PRECONDITION_FAILED - The binding key must be an integer: <<"1.5">>'),
    (" 5", 'PRECONDITION_FAILED - The binding key must be an integer: <<" 5">>'),
    ("0", "PRECONDITION_FAILED - The binding key must be greater than 0"),
    ("-1", "PRECONDITION_FAILED - The binding key must be greater than 0"),
])
def test_chx_invalid_binding_key(conn, ch, names, chx, key, text):
    """A binding key that is not an integer > 0 is 406."""
    x = names.exchange()
    q = names.queue()
    ch.exchange_declare(x, CHX)
    ch.queue_declare(q)
    with channel_error(406) as ei:
        ch.queue_bind(q, x, key)
    assert ei.value.reply_text == text


@pytest.mark.parametrize("args,text", [
    ({"hash-property": "app_id"}, "PRECONDITION_FAILED - Unsupported property: app_id"),
    ({"hash-header": "h", "hash-property": "message_id"},
     "PRECONDITION_FAILED - hash-header and hash-property are mutually exclusive"),
], ids=["unknown-property", "both"])
def test_chx_invalid_exchange_arguments(conn, names, chx, args, text):
    """An unknown hash-property, or both hash-header and hash-property, is 406."""
    x = names.exchange()
    with channel_error(406) as ei:
        conn.channel().exchange_declare(x, CHX, arguments=args)
    assert ei.value.reply_text == text


# ------------------------------------------------------- delayed-message exchange

DELAYED = "x-delayed-message"


@pytest.fixture
def delayed(conn, names):
    warren_only(conn)
    require_exchange_type(conn, names, DELAYED, {"x-delayed-type": "direct"})


def delayed_setup(ch, names, key="k"):
    x, q = names.exchange(), names.queue()
    ch.exchange_declare(x, DELAYED, arguments={"x-delayed-type": "direct"})
    ch.queue_declare(q)
    ch.queue_bind(q, x, key)
    return x, q


def test_delayed_messages_arrive_in_due_order(conn, ch, names, delayed):
    """x-delay 1500, 500, 1000 published in that order arrive as 500, 1000,
    1500, none before its delay."""
    x, q = delayed_setup(ch, names)
    arrived = []
    ch.basic_consume(q, lambda c, m, p, b: arrived.append((b, time.monotonic())),
                     auto_ack=True)
    pub = conn.channel()
    sent = {}
    for d in (1500, 500, 1000):
        body = b"%d" % d
        sent[body] = time.monotonic()
        pub.basic_publish(x, "k", body, pika.BasicProperties(headers={"x-delay": d}))
    deadline = time.monotonic() + 15
    while len(arrived) < 3 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.01)
    assert [b for b, _t in arrived] == [b"500", b"1000", b"1500"]
    for body, t in arrived:
        assert t - sent[body] >= int(body) / 1000.0 - 0.010, (body, t - sent[body])


@pytest.mark.parametrize("delay", [0, -500, "abc"])
def test_delayed_zero_negative_or_not_a_number_routes_at_once(conn, ch, names, delayed,
                                                              delay):
    """x-delay 0, negative or not a number: routed at once."""
    x, q = delayed_setup(ch, names)
    start = time.monotonic()
    publish_confirmed(conn, x, "k", b"now",
                      pika.BasicProperties(headers={"x-delay": delay}))
    assert wait_depth(ch, q, 1, timeout=10) == 1
    assert time.monotonic() - start < 1.5


def test_delayed_without_header_routes_at_once(conn, ch, names, delayed):
    """No x-delay header: routed at once like the underlying type."""
    x, q = delayed_setup(ch, names)
    start = time.monotonic()
    publish_confirmed(conn, x, "k", b"plain")
    assert wait_depth(ch, q, 1, timeout=10) == 1
    assert time.monotonic() - start < 1.5


def test_delayed_routes_with_underlying_type(conn, ch, names, delayed):
    """x-delayed-type direct: only the matching binding gets the message."""
    x, q = delayed_setup(ch, names, key="k")
    other = names.queue()
    ch.queue_declare(other)
    ch.queue_bind(other, x, "other")
    publish_confirmed(conn, x, "k", b"d", pika.BasicProperties(headers={"x-delay": 200}))
    assert wait_depth(ch, q, 1, timeout=10) == 1
    assert queue_depth(ch, other) == 0


def test_delayed_topic_underlying_type(conn, ch, names, delayed):
    """x-delayed-type topic routes by topic patterns after the delay."""
    x, q = names.exchange(), names.queue()
    ch.exchange_declare(x, DELAYED, arguments={"x-delayed-type": "topic"})
    ch.queue_declare(q)
    ch.queue_bind(q, x, "a.*")
    publish_confirmed(conn, x, "a.b", b"t", pika.BasicProperties(headers={"x-delay": 300}))
    publish_confirmed(conn, x, "b.b", b"no", pika.BasicProperties(headers={"x-delay": 300}))
    assert wait_depth(ch, q, 1, timeout=10) == 1
    time.sleep(0.5)
    assert queue_depth(ch, q) == 1


def test_delayed_mandatory_with_matching_binding_not_returned(conn, names, delayed):
    """A mandatory delayed publish that a binding matches is not returned."""
    ch = conn.channel()
    x, q = delayed_setup(ch, names)
    ch.confirm_delivery()
    ch.basic_publish(x, "k", b"m", pika.BasicProperties(headers={"x-delay": 500}),
                     mandatory=True)  # no UnroutableError
    assert wait_depth(ch, q, 1, timeout=10) == 1


def test_delayed_mandatory_without_matching_binding_returned(conn, names, delayed):
    """A mandatory delayed publish no binding matches comes back 312 NO_ROUTE."""
    ch = conn.channel()
    x, _q = delayed_setup(ch, names)
    ch.confirm_delivery()
    with pytest.raises(pe.UnroutableError) as ei:
        ch.basic_publish(x, "nomatch", b"back",
                         pika.BasicProperties(headers={"x-delay": 500}), mandatory=True)
    [ret] = ei.value.messages
    assert ret.method.reply_code == 312 and ret.method.reply_text == "NO_ROUTE"
    assert ret.body == b"back"


def test_delayed_message_keeps_properties_and_headers(conn, ch, names, delayed):
    """The delivered message keeps its properties and headers."""
    x, q = delayed_setup(ch, names)
    props = pika.BasicProperties(message_id="id-1", correlation_id="c-1",
                                 content_type="text/plain",
                                 headers={"x-delay": 300, "app": "kept", "n": 7})
    publish_confirmed(conn, x, "k", b"body", props)
    m, p, body = get_one(ch, q, timeout=10, auto_ack=True)
    assert body == b"body"
    assert m.exchange == x and m.routing_key == "k"
    assert (p.message_id, p.correlation_id, p.content_type) == ("id-1", "c-1", "text/plain")
    h = headers_of(p)
    assert h["app"] == "kept" and h["n"] == 7
    # the plugin hands x-delay on negated (-300); the value itself is kept either way
    assert h["x-delay"] in (300, -300)


@pytest.mark.parametrize("args", [
    {},
    {"x-delayed-type": "x-delayed-message"},
    {"x-delayed-type": "no-such-type"},
], ids=["missing", "itself", "unknown"])
def test_delayed_invalid_delayed_type_406(conn, names, delayed, args):
    """x-delayed-type missing, x-delayed-message itself or an unknown type: 406."""
    with channel_error(406):
        conn.channel().exchange_declare(names.exchange(), DELAYED, arguments=args)


# --------------------------------------------------------------- deduplication

DEDUP = "x-message-deduplication"


@pytest.fixture
def dedup(conn, names):
    warren_only(conn)
    require_exchange_type(conn, names, DEDUP, {"x-cache-size": 10})


def dedup_setup(ch, names, **args):
    x, q = names.exchange(), names.queue()
    ch.exchange_declare(x, DEDUP, arguments={"x-cache-size": 100, **args})
    ch.queue_declare(q)
    ch.queue_bind(q, x)
    return x, q


def dkey(key, **more):
    return pika.BasicProperties(headers={"x-deduplication-header": key, **more})


def test_dedup_exchange_drops_second_message_with_same_key(conn, ch, names, dedup):
    """Same x-deduplication-header twice: only the first is routed."""
    x, q = dedup_setup(ch, names)
    publish_confirmed(conn, x, "", b"first", dkey("k1"))
    publish_confirmed(conn, x, "", b"second", dkey("k1"))
    assert wait_depth(ch, q, 1) == 1
    m, _p, body = ch.basic_get(q, auto_ack=True)
    assert body == b"first"


def test_dedup_exchange_different_keys_both_routed(conn, ch, names, dedup):
    """Different keys are both routed (to every bound queue, like fanout)."""
    x, q = dedup_setup(ch, names)
    q2 = names.queue()
    ch.queue_declare(q2)
    ch.queue_bind(q2, x, "any-key")
    publish_confirmed(conn, x, "rk", b"a", dkey("k1"))
    publish_confirmed(conn, x, "other", b"b", dkey("k2"))
    assert wait_depth(ch, q, 2) == 2
    assert wait_depth(ch, q2, 2) == 2


def test_dedup_exchange_without_header_always_routed(conn, ch, names, dedup):
    """Messages without x-deduplication-header are never deduplicated."""
    x, q = dedup_setup(ch, names)
    for _ in range(3):
        publish_confirmed(conn, x, "", b"same")
    assert wait_depth(ch, q, 3) == 3


def test_dedup_exchange_key_routed_again_after_ttl(conn, ch, names, dedup):
    """x-cache-ttl 1000: after it expires the same key is routed again."""
    x, q = dedup_setup(ch, names, **{"x-cache-ttl": 1000})
    publish_confirmed(conn, x, "", b"1", dkey("k"))
    publish_confirmed(conn, x, "", b"dup", dkey("k"))
    assert wait_depth(ch, q, 1) == 1
    time.sleep(2.5)
    publish_confirmed(conn, x, "", b"2", dkey("k"))
    assert wait_depth(ch, q, 2) == 2
    assert [ch.basic_get(q, auto_ack=True)[2] for _ in range(2)] == [b"1", b"2"]


def test_dedup_exchange_per_message_ttl_overrides(conn, ch, names, dedup):
    """A message's x-cache-ttl header sets the entry's TTL (no exchange TTL:
    other keys stay cached)."""
    x, q = dedup_setup(ch, names)
    publish_confirmed(conn, x, "", b"short", dkey("short", **{"x-cache-ttl": 500}))
    publish_confirmed(conn, x, "", b"forever", dkey("forever"))
    assert wait_depth(ch, q, 2) == 2
    time.sleep(2.0)
    publish_confirmed(conn, x, "", b"short-again", dkey("short"))
    publish_confirmed(conn, x, "", b"forever-again", dkey("forever"))
    assert wait_depth(ch, q, 3) == 3
    time.sleep(0.3)
    bodies = [ch.basic_get(q, auto_ack=True)[2] for _ in range(3)]
    assert bodies == [b"short", b"forever", b"short-again"]


def test_dedup_duplicate_is_confirmed_with_ack(conn, names, dedup):
    """Under publisher confirms a duplicate gets basic.ack, not basic.nack."""
    ch = conn.channel()
    x, q = dedup_setup(ch, names)
    ch.confirm_delivery()
    ch.basic_publish(x, "", b"1", dkey("k"))
    ch.basic_publish(x, "", b"2", dkey("k"))  # NackError if nacked
    assert wait_depth(ch, q, 1) == 1


def test_dedup_mandatory_duplicate_not_returned(conn, names, dedup):
    """A mandatory duplicate is dropped silently, not returned."""
    ch = conn.channel()
    x, q = dedup_setup(ch, names)
    ch.confirm_delivery()
    ch.basic_publish(x, "", b"1", dkey("k"), mandatory=True)
    ch.basic_publish(x, "", b"2", dkey("k"), mandatory=True)  # no UnroutableError
    assert wait_depth(ch, q, 1) == 1


def test_dedup_exchange_requires_cache_size(conn, names, dedup):
    """x-message-deduplication exchange without x-cache-size: 406."""
    with channel_error(406):
        conn.channel().exchange_declare(names.exchange(), DEDUP, arguments={})


def test_dedup_queue_drops_key_already_in_queue(conn, ch, names):
    """Queue x-message-deduplication: a key already in the queue (ready or
    unacked) is dropped; once acked it is accepted again."""
    warren_only(conn)
    q = names.queue()
    ch.queue_declare(q, arguments={"x-message-deduplication": True})
    publish_confirmed(conn, "", q, b"a1", dkey("a"))
    publish_confirmed(conn, "", q, b"a2", dkey("a"))  # a is ready: dropped
    publish_confirmed(conn, "", q, b"b1", dkey("b"))
    assert queue_depth(ch, q) == 2
    m, _p, body = ch.basic_get(q)  # a1, now unacked
    assert body == b"a1"
    publish_confirmed(conn, "", q, b"a3", dkey("a"))  # a is unacked: dropped
    assert queue_depth(ch, q) == 1
    ch.basic_ack(m.delivery_tag)
    sync(ch)
    publish_confirmed(conn, "", q, b"a4", dkey("a"))  # gone: accepted again
    assert queue_depth(ch, q) == 2
    assert [ch.basic_get(q, auto_ack=True)[2] for _ in range(2)] == [b"b1", b"a4"]


def test_dedup_queue_without_header_always_accepted(conn, ch, names):
    """Queue deduplication ignores messages without x-deduplication-header."""
    warren_only(conn)
    q = names.queue()
    ch.queue_declare(q, arguments={"x-message-deduplication": True})
    for _ in range(3):
        publish_confirmed(conn, "", q, b"same")
    assert queue_depth(ch, q) == 3


def test_dedup_queue_key_accepted_after_reject_without_requeue(conn, ch, names):
    """A key leaves the queue's set when its message is rejected (not requeued)."""
    warren_only(conn)
    q = names.queue()
    ch.queue_declare(q, arguments={"x-message-deduplication": True})
    publish_confirmed(conn, "", q, b"a1", dkey("a"))
    m, _p, _b = ch.basic_get(q)
    ch.basic_reject(m.delivery_tag, requeue=False)
    sync(ch)
    publish_confirmed(conn, "", q, b"a2", dkey("a"))
    assert queue_depth(ch, q) == 1


def test_dedup_argument_on_direct_exchange(conn, ch, names):
    """x-message-deduplication: true on a direct exchange deduplicates there and
    still routes by routing key."""
    warren_only(conn)
    x, q, other = names.exchange(), names.queue(), names.queue()
    ch.exchange_declare(x, "direct", arguments={"x-message-deduplication": True,
                                                "x-cache-size": 100})
    ch.queue_declare(q)
    ch.queue_declare(other)
    ch.queue_bind(q, x, "k")
    ch.queue_bind(other, x, "other")
    publish_confirmed(conn, x, "k", b"1", dkey("d"))
    publish_confirmed(conn, x, "k", b"2", dkey("d"))
    publish_confirmed(conn, x, "k", b"3", dkey("e"))
    assert queue_depth(ch, q) == 2
    assert queue_depth(ch, other) == 0


# ------------------------------------------------------------- consumer timeout


def test_pika_announces_consumer_cancel_notify(conn):
    """pika sends capability consumer_cancel_notify, and the broker has it."""
    caps = conn._impl._client_properties["capabilities"]
    assert caps["consumer_cancel_notify"] is True
    assert conn._impl.server_capabilities.get("consumer_cancel_notify") is True


def wait_cancel(conn, cancels, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cancels and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    return cancels


def check_consumer_timeout(conn, names, queue_args, consume_args):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q, arguments=queue_args)
    publish_confirmed(conn, "", q, b"slow")
    cancels = []
    ch.add_on_cancel_callback(lambda frame: cancels.append(frame))
    got = []
    tag = ch.basic_consume(q, lambda c, m, p, b: got.append(m), auto_ack=False,
                           arguments=consume_args)
    start = time.monotonic()
    assert wait_cancel(conn, got, timeout=5) and got[0].redelivered is False
    assert wait_cancel(conn, cancels, timeout=10), "no basic.cancel within 10 s"
    assert time.monotonic() - start >= 0.9
    assert cancels[0].method.consumer_tag == tag
    assert tag not in ch.consumer_tags
    assert ch.is_open
    other = conn.channel()
    m, _p, body = get_one(other, q, timeout=5, auto_ack=True)
    assert body == b"slow" and m.redelivered is True


def test_warren_queue_consumer_timeout_cancels_and_requeues(conn, names):
    """Queue x-consumer-timeout 1000: an unacked delivery cancels the consumer
    (basic.cancel) and the message is requeued, redelivered=True."""
    warren_only(conn)
    check_consumer_timeout(conn, names, {"x-consumer-timeout": 1000}, None)


def test_warren_consumer_argument_timeout_cancels_and_requeues(conn, names):
    """Consumer argument x-consumer-timeout 1000 does the same on a plain queue."""
    warren_only(conn)
    check_consumer_timeout(conn, names, None, {"x-consumer-timeout": 1000})


def test_warren_consumer_timeout_not_triggered_when_acked(conn, names):
    """A consumer that acks in time is not cancelled."""
    warren_only(conn)
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q, arguments={"x-consumer-timeout": 1000})
    cancels = []
    ch.add_on_cancel_callback(lambda frame: cancels.append(frame))
    got = []
    tag = ch.basic_consume(q, lambda c, m, p, b: (got.append(b), c.basic_ack(m.delivery_tag)))
    # (pika runs consumer callbacks only while it processes events: keep
    # processing, so that every delivery is acked at once.)
    for i in range(3):
        publish_confirmed(conn, "", q, b"%d" % i)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert got == [b"0", b"1", b"2"]
    assert cancels == [] and tag in ch.consumer_tags


# ------------------------------------------------------- exchange equivalence

def test_exchange_redeclared_with_another_alternate_exchange_is_406(conn, names):
    """A redeclaration must name the same alternate-exchange (406 otherwise,
    as RabbitMQ checks it)."""
    x = names.exchange()
    ch = conn.channel()
    ch.exchange_declare(x, "direct", arguments={"alternate-exchange": "ae-one"})
    ch.exchange_declare(x, "direct", arguments={"alternate-exchange": "ae-one"})
    with channel_error(406) as ei:
        conn.channel().exchange_declare(x, "direct",
                                        arguments={"alternate-exchange": "ae-two"})
    assert ei.value.reply_text == (
        "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange "
        "'%s' in vhost '/': received 'ae-two' but current is 'ae-one'" % x)


def test_warren_plugin_exchange_arguments_must_match_on_redeclare(conn, names):
    """Warren: a delayed exchange redeclared with another x-delayed-type, or a
    deduplicating one with another cache size, is 406 (never accepted while
    the exchange keeps doing what it did)."""
    warren_only(conn)
    x, y = names.exchange(), names.exchange()
    ch = conn.channel()
    ch.exchange_declare(x, "x-delayed-message", arguments={"x-delayed-type": "direct"})
    with channel_error(406):
        conn.channel().exchange_declare(x, "x-delayed-message",
                                        arguments={"x-delayed-type": "topic"})
    ch.exchange_declare(y, "x-message-deduplication", arguments={"x-cache-size": 10})
    with channel_error(406):
        conn.channel().exchange_declare(y, "x-message-deduplication",
                                        arguments={"x-cache-size": 20})


def test_warren_delayed_exchange_checks_bindings_as_its_type(conn, names):
    """Warren: a delayed exchange checks a binding as the type it routes as
    (x-delayed-type headers: x-match; x-consistent-hash: the weight)."""
    warren_only(conn)
    x, y, q = names.exchange(), names.exchange(), names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.exchange_declare(x, "x-delayed-message", arguments={"x-delayed-type": "headers"})
    with channel_error(406):
        conn.channel().queue_bind(q, x, "", arguments={"x-match": "some"})
    ch.exchange_declare(y, "x-delayed-message",
                        arguments={"x-delayed-type": "x-consistent-hash"})
    with channel_error(406):
        conn.channel().queue_bind(q, y, "heavy")
    ch.queue_bind(q, y, "2")
