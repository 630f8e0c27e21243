"""Streams (x-queue-type: stream) over AMQP 0-9-1, as RabbitMQ 3.10 has them:
what a declare refuses, what consumers must set (a prefetch, manual acks),
what a stream refuses (basic.get, purge, nack, reject: 540), where a consumer
starts (x-stream-offset first / last / next / numeric / timestamp /
interval), the x-stream-offset header on every delivery, non-destructive
reads by many consumers, consumers waiting at the end, retention by size
(argument and policy), and the management API's view of a stream.

Every test passes on Warren and on the RabbitMQ reference. Offsets are
compared as RabbitMQ guarantees them: increasing, dense within a test's few
messages (RabbitMQ leaves a gap where a segment starts; the tests that make
segments check order, not density)."""

import datetime
import time

import pika
import pytest

from conftest import channel_error, connect, connection_error

pytestmark = pytest.mark.extension

STREAM = {"x-queue-type": "stream"}


def declare(ch, name, **args):
    return ch.queue_declare(name, durable=True, arguments={**STREAM, **args})


def fill(conn, name, bodies):
    """Publish each body on a confirm channel, one at a time (each its own
    chunk on RabbitMQ)."""
    c = conn.channel()
    c.confirm_delivery()
    for b in bodies:
        c.basic_publish("", name, b)
    c.close()


class Reader:
    """A stream consumer on its own channel: collects (offset, body,
    redelivered) and acks each delivery."""

    def __init__(self, conn, name, prefetch=100, ack=True, **args):
        self.conn, self.got = conn, []
        self.ch = conn.channel()
        self.ch.basic_qos(prefetch_count=prefetch)

        def on_msg(c, m, p, b):
            self.got.append(((p.headers or {}).get("x-stream-offset"), b, m.redelivered))
            if ack:
                c.basic_ack(m.delivery_tag)

        self.tag = self.ch.basic_consume(name, on_msg, arguments=args)

    def wait(self, n, timeout=5.0):
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.05)
        return self.got

    def settle(self, seconds=0.5):
        """Whatever arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.05)
        return self.got

    def bodies(self):
        return [b for _o, b, _r in self.got]

    def offsets(self):
        return [o for o, _b, _r in self.got]


# ------------------------------------------------------------ declaring

@pytest.mark.parametrize("flags,prop", [
    ({"durable": False}, "non-durable"),
    ({"durable": True, "exclusive": True}, "exclusive-owner"),
    ({"durable": True, "auto_delete": True}, "auto-delete"),
])
def test_a_stream_is_durable_not_exclusive_not_auto_delete(conn, names, flags, prop):
    n = names.queue()
    with channel_error(406) as e:
        conn.channel().queue_declare(n, arguments=STREAM, **flags)
    assert "invalid property '%s'" % prop in e.value.reply_text


def test_a_stream_cannot_be_server_named(conn):
    with channel_error(406) as e:
        conn.channel().queue_declare("", durable=True, arguments=STREAM)
    assert "Cannot declare a server-named queue for type rabbit_stream_queue" in e.value.reply_text


@pytest.mark.parametrize("arg,value", [
    ("x-max-length", 10), ("x-message-ttl", 1000), ("x-dead-letter-exchange", "dlx"),
    ("x-max-priority", 5), ("x-expires", 10000), ("x-single-active-consumer", True),
    ("x-overflow", "reject-publish"), ("x-queue-mode", "lazy"), ("x-delivery-limit", 3),
])
def test_a_stream_refuses_the_arguments_of_destructive_queues(conn, names, arg, value):
    n = names.queue()
    with channel_error(406) as e:
        declare(conn.channel(), n, **{arg: value})
    assert ("invalid arg '%s' for queue '%s' in vhost '/' of queue type rabbit_stream_queue"
            % (arg, n)) in e.value.reply_text


def test_retention_arguments_are_checked(conn, names):
    n = names.queue()
    with channel_error(406) as e:
        declare(conn.channel(), n, **{"x-max-age": 10})
    assert "invalid arg 'x-max-age'" in e.value.reply_text
    with channel_error(406):
        declare(conn.channel(), n, **{"x-max-length-bytes": -1})
    ch = conn.channel()
    for age in ("7D", "12h", "30m", "45s", "1Y", "2M"):
        declare(ch, n, **{"x-max-age": age, "x-max-length-bytes": 10_000_000,
                          "x-stream-max-segment-size-bytes": 1_000_000})
        ch.queue_delete(n)


def test_a_redeclare_must_match(conn, names):
    n = names.queue()
    declare(conn.channel(), n, **{"x-max-age": "1D"})
    declare(conn.channel(), n, **{"x-max-age": "1D"})
    with channel_error(406) as e:
        declare(conn.channel(), n, **{"x-max-age": "1h"})
    assert "inequivalent arg 'x-max-age'" in e.value.reply_text
    with channel_error(406) as e:
        conn.channel().queue_declare(n, durable=True)
    assert "inequivalent arg 'x-queue-type'" in e.value.reply_text


# ------------------------------------------------------------ what a stream refuses

def test_consumers_need_a_prefetch(conn, names):
    n = names.queue()
    declare(conn.channel(), n)
    ch = conn.channel()
    with channel_error(406) as e:
        ch.basic_consume(n, lambda *a: None)
        conn.process_data_events(time_limit=0.5)
    assert "consumer prefetch count is not set" in e.value.reply_text


def test_a_global_prefetch_is_not_a_consumer_prefetch(conn, names):
    n = names.queue()
    declare(conn.channel(), n)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=10, global_qos=True)
    with channel_error(406):
        ch.basic_consume(n, lambda *a: None)
        conn.process_data_events(time_limit=0.5)


def test_automatic_acknowledgement_is_540(names):
    c = connect()
    ch = c.channel()
    n = names.queue()
    declare(ch, n)
    ch.basic_qos(prefetch_count=10)
    with connection_error(540) as e:
        ch.basic_consume(n, lambda *a: None, auto_ack=True)
        c.process_data_events(time_limit=0.5)
    assert "automatic acknowledgement not supported by stream queues" in e.value.reply_text


@pytest.mark.parametrize("what", ["get", "purge"])
def test_basic_get_and_purge_are_540(names, what):
    c = connect()
    ch = c.channel()
    n = names.queue()
    declare(ch, n)
    with connection_error(540) as e:
        if what == "get":
            ch.basic_get(n)
        else:
            ch.queue_purge(n)
    word = "basic.get" if what == "get" else "queue.purge"
    assert "%s not supported by stream queues queue '%s'" % (word, n) in e.value.reply_text


@pytest.mark.parametrize("requeue", [True, False])
def test_nack_and_reject_are_540(names, requeue):
    c = connect()
    n = names.queue()
    declare(c.channel(), n)
    fill(c, n, [b"a"])
    ch = c.channel()
    ch.basic_qos(prefetch_count=10)

    def on_msg(c_, m, _p, _b):
        if requeue:
            c_.basic_nack(m.delivery_tag, requeue=True)
        else:
            c_.basic_reject(m.delivery_tag, requeue=False)

    with connection_error(540) as e:
        ch.basic_consume(n, on_msg, arguments={"x-stream-offset": "first"})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            c.process_data_events(time_limit=0.1)
    assert "basic.nack and basic.reject not supported by stream queues" in e.value.reply_text


def test_stream_consumer_arguments_are_refused_on_a_classic_queue(conn, names):
    n = names.queue()
    conn.channel().queue_declare(n)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=10)
    with channel_error(406) as e:
        ch.basic_consume(n, lambda *a: None, arguments={"x-stream-offset": "first"})
        conn.process_data_events(time_limit=0.5)
    assert "invalid arg 'x-stream-offset'" in e.value.reply_text
    assert "rabbit_classic_queue" in e.value.reply_text


def test_a_bad_offset_is_refused(conn, names):
    n = names.queue()
    declare(conn.channel(), n)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=10)
    with channel_error(406) as e:
        ch.basic_consume(n, lambda *a: None, arguments={"x-stream-offset": "0s"})
        conn.process_data_events(time_limit=0.5)
    assert "invalid_stream_offset_arg" in e.value.reply_text


# ------------------------------------------------------------ offsets

@pytest.fixture
def five(conn, names):
    """A stream holding m0..m4, published one by one."""
    n = names.queue()
    declare(conn.channel(), n)
    fill(conn, n, [b"m%d" % i for i in range(5)])
    return n


def test_first_reads_everything_with_each_offset_in_a_header(conn, five):
    r = Reader(conn, five, **{"x-stream-offset": "first"})
    got = r.wait(5)
    assert r.bodies() == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    offs = r.offsets()
    assert offs == list(range(offs[0], offs[0] + 5)) and offs[0] == 0
    assert not any(red for _o, _b, red in got)
    assert r.settle(0.3) == got


def test_last_starts_at_the_last_chunk(conn, five):
    r = Reader(conn, five, **{"x-stream-offset": "last"})
    r.wait(1)
    assert r.settle(0.3) and r.bodies() == [b"m4"]


def test_next_is_the_default_and_waits_for_new_messages(conn, five):
    explicit = Reader(conn, five, **{"x-stream-offset": "next"})
    default = Reader(conn, five)
    assert explicit.settle(0.3) == [] and default.settle(0.1) == []
    fill(conn, five, [b"new"])
    assert explicit.wait(1) and explicit.bodies() == [b"new"]
    assert default.wait(1) and default.bodies() == [b"new"]
    assert explicit.offsets() == [5]


def test_a_numeric_offset_starts_there(conn, five):
    r = Reader(conn, five, **{"x-stream-offset": 2})
    r.wait(3)
    assert r.settle(0.3) and r.bodies() == [b"m2", b"m3", b"m4"]
    assert r.offsets() == [2, 3, 4]


def test_an_offset_before_the_start_is_the_first(conn, five):
    r = Reader(conn, five, **{"x-stream-offset": -1})
    r.wait(5)
    assert r.bodies() == [b"m0", b"m1", b"m2", b"m3", b"m4"]


def test_an_offset_beyond_the_end_waits_for_it(conn, five):
    r = Reader(conn, five, **{"x-stream-offset": 7})
    assert r.settle(0.3) == []
    fill(conn, five, [b"m5", b"m6", b"m7", b"m8"])
    r.wait(2)
    assert r.settle(0.3) and r.bodies() == [b"m7", b"m8"]


def test_a_timestamp_or_an_interval_starts_by_append_time(conn, names):
    n = names.queue()
    declare(conn.channel(), n)
    fill(conn, n, [b"old"])
    time.sleep(2.2)
    middle = datetime.datetime.fromtimestamp(time.time() - 1)
    fill(conn, n, [b"new1", b"new2"])
    by_time = Reader(conn, n, **{"x-stream-offset": middle})
    by_time.wait(2)
    assert by_time.settle(0.3) and by_time.bodies() == [b"new1", b"new2"]
    everything = Reader(conn, n, **{"x-stream-offset": datetime.datetime.fromtimestamp(
        time.time() - 60)})
    everything.wait(3)
    assert everything.bodies() == [b"old", b"new1", b"new2"]
    recent = Reader(conn, n, **{"x-stream-offset": "1s"})
    recent_all = Reader(conn, n, **{"x-stream-offset": "1h"})
    recent_all.wait(3)
    assert recent_all.bodies() == [b"old", b"new1", b"new2"]
    recent.settle(0.3)
    assert b"old" not in recent.bodies()
    future = Reader(conn, n, **{"x-stream-offset": datetime.datetime.fromtimestamp(
        time.time() + 60)})
    assert future.settle(0.3) == []


# ------------------------------------------------------------ reading

def test_reads_do_not_remove_messages(conn, five):
    readers = [Reader(conn, five, **{"x-stream-offset": "first"}) for _ in range(3)]
    for r in readers:
        r.wait(5)
        assert r.bodies() == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    # Read and acked three times over, all still there for a newcomer
    # (RabbitMQ's declare-ok count of a stream lags: not compared).
    late = Reader(conn, five, **{"x-stream-offset": "first"})
    late.wait(5)
    assert late.bodies() == [b"m0", b"m1", b"m2", b"m3", b"m4"]


def test_the_prefetch_bounds_unacked_deliveries(conn, five):
    r = Reader(conn, five, prefetch=2, ack=False, **{"x-stream-offset": "first"})
    r.wait(2)
    assert len(r.settle(0.5)) == 2
    r.ch.basic_ack(0, multiple=True)
    r.wait(4)
    assert len(r.settle(0.3)) == 4


def test_a_cancelled_consumer_gets_no_more(conn, five):
    r = Reader(conn, five, **{"x-stream-offset": "first"})
    r.wait(5)
    r.ch.basic_cancel(r.tag)
    fill(conn, five, [b"after"])
    assert len(r.settle(0.3)) == 5


def test_many_messages_arrive_in_order(conn, names):
    n = names.queue()
    declare(conn.channel(), n)
    c = conn.channel()
    c.confirm_delivery()
    for i in range(2000):
        c.basic_publish("", n, b"%d" % i)
    r = Reader(conn, n, prefetch=500, **{"x-stream-offset": "first"})
    r.wait(2000, timeout=15)
    assert r.bodies() == [b"%d" % i for i in range(2000)]
    offs = r.offsets()
    assert offs == sorted(offs) and len(set(offs)) == 2000


def test_retention_by_size_removes_the_oldest_segments(conn, names):
    n = names.queue()
    declare(conn.channel(), n, **{"x-max-length-bytes": 1000,
                                  "x-stream-max-segment-size-bytes": 200})
    fill(conn, n, [b"%03d" % i + b"x" * 97 for i in range(50)])
    time.sleep(0.5)
    fill(conn, n, [b"last" + b"x" * 96])
    r = Reader(conn, n, **{"x-stream-offset": "first"})
    got = r.settle(1.0)
    bodies = r.bodies()
    assert 0 < len(bodies) < 51, len(bodies)
    assert bodies[-1].startswith(b"last")
    assert bodies[0] != b"000" + b"x" * 97
    offs = r.offsets()
    assert offs[0] > 0 and offs == sorted(offs)
    assert got


def test_a_deleted_stream_cancels_its_consumers(conn, names):
    n = names.queue()
    declare(conn.channel(), n)
    r = Reader(conn, n)
    cancelled = []
    r.ch.add_on_cancel_callback(lambda f: cancelled.append(f))
    conn.channel().queue_delete(n)
    deadline = time.monotonic() + 5
    while not cancelled and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert cancelled


# ------------------------------------------------------------ policies and the API

from test_management import MGMT_URL, api, ok, q, wait_until  # noqa: E402
from test_queue_features import is_warren  # noqa: E402


@pytest.mark.skipif(not MGMT_URL, reason="no MGMT_URL (management API) given")
def test_a_policy_sets_retention_and_the_api_shows_a_stream(conn, names):
    n = names.queue()
    ok("PUT", "policies/%%2F/%s" % n,
       {"pattern": "^" + n + "$", "apply-to": "queues", "priority": 5,
        "definition": {"max-length-bytes": 1000, "stream-max-segment-size-bytes": 200}})
    try:
        declare(conn.channel(), n)
        fill(conn, n, [b"x" * 100 for _ in range(40)])
        time.sleep(0.5)
        fill(conn, n, [b"y" * 100])
        r = Reader(conn, n, **{"x-stream-offset": "first"})
        r.settle(1.0)
        assert 0 < len(r.got) < 41 and r.offsets()[0] > 0
        got = wait_until("the stream in the API", lambda: (lambda j: j if j.get(
            "type") == "stream" and j.get("policy") == n else None)(
            ok("GET", "queues/%%2F/%s" % q(n))))
        assert got["durable"] is True
        assert got["arguments"]["x-queue-type"] == "stream"
    finally:
        api("DELETE", "policies/%%2F/%s" % n)


@pytest.mark.skipif(not MGMT_URL, reason="no MGMT_URL (management API) given")
def test_the_api_shows_a_stream_and_its_consumers(conn, names):
    """Both brokers: type stream, the message count, the consumer with its
    prefetch. Warren also shows the offsets kept, the segments and each
    consumer's offset and lag (RabbitMQ 3.10 shows none of them)."""
    n = names.queue()
    declare(conn.channel(), n)
    fill(conn, n, [b"m%d" % i for i in range(5)])
    r = Reader(conn, n, prefetch=2, ack=False, **{"x-stream-offset": "first"})
    r.wait(2)

    def shown():
        j = ok("GET", "queues/%%2F/%s" % q(n))
        return j if j.get("messages") == 5 and j.get("consumers") == 1 else None

    got = wait_until("the stream's numbers in the API", shown)
    assert got["type"] == "stream"
    consumers = [c for c in ok("GET", "consumers") if c["queue"]["name"] == n]
    assert len(consumers) == 1 and consumers[0]["prefetch_count"] == 2
    if is_warren(conn):
        assert (got["first_offset"], got["committed_offset"], got["segments"]) == (0, 4, 1)
        # Two delivered (prefetch 2, none acked): next offset 2, 3 behind.
        assert (consumers[0]["offset"], consumers[0]["offset_lag"]) == (2, 3)
