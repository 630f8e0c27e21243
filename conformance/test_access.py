"""Users, vhosts and permissions, as RabbitMQ's access control checks them.

Needs the state in definitions.json: conformance/run starts Warren with it
(--definitions); on RabbitMQ import it first:
    rabbitmqctl import_definitions conformance/definitions.json
The tests skip themselves when the broker lacks it.
"""

import uuid

import pika
import pika.exceptions as pe
import pytest

from conftest import channel_error, url_params

VHOST = "conf-vhost"


def params(user, password, vhost=VHOST):
    p = url_params()
    p.credentials = pika.PlainCredentials(user, password)
    p.virtual_host = vhost
    return p


def login(user, password, vhost=VHOST):
    return pika.BlockingConnection(params(user, password, vhost))


def app():
    return login("conf-app", "conf-app-pw")


def guest(vhost=VHOST):
    return login("guest", "guest", vhost)


@pytest.fixture(scope="module", autouse=True)
def definitions_loaded():
    try:
        login("conf-app", "conf-app-pw").close()
    except pe.AMQPConnectionError:
        pytest.skip("the broker lacks conformance/definitions.json "
                    "(rabbitmqctl import_definitions conformance/definitions.json)")


def refused(kind, name, user="conf-app", vhost=VHOST):
    return ("ACCESS_REFUSED - access to %s '%s' in vhost '%s' refused for user '%s'"
            % (kind, name, vhost, user))


def uid(prefix):
    return "%s%s" % (prefix, uuid.uuid4().hex[:10])


# ---------------------------------------------------------------- logins


def test_wrong_password_is_refused():
    with pytest.raises((pe.ProbableAuthenticationError, pe.AuthenticationError)):
        login("conf-app", "wrong")


def test_unknown_user_is_refused():
    with pytest.raises((pe.ProbableAuthenticationError, pe.AuthenticationError)):
        login("conf-nobody", "x")


def test_sha512_hash_from_definitions_logs_in():
    login("conf-ro", "conf-ro-pw").close()


def open_refused(user, password, vhost):
    """pika reports a connection.close at connection.open as a probable
    access denial, with the broker's close in its message."""
    with pytest.raises(pe.ProbableAccessDeniedError) as ei:
        login(user, password, vhost)
    return str(ei.value)


def test_vhost_without_permissions_is_530():
    e = open_refused("conf-app", "conf-app-pw", "/")
    assert "(530) \"NOT_ALLOWED - access to vhost '/' refused for user 'conf-app'\"" in e, e


def test_missing_vhost_is_530():
    e = open_refused("guest", "guest", "conf-no-such-vhost")
    assert "(530) 'NOT_ALLOWED - vhost conf-no-such-vhost not found'" in e, e


# ---------------------------------------------------------------- configure


def test_declare_needs_configure():
    c = app()
    try:
        ch = c.channel()
        q = uid("conf-app.q-")
        ch.queue_declare(q, auto_delete=True)
        other = uid("conf-other-")
        with channel_error(403) as ei:
            ch.queue_declare(other)
        assert ei.value.reply_text == refused("queue", other)
        ch = c.channel()
        with channel_error(403) as ei:
            ch.exchange_declare(other, "direct")
        assert ei.value.reply_text == refused("exchange", other)
    finally:
        c.close()


def test_passive_declare_needs_nothing():
    c = login("conf-ro", "conf-ro-pw")
    try:
        ch = c.channel()
        ch.queue_declare("conf-shared", passive=True)
        ch.exchange_declare("amq.topic", passive=True)
    finally:
        c.close()


def test_delete_needs_configure():
    c = app()
    try:
        ch = c.channel()
        with channel_error(403) as ei:
            ch.queue_delete("conf-shared")
        assert ei.value.reply_text == refused("queue", "conf-shared")
    finally:
        c.close()


def test_alternate_exchange_needs_write_on_it():
    c = app()
    try:
        ch = c.channel()
        x = uid("conf-app.x-")
        with channel_error(403) as ei:
            ch.exchange_declare(x, "fanout", auto_delete=True,
                                arguments={"alternate-exchange": "conf-elsewhere"})
        assert ei.value.reply_text == refused("exchange", "conf-elsewhere")
    finally:
        c.close()


def test_dead_letter_exchange_needs_write_on_it():
    c = app()
    try:
        ch = c.channel()
        q = uid("conf-app.q-")
        with channel_error(403) as ei:
            ch.queue_declare(q, auto_delete=True,
                             arguments={"x-dead-letter-exchange": "conf-elsewhere"})
        assert ei.value.reply_text == refused("exchange", "conf-elsewhere")
    finally:
        c.close()


# ---------------------------------------------------------------- write / read


def test_publish_needs_write_on_the_exchange():
    c = app()
    try:
        ch = c.channel()
        ch.confirm_delivery()
        with channel_error(403) as ei:
            ch.basic_publish("", "conf-shared", b"x")
        assert ei.value.reply_text == refused("exchange", "amq.default")
    finally:
        c.close()


def test_read_is_enough_to_get_and_purge():
    g = guest()
    c = login("conf-ro", "conf-ro-pw")
    q = uid("conf-app.q-")
    try:
        gch = g.channel()
        gch.queue_declare(q, auto_delete=False)
        gch.confirm_delivery()
        gch.basic_publish("", q, b"hello")
        gch.basic_publish("", q, b"again")
        # conf-ro may read everything, configure and write nothing.
        ch = c.channel()
        m, _p, body = ch.basic_get(q, auto_ack=True)
        assert body == b"hello"
        assert ch.queue_purge(q).method.message_count == 1
        with channel_error(403) as ei:
            ch.queue_declare(uid("conf-ro-"))
        assert ei.value.reply_text.startswith("ACCESS_REFUSED - access to queue ")
    finally:
        g.channel().queue_delete(q)
        g.close()
        if c.is_open:
            c.close()


def test_read_refused():
    a = app()
    try:
        ch = a.channel()
        with channel_error(403) as ei:
            ch.basic_get("conf-shared")
        assert ei.value.reply_text == refused("queue", "conf-shared")
        ch = a.channel()
        with channel_error(403) as ei:
            ch.basic_consume("conf-shared", lambda *a: None)
        assert ei.value.reply_text == refused("queue", "conf-shared")
        ch = a.channel()
        with channel_error(403) as ei:
            ch.queue_purge("conf-shared")
        assert ei.value.reply_text == refused("queue", "conf-shared")
    finally:
        a.close()


def test_bind_needs_write_on_queue_and_read_on_exchange():
    a = app()
    try:
        ch = a.channel()
        q = uid("conf-app.q-")
        ch.queue_declare(q, auto_delete=True)
        ch.queue_bind(q, "amq.topic", "conf-app.#")
        with channel_error(403) as ei:
            ch.queue_bind(q, "amq.direct", "k")
        assert ei.value.reply_text == refused("exchange", "amq.direct")
        ch = a.channel()
        with channel_error(403) as ei:
            ch.queue_bind("conf-shared", "amq.topic", "conf-app.x")
        assert ei.value.reply_text == refused("queue", "conf-shared")
    finally:
        a.close()


# ---------------------------------------------------------------- topics


def test_topic_permissions_on_publish_and_bind():
    a = app()
    try:
        ch = a.channel()
        q = uid("conf-app.q-")
        ch.queue_declare(q, auto_delete=True)
        with channel_error(403) as ei:
            ch.queue_bind(q, "amq.topic", "#")
        assert ei.value.reply_text == ("ACCESS_REFUSED - access to topic '#' in exchange "
                                       "'amq.topic' in vhost 'conf-vhost' refused for user "
                                       "'conf-app'")
    finally:
        if a.is_open:
            a.close()
    a = app()
    try:
        ch = a.channel()
        q = uid("conf-app.q-")
        ch.queue_declare(q, auto_delete=True)
        ch.queue_bind(q, "amq.topic", "conf-app.*")
        ch.confirm_delivery()
        ch.basic_publish("amq.topic", "conf-app.one", b"mine")
        m, _p, body = ch.basic_get(q, auto_ack=True)
        assert body == b"mine"
        with channel_error(403) as ei:
            ch.basic_publish("amq.topic", "someone.else", b"x")
        assert ei.value.reply_text == ("ACCESS_REFUSED - access to topic 'someone.else' in "
                                       "exchange 'amq.topic' in vhost 'conf-vhost' refused "
                                       "for user 'conf-app'")
    finally:
        if a.is_open:
            a.close()


# ---------------------------------------------------------------- isolation, user_id


def test_vhosts_are_isolated():
    g1 = guest("conf-other")
    g2 = guest(VHOST)
    q = uid("conf-iso-")
    try:
        g1.channel().queue_declare(q, auto_delete=False)
        ch = g2.channel()
        with channel_error(404):
            ch.queue_declare(q, passive=True)
    finally:
        g1.channel().queue_delete(q)
        g1.close()
        if g2.is_open:
            g2.close()


def test_user_id_must_match_unless_impersonator():
    a = app()
    i = login("conf-imp", "conf-imp-pw")
    try:
        ich = i.channel()
        q = uid("conf-app.q-")
        ich.queue_declare(q, auto_delete=False)
        ich.confirm_delivery()
        ich.basic_publish("", q, b"as-someone",
                          pika.BasicProperties(user_id="someone-else"))
        m, p, body = ich.basic_get(q, auto_ack=True)
        assert body == b"as-someone" and p.user_id == "someone-else"
        ach = a.channel()
        ach.confirm_delivery()
        with channel_error(406):
            ach.basic_publish("amq.topic", "conf-app.x", b"x",
                              pika.BasicProperties(user_id="someone-else"))
    finally:
        i.channel().queue_delete(q)
        i.close()
        if a.is_open:
            a.close()


# ---------------------------------------------------------------- limits


def test_user_connection_limit():
    held = [login("conf-lim", "conf-lim-pw") for _ in range(2)]
    try:
        e = open_refused("conf-lim", "conf-lim-pw", VHOST)
        assert ("(530) \"NOT_ALLOWED - connection refused for user 'conf-lim': "
                "user connection limit (2) is reached\"") in e, e
    finally:
        for c in held:
            c.close()
    login("conf-lim", "conf-lim-pw").close()  # room again


def test_user_channel_limit_counts_all_its_channels():
    a = login("conf-lim", "conf-lim-pw")
    b = login("conf-lim", "conf-lim-pw")
    try:
        a.channel()
        a.channel()
        b.channel()
        with pytest.raises(pe.ConnectionClosedByBroker) as ei:
            b.channel()
        assert ei.value.reply_code == 530
        assert ei.value.reply_text == ("NOT_ALLOWED - number of channels opened for user "
                                       "'conf-lim' has reached the maximum allowed user "
                                       "limit of (3)")
    finally:
        for c in (a, b):
            if c.is_open:
                c.close()


def test_vhost_connection_limit():
    held = [guest("conf-limited") for _ in range(3)]
    try:
        e = open_refused("guest", "guest", "conf-limited")
        assert ("(530) \"NOT_ALLOWED - access to vhost 'conf-limited' refused for user "
                "'guest': connection limit (3) is reached\"") in e, e
    finally:
        for c in held:
            c.close()


def test_vhost_queue_limit():
    c = guest("conf-limited")
    try:
        ch = c.channel()
        ch.queue_declare("conf-lim-a", auto_delete=True)
        ch.queue_declare("conf-lim-b", auto_delete=True)
        ch.queue_declare("conf-lim-a", auto_delete=True)  # exists: not a new queue
        with channel_error(406) as ei:
            ch.queue_declare("conf-lim-c", auto_delete=True)
        assert ei.value.reply_text == ("PRECONDITION_FAILED - cannot declare queue "
                                       "'conf-lim-c': queue limit in vhost 'conf-limited' "
                                       "(2) is reached")
    finally:
        c.close()
