"""Channels: many open, close, error isolation, channel_max."""

from conftest import channel_error, connect, connection_error


def test_open_many_channels_and_close(conn):
    chans = [conn.channel() for _ in range(50)]
    for c in chans:
        assert c.is_open
    for c in chans[::2]:
        c.close()
        assert c.is_closed
    for c in chans[1::2]:
        c.queue_declare("", exclusive=True)
    # a closed channel number can be reused
    again = conn.channel(channel_number=chans[0].channel_number)
    again.queue_declare("", exclusive=True)


def test_channel_error_closes_only_that_channel(conn, names):
    good = conn.channel()
    bad = conn.channel()
    q = names.queue()
    good.queue_declare(q)
    with channel_error(404):
        bad.queue_declare(names.queue(), passive=True)
    assert bad.is_closed
    assert conn.is_open and good.is_open
    good.confirm_delivery()
    good.basic_publish("", q, b"still-works")
    m, _p, body = good.basic_get(q, auto_ack=True)
    assert body == b"still-works"
    # a new channel on the same connection also works
    conn.channel().queue_declare(q, passive=True)


def test_opening_more_channels_than_channel_max():
    c = connect(channel_max=3)
    try:
        assert c._impl.params.channel_max == 3
        for _ in range(3):
            c.channel()
        # pika enforces its side itself; force a fourth channel number past the limit
        with connection_error(530):
            c.channel(channel_number=4)
    finally:
        if c.is_open:
            c.close()


def test_channel_max_after_close_frees_a_slot():
    c = connect(channel_max=2)
    try:
        a = c.channel()
        b = c.channel()
        a.close()
        d = c.channel()
        d.queue_declare("", exclusive=True)
        assert b.is_open
    finally:
        c.close()
