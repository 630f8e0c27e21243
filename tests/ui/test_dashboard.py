"""Warren's dashboard in headless Chromium: log in, see the overview's
numbers move while a publisher runs, sort and filter the queues, create a
queue from the page (and find it through the API), close a connection from
the page. Screenshots of the overview under load and of the queues page go
to $UI_OUT."""

import base64
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

import pika
import pytest
from playwright.sync_api import sync_playwright, expect

WARREN_BIN = os.environ["WARREN_BIN"]
UI_OUT = os.environ.get("UI_OUT", tempfile.gettempdir())
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def broker():
    amqp, http = free_port(), free_port()
    data = tempfile.mkdtemp(prefix="warren-ui-")
    log = open(os.path.join(data, "broker.log"), "w")
    p = subprocess.Popen([WARREN_BIN, "--port", str(amqp), "--management-port", str(http),
                          "--prometheus-port", "0", "--data-dir", os.path.join(data, "d"),
                          "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", http), 1).close()
            break
        except OSError:
            if time.time() > deadline or p.poll() is not None:
                raise RuntimeError("warren did not start")
            time.sleep(0.1)
    yield amqp, http
    p.terminate()
    p.wait(30)


def api(http, path):
    req = urllib.request.Request("http://127.0.0.1:%d/api/%s" % (http, path))
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def load(broker):
    """A publisher and a consumer on queue ui-load, running all the time."""
    amqp, _http = broker
    stop = threading.Event()

    def work():
        params = pika.URLParameters("amqp://guest:guest@127.0.0.1:%d/%%2F" % amqp)
        params.client_properties = {"connection_name": "ui-load"}
        c = pika.BlockingConnection(params)
        ch = c.channel()
        ch.queue_declare("ui-load")
        ch.queue_declare("ui-backlog")
        for _ in range(250):
            ch.basic_publish("", "ui-backlog", b"waiting")
        while not stop.is_set():
            for _ in range(200):
                ch.basic_publish("", "ui-load", b"x" * 64)
            while ch.basic_get("ui-load", auto_ack=True)[0] is not None:
                pass
            c.process_data_events(0.05)
        c.close()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(10)


@pytest.fixture(scope="module")
def page(broker, load):
    _amqp, http = broker
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS,
                                     )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto("http://127.0.0.1:%d/" % http)
        page.fill("input[name=user]", "guest")
        page.fill("input[name=pass]", "guest")
        page.click("form#login button")
        expect(page.locator("#whoami")).to_contain_text("guest")
        yield page
        browser.close()


def number(page, sel):
    return float(page.locator(sel + " b").inner_text().replace(",", ""))


def test_a_wrong_password_is_refused(broker):
    _amqp, http = broker
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        p = browser.new_page()
        p.goto("http://127.0.0.1:%d/" % http)
        p.fill("input[name=user]", "guest")
        p.fill("input[name=pass]", "wrong")
        p.click("form#login button")
        expect(p.locator("#login-error")).to_contain_text("Login failed")
        browser.close()


def test_the_overview_shows_live_numbers_under_load(page):
    page.goto(page.url.split("#")[0] + "#/overview")
    expect(page.locator("#stat-connections b")).not_to_have_text("0", timeout=10000)
    # The backlog queue's 250 messages are among the messages counted.
    expect(page.locator("#stat-queues b")).to_have_text("2", timeout=10000)
    assert number(page, "#stat-messages") >= 250
    # Rates come from the broker's 5-second samples: wait for a publish rate.
    deadline = time.time() + 30
    while number(page, "#stat-publish-rate") == 0:
        assert time.time() < deadline, "no publish rate shown"
        page.wait_for_timeout(1000)
    expect(page.locator("#alarms")).to_have_text("No alarms")
    page.wait_for_timeout(6000)  # a few chart points
    page.screenshot(path=os.path.join(UI_OUT, "overview-under-load.png"), full_page=True)


def test_queues_are_listed_sorted_and_filtered_and_one_is_created_from_the_page(page, broker):
    _amqp, http = broker
    page.click("nav a[href='#/queues']")
    rows = page.locator("table[data-table=queues] tbody tr")
    expect(rows).to_have_count(2)
    # Sort by messages, descending (click twice): the backlog first.
    page.click("table[data-table=queues] th:has-text('messages')")
    page.click("table[data-table=queues] th:has-text('messages')")
    expect(rows.first.locator("td[data-col=name]")).to_have_text("ui-backlog")
    page.fill("input.filter", "load")
    expect(rows).to_have_count(1)
    page.fill("input.filter", "")
    page.fill("form input[name=name]", "made-in-the-browser")
    page.click("form button:has-text('Add queue')")
    expect(page.locator("form .msg")).to_have_text("Done.")
    expect(page.locator("table[data-table=queues] td[data-col=name]", has_text="made-in-the-browser")).to_have_count(1)
    q = api(http, "queues/%2F/made-in-the-browser")
    assert q["name"] == "made-in-the-browser" and q["durable"] is True
    page.screenshot(path=os.path.join(UI_OUT, "queues.png"), full_page=True)
    # The new queue's own page: publish a message, then get it.
    page.click("a:has-text('made-in-the-browser')")
    expect(page.locator("h2")).to_contain_text("Queue made-in-the-browser")
    page.fill("form input[name=payload]", "typed in the page")
    page.click("form button:has-text('Publish message')")
    deadline = time.time() + 10
    while api(http, "queues/%2F/made-in-the-browser").get("messages") != 1:
        assert time.time() < deadline, "the published message did not arrive"
        time.sleep(0.2)
    page.select_option("#get-form select[name=ackmode]", "ack_requeue_false")
    page.click("#get-form button:has-text('Get messages')")
    expect(page.locator("#got td[data-col=payload]")).to_have_text("typed in the page")
    page.screenshot(path=os.path.join(UI_OUT, "queue-page.png"), full_page=True)


def test_a_connection_is_closed_from_the_page(page, broker):
    amqp, http = broker
    params = pika.URLParameters("amqp://guest:guest@127.0.0.1:%d/%%2F" % amqp)
    params.client_properties = {"connection_name": "close-me"}
    c = pika.BlockingConnection(params)
    page.click("nav a[href='#/connections']")
    row = page.locator("table[data-table=connections] tr", has_text="close-me")
    expect(row).to_have_count(1)
    row.locator("button:has-text('Close')").click()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker):
        for _ in range(100):
            c.process_data_events(0.1)
    names = [x["client_properties"].get("connection_name") for x in api(http, "connections")]
    assert "close-me" not in names
