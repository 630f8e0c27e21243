"""Shared fixtures: the broker URL (env AMQP_URL), pika connections, unique
names with cleanup, and helpers for asserting broker-sent closes."""

import contextlib
import os
import time
import uuid

import pika
import pika.exceptions as pe
import pytest

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def url_params(**overrides):
    p = pika.URLParameters(AMQP_URL)
    p.connection_attempts = 1
    p.socket_timeout = 5
    p.blocked_connection_timeout = 30
    for k, v in overrides.items():
        setattr(p, k, v)
    return p


def connect(**overrides):
    return pika.BlockingConnection(url_params(**overrides))


def uname(kind="q"):
    return "conf-%s-%s" % (kind, uuid.uuid4().hex[:12])


class Names:
    """Hands out unique queue/exchange names and deletes them after the test."""

    def __init__(self):
        self.queues, self.exchanges = [], []

    def queue(self):
        n = uname("q")
        self.queues.append(n)
        return n

    def exchange(self):
        n = uname("x")
        self.exchanges.append(n)
        return n

    def cleanup(self):
        if not (self.queues or self.exchanges):
            return
        try:
            c = connect()
        except Exception:
            return
        try:
            for kind, names in (("q", self.queues), ("x", self.exchanges)):
                for n in names:
                    try:
                        ch = c.channel()
                        if kind == "q":
                            ch.queue_delete(n)
                        else:
                            ch.exchange_delete(n)
                        ch.close()
                    except pe.ChannelClosedByBroker:
                        pass
        finally:
            with contextlib.suppress(Exception):
                c.close()


@pytest.fixture
def names():
    n = Names()
    yield n
    n.cleanup()


@pytest.fixture
def conn():
    c = connect()
    yield c
    if c.is_open:
        with contextlib.suppress(Exception):
            c.close()


@pytest.fixture
def ch(conn):
    return conn.channel()


@pytest.fixture
def conn2():
    c = connect()
    yield c
    if c.is_open:
        with contextlib.suppress(Exception):
            c.close()


@contextlib.contextmanager
def channel_error(code):
    """The block must end in a channel.close from the broker with `code`."""
    with pytest.raises(pe.ChannelClosedByBroker) as ei:
        yield ei
    assert ei.value.reply_code == code, ei.value


@contextlib.contextmanager
def connection_error(code):
    """The block must end in a connection.close from the broker with `code`."""
    with pytest.raises(pe.ConnectionClosedByBroker) as ei:
        yield ei
    assert ei.value.reply_code == code, ei.value


def sync(ch):
    """Round trip on the channel so everything sent before is processed."""
    ch.basic_qos(prefetch_count=0)


def publish_confirmed(conn, exchange, routing_key, body=b"x", properties=None,
                      mandatory=False):
    """Publish on a fresh confirm channel: when this returns the broker has
    routed (or dropped) the message."""
    c = conn.channel()
    c.confirm_delivery()
    try:
        c.basic_publish(exchange, routing_key, body, properties, mandatory)
    finally:
        if c.is_open:
            c.close()


def drain(ch, queue):
    """All bodies currently in queue, auto-acked, via basic.get."""
    out = []
    while True:
        m, _p, body = ch.basic_get(queue, auto_ack=True)
        if m is None:
            return out
        out.append(body)


def consume_n(conn, ch, queue, n, timeout=5.0, auto_ack=False, **kw):
    """Start a consumer, collect n deliveries (method, props, body), cancel."""
    got = []

    def on_msg(_c, m, p, b):
        got.append((m, p, b))

    tag = ch.basic_consume(queue, on_msg, auto_ack=auto_ack, **kw)
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    ch.basic_cancel(tag)
    return got


def queue_depth(ch, queue):
    return ch.queue_declare(queue, passive=True).method.message_count


def broker_alive():
    """A fresh pika connection can declare, publish and get."""
    c = connect()
    try:
        ch = c.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.confirm_delivery()
        ch.basic_publish("", q, b"alive")
        m, _p, body = ch.basic_get(q, auto_ack=True)
        assert body == b"alive"
    finally:
        c.close()
    return True
