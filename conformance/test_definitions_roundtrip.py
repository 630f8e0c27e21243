"""Definitions round trip between RabbitMQ and Warren: a file exported by
`rabbitmqctl export_definitions` imports into Warren (the user's password,
hashed by RabbitMQ, logs in), and Warren's `export-definitions` imports into
RabbitMQ (the same password logs in there).

Needs both brokers' tools, so it runs only when told where they are:
    RABBITMQ_CTL="rabbitmqctl -n rabbit@host"   (a command prefix)
    RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5673/%2F
    WARREN_BIN=target/debug/warren
and skips otherwise.
"""

import json
import os
import shlex
import socket
import subprocess
import time
import uuid

import pika
import pytest

CTL = os.environ.get("RABBITMQ_CTL")
RABBIT_URL = os.environ.get("RABBITMQ_URL")
WARREN_BIN = os.environ.get("WARREN_BIN")

pytestmark = pytest.mark.skipif(
    not (CTL and RABBIT_URL and WARREN_BIN),
    reason="set RABBITMQ_CTL, RABBITMQ_URL and WARREN_BIN to run the round trip")


def ctl(*args, stdin=None):
    out = subprocess.run(shlex.split(CTL) + list(args), capture_output=True, text=True,
                         timeout=60, input=stdin)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def login(url, user, password, vhost):
    p = pika.URLParameters(url)
    p.credentials = pika.PlainCredentials(user, password)
    p.virtual_host = vhost
    p.connection_attempts = 1
    return pika.BlockingConnection(p)


def wait_login(url, user, password, vhost, seconds=20):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return login(url, user, password, vhost)
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_rabbitmq_to_warren_and_back(tmp_path):
    tag = uuid.uuid4().hex[:8]
    user, password, vhost, queue = "rt-%s" % tag, "pw-%s" % tag, "rt-vhost-%s" % tag, "rt-q"
    ctl("add_vhost", vhost)
    ctl("add_user", user, password)
    ctl("set_permissions", "-p", vhost, user, "^rt-", ".*", ".*")
    ctl("set_policy", "-p", vhost, "--priority", "3", "--apply-to", "queues",
        "rt-cap", "^rt-", '{"max-length": 5, "overflow": "reject-publish"}')
    ctl("set_operator_policy", "-p", vhost, "--apply-to", "queues",
        "rt-op", ".*", '{"max-length": 4}')
    c = login(RABBIT_URL, user, password, vhost)
    c.channel().queue_declare(queue, durable=True, arguments={"x-max-length": 7})
    c.close()
    # Through stdin and stdout: rabbitmqctl may run as another user.
    exported = tmp_path / "rabbit.json"
    out = ctl("export_definitions", "-")
    # Only what this test made: the reference may hold leftovers of others.
    d = json.loads(out[out.index("{"):])
    d["users"] = [u for u in d["users"] if u["name"] == user]
    d["vhosts"] = [v for v in d["vhosts"] if v["name"] == vhost]
    for k in ("permissions", "topic_permissions", "queues", "exchanges", "bindings"):
        d[k] = [x for x in d.get(k, []) if x.get("vhost") == vhost]
    d["policies"] = [p for p in d.get("policies", []) if p.get("vhost") == vhost]
    # RabbitMQ exports operator policies as parameters (definition as a
    # list of pairs); vhost limits would be there too.
    d["parameters"] = [p for p in d.get("parameters", []) if p.get("vhost") == vhost]
    assert [p["name"] for p in d["parameters"]] == ["rt-op"]
    exported.write_text(json.dumps(d))

    port, data = free_port(), tmp_path / "data"
    log = open(tmp_path / "warren.log", "w")
    w = subprocess.Popen([WARREN_BIN, "--port", str(port), "--data-dir", str(data),
                          "--definitions", str(exported), "--log-level", "warn",
                          "--management-port", "0", "--prometheus-port", "0"],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        url = "amqp://127.0.0.1:%d/" % port
        c = wait_login(url, user, password, vhost)
        ch = c.channel()
        q = ch.queue_declare(queue, passive=True)
        assert q.method.queue == queue
        # The policies are in force: the operator policy's 4 beats the
        # policy's 5 and the argument's 7; reject-publish nacks the 5th.
        ch.confirm_delivery()
        for i in range(4):
            ch.basic_publish("", queue, b"m")
        with pytest.raises(pika.exceptions.NackError):
            ch.basic_publish("", queue, b"one too many")
        c.close()
    finally:
        w.terminate()
        w.wait(30)
    back = tmp_path / "warren.json"
    subprocess.run([WARREN_BIN, "export-definitions", "--data-dir", str(data), str(back)],
                   check=True, timeout=60)
    w_defs = json.loads(back.read_text())
    assert [p["name"] for p in w_defs["policies"]] == ["rt-cap"]
    assert [p["name"] for p in w_defs["parameters"] if p["component"] == "operator_policy"] == ["rt-op"]
    ctl("delete_user", user)
    ctl("delete_vhost", vhost)
    # A file rabbitmqctl can read, whichever user it runs as.
    shared = "/tmp/warren-roundtrip-%s.json" % tag
    with open(shared, "w") as f:
        f.write(back.read_text())
    os.chmod(shared, 0o644)
    try:
        ctl("import_definitions", shared)
    finally:
        os.unlink(shared)
    c = wait_login(RABBIT_URL, user, password, vhost)
    q = c.channel().queue_declare(queue, passive=True)
    assert q.method.queue == queue
    c.close()
    assert "rt-cap" in ctl("list_policies", "-p", vhost)
    assert "rt-op" in ctl("list_operator_policies", "-p", vhost)
    ctl("delete_user", user)
    ctl("delete_vhost", vhost)
