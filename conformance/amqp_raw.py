"""A tiny AMQP 0-9-1 speaker over a plain socket, for the cases a well-behaved
client library cannot produce: malformed frames, protocol violations, forged
sizes. Frames are packed by hand with struct.

Frame: type(u8) channel(u16) size(u32) payload frame-end(0xCE).
Method payload: class-id(u16) method-id(u16) arguments.
"""

import os
import socket
import struct
import time
import urllib.parse

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE

CONNECTION_START = (10, 10)
CONNECTION_START_OK = (10, 11)
CONNECTION_TUNE = (10, 30)
CONNECTION_TUNE_OK = (10, 31)
CONNECTION_OPEN = (10, 40)
CONNECTION_OPEN_OK = (10, 41)
CONNECTION_CLOSE = (10, 50)
CONNECTION_CLOSE_OK = (10, 51)
CHANNEL_OPEN = (20, 10)
CHANNEL_OPEN_OK = (20, 11)
CHANNEL_CLOSE = (20, 40)
CHANNEL_CLOSE_OK = (20, 41)
QUEUE_DECLARE = (50, 10)
QUEUE_DECLARE_OK = (50, 11)
BASIC_PUBLISH = (60, 40)
BASIC_RETURN = (60, 50)
BASIC_GET = (60, 70)
BASIC_GET_OK = (60, 71)
BASIC_GET_EMPTY = (60, 72)
BASIC_ACK = (60, 80)
CONFIRM_SELECT = (85, 10)
CONFIRM_SELECT_OK = (85, 11)


def url_parts(url):
    """(host, port, user, password, vhost) from an amqp:// URL."""
    u = urllib.parse.urlparse(url)
    vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
    return (u.hostname or "127.0.0.1", u.port or 5672,
            urllib.parse.unquote(u.username or "guest"),
            urllib.parse.unquote(u.password or "guest"), vhost)


# ---------------------------------------------------------------- encoding
def shortstr(s):
    if isinstance(s, str):
        s = s.encode()
    assert len(s) < 256
    return struct.pack(">B", len(s)) + s


def longstr(s):
    if isinstance(s, str):
        s = s.encode()
    return struct.pack(">I", len(s)) + s


def field_value(v):
    """Encode a Python value as a tagged field value (a small, fixed mapping)."""
    if isinstance(v, bool):
        return b"t" + struct.pack(">B", v)
    if isinstance(v, int):
        return b"l" + struct.pack(">q", v)
    if isinstance(v, str):
        return b"S" + longstr(v)
    if isinstance(v, bytes):
        return b"x" + longstr(v)
    if isinstance(v, dict):
        return b"F" + table(v)
    if isinstance(v, list):
        inner = b"".join(field_value(x) for x in v)
        return b"A" + struct.pack(">I", len(inner)) + inner
    if v is None:
        return b"V"
    raise TypeError(v)


def table(d):
    inner = b"".join(shortstr(k) + field_value(v) for k, v in d.items())
    return struct.pack(">I", len(inner)) + inner


def raw_table(entries):
    """entries: list of (name, already-tagged value bytes)."""
    inner = b"".join(shortstr(k) + v for k, v in entries)
    return struct.pack(">I", len(inner)) + inner


def nested_table(depth, key=b"a"):
    """A field table nested `depth` levels deep: {a: {a: {... {}}}}."""
    t = struct.pack(">I", 0)
    per_level = shortstr(key) + b"F"
    for _ in range(depth):
        t = struct.pack(">I", len(per_level) + len(t)) + per_level + t
    return t


def nested_array_table(depth):
    """A table {a: [[[...[]...]]]} with arrays nested `depth` levels (5 bytes a level)."""
    v = b"A" + struct.pack(">I", 0)
    for _ in range(depth - 1):
        v = b"A" + struct.pack(">I", len(v)) + v
    return raw_table([("a", v)])


def frame(ftype, channel, payload, end=FRAME_END):
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + bytes([end])


def method_payload(cm, args=b""):
    return struct.pack(">HH", *cm) + args


def method_frame(channel, cm, args=b"", end=FRAME_END):
    return frame(FRAME_METHOD, channel, method_payload(cm, args), end)


def header_frame(channel, body_size, flags=0, props=b"", class_id=60):
    return frame(FRAME_HEADER, channel,
                 struct.pack(">HHQH", class_id, 0, body_size, flags) + props)


def body_frame(channel, body):
    return frame(FRAME_BODY, channel, body)


def close_args(code=200, text="bye", class_id=0, method_id=0):
    return struct.pack(">H", code) + shortstr(text) + struct.pack(">HH", class_id, method_id)


# ---------------------------------------------------------------- decoding
class Frame:
    def __init__(self, ftype, channel, payload):
        self.type, self.channel, self.payload = ftype, channel, payload

    @property
    def method(self):
        if self.type != FRAME_METHOD or len(self.payload) < 4:
            return None
        return struct.unpack_from(">HH", self.payload)

    @property
    def args(self):
        return self.payload[4:]

    def __repr__(self):
        return "Frame(type=%d, ch=%d, method=%r, %d bytes)" % (
            self.type, self.channel, self.method, len(self.payload))


class Close:
    """A decoded connection.close or channel.close."""

    def __init__(self, args):
        self.reply_code = struct.unpack_from(">H", args)[0]
        n = args[2]
        self.reply_text = args[3:3 + n].decode(errors="replace")
        self.class_id, self.method_id = struct.unpack_from(">HH", args, 3 + n)

    def __repr__(self):
        return "Close(%d, %r, class=%d, method=%d)" % (
            self.reply_code, self.reply_text, self.class_id, self.method_id)


def parse_tune(args):
    return struct.unpack_from(">HIH", args)


# ---------------------------------------------------------------- the speaker
class RawAMQP:
    def __init__(self, url, timeout=5.0):
        self.host, self.port, self.user, self.password, self.vhost = url_parts(url)
        self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False
        self.tune = None  # (channel_max, frame_max, heartbeat) proposed by server
        self.start_args = None

    # -- low level
    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from broker")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no data from broker")
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
        self.buf += chunk

    def read_exact(self, n, timeout=5.0):
        """n bytes, or fewer if the broker closed the socket first."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < n and not self.eof:
            self._fill(deadline)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self, timeout=5.0):
        """The next frame, or None if the broker closed the socket."""
        hdr = self.read_exact(7, timeout)
        if len(hdr) < 7:
            return None
        ftype, channel, size = struct.unpack(">BHI", hdr)
        rest = self.read_exact(size + 1, timeout)
        if len(rest) < size + 1:
            return None
        assert rest[-1] == FRAME_END, "broker sent a bad frame-end octet"
        return Frame(ftype, channel, rest[:-1])

    def read_method(self, timeout=5.0, skip_heartbeats=True):
        while True:
            f = self.read_frame(timeout)
            if f is None or not (skip_heartbeats and f.type == FRAME_HEARTBEAT):
                return f

    def expect_method(self, cm, timeout=5.0):
        f = self.read_method(timeout)
        assert f is not None, "broker closed the socket while we waited for %r" % (cm,)
        if f.method == CONNECTION_CLOSE and cm != CONNECTION_CLOSE:
            raise AssertionError("broker closed the connection: %r" % Close(f.args))
        assert f.method == cm, "expected %r, got %r" % (cm, f)
        return f

    def wait_connection_close(self, timeout=5.0):
        """Read until connection.close (answering close-ok) -> Close, or None on EOF
        without a close. Frames for channels (e.g. deliveries) are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                f = self.read_frame(max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError("broker neither closed the connection nor the socket")
            if f is None:
                return None
            if f.method == CONNECTION_CLOSE:
                c = Close(f.args)
                try:
                    self.send(method_frame(0, CONNECTION_CLOSE_OK))
                except OSError:
                    pass
                return c

    def wait_eof(self, timeout=5.0):
        """True if the broker closes the socket within timeout (data is drained)."""
        deadline = time.monotonic() + timeout
        try:
            while not self.eof:
                self.buf = b""
                self._fill(deadline)
        except TimeoutError:
            return False
        return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # -- handshake pieces
    def send_header(self, header=PROTOCOL_HEADER):
        self.send(header)

    def read_start(self):
        f = self.expect_method(CONNECTION_START)
        self.start_args = f.args
        return f

    def start_ok(self, client_properties=None, mechanism="PLAIN", response=None,
                 raw_properties=None):
        if raw_properties is None:
            props = {"product": "conformance-raw",
                     "capabilities": {"authentication_failure_close": True,
                                      "consumer_cancel_notify": True}}
            if client_properties:
                props.update(client_properties)
            raw_properties = table(props)
        if response is None:
            response = b"\x00" + self.user.encode() + b"\x00" + self.password.encode()
        self.send(method_frame(0, CONNECTION_START_OK,
                               raw_properties + shortstr(mechanism) + longstr(response)
                               + shortstr("en_US")))

    def read_tune(self):
        f = self.expect_method(CONNECTION_TUNE)
        self.tune = parse_tune(f.args)
        return self.tune

    def tune_ok(self, channel_max=None, frame_max=None, heartbeat=0):
        cm, fm, _hb = self.tune
        self.send(method_frame(0, CONNECTION_TUNE_OK, struct.pack(
            ">HIH", cm if channel_max is None else channel_max,
            fm if frame_max is None else frame_max, heartbeat)))

    def open(self, vhost=None):
        self.send(method_frame(0, CONNECTION_OPEN,
                               shortstr(self.vhost if vhost is None else vhost)
                               + shortstr("") + b"\x00"))
        self.expect_method(CONNECTION_OPEN_OK)

    def handshake(self, channel_max=None, frame_max=None, heartbeat=0):
        """Full handshake up to connection.open-ok; returns the server's tune."""
        self.send_header()
        self.read_start()
        self.start_ok()
        tune = self.read_tune()
        self.tune_ok(channel_max, frame_max, heartbeat)
        self.open()
        return tune

    def open_channel(self, ch):
        self.send(method_frame(ch, CHANNEL_OPEN, shortstr("")))
        self.expect_method(CHANNEL_OPEN_OK)


def connect(url, **kw):
    """A RawAMQP with the handshake done."""
    c = RawAMQP(url)
    c.handshake(**kw)
    return c


def unique(prefix="conf"):
    return "%s-%s" % (prefix, os.urandom(6).hex())
