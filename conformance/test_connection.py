"""Connection: handshake, server properties, auth failures, tuning, heartbeats."""

import time
import urllib.parse

import pika
import pika.exceptions as pe
import pytest

import amqp_raw
from conftest import AMQP_URL, connect

CAPABILITIES = ["publisher_confirms", "exchange_exchange_bindings", "basic.nack",
                "consumer_cancel_notify", "connection.blocked", "consumer_priorities",
                "authentication_failure_close", "per_consumer_qos", "direct_reply_to"]


def test_connect_and_close():
    c = connect()
    assert c.is_open
    ch = c.channel()
    assert ch.is_open
    c.close()
    assert c.is_closed


def test_server_properties_and_capabilities(conn):
    props = conn._impl.server_properties
    caps = props["capabilities"]
    for name in CAPABILITIES:
        assert caps.get(name) is True, "capability %s not true: %r" % (name, caps)
    assert props.get("product"), props
    assert props.get("version"), props
    assert conn.publisher_confirms and conn.basic_nack and conn.consumer_cancel_notify \
        and conn.exchange_exchange_bindings


def test_connection_start_fields():
    c = amqp_raw.RawAMQP(AMQP_URL)
    try:
        c.send_header()
        f = c.read_start()
        assert f.channel == 0
        major, minor = f.args[0], f.args[1]
        assert (major, minor) == (0, 9)
        # skip the server-properties table, then mechanisms and locales (longstr)
        off = 2
        tlen = int.from_bytes(f.args[off:off + 4], "big")
        off += 4 + tlen
        mlen = int.from_bytes(f.args[off:off + 4], "big")
        mechanisms = f.args[off + 4:off + 4 + mlen].decode().split()
        off += 4 + mlen
        llen = int.from_bytes(f.args[off:off + 4], "big")
        locales = f.args[off + 4:off + 4 + llen].decode().split()
        assert "PLAIN" in mechanisms and "AMQPLAIN" in mechanisms, mechanisms
        assert "en_US" in locales
    finally:
        c.close()


def _url_with(user=None, password=None, vhost=None):
    u = urllib.parse.urlparse(AMQP_URL)
    h, p, user0, pw0, vh0 = amqp_raw.url_parts(AMQP_URL)
    user = user0 if user is None else user
    password = pw0 if password is None else password
    vhost = vh0 if vhost is None else vhost
    return "%s://%s:%s@%s:%d/%s" % (u.scheme, urllib.parse.quote(user, safe=""),
                                     urllib.parse.quote(password, safe=""), h, p,
                                     urllib.parse.quote(vhost, safe=""))


def test_wrong_password_refused():
    params = pika.URLParameters(_url_with(password="definitely-wrong"))
    params.connection_attempts = 1
    with pytest.raises((pe.ProbableAuthenticationError, pe.ConnectionClosedByBroker)) as ei:
        pika.BlockingConnection(params)
    if isinstance(ei.value, pe.ConnectionClosedByBroker):
        assert ei.value.reply_code == 403
    # pika advertises authentication_failure_close, so the broker must say 403
    # (pika maps a close during the auth phase to ProbableAuthenticationError).
    assert "403" in str(ei.value) or "ACCESS_REFUSED" in str(ei.value), ei.value


def test_wrong_password_raw_gets_403():
    c = amqp_raw.RawAMQP(AMQP_URL)
    try:
        c.send_header()
        c.read_start()
        c.start_ok(response=b"\x00" + c.user.encode() + b"\x00wrong-password")
        close = c.wait_connection_close()
        assert close is not None and close.reply_code == 403, close
        assert (close.class_id, close.method_id) == (10, 11) or close.class_id == 0
    finally:
        c.close()


def test_unknown_mechanism_refused():
    c = amqp_raw.RawAMQP(AMQP_URL)
    try:
        c.send_header()
        c.read_start()
        c.start_ok(mechanism="NOPE")
        close = c.wait_connection_close()
        # RabbitMQ 3.10 logs 503 COMMAND_INVALID "unknown authentication mechanism"
        # but, still in the handshake, just drops the socket without connection.close.
        assert close is None or close.reply_code == 503, close
    finally:
        c.close()


def test_unknown_vhost_530():
    params = pika.URLParameters(_url_with(vhost="no-such-vhost-conformance"))
    params.connection_attempts = 1
    # pika wraps a close during connection.open in ProbableAccessDeniedError
    with pytest.raises((pe.ProbableAccessDeniedError, pe.ConnectionClosedByBroker)) as ei:
        pika.BlockingConnection(params)
    assert "(530)" in str(ei.value), ei.value


def test_unknown_vhost_raw_530():
    c = amqp_raw.RawAMQP(AMQP_URL)
    try:
        c.send_header()
        c.read_start()
        c.start_ok()
        c.read_tune()
        c.tune_ok()
        c.send(amqp_raw.method_frame(0, amqp_raw.CONNECTION_OPEN, amqp_raw.shortstr(
            "no-such-vhost-conformance") + amqp_raw.shortstr("") + b"\x00"))
        close = c.wait_connection_close()
        assert close is not None and close.reply_code == 530, close
        assert (close.class_id, close.method_id) == (10, 40), close
    finally:
        c.close()


def test_tune_proposal():
    c = amqp_raw.RawAMQP(AMQP_URL)
    try:
        c.send_header()
        c.read_start()
        c.start_ok()
        channel_max, frame_max, heartbeat = c.read_tune()
        assert (channel_max, frame_max, heartbeat) == (2047, 131072, 60)
    finally:
        c.close()


def test_heartbeat_negotiation_lower_value_taken():
    c = connect(heartbeat=7)
    try:
        assert c._impl.params.heartbeat == 7
    finally:
        c.close()


def test_heartbeat_zero_disables():
    c = connect(heartbeat=0)
    try:
        assert c._impl.params.heartbeat == 0
        ch = c.channel()
        ch.queue_declare("", exclusive=True)
    finally:
        c.close()


def test_heartbeats_keep_idle_connection_alive():
    c = connect(heartbeat=1)
    try:
        c.sleep(3.5)  # pika answers heartbeats while sleeping
        assert c.is_open
        ch = c.channel()
        ch.queue_declare("", exclusive=True)
    finally:
        c.close()


def test_server_sends_heartbeats():
    c = amqp_raw.connect(AMQP_URL, heartbeat=1)
    try:
        deadline = time.monotonic() + 3
        seen = False
        while time.monotonic() < deadline:
            f = c.read_frame(timeout=3)
            assert f is not None
            if f.type == amqp_raw.FRAME_HEARTBEAT:
                assert f.channel == 0 and f.payload == b""
                seen = True
                break
        assert seen
    finally:
        c.close()


def test_silent_client_is_disconnected_after_missed_heartbeats():
    c = amqp_raw.connect(AMQP_URL, heartbeat=1)
    try:
        # RabbitMQ drops the socket (no connection.close) after ~2 missed heartbeats.
        assert c.wait_eof(timeout=8)
    finally:
        c.close()


def test_channel_max_negotiation():
    c = connect(channel_max=10)
    try:
        assert c._impl.params.channel_max == 10
    finally:
        c.close()
    c = connect()
    try:
        # pika proposes 65535 and takes the lower one: the server's proposal
        assert c._impl.params.channel_max == 2047
        assert c._impl.params.frame_max == 131072
    finally:
        c.close()


def test_frame_max_negotiation_lower_value_taken():
    c = connect(frame_max=8192)
    try:
        assert c._impl.params.frame_max == 8192
        ch = c.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        body = bytes(range(256)) * 200  # 51200 bytes -> 7 body frames
        ch.confirm_delivery()
        ch.basic_publish("", q, body)
        m, _p, got = ch.basic_get(q, auto_ack=True)
        assert got == body
    finally:
        c.close()


def test_connection_name_and_client_properties_accepted():
    c = connect(client_properties={"connection_name": "conformance-named"})
    try:
        assert c.is_open
    finally:
        c.close()


def test_close_from_client_is_acknowledged():
    c = amqp_raw.connect(AMQP_URL)
    try:
        c.send(amqp_raw.method_frame(0, amqp_raw.CONNECTION_CLOSE, amqp_raw.close_args()))
        c.expect_method(amqp_raw.CONNECTION_CLOSE_OK)
        # RabbitMQ leaves closing the socket to the client that started the close.
    finally:
        c.close()
