"""Publisher confirms and transactions."""

import time

import pika
import pika.exceptions as pe
import pytest

from conftest import channel_error, drain, queue_depth


def test_confirm_select_and_acks(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.confirm_delivery()
    for i in range(20):
        ch.basic_publish("", q, b"%d" % i)  # raises unless acked
    assert queue_depth(ch, q) == 20


def test_confirm_unroutable_is_acked(conn, names):
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish("", names.queue(), b"nowhere")  # no exception: ack, not nack
    assert ch.is_open


def test_confirm_mandatory_unroutable_returned_then_acked(conn, names):
    ch = conn.channel()
    ch.confirm_delivery()
    with pytest.raises(pe.UnroutableError) as ei:
        ch.basic_publish("", names.queue(), b"bounce", mandatory=True)
    [ret] = ei.value.messages
    assert ret.method.reply_code == 312 and ret.body == b"bounce"
    assert ch.is_open
    ch.basic_publish("", "amq.gen-nothing-" + names.queue(), b"next")  # still usable


def test_confirm_delivery_tags_raw_sequence(conn, names):
    """Acks arrive for sequence numbers 1..n (possibly batched with multiple)."""
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    acks = []
    ch._impl.add_callback(lambda f: acks.append(f.method), [pika.spec.Basic.Ack], False)
    ok = []
    ch._impl._rpc(pika.spec.Confirm.Select(), lambda f: ok.append(f),
                  [pika.spec.Confirm.SelectOk])
    conn.process_data_events(time_limit=0.2)
    assert ok
    for i in range(10):
        ch._impl.basic_publish("", q, b"%d" % i)
    deadline = time.monotonic() + 5
    while (not acks or acks[-1].delivery_tag < 10) and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    covered = set()
    prev = 0
    for a in acks:
        assert a.delivery_tag > prev
        covered |= set(range(prev + 1, a.delivery_tag + 1)) if a.multiple else {a.delivery_tag}
        prev = a.delivery_tag
    assert covered == set(range(1, 11))


def test_tx_commit(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.tx_select()
    ch.basic_publish("", q, b"t1")
    ch.basic_publish("", q, b"t2")
    other = conn.channel()
    assert queue_depth(other, q) == 0  # not visible before commit
    ch.tx_commit()
    assert drain(other, q) == [b"t1", b"t2"]


def test_tx_rollback_discards_publishes(conn, names):
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.tx_select()
    ch.basic_publish("", q, b"discarded")
    ch.tx_rollback()
    ch.basic_publish("", q, b"kept")
    ch.tx_commit()
    assert drain(conn.channel(), q) == [b"kept"]


def test_tx_rollback_discards_acks(conn, names):
    q = names.queue()
    setup = conn.channel()
    setup.queue_declare(q)
    setup.confirm_delivery()
    setup.basic_publish("", q, b"m")
    ch = conn.channel()
    ch.tx_select()
    m, _p, _b = ch.basic_get(q)
    ch.basic_ack(m.delivery_tag)
    ch.tx_rollback()
    # the ack was thrown away: the message is still unacked, so closing requeues it
    ch.close()
    m, _p, body = setup.basic_get(q, auto_ack=True)
    assert body == b"m" and m.redelivered is True


def test_tx_commit_applies_acks(conn, names):
    q = names.queue()
    setup = conn.channel()
    setup.queue_declare(q)
    setup.confirm_delivery()
    setup.basic_publish("", q, b"m")
    ch = conn.channel()
    ch.tx_select()
    m, _p, _b = ch.basic_get(q)
    ch.basic_ack(m.delivery_tag)
    ch.tx_commit()
    ch.close()
    assert setup.basic_get(q) == (None, None, None)


def test_tx_commit_without_select_406(conn):
    ch = conn.channel()
    with channel_error(406):
        ch.tx_commit()


def test_tx_rollback_without_select_406(conn):
    ch = conn.channel()
    with channel_error(406):
        ch.tx_rollback()


def test_confirm_then_tx_406(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    with channel_error(406):
        ch.tx_select()
    assert conn.is_open


def test_tx_then_confirm_406(conn):
    ch = conn.channel()
    ch.tx_select()
    with channel_error(406):
        ch.confirm_delivery()
    assert conn.is_open


def test_confirm_select_twice_ok(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    ok = []
    ch._impl._rpc(pika.spec.Confirm.Select(), lambda f: ok.append(f),
                  [pika.spec.Confirm.SelectOk])
    deadline = time.monotonic() + 5
    while not ok and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert ok


def test_tx_select_twice_ok(conn):
    ch = conn.channel()
    ch.tx_select()
    ch.tx_select()
    ch.tx_commit()
