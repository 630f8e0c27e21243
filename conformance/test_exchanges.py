"""Exchanges: built-ins, declare/equivalence, naming rules, delete, e2e bindings,
internal exchanges, alternate exchanges."""

import pika.exceptions as pe
import pytest

from conftest import (channel_error, connection_error, drain, publish_confirmed,
                      queue_depth)

BUILTIN = [("amq.direct", "direct"), ("amq.fanout", "fanout"), ("amq.topic", "topic"),
           ("amq.headers", "headers"), ("amq.match", "headers")]


@pytest.mark.parametrize("name,kind", BUILTIN)
def test_builtin_exchanges_exist(ch, name, kind):
    ch.exchange_declare(name, kind, passive=True)


@pytest.mark.parametrize("name,kind", BUILTIN)
def test_builtin_exchanges_redeclare_same_ok(ch, name, kind):
    # redeclaring amq.* with identical attributes is allowed (durable=True)
    ch.exchange_declare(name, kind, durable=True)


def test_default_exchange_routes_by_queue_name(conn, ch, names):
    q = names.queue()
    ch.queue_declare(q)
    publish_confirmed(conn, "", q, b"via-default")
    assert drain(ch, q) == [b"via-default"]


def test_default_exchange_declare_403(ch):
    # RabbitMQ refuses even a passive declare of the default exchange:
    # 403 "operation not permitted on the default exchange"
    with channel_error(403):
        ch.exchange_declare("", passive=True)


@pytest.mark.parametrize("kind", ["direct", "fanout", "topic", "headers"])
def test_declare_types(ch, names, kind):
    x = names.exchange()
    ch.exchange_declare(x, kind)
    ch.exchange_declare(x, kind, passive=True)
    ch.exchange_declare(x, kind)  # idempotent
    ch.exchange_delete(x)
    with channel_error(404):
        ch.exchange_declare(x, kind, passive=True)


def test_passive_missing_404(ch, names):
    with channel_error(404):
        ch.exchange_declare(names.exchange(), passive=True)


def test_redeclare_different_type_406(conn, names):
    x = names.exchange()
    ch = conn.channel()
    ch.exchange_declare(x, "direct")
    with channel_error(406) as ei:
        ch.exchange_declare(x, "fanout")
    assert "inequivalent arg 'type'" in str(ei.value), ei.value
    assert conn.is_open


def test_redeclare_different_durable_406(conn, names):
    x = names.exchange()
    ch = conn.channel()
    ch.exchange_declare(x, "direct", durable=False)
    with channel_error(406) as ei:
        ch.exchange_declare(x, "direct", durable=True)
    assert "inequivalent arg 'durable'" in str(ei.value), ei.value


def test_redeclare_different_auto_delete_406(conn, names):
    x = names.exchange()
    ch = conn.channel()
    ch.exchange_declare(x, "direct")
    with channel_error(406):
        ch.exchange_declare(x, "direct", auto_delete=True)


def test_passive_declare_ignores_attributes(conn, names):
    x = names.exchange()
    ch = conn.channel()
    ch.exchange_declare(x, "direct")
    ch.exchange_declare(x, "fanout", passive=True, durable=True)


def test_amq_prefix_reserved_403(ch):
    with channel_error(403):
        ch.exchange_declare("amq.conformance-x", "direct")


def test_amq_prefix_passive_missing_404(ch):
    with channel_error(404):
        ch.exchange_declare("amq.conformance-missing", "direct", passive=True)


def test_unknown_type_is_connection_error_503(conn, names):
    # RabbitMQ: connection.close 503 COMMAND_INVALID "invalid exchange type 'x-nope'"
    ch = conn.channel()
    with connection_error(503):
        ch.exchange_declare(names.exchange(), "x-nope")
    assert conn.is_closed


def test_delete_exchange(ch, names):
    x = names.exchange()
    ch.exchange_declare(x, "fanout")
    ch.exchange_delete(x)
    with channel_error(404):
        ch.exchange_declare(x, passive=True)


def test_delete_missing_exchange_succeeds(ch, names):
    ch.exchange_delete(names.exchange())
    assert ch.is_open


def test_delete_if_unused_with_binding_406(conn, names):
    x, q = names.exchange(), names.queue()
    ch = conn.channel()
    ch.exchange_declare(x, "direct")
    ch.queue_declare(q)
    ch.queue_bind(q, x, "k")
    with channel_error(406):
        ch.exchange_delete(x, if_unused=True)
    ch = conn.channel()
    ch.exchange_declare(x, passive=True)
    ch.queue_unbind(q, x, "k")
    ch.exchange_delete(x, if_unused=True)
    with channel_error(404):
        ch.exchange_declare(x, passive=True)


def test_delete_if_unused_without_bindings_ok(ch, names):
    x = names.exchange()
    ch.exchange_declare(x, "direct")
    ch.exchange_delete(x, if_unused=True)


def test_delete_default_exchange_403(ch):
    with channel_error(403):
        ch.exchange_delete("")


def test_delete_builtin_exchange_403(ch):
    with channel_error(403):
        ch.exchange_delete("amq.direct")


def test_deleting_exchange_removes_its_bindings(conn, ch, names):
    x, q = names.exchange(), names.queue()
    ch.exchange_declare(x, "fanout")
    ch.queue_declare(q)
    ch.queue_bind(q, x)
    ch.exchange_delete(x)
    ch.exchange_declare(x, "fanout")  # fresh exchange, no binding
    publish_confirmed(conn, x, "", b"nobody")
    assert queue_depth(ch, q) == 0


def test_exchange_to_exchange_binding_routes(conn, ch, names):
    src, dst, q = names.exchange(), names.exchange(), names.queue()
    ch.exchange_declare(src, "topic")
    ch.exchange_declare(dst, "direct")
    ch.queue_declare(q)
    ch.queue_bind(q, dst, "a.b")
    ch.exchange_bind(destination=dst, source=src, routing_key="a.*")
    publish_confirmed(conn, src, "a.b", b"e2e")
    publish_confirmed(conn, src, "a.c", b"no-queue-binding")
    publish_confirmed(conn, src, "b.b", b"no-e2e-match")
    assert drain(ch, q) == [b"e2e"]
    ch.exchange_unbind(destination=dst, source=src, routing_key="a.*")
    publish_confirmed(conn, src, "a.b", b"after-unbind")
    assert drain(ch, q) == []


def test_exchange_unbind_what_is_gone_is_ok(ch, names):
    # As queue.unbind: a missing source, destination or both is unbind-ok.
    x = names.exchange()
    ch.exchange_declare(x, "direct")
    ch.exchange_unbind(destination=x, source=names.exchange(), routing_key="k")
    ch.exchange_unbind(destination=names.exchange(), source=x, routing_key="k")
    ch.exchange_unbind(destination=names.exchange(), source=names.exchange(), routing_key="k")
    ch.exchange_declare(x, "direct", passive=True)  # the channel is still open


def test_exchange_binding_chain_delivers_once(conn, ch, names):
    a, b, q = names.exchange(), names.exchange(), names.queue()
    ch.exchange_declare(a, "fanout")
    ch.exchange_declare(b, "fanout")
    ch.queue_declare(q)
    ch.exchange_bind(b, a)
    ch.queue_bind(q, a)
    ch.queue_bind(q, b)
    publish_confirmed(conn, a, "", b"once")
    # a queue reachable by two paths gets one copy
    assert drain(ch, q) == [b"once"]


def test_exchange_bind_missing_source_404(ch, names):
    dst = names.exchange()
    ch.exchange_declare(dst, "fanout")
    with channel_error(404):
        ch.exchange_bind(dst, names.exchange())


def test_exchange_delete_if_unused_as_destination(conn, names):
    # RabbitMQ's if_unused only looks at bindings where the exchange is the source
    src, dst = names.exchange(), names.exchange()
    ch = conn.channel()
    ch.exchange_declare(src, "fanout")
    ch.exchange_declare(dst, "fanout")
    ch.exchange_bind(dst, src)
    with channel_error(406):
        ch.exchange_delete(src, if_unused=True)
    ch = conn.channel()
    ch.exchange_delete(dst, if_unused=True)


def test_internal_exchange_rejects_publish_403(conn, names):
    x = names.exchange()
    ch = conn.channel()
    ch.exchange_declare(x, "fanout", internal=True)
    ch.confirm_delivery()
    with channel_error(403):
        ch.basic_publish(x, "", b"nope")
        ch.basic_qos(prefetch_count=0)


def test_internal_exchange_reachable_via_exchange_binding(conn, ch, names):
    front, inner, q = names.exchange(), names.exchange(), names.queue()
    ch.exchange_declare(front, "fanout")
    ch.exchange_declare(inner, "fanout", internal=True)
    ch.queue_declare(q)
    ch.queue_bind(q, inner)
    ch.exchange_bind(inner, front)
    publish_confirmed(conn, front, "", b"through-internal")
    assert drain(ch, q) == [b"through-internal"]


def test_alternate_exchange_receives_unroutable(conn, ch, names):
    main, alt, q_main, q_alt = names.exchange(), names.exchange(), names.queue(), names.queue()
    ch.exchange_declare(alt, "fanout")
    ch.exchange_declare(main, "direct", arguments={"alternate-exchange": alt})
    ch.queue_declare(q_main)
    ch.queue_declare(q_alt)
    ch.queue_bind(q_main, main, "known")
    ch.queue_bind(q_alt, alt)
    publish_confirmed(conn, main, "known", b"routed")
    publish_confirmed(conn, main, "unknown", b"to-alt")
    assert drain(ch, q_main) == [b"routed"]
    assert drain(ch, q_alt) == [b"to-alt"]


def test_alternate_exchange_mandatory_not_returned(conn, ch, names):
    main, alt, q_alt = names.exchange(), names.exchange(), names.queue()
    ch.exchange_declare(alt, "fanout")
    ch.exchange_declare(main, "direct", arguments={"alternate-exchange": alt})
    ch.queue_declare(q_alt)
    ch.queue_bind(q_alt, alt)
    pub = conn.channel()
    pub.confirm_delivery()
    pub.basic_publish(main, "nothing", b"m", mandatory=True)  # no UnroutableError
    assert drain(ch, q_alt) == [b"m"]


def test_alternate_exchange_missing_drops_message(conn, ch, names):
    main = names.exchange()
    ch.exchange_declare(main, "direct", arguments={"alternate-exchange": names.exchange()})
    pub = conn.channel()
    pub.confirm_delivery()
    pub.basic_publish(main, "nothing", b"m")
    with pytest.raises(pe.UnroutableError):
        pub.basic_publish(main, "nothing", b"m", mandatory=True)
