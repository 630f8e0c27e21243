"""Prometheus metrics with RabbitMQ's names, types and labels: the scrape
parses with the Prometheus client's text-format parser, the families a
RabbitMQ dashboard reads are there with their types, and the counters follow
a scripted workload (publish N, get M, ack them: the totals move by N and M).

Needs PROM_URL (e.g. http://127.0.0.1:15692): conformance/run sets it for
Warren; `--prometheus URL` gives it for a running broker (the reference
RabbitMQ started with --plugins serves it on PORT+10020). RabbitMQ updates
its counters every few seconds, so the checks wait for them."""

import os
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import connect

PROM_URL = os.environ.get("PROM_URL", "").rstrip("/")

pytestmark = pytest.mark.skipif(not PROM_URL, reason="no PROM_URL (Prometheus endpoint) given")

# Family name (as the parser reports it: counters without _total) -> type.
EXPECTED = {
    "rabbitmq_identity_info": "unknown",
    "rabbitmq_connections": "gauge",
    "rabbitmq_channels": "gauge",
    "rabbitmq_consumers": "gauge",
    "rabbitmq_queues": "gauge",
    "rabbitmq_queue_messages_ready": "gauge",
    "rabbitmq_queue_messages_unacked": "gauge",
    "rabbitmq_connections_opened": "counter",
    "rabbitmq_connections_closed": "counter",
    "rabbitmq_channels_opened": "counter",
    "rabbitmq_channels_closed": "counter",
    "rabbitmq_queues_declared": "counter",
    "rabbitmq_queues_created": "counter",
    "rabbitmq_queues_deleted": "counter",
    "rabbitmq_global_messages_received": "counter",
    "rabbitmq_global_messages_routed": "counter",
    "rabbitmq_global_messages_delivered": "counter",
    "rabbitmq_global_messages_delivered_get_manual_ack": "counter",
    "rabbitmq_global_messages_acknowledged": "counter",
    "rabbitmq_global_messages_confirmed": "counter",
    "rabbitmq_global_messages_unroutable_dropped": "counter",
    "rabbitmq_process_resident_memory_bytes": "gauge",
    "rabbitmq_resident_memory_limit_bytes": "gauge",
    "rabbitmq_disk_space_available_bytes": "gauge",
    "rabbitmq_alarms_memory_used_watermark": "unknown",
    "rabbitmq_alarms_free_disk_space_watermark": "unknown",
    "rabbitmq_global_messages_dead_lettered_expired": "counter",
    "rabbitmq_global_messages_dead_lettered_maxlen": "counter",
    "rabbitmq_global_messages_dead_lettered_rejected": "counter",
}


def scrape(path="/metrics"):
    with urllib.request.urlopen(PROM_URL + path, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families, name, **labels):
    f = families[name]
    for s in f.samples:
        if s.name in (name, name + "_total") and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


def test_the_scrape_parses_and_has_rabbitmqs_families_with_their_types():
    fams = scrape()
    for name, kind in EXPECTED.items():
        assert name in fams, name
        assert fams[name].type == kind, (name, fams[name].type)
    ident = fams["rabbitmq_identity_info"].samples[0].labels
    for k in ("rabbitmq_node", "rabbitmq_cluster"):
        assert ident[k], k
    assert value(fams, "rabbitmq_global_messages_received", protocol="amqp091") >= 0


def test_counters_follow_a_workload():
    n, m = 40, 25
    before = scrape()

    def total(fams, name):
        return value(fams, name, protocol="amqp091")

    c = connect()
    try:
        ch = c.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.confirm_delivery()
        for i in range(n):
            ch.basic_publish("", q, b"m%d" % i)
        ch.basic_publish("", "no-such-queue-for-prometheus", b"dropped")
        tags = []
        for _ in range(m):
            method, _props, _body = ch.basic_get(q, auto_ack=False)
            tags.append(method.delivery_tag)
        ch.basic_ack(tags[-1], multiple=True)
        # A reject without requeue, on a queue without a dead-letter
        # exchange: counted as dead-lettered "disabled".
        method, _props, _body = ch.basic_get(q, auto_ack=False)
        ch.basic_reject(method.delivery_tag, requeue=False)
        want = {
            "rabbitmq_global_messages_received": n + 1,
            "rabbitmq_global_messages_confirmed": n + 1,
            "rabbitmq_global_messages_routed": n,
            "rabbitmq_global_messages_unroutable_dropped": 1,
            "rabbitmq_global_messages_delivered_get_manual_ack": m,
            "rabbitmq_global_messages_acknowledged": m,
        }
        deadline = time.time() + 20
        while True:
            after = scrape()
            moved = {k: total(after, k) - total(before, k) for k in want}
            rejected = "rabbitmq_global_messages_dead_lettered_rejected"
            lab = {"queue_type": "rabbit_classic_queue", "dead_letter_strategy": "disabled"}
            moved[rejected] = value(after, rejected, **lab) - value(before, rejected, **lab)
            # Other tests may run at the same time: at least, not exactly.
            if all(moved[k] >= v for k, v in want.items()) and moved[rejected] >= 1:
                break
            if time.time() > deadline:
                raise AssertionError("counters moved %r, want at least %r" % (moved, want))
            time.sleep(0.5)
        assert value(after, "rabbitmq_connections") >= 1
        assert value(after, "rabbitmq_queues") >= 1
    finally:
        c.close()


def test_per_object_metrics_have_one_series_per_queue():
    c = connect()
    try:
        ch = c.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        for i in range(3):
            ch.basic_publish("", q, b"x")
        deadline = time.time() + 20
        while True:
            fams = scrape("/metrics/per-object")
            ready = {s.labels.get("queue"): s.value
                     for s in fams["rabbitmq_queue_messages_ready"].samples}
            if ready.get(q) == 3:
                break
            if time.time() > deadline:
                raise AssertionError("no series for %s with 3 ready: %r" % (q, ready))
            time.sleep(0.5)
        sample = [s for s in fams["rabbitmq_queue_messages_ready"].samples if s.labels.get("queue") == q][0]
        assert sample.labels["vhost"] == "/"
    finally:
        c.close()


def test_streams_have_their_offsets_segments_and_consumer_lag_per_object():
    """Warren-only families (RabbitMQ 3.10 has no per-stream series over
    AMQP): first and last offset, segments, and each consumer's lag."""
    from test_queue_features import warren_only
    c = connect()
    warren_only(c)
    ch = c.channel()
    n = "conf-prom-stream-%d" % int(time.time() * 1000)
    try:
        ch.queue_declare(n, durable=True, arguments={"x-queue-type": "stream"})
        ch.confirm_delivery()
        for i in range(4):
            ch.basic_publish("", n, b"x")
        reader = c.channel()
        reader.basic_qos(prefetch_count=1)
        reader.basic_consume(n, lambda *a: None, consumer_tag="lagging",
                             arguments={"x-stream-offset": "first"})
        c.process_data_events(time_limit=0.3)
        fams = scrape("/metrics/per-object")
        assert value(fams, "warren_stream_first_offset", queue=n) == 0
        assert value(fams, "warren_stream_last_offset", queue=n) == 3
        assert value(fams, "warren_stream_segments", queue=n) == 1
        # One delivered, unacked (prefetch 1): it is at offset 1, 3 behind.
        assert value(fams, "warren_stream_consumer_offset_lag", queue=n,
                     consumer_tag="lagging") == 3
    finally:
        c.channel().queue_delete(n)
        c.close()
