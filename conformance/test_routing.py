"""Routing through direct, fanout, topic and headers exchanges. The expected
tables were taken from RabbitMQ's behaviour."""

import pika
import pytest

from conftest import channel_error, drain, uname


def _route(conn, kind, bindings, messages, exchange_args=None):
    """Declare an exchange of `kind`, one exclusive queue per binding
    (binding = (routing_key, arguments)), publish messages = [(label, routing_key,
    headers)] with confirms, return {binding index: [labels received]}."""
    ch = conn.channel()
    x = uname("x")
    ch.exchange_declare(x, kind, auto_delete=True, arguments=exchange_args)
    queues = []
    for key, args in bindings:
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, x, key, arguments=args)
        queues.append(q)
    pub = conn.channel()
    pub.confirm_delivery()
    for label, key, headers in messages:
        pub.basic_publish(x, key, label.encode(), pika.BasicProperties(headers=headers))
    out = {i: [b.decode() for b in drain(ch, q)] for i, q in enumerate(queues)}
    ch.exchange_delete(x)
    return out


def test_direct_exact_match(conn):
    got = _route(conn, "direct", [("k1", None), ("k2", None), ("k1", None), ("", None)],
                 [("m1", "k1", None), ("m2", "k2", None), ("m3", "K1", None),
                  ("m4", "", None), ("m5", "k1.x", None)])
    assert got == {0: ["m1"], 1: ["m2"], 2: ["m1"], 3: ["m4"]}


def test_direct_queue_bound_twice_gets_one_copy_per_key(conn):
    ch = conn.channel()
    x = uname("x")
    ch.exchange_declare(x, "direct", auto_delete=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, x, "a")
    ch.queue_bind(q, x, "a")  # duplicate binding is a no-op
    ch.queue_bind(q, x, "b")
    pub = conn.channel()
    pub.confirm_delivery()
    pub.basic_publish(x, "a", b"1")
    pub.basic_publish(x, "b", b"2")
    assert drain(ch, q) == [b"1", b"2"]
    ch.queue_unbind(q, x, "a")
    pub.basic_publish(x, "a", b"3")
    pub.basic_publish(x, "b", b"4")
    assert drain(ch, q) == [b"4"]


def test_fanout_ignores_routing_key(conn):
    got = _route(conn, "fanout", [("", None), ("whatever", None), ("x.y", None)],
                 [("m1", "", None), ("m2", "abc", None)])
    assert got == {0: ["m1", "m2"], 1: ["m1", "m2"], 2: ["m1", "m2"]}


TOPIC_KEYS = ["", "a", "a.", "a.b", "a.x.b", "a.x.y.b", "a..b", ".", "b", "a.b.c",
              "b.a", "A.b", "x.b.y", "b..", "..", "a.b.b"]
ALL = list(TOPIC_KEYS)
ALL_BUT_EMPTY = [k for k in TOPIC_KEYS if k]
# binding key -> routing keys that match, as RabbitMQ routes them. Note: the empty
# routing key is zero words, so `*`, `*.#` and `#.*` do not match it; "a." is the
# two words "a" and "".
TOPIC_CASES = {
    "*": ["a", "b"],
    "#": ALL,
    "": [""],
    "a.*": ["a.", "a.b"],
    "a.#": ["a", "a.", "a.b", "a.x.b", "a.x.y.b", "a..b", "a.b.c", "a.b.b"],
    "#.a": ["a", "b.a"],
    "a.#.b": ["a.b", "a.x.b", "a.x.y.b", "a..b", "a.b.b"],
    "#.#": ALL,
    "*.#": ALL_BUT_EMPTY,
    "#.*": ALL_BUT_EMPTY,
    "a.*.b": ["a.x.b", "a..b", "a.b.b"],
    "*.*": ["a.", "a.b", ".", "b.a", "A.b"],
    "a.b": ["a.b"],
    "#.b.#": ["a.b", "a.x.b", "a.x.y.b", "a..b", "b", "a.b.c", "b.a", "A.b", "x.b.y",
              "b..", "a.b.b"],
    "a.#.#.b": ["a.b", "a.x.b", "a.x.y.b", "a..b", "a.b.b"],
    "*.*.*": ["a.x.b", "a..b", "a.b.c", "x.b.y", "b..", "..", "a.b.b"],
}


def test_topic_matching_table(conn):
    patterns = list(TOPIC_CASES)
    got = _route(conn, "topic", [(p, None) for p in patterns],
                 [(k or "<empty>", k, None) for k in TOPIC_KEYS])
    for i, p in enumerate(patterns):
        expected = [k or "<empty>" for k in TOPIC_CASES[p]]
        assert got[i] == expected, "binding %r" % p


def test_topic_long_keys(conn):
    key = ".".join("w%d" % i for i in range(60))
    got = _route(conn, "topic", [("w0.#.w59", None), ("#.w30.#", None), ("*.w1.#", None),
                                 ("w0.*", None)],
                 [("long", key, None)])
    assert got == {0: ["long"], 1: ["long"], 2: ["long"], 3: []}


def test_topic_unbind(conn):
    ch = conn.channel()
    x = uname("x")
    ch.exchange_declare(x, "topic", auto_delete=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, x, "a.*")
    ch.queue_bind(q, x, "#")
    pub = conn.channel()
    pub.confirm_delivery()
    pub.basic_publish(x, "a.b", b"1")  # matches both bindings: one copy
    ch.queue_unbind(q, x, "#")
    pub.basic_publish(x, "a.b", b"2")
    pub.basic_publish(x, "c", b"3")
    assert drain(ch, q) == [b"1", b"2"]


HEADER_MESSAGES = [
    ("ab", {"a": 1, "b": "two"}),
    ("a", {"a": 1}),
    ("b", {"b": "two"}),
    ("abc", {"a": 1, "b": "two", "c": 3}),
    ("a_str", {"a": "1", "b": "two"}),
    ("none", None),
    ("empty", {}),
    ("xk", {"x-k": "v"}),
    ("xk_a", {"x-k": "v", "a": 1}),
    ("a_long", {"a": 2 ** 40}),
    ("a_void", {"a": None}),
    ("b_wrong", {"a": 1, "b": "three"}),
    ("a_bool", {"a": True}),
]
EVERYTHING = [m for m, _ in HEADER_MESSAGES]
HEADER_CASES = [
    ("all", {"x-match": "all", "a": 1, "b": "two"}, ["ab", "abc"]),
    ("default-is-all", {"a": 1, "b": "two"}, ["ab", "abc"]),
    ("any", {"x-match": "any", "a": 1, "b": "two"},
     ["ab", "a", "b", "abc", "a_str", "xk_a", "b_wrong"]),
    # x- arguments are not matched with plain all/any: an all-binding of only x- keys
    # matches everything, an any-binding of only x- keys matches nothing.
    ("all-only-x", {"x-match": "all", "x-k": "v"}, EVERYTHING),
    ("any-only-x", {"x-match": "any", "x-k": "v"}, []),
    # a void binding value matches on presence of the header, whatever its value
    ("void", {"x-match": "all", "a": None},
     ["ab", "a", "abc", "a_str", "xk_a", "a_long", "a_void", "b_wrong", "a_bool"]),
    ("empty-all", {"x-match": "all"}, EVERYTHING),
    ("empty-any", {"x-match": "any"}, []),
    ("string-one", {"a": "1"}, ["a_str"]),
]
HEADER_X_CASES = [
    ("all-with-x", {"x-match": "all-with-x", "x-k": "v", "a": 1}, ["xk_a"]),
    ("any-with-x", {"x-match": "any-with-x", "x-k": "v", "a": 1},
     ["ab", "a", "abc", "xk", "xk_a", "b_wrong"]),
]


def test_headers_matching_table(conn):
    got = _route(conn, "headers", [("", args) for _, args, _ in HEADER_CASES],
                 [(label, "", h) for label, h in HEADER_MESSAGES])
    for i, (name, _args, expected) in enumerate(HEADER_CASES):
        assert got[i] == expected, name


def _supports_with_x(conn):
    ch = conn.channel()
    x = uname("x")
    ch.exchange_declare(x, "headers", auto_delete=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    try:
        ch.queue_bind(q, x, "", arguments={"x-match": "all-with-x"})
    except pika.exceptions.ChannelClosedByBroker:
        return False
    ch.exchange_delete(x)
    return True


def test_headers_with_x_matching(conn):
    if not _supports_with_x(conn):
        pytest.skip("broker does not support x-match all-with-x/any-with-x (RabbitMQ < 3.10)")
    got = _route(conn, "headers", [("", args) for _, args, _ in HEADER_X_CASES],
                 [(label, "", h) for label, h in HEADER_MESSAGES])
    for i, (name, _args, expected) in enumerate(HEADER_X_CASES):
        assert got[i] == expected, name


def test_headers_ignores_routing_key(conn):
    got = _route(conn, "headers", [("some-key", {"x-match": "any", "k": "v"})],
                 [("m1", "other-key", {"k": "v"}), ("m2", "some-key", {"k": "w"})])
    assert got == {0: ["m1"]}


def test_headers_invalid_x_match_406(conn):
    ch = conn.channel()
    x = uname("x")
    ch.exchange_declare(x, "headers", auto_delete=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    with channel_error(406):
        ch.queue_bind(q, x, "", arguments={"x-match": "bogus"})


def test_headers_unbind_by_arguments(conn):
    ch = conn.channel()
    x = uname("x")
    ch.exchange_declare(x, "headers", auto_delete=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, x, "", arguments={"k": "1"})
    ch.queue_bind(q, x, "", arguments={"k": "2"})
    pub = conn.channel()
    pub.confirm_delivery()
    pub.basic_publish(x, "", b"one", pika.BasicProperties(headers={"k": "1"}))
    ch.queue_unbind(q, x, "", arguments={"k": "1"})
    pub.basic_publish(x, "", b"one-again", pika.BasicProperties(headers={"k": "1"}))
    pub.basic_publish(x, "", b"two", pika.BasicProperties(headers={"k": "2"}))
    assert drain(ch, q) == [b"one", b"two"]
    ch.exchange_delete(x)
