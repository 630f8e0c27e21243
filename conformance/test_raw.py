"""Raw-socket cases: protocol violations a client library will not produce.
Each case checks the broker's answer (connection.close reply code, or the socket
being dropped where RabbitMQ drops it) and that the broker keeps serving others.

Codes RabbitMQ 3.10 sends are noted on each case."""

import concurrent.futures
import struct
import time

import pytest

import amqp_raw as R
from conftest import AMQP_URL, broker_alive, uname


def raw():
    return R.RawAMQP(AMQP_URL)


def opened(**kw):
    return R.connect(AMQP_URL, **kw)


def expect_close(c, codes, allow_drop=False, timeout=6.0):
    """connection.close with a code in `codes` (answered with close-ok), or, if
    allow_drop, the socket closed without one."""
    if isinstance(codes, int):
        codes = {codes}
    close = c.wait_connection_close(timeout)
    if close is None:
        assert allow_drop, "broker dropped the socket without connection.close (wanted %s)" % codes
    else:
        assert close.reply_code in codes, close
    return close


@pytest.fixture(autouse=True)
def _broker_still_serves():
    yield
    assert broker_alive()


def _queue_declare_args(name="", arguments=b"\x00\x00\x00\x00", passive=False, exclusive=False):
    flags = (1 if passive else 0) | (4 if exclusive else 0)
    return struct.pack(">H", 0) + R.shortstr(name) + bytes([flags]) + arguments


def _publish_args(exchange, routing_key, mandatory=False, immediate=False):
    return (struct.pack(">H", 0) + R.shortstr(exchange) + R.shortstr(routing_key)
            + bytes([(1 if mandatory else 0) | (2 if immediate else 0)]))


# ------------------------------------------------------------ protocol header
@pytest.mark.parametrize("header", [
    b"AMQP\x00\x00\x09\x02",        # unknown revision
    b"AMQP\x01\x01\x00\x0a",        # AMQP 0-10
    b"AMQP\x00\x01\x00\x00",        # AMQP 1.0
    b"GET / HTTP/1.1\r\n\r\n",      # not AMQP at all
])
def test_wrong_protocol_header_gets_ours_and_close(header):
    c = raw()
    try:
        c.send(header)
        assert c.read_exact(8, timeout=5) == R.PROTOCOL_HEADER
        assert c.wait_eof(timeout=5)
    finally:
        c.close()


def test_correct_header_in_pieces():
    c = raw()
    try:
        for b in R.PROTOCOL_HEADER:
            c.send(bytes([b]))
            time.sleep(0.01)
        c.read_start()
    finally:
        c.close()


def test_garbage_before_header_gets_header_back():
    c = raw()
    try:
        c.send(b"\xde\xad\xbe\xef" * 16)
        assert c.read_exact(8, timeout=5) == R.PROTOCOL_HEADER
        assert c.wait_eof(timeout=5)
    finally:
        c.close()


# ------------------------------------------------------------ frame errors
def test_bad_frame_end_501():
    c = opened()
    try:
        c.send(R.method_frame(1, R.CHANNEL_OPEN, R.shortstr(""), end=0x00))
        expect_close(c, 501)  # RabbitMQ: 501 "invalid_frame_end_marker"
    finally:
        c.close()


def test_frame_larger_than_negotiated_frame_max_501():
    c = opened(frame_max=4096)
    try:
        c.open_channel(1)
        pad = R.table({"x-pad": "a" * 5000})
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(arguments=pad)))
        expect_close(c, 501)  # RabbitMQ: 501 {frame_too_large,5023,4088}
    finally:
        c.close()


def test_frame_larger_than_default_frame_max_501():
    c = opened()
    try:
        c.open_channel(1)
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", "nowhere")))
        c.send(R.header_frame(1, 140000))
        c.send(R.body_frame(1, b"b" * 140000))
        expect_close(c, 501)
    finally:
        c.close()


def test_frame_exactly_frame_max_accepted():
    # frame_max counts the whole frame: 7-byte header + payload + frame-end
    c = opened(frame_max=4096)
    try:
        c.open_channel(1)
        q = uname("raw")
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(q) ))
        c.expect_method(R.QUEUE_DECLARE_OK)
        body = b"z" * (4096 - 8)
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", q)))
        c.send(R.header_frame(1, len(body) + 1))
        c.send(R.body_frame(1, body))
        c.send(R.body_frame(1, b"!"))
        c.send(R.method_frame(1, R.BASIC_GET, struct.pack(">H", 0) + R.shortstr(q) + b"\x01"))
        c.expect_method(R.BASIC_GET_OK)
        h = c.read_frame()
        assert h.type == R.FRAME_HEADER
        got = b""
        while len(got) < len(body) + 1:
            f = c.read_frame()
            assert f.type == R.FRAME_BODY and len(f.payload) <= 4096 - 8
            got += f.payload
        assert got == body + b"!"
        c.send(R.method_frame(1, (50, 40), struct.pack(">H", 0) + R.shortstr(q) + b"\x00"))
        c.expect_method((50, 41))
        # A payload above frame_max: 501. (RabbitMQ 3.10 only rejects payloads larger
        # than frame_max itself, i.e. it tolerates frames up to frame_max + 8 bytes
        # although its error text says the limit is frame_max - 8; that slack is not
        # asserted either way.)
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", q)))
        c.send(R.header_frame(1, 4097))
        c.send(R.body_frame(1, b"z" * 4097))
        expect_close(c, 501)  # RabbitMQ: 501 {frame_too_large,4097,4088}
    finally:
        c.close()


def test_forged_huge_frame_size_rejected_without_waiting():
    c = opened()
    try:
        t0 = time.monotonic()
        c.send(struct.pack(">BHI", R.FRAME_METHOD, 0, 0xFFFFFFF0))  # claims ~4 GiB
        expect_close(c, 501, timeout=5)  # RabbitMQ: 501 at once, from the header alone
        assert time.monotonic() - t0 < 3
    finally:
        c.close()


def test_unknown_frame_type_501():
    c = opened()
    try:
        c.send(R.frame(9, 0, b"abc"))
        expect_close(c, 501)  # RabbitMQ: 501 "unknown_frame"
    finally:
        c.close()


def test_garbage_after_handshake_501():
    c = opened()
    try:
        c.send(b"\xde\xad\xbe\xef" * 64)
        expect_close(c, 501)  # RabbitMQ: 501 (reads it as a frame of type 222, too large)
    finally:
        c.close()


def test_truncated_method_arguments_501():
    c = opened()
    try:
        c.open_channel(1)
        c.send(R.method_frame(1, R.QUEUE_DECLARE, b"\x00"))
        close = expect_close(c, 501)  # RabbitMQ: 501 "cannot decode <<0>>" (class 50 method 10)
        assert (close.class_id, close.method_id) == (50, 10)
    finally:
        c.close()


def test_malformed_utf8_shortstr_501():
    c = opened()
    try:
        c.open_channel(1)
        c.send(R.method_frame(1, R.QUEUE_DECLARE, struct.pack(">H", 0)
                              + R.shortstr(b"\xff\xfe") + b"\x00" + R.table({})))
        expect_close(c, 501)  # RabbitMQ: 501 "Malformed UTF-8 in shortstr"
    finally:
        c.close()


def test_unknown_field_value_type():
    c = opened()
    try:
        c.open_channel(1)
        args = R.raw_table([("x-a", b"Z\x00")])
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(arguments=args)))
        # RabbitMQ 3.10: its connection process crashes on the unknown tag and the
        # socket is dropped without connection.close; 501/502 are the proper answers.
        expect_close(c, {501, 502}, allow_drop=True)
    finally:
        c.close()


def test_truncated_frame_then_disconnect():
    for cut in (3, 7, 12):
        c = opened()
        c.open_channel(1)
        data = R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(uname("raw")))
        c.send(data[:cut])
        c.close()
    # the broker notices the dead peers and keeps serving (checked by the fixture)


def test_truncated_frame_during_handshake_then_disconnect():
    c = raw()
    c.send_header()
    c.read_start()
    c.send(R.method_frame(0, R.CONNECTION_START_OK, R.table({}))[:20])
    c.close()


# ------------------------------------------------------------ channel/state errors
def test_method_on_unopened_channel_504():
    c = opened()
    try:
        c.send(R.method_frame(5, R.QUEUE_DECLARE, _queue_declare_args()))
        close = expect_close(c, 504)  # RabbitMQ: 504 "expected 'channel.open'"
        assert (close.class_id, close.method_id) == (50, 10)
    finally:
        c.close()


def test_second_channel_open_504():
    c = opened()
    try:
        c.open_channel(1)
        c.send(R.method_frame(1, R.CHANNEL_OPEN, R.shortstr("")))
        close = expect_close(c, 504)  # RabbitMQ: 504 "second 'channel.open' seen"
        assert (close.class_id, close.method_id) == (20, 10)
    finally:
        c.close()


def test_channel_method_on_channel_zero_504():
    c = opened()
    try:
        c.send(R.method_frame(0, R.QUEUE_DECLARE, _queue_declare_args()))
        # RabbitMQ: 504 "unexpected method in connection state running"
        expect_close(c, 504)
    finally:
        c.close()


def test_start_ok_after_open_504():
    c = opened()
    try:
        c.start_ok()
        # RabbitMQ: 504 "unexpected method in connection state running" (class 10 method 11)
        expect_close(c, 504)
    finally:
        c.close()


def test_channel_open_before_connection_open_505():
    c = raw()
    try:
        c.send_header()
        c.read_start()
        c.start_ok()
        c.read_tune()
        c.tune_ok()
        c.send(R.method_frame(1, R.CHANNEL_OPEN, R.shortstr("")))
        expect_close(c, 505)  # RabbitMQ: 505 UNEXPECTED_FRAME
    finally:
        c.close()


@pytest.mark.parametrize("kind", ["header", "body"])
def test_content_frame_without_method_505(kind):
    c = opened()
    try:
        c.open_channel(1)
        if kind == "header":
            c.send(R.header_frame(1, 3))
        else:
            c.send(R.body_frame(1, b"abc"))
        # RabbitMQ: 505 "expected method frame, got non method frame instead"
        expect_close(c, 505)
    finally:
        c.close()


def test_body_before_header_505():
    c = opened()
    try:
        c.open_channel(1)
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", "nowhere")))
        c.send(R.body_frame(1, b"abc"))
        close = expect_close(c, 505)  # RabbitMQ: 505 "expected content header for class 60"
        assert (close.class_id, close.method_id) == (60, 40)
    finally:
        c.close()


def test_method_while_content_expected_505():
    c = opened()
    try:
        c.open_channel(1)
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", "nowhere")))
        c.send(R.header_frame(1, 3))
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", "nowhere")))
        expect_close(c, 505)  # RabbitMQ: 505 "expected content body, got non content body frame"
    finally:
        c.close()


def test_content_header_wrong_class_505():
    c = opened()
    try:
        c.open_channel(1)
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", "nowhere")))
        c.send(R.header_frame(1, 3, class_id=50))
        expect_close(c, 505)  # RabbitMQ: 505 "expected content header for class 60, got one for class 50"
    finally:
        c.close()


def test_heartbeat_on_nonzero_channel_505():
    c = opened()
    try:
        c.open_channel(1)
        c.send(R.frame(R.FRAME_HEARTBEAT, 1, b""))
        expect_close(c, 505)  # RabbitMQ: 505 UNEXPECTED_FRAME "type 8"
    finally:
        c.close()


@pytest.mark.parametrize("cm,channel", [((60, 999), 1), ((999, 10), 1), ((999, 10), 0)])
def test_unknown_class_or_method(cm, channel):
    c = opened()
    try:
        if channel:
            c.open_channel(channel)
        c.send(R.method_frame(channel, cm))
        # RabbitMQ 3.10 crashes the connection process ({unknown_method_id,...}) and
        # drops the socket without connection.close; 503/540 are the proper answers.
        expect_close(c, {503, 540}, allow_drop=True)
    finally:
        c.close()


def test_immediate_publish_540():
    c = opened()
    try:
        c.open_channel(1)
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", "q", immediate=True)))
        c.send(R.header_frame(1, 1))
        c.send(R.body_frame(1, b"x"))
        close = expect_close(c, 540)  # RabbitMQ: 540 "immediate=true"
        assert (close.class_id, close.method_id) == (60, 40)
    finally:
        c.close()


# ------------------------------------------------------------ tune / channel_max
def test_frames_capped_before_tune():
    c = raw()
    try:
        c.send_header()
        c.read_start()
        c.start_ok(client_properties={"pad": "a" * 20000})
        # RabbitMQ: drops the socket (frame_too_large before tune); never tunes
        f = c.read_method(timeout=6)
        assert f is None or f.method == R.CONNECTION_CLOSE, f
    finally:
        c.close()


def _tune_ok_outcome(kw):
    c = raw()
    try:
        c.send_header()
        c.read_start()
        c.start_ok()
        c.read_tune()
        c.tune_ok(**kw)
        c.send(R.method_frame(0, R.CONNECTION_OPEN, R.shortstr(c.vhost) + R.shortstr("")
                              + b"\x00"))
        f = c.read_method(timeout=8)
        if f is None:
            return "dropped"
        if f.method == R.CONNECTION_CLOSE:
            return R.Close(f.args).reply_code
        return f.method
    finally:
        c.close()


def test_tune_ok_out_of_bounds_refused():
    cases = [{"frame_max": 1024}, {"frame_max": 200000}, {"frame_max": 0},
             {"channel_max": 5000}, {"channel_max": 0}]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as ex:
        outcomes = list(ex.map(_tune_ok_outcome, cases))
    # RabbitMQ 3.10 logs "failed to negotiate connection parameters" (530 NOT_ALLOWED)
    # but, still in the handshake, drops the socket (after a 3 s delay) without
    # connection.close. channel_max=0 means "no limit" and RabbitMQ accepts it.
    for kw, outcome in zip(cases[:4], outcomes[:4]):
        assert outcome in ("dropped", 530), (kw, outcome)
    assert outcomes[4] in (R.CONNECTION_OPEN_OK, "dropped", 530)


def test_tune_ok_lower_values_accepted():
    c = opened(channel_max=10, frame_max=4096, heartbeat=30)
    try:
        c.open_channel(10)
    finally:
        c.close()


def test_channel_count_over_channel_max_530():
    c = opened(channel_max=2)
    try:
        c.open_channel(1)
        c.open_channel(2)
        c.send(R.method_frame(3, R.CHANNEL_OPEN, R.shortstr("")))
        # RabbitMQ: 530 "number of channels opened (2) has reached the negotiated channel_max (2)"
        expect_close(c, 530)
    finally:
        c.close()


def test_channel_number_above_channel_max():
    c = opened(channel_max=5)
    try:
        c.send(R.method_frame(9, R.CHANNEL_OPEN, R.shortstr("")))
        f = c.read_method()
        # RabbitMQ counts open channels, not channel numbers: channel 9 opens fine
        # while fewer than 5 are open.
        assert f.method == R.CHANNEL_OPEN_OK and f.channel == 9, f
    finally:
        c.close()


# ------------------------------------------------------------ nesting / size bombs
def _start_ok_outcome(props):
    c = raw()
    try:
        c.send_header()
        c.read_start()
        c.start_ok(raw_properties=props)
        try:
            f = c.read_method(timeout=8)
        except TimeoutError:
            return "timeout"
        if f is None:
            return "dropped"
        if f.method == R.CONNECTION_CLOSE:
            return R.Close(f.args).reply_code
        return f.method
    finally:
        c.close()


def test_deeply_nested_client_properties_2000():
    # ~14 KB: RabbitMQ drops it as a too-large pre-tune frame. A broker that takes
    # bigger frames before tune must refuse the depth or parse it without crashing.
    outcome = _start_ok_outcome(R.nested_table(2000))
    assert outcome in ("dropped", 501, 502, 503, 530, R.CONNECTION_TUNE), outcome


def test_deeply_nested_client_properties_within_pre_tune_limit():
    # 800 nested arrays in 4 KB: RabbitMQ parses it and goes on to tune.
    outcome = _start_ok_outcome(R.nested_array_table(800))
    assert outcome in ("dropped", 501, 502, 503, R.CONNECTION_TUNE), outcome
    outcome = _start_ok_outcome(R.nested_table(550))
    assert outcome in ("dropped", 501, 502, 503, R.CONNECTION_TUNE), outcome


def test_deeply_nested_arguments_after_open():
    c = opened()
    try:
        c.open_channel(1)
        deep = R.raw_table([("x-deep", b"F" + R.nested_table(15000))])  # ~105 KB, fits a frame
        # Exclusive: gone with the connection (a leftover with 15,000 levels
        # of arguments would break every later definitions export's parser).
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(arguments=deep, exclusive=True)))
        f = c.read_method(timeout=10)
        # RabbitMQ 3.10 accepts it (declare-ok for a server-named queue); a broker
        # with a depth limit may close instead. It must not fall over.
        if f is not None and f.method == R.CONNECTION_CLOSE:
            assert R.Close(f.args).reply_code in (501, 502, 406, 503, 530), R.Close(f.args)
        elif f is not None and f.method == R.CHANNEL_CLOSE:
            assert R.Close(f.args).reply_code in (406, 403, 502), R.Close(f.args)
        elif f is not None:
            assert f.method == R.QUEUE_DECLARE_OK
    finally:
        c.close()


def test_deeply_nested_message_headers():
    c = opened()
    try:
        c.open_channel(1)
        q = uname("raw")
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(q)))
        c.expect_method(R.QUEUE_DECLARE_OK)
        props = R.raw_table([("deep", b"F" + R.nested_table(15000))])
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", q)))
        c.send(R.header_frame(1, 2, flags=0x2000, props=props))
        c.send(R.body_frame(1, b"hi"))
        c.send(R.method_frame(1, (50, 30), struct.pack(">H", 0) + R.shortstr(q) + b"\x00"))
        f = c.read_method(timeout=10)
        # RabbitMQ 3.10 routes it (purge-ok with 1 message); a depth limit may close.
        if f is not None and f.method in (R.CONNECTION_CLOSE, R.CHANNEL_CLOSE):
            assert R.Close(f.args).reply_code in (501, 502, 406, 505), R.Close(f.args)
        elif f is not None:
            assert f.method == (50, 31), f
            assert struct.unpack_from(">I", f.args)[0] == 1
    finally:
        c.close()
        cleanup = opened()
        cleanup.open_channel(1)
        cleanup.send(R.method_frame(1, (50, 40), struct.pack(">H", 0) + R.shortstr(q) + b"\x00"))
        cleanup.expect_method((50, 41))
        cleanup.close()


def test_many_garbage_connections_in_parallel():
    def one(i):
        c = raw()
        try:
            if i % 3 == 0:
                c.send(b"\x00" * 100)
            elif i % 3 == 1:
                c.send_header()
                c.read_start()
                c.send(b"\xff" * 100)
            else:
                c.send(R.PROTOCOL_HEADER[:4])
        finally:
            c.close()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(one, range(24)))


# ------------------------------------------------------------ content as bytes
ALL_FIELD_TYPES = [
    ("t", b"t\x01"),
    ("b", b"b" + struct.pack(">b", -5)),
    ("B", b"B" + struct.pack(">B", 250)),
    ("s", b"s" + struct.pack(">h", -300)),
    ("u", b"u" + struct.pack(">H", 60000)),
    ("I", b"I" + struct.pack(">i", -70000)),
    ("i", b"i" + struct.pack(">I", 4000000000)),
    ("l", b"l" + struct.pack(">q", -(2 ** 40))),
    ("f", b"f" + struct.pack(">f", 1.5)),
    ("d", b"d" + struct.pack(">d", -2.25)),
    ("D", b"D\x02" + struct.pack(">i", 314)),
    ("S", b"S" + R.longstr("long string \u2713")),
    ("x", b"x" + R.longstr(b"\x00\x01\xff")),
    ("A", b"A" + struct.pack(">I", 10) + b"I" + struct.pack(">i", 1) + b"t\x00" + b"V" + b"V" + b"V"),
    ("T", b"T" + struct.pack(">Q", 1700000000)),
    ("F", b"F" + R.raw_table([("k", b"S" + R.longstr("v")), ("n", b"F" + R.raw_table([]))])),
    ("V", b"V"),
]


def _all_properties():
    props = (R.shortstr("text/plain") + R.shortstr("identity")
             + R.raw_table(ALL_FIELD_TYPES)
             + bytes([2, 7])
             + R.shortstr("corr") + R.shortstr("reply") + R.shortstr("60000")
             + R.shortstr("mid") + struct.pack(">Q", 1700000001) + R.shortstr("typ")
             + R.shortstr(R.url_parts(AMQP_URL)[2]) + R.shortstr("app"))
    flags = 0xFFF8  # every property except the deprecated cluster-id
    return flags, props


def test_content_header_bytes_delivered_verbatim():
    """Properties with every field-value type come back byte for byte: brokers must
    not re-encode them (RabbitMQ forwards the publisher's bytes)."""
    c = opened()
    try:
        c.open_channel(1)
        q = uname("raw")
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(q)))
        c.expect_method(R.QUEUE_DECLARE_OK)
        flags, props = _all_properties()
        body = b"verbatim"
        header_payload = struct.pack(">HHQH", 60, 0, len(body), flags) + props
        c.send(R.method_frame(1, R.CONFIRM_SELECT, b"\x00"))
        c.expect_method(R.CONFIRM_SELECT_OK)
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", q)))
        c.send(R.frame(R.FRAME_HEADER, 1, header_payload))
        c.send(R.body_frame(1, body))
        c.expect_method(R.BASIC_ACK)
        c.send(R.method_frame(1, R.BASIC_GET, struct.pack(">H", 0) + R.shortstr(q) + b"\x01"))
        c.expect_method(R.BASIC_GET_OK)
        h = c.read_frame()
        assert h.type == R.FRAME_HEADER and h.channel == 1
        assert h.payload == header_payload
        b = c.read_frame()
        assert b.type == R.FRAME_BODY and b.payload == body
        c.send(R.method_frame(1, (50, 40), struct.pack(">H", 0) + R.shortstr(q) + b"\x00"))
        c.expect_method((50, 41))
    finally:
        c.close()


@pytest.mark.parametrize("flag", [0x8000, 0x4000, 0x0400, 0x0200, 0x0080, 0x0020, 0x0008])
def test_non_utf8_short_string_property_is_carried_as_bytes(flag):
    """content-type, content-encoding, correlation-id, message-id, type, app-id
    (and reply-to) as bytes that are not UTF-8: RabbitMQ accepts the message
    and delivers the bytes unchanged."""
    c = opened()
    try:
        c.open_channel(1)
        q = uname("raw")
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(q)))
        c.expect_method(R.QUEUE_DECLARE_OK)
        body = b"latin-1"
        header_payload = struct.pack(">HHQH", 60, 0, len(body), flag) + R.shortstr(b"caf\xe9 \xff")
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", q)))
        c.send(R.frame(R.FRAME_HEADER, 1, header_payload))
        c.send(R.body_frame(1, body))
        c.send(R.method_frame(1, R.BASIC_GET, struct.pack(">H", 0) + R.shortstr(q) + b"\x01"))
        c.expect_method(R.BASIC_GET_OK)
        h = c.read_frame()
        assert h.type == R.FRAME_HEADER and h.payload == header_payload
        assert c.read_frame().payload == body
        c.send(R.method_frame(1, (50, 40), struct.pack(">H", 0) + R.shortstr(q) + b"\x00"))
        c.expect_method((50, 41))
    finally:
        c.close()


def test_non_utf8_user_id_is_refused_406():
    """user-id is compared with the login as bytes: bytes that are not UTF-8
    never match it."""
    c = opened()
    try:
        c.open_channel(1)
        header_payload = struct.pack(">HHQH", 60, 0, 1, 0x0010) + R.shortstr(b"gu\xe9st")
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", "nowhere")))
        c.send(R.frame(R.FRAME_HEADER, 1, header_payload))
        c.send(R.body_frame(1, b"x"))
        # A channel error (406), not a connection error.
        f = c.expect_method(R.CHANNEL_CLOSE)
        assert R.Close(f.args).reply_code == 406
    finally:
        c.close()


def test_empty_body_has_no_body_frame():
    c = opened()
    try:
        c.open_channel(1)
        q = uname("raw")
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(q)))
        c.expect_method(R.QUEUE_DECLARE_OK)
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", q)))
        c.send(R.header_frame(1, 0))
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", q)))
        c.send(R.header_frame(1, 1))
        c.send(R.body_frame(1, b"2"))
        for expect_body in (b"", b"2"):
            c.send(R.method_frame(1, R.BASIC_GET, struct.pack(">H", 0) + R.shortstr(q)
                                  + b"\x01"))
            c.expect_method(R.BASIC_GET_OK)
            h = c.read_frame()
            assert h.type == R.FRAME_HEADER
            assert struct.unpack_from(">Q", h.payload, 4)[0] == len(expect_body)
            if expect_body:
                f = c.read_frame()
                assert f.type == R.FRAME_BODY and f.payload == expect_body
        c.send(R.method_frame(1, (50, 40), struct.pack(">H", 0) + R.shortstr(q) + b"\x00"))
        # the next frame is the delete-ok, not a body frame of the empty message
        c.expect_method((50, 41))
    finally:
        c.close()


def test_body_split_into_tiny_frames():
    c = opened()
    try:
        c.open_channel(1)
        q = uname("raw")
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(q)))
        c.expect_method(R.QUEUE_DECLARE_OK)
        body = bytes(range(200))
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", q)))
        c.send(R.header_frame(1, len(body)))
        c.send(b"".join(R.body_frame(1, body[i:i + 1]) for i in range(len(body))))
        c.send(R.method_frame(1, R.BASIC_GET, struct.pack(">H", 0) + R.shortstr(q) + b"\x01"))
        c.expect_method(R.BASIC_GET_OK)
        c.read_frame()
        got = b""
        while len(got) < len(body):
            f = c.read_frame()
            assert f.type == R.FRAME_BODY
            got += f.payload
        assert got == body
        c.send(R.method_frame(1, (50, 40), struct.pack(">H", 0) + R.shortstr(q) + b"\x00"))
        c.expect_method((50, 41))
    finally:
        c.close()


def test_interleaved_content_on_two_channels():
    c = opened()
    try:
        c.open_channel(1)
        c.open_channel(2)
        q = uname("raw")
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(q)))
        c.expect_method(R.QUEUE_DECLARE_OK)
        for ch in (1, 2):
            c.send(R.method_frame(ch, R.CONFIRM_SELECT, b"\x00"))
            c.expect_method(R.CONFIRM_SELECT_OK)
        c.send(R.method_frame(1, R.BASIC_PUBLISH, _publish_args("", q)))
        c.send(R.method_frame(2, R.BASIC_PUBLISH, _publish_args("", q)))
        c.send(R.header_frame(1, 4))
        c.send(R.header_frame(2, 4))
        c.send(R.body_frame(2, b"ch2!"))
        c.send(R.body_frame(1, b"ch1!"))
        acked = {c.expect_method(R.BASIC_ACK).channel, c.expect_method(R.BASIC_ACK).channel}
        assert acked == {1, 2}
        bodies = set()
        for _ in range(2):
            c.send(R.method_frame(1, R.BASIC_GET, struct.pack(">H", 0) + R.shortstr(q)
                                  + b"\x01"))
            c.expect_method(R.BASIC_GET_OK)
            c.read_frame()
            bodies.add(c.read_frame().payload)
        assert bodies == {b"ch1!", b"ch2!"}
        c.send(R.method_frame(1, (50, 40), struct.pack(">H", 0) + R.shortstr(q) + b"\x00"))
        c.expect_method((50, 41))
    finally:
        c.close()


def test_mandatory_return_precedes_confirm_ack():
    c = opened()
    try:
        c.open_channel(1)
        c.send(R.method_frame(1, R.CONFIRM_SELECT, b"\x00"))
        c.expect_method(R.CONFIRM_SELECT_OK)
        c.send(R.method_frame(1, R.BASIC_PUBLISH,
                              _publish_args("", uname("nowhere"), mandatory=True)))
        c.send(R.header_frame(1, 3))
        c.send(R.body_frame(1, b"ret"))
        f = c.expect_method(R.BASIC_RETURN)
        assert struct.unpack_from(">H", f.args)[0] == 312
        n = f.args[2]
        assert f.args[3:3 + n] == b"NO_ROUTE"
        h = c.read_frame()
        assert h.type == R.FRAME_HEADER
        b = c.read_frame()
        assert b.type == R.FRAME_BODY and b.payload == b"ret"
        ack = c.expect_method(R.BASIC_ACK)
        tag, multiple = struct.unpack_from(">QB", ack.args)
        assert tag == 1 and multiple == 0
    finally:
        c.close()


# ------------------------------------------------------------ client capabilities
def test_no_cancel_notify_capability_no_async_cancel():
    """A client that did not set consumer_cancel_notify gets no basic.cancel when
    its queue is deleted; the channel stays usable."""
    c = raw()
    try:
        c.send_header()
        c.read_start()
        c.start_ok(raw_properties=R.table({"product": "old-client"}))
        c.read_tune()
        c.tune_ok()
        c.open()
        c.open_channel(1)
        q = uname("raw")
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(q)))
        c.expect_method(R.QUEUE_DECLARE_OK)
        c.send(R.method_frame(1, (60, 20), struct.pack(">H", 0) + R.shortstr(q)
                              + R.shortstr("old-ctag") + b"\x00" + R.table({})))
        c.expect_method((60, 21))
        other = opened()
        other.open_channel(1)
        other.send(R.method_frame(1, (50, 40), struct.pack(">H", 0) + R.shortstr(q) + b"\x00"))
        other.expect_method((50, 41))
        other.close()
        with pytest.raises(TimeoutError):
            f = c.read_method(timeout=1)
            raise AssertionError("unexpected frame %r" % f)
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args("")))
        c.expect_method(R.QUEUE_DECLARE_OK)
    finally:
        c.close()


def test_cancel_notify_capability_gets_async_cancel():
    c = opened()  # start_ok sets consumer_cancel_notify
    try:
        c.open_channel(1)
        q = uname("raw")
        c.send(R.method_frame(1, R.QUEUE_DECLARE, _queue_declare_args(q)))
        c.expect_method(R.QUEUE_DECLARE_OK)
        c.send(R.method_frame(1, (60, 20), struct.pack(">H", 0) + R.shortstr(q)
                              + R.shortstr("new-ctag") + b"\x00" + R.table({})))
        c.expect_method((60, 21))
        c.send(R.method_frame(1, (50, 40), struct.pack(">H", 0) + R.shortstr(q) + b"\x00"))
        seen = set()
        for _ in range(2):  # basic.cancel and queue.delete-ok, in either order
            f = c.read_method()
            seen.add(f.method)
            if f.method == (60, 30):
                assert f.args[1:1 + f.args[0]] == b"new-ctag"
        assert seen == {(60, 30), (50, 41)}
    finally:
        c.close()


def test_no_auth_failure_close_capability_just_drops():
    c = raw()
    try:
        c.send_header()
        c.read_start()
        c.start_ok(raw_properties=R.table({"product": "old-client"}),
                   response=b"\x00" + c.user.encode() + b"\x00wrong-password")
        # RabbitMQ: no connection.close for clients without authentication_failure_close
        f = c.read_method(timeout=6)
        assert f is None, f
    finally:
        c.close()


def test_heartbeat_with_payload_501():
    c = opened()
    try:
        c.send(R.frame(R.FRAME_HEARTBEAT, 0, b"\x00\x01"))
        expect_close(c, 501)  # RabbitMQ: 501 FRAME_ERROR
    finally:
        c.close()


def test_heartbeat_on_nonzero_channel_in_handshake_closes_at_once():
    c = R.RawAMQP(AMQP_URL)
    try:
        c.send_header()
        c.read_start()
        c.send(R.frame(R.FRAME_HEARTBEAT, 1, b""))
        # RabbitMQ drops the socket (it sends no connection.close before
        # connection.open), well before its 10 s handshake timeout.
        started = time.monotonic()
        assert c.wait_eof(timeout=6.0), "the broker waited for the handshake timeout"
        assert time.monotonic() - started < 5.0
    finally:
        c.close()


def test_trailing_bytes_after_method_arguments():
    c = opened()
    try:
        c.send(R.method_frame(1, R.CHANNEL_OPEN, R.shortstr("") + b"\x00\x00\x00"))
        expect_close(c, 501)  # RabbitMQ: 501 "FRAME_ERROR - cannot decode <<0,0,0,0>>"
    finally:
        c.close()
