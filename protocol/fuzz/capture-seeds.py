#!/usr/bin/env python3
"""Seed corpora for the fuzz targets, taken from real client traffic: a pika
session (handshake, declares with arguments, bindings, publishes with every
property, consume, get, ack, nack, reject, qos, confirms, tx, close) runs
through a recording proxy in front of a broker; what the client sent is cut
into frames and filed by target:

  frame_check/     the byte stream in chunks (2-byte frame_max prefix + bytes)
  method_decode/   every method frame's payload
  content_header/  every content header frame's payload
  field_table/     the tables inside start-ok, declares, binds and headers

Usage: capture-seeds.py AMQP_URL [OUT_DIR]   (OUT_DIR: protocol/fuzz/corpus)
Needs pika (conformance/.venv has it). Only loopback brokers.
"""
import hashlib
import os
import socket
import struct
import sys
import threading
import urllib.parse

import pika


def proxy(upstream, recorded):
    """Listen on a free loopback port; forward one connection at a time to
    `upstream`, appending client->broker bytes to `recorded`."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)

    def pump(src, dst, record):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                if record:
                    recorded.append(b)
                dst.sendall(b)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve():
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            u = socket.create_connection(upstream)
            threading.Thread(target=pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=pump, args=(u, c, False), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return lsock.getsockname()[1]


def session(port, user, password):
    params = pika.ConnectionParameters(
        "127.0.0.1", port, "/", pika.PlainCredentials(user, password), heartbeat=0)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.exchange_declare("seed-x", "topic", arguments={"alternate-exchange": "amq.fanout"})
    ch.exchange_declare("seed-h", "headers", auto_delete=True)
    ch.queue_declare("seed-q", arguments={
        "x-message-ttl": 60000, "x-max-length": 1000, "x-overflow": "reject-publish",
        "x-dead-letter-exchange": "seed-x", "x-max-priority": 5, "x-queue-mode": "lazy",
        "nested": {"a": [1, True, None, b"bytes", {"deep": "table"}], "big": 2**40},
    })
    ch.queue_bind("seed-q", "seed-x", "a.*.#")
    ch.queue_bind("seed-q", "seed-h", arguments={"x-match": "any", "k": "v", "n": 7})
    props = pika.BasicProperties(
        content_type="application/json", content_encoding="utf-8",
        headers={"h1": "v", "h2": 42, "h3": [1, "two"], "CC": ["a.b"], "ts": 1700000000},
        delivery_mode=2, priority=3, correlation_id="c-1", reply_to="replies",
        expiration="60000", message_id="m-1", timestamp=1700000000, type="t",
        user_id=params.credentials.username, app_id="seeds")
    for i, body in enumerate([b"", b"x", b"{\"k\": 1}", os.urandom(300), b"y" * 5000]):
        ch.basic_publish("seed-x", "a.b.c", body, props if i % 2 == 0 else None)
    ch.basic_publish("", "seed-q", b"plain")
    ch.basic_qos(prefetch_count=10)
    got = ch.basic_get("seed-q")
    if got[0]:
        ch.basic_nack(got[0].delivery_tag, requeue=True)
    got = ch.basic_get("seed-q")
    if got[0]:
        ch.basic_reject(got[0].delivery_tag, requeue=True)
    tag = ch.basic_consume("seed-q", lambda *a: None)
    conn.process_data_events(time_limit=0.2)
    ch.basic_cancel(tag)
    ch.basic_recover(requeue=True)
    ch2 = conn.channel()
    ch2.tx_select()
    ch2.basic_publish("", "seed-q", b"in tx")
    ch2.tx_commit()
    ch2.tx_rollback()
    ch2.close()
    got = ch.basic_get("seed-q", auto_ack=False)
    if got[0]:
        ch.basic_ack(got[0].delivery_tag, multiple=True)
    ch.queue_unbind("seed-q", "seed-x", "a.*.#")
    ch.queue_purge("seed-q")
    ch.queue_delete("seed-q")
    ch.exchange_delete("seed-x")
    conn.close()


def frames(stream):
    """(type, channel, payload) of every whole frame after the protocol header."""
    i = 8 if stream.startswith(b"AMQP") else 0
    while i + 7 <= len(stream):
        t, ch, size = struct.unpack_from(">BHI", stream, i)
        end = i + 7 + size
        if end + 1 > len(stream):
            break
        yield t, ch, stream[i + 7:end]
        i = end + 1


def tables(payload):
    """Field tables at the end of a method payload (declare and bind
    arguments), found by trying each offset whose u32 prefix reaches the
    end exactly."""
    out = []
    for at in range(4, len(payload) - 3):
        (n,) = struct.unpack_from(">I", payload, at)
        if 0 < n <= len(payload) - at - 4 and at + 4 + n in (len(payload), len(payload) - 1):
            out.append(payload[at:at + 4 + n])
    return out


def write(out, target, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    url = urllib.parse.urlparse(sys.argv[1])
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "corpus")
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("capture-seeds.py: loopback brokers only")
    recorded = []
    port = proxy((url.hostname, url.port or 5672), recorded)
    session(port, urllib.parse.unquote(url.username or "guest"),
            urllib.parse.unquote(url.password or "guest"))
    stream = b"".join(recorded)
    for k in range(0, len(stream), 4096):
        write(out, "frame_check", struct.pack(">H", 0x2000) + stream[k:k + 4096])
    for t, ch, payload in frames(stream):
        whole = struct.pack(">BHI", t, ch, len(payload)) + payload + b"\xce"
        write(out, "frame_check", struct.pack(">H", 0x2000) + whole)
        if t == 1:
            write(out, "method_decode", payload)
            for tb in tables(payload):
                write(out, "field_table", tb)
            if payload[:4] == b"\x00\x0a\x00\x0b":  # start-ok: client properties first
                (n,) = struct.unpack_from(">I", payload, 4)
                write(out, "field_table", payload[4:8 + n])
        elif t == 2:
            write(out, "content_header", payload)
    for target in ("frame_check", "method_decode", "content_header", "field_table"):
        d = os.path.join(out, target)
        print(target, len(os.listdir(d)) if os.path.isdir(d) else 0)


if __name__ == "__main__":
    main()
