// Warren's dashboard: plain JavaScript over the management API (the same
// requests any API client makes), with basic auth from a login form kept
// for the browser session. Hash routes: #/overview, #/queues,
// #/queue/VHOST/NAME, #/exchanges, #/connections, #/channels, #/users,
// #/vhosts, #/policies.
"use strict";

const state = { auth: sessionStorage.getItem("warren-auth"), timer: null, samples: [] };
const $ = (sel, root = document) => root.querySelector(sel);
const enc = encodeURIComponent;

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) el.setAttribute(k, v);
  }
  for (const c of children.flat()) el.append(c instanceof Node ? c : String(c ?? ""));
  return el;
}

async function api(method, path, body) {
  const res = await fetch("/api/" + path, {
    method,
    // X-Requested-With: no basic-auth challenge (the browser's own dialog)
    // on a refused login.
    headers: { Authorization: "Basic " + state.auth, "Content-Type": "application/json",
      "X-Requested-With": "XMLHttpRequest" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401 && path === "whoami") throw new Error("Login failed");
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw new Error((data && data.reason) || res.status + " " + res.statusText);
  return data;
}

function mib(n) {
  return typeof n === "number" ? (n / 1048576).toFixed(1) + " MiB" : "";
}

function fmt(n) {
  if (typeof n !== "number") return n ?? "";
  return Number.isInteger(n) ? n.toLocaleString("en") : n.toFixed(1);
}

// ---------------------------------------------------------------- tables

// A sortable, filterable table of `rows` with `cols` ([key, label, render?]).
function table(rows, cols, opts = {}) {
  let key = opts.sort || cols[0][0], desc = false, filter = "";
  const wrap = h("div", { class: "card" });
  const input = h("input", { placeholder: "Filter by name", class: "filter",
    oninput: (e) => { filter = e.target.value; draw(); } });
  const tbl = h("table", { "data-table": opts.id || "" });
  wrap.append(input, tbl);
  function draw() {
    const shown = rows
      .filter((r) => !filter || String(r.name ?? r.user ?? "").includes(filter))
      .sort((a, b) => {
        const x = a[key], y = b[key];
        const c = typeof x === "number" && typeof y === "number" ? x - y : String(x ?? "").localeCompare(String(y ?? ""));
        return desc ? -c : c;
      });
    tbl.replaceChildren(
      h("thead", {}, h("tr", {}, cols.map(([k, label]) =>
        h("th", { onclick: () => { desc = key === k ? !desc : false; key = k; draw(); } },
          label + (key === k ? (desc ? " ▾" : " ▴") : ""))))),
      h("tbody", {}, shown.map((r) => h("tr", {}, cols.map(([k, , render]) =>
        h("td", { "data-col": k }, render ? render(r) : fmt(r[k])))))),
    );
  }
  draw();
  return wrap;
}

function form(title, fields, submit) {
  const f = h("form", { class: "card" }, h("h3", {}, title));
  for (const [name, label, value, type] of fields) {
    f.append(h("label", {}, label, type === "select"
      ? h("select", { name }, value.map((v) => h("option", { value: v }, v)))
      : h("input", { name, value: value ?? "", type: type || "text" })));
  }
  const msg = h("p", { class: "msg" });
  f.append(h("button", { type: "submit" }, title), msg);
  f.addEventListener("submit", async (e) => {
    e.preventDefault();
    const data = Object.fromEntries(new FormData(f));
    try {
      await submit(data);
      msg.className = "msg ok";
      msg.textContent = "Done.";
      setTimeout(route, 300);
    } catch (err) {
      msg.className = "msg error";
      msg.textContent = err.message;
    }
  });
  return f;
}

function button(label, action, cls = "danger") {
  return h("button", { type: "button", class: cls, onclick: async (e) => {
    try { await action(); route(); } catch (err) { e.target.after(h("span", { class: "error" }, " " + err.message)); }
  } }, label);
}

// ----------------------------------------------------------------- pages

const RATES = [["publish", "publish"], ["deliver_get", "deliver / get"], ["ack", "ack"], ["confirm", "confirm"]];
const COLORS = ["#1f6feb", "#1e8e3e", "#b26b00", "#8e44ad"];

function drawChart(canvas) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth * devicePixelRatio);
  const hgt = (canvas.height = canvas.clientHeight * devicePixelRatio);
  ctx.clearRect(0, 0, w, hgt);
  const s = state.samples;
  const max = Math.max(1, ...s.flatMap((p) => RATES.map(([k]) => p[k])));
  ctx.fillStyle = "#6b7385";
  ctx.font = 11 * devicePixelRatio + "px sans-serif";
  ctx.fillText(fmt(Math.round(max)) + " msg/s", 6, 14 * devicePixelRatio);
  RATES.forEach(([k], i) => {
    ctx.strokeStyle = COLORS[i];
    ctx.lineWidth = 2 * devicePixelRatio;
    ctx.beginPath();
    s.forEach((p, j) => {
      const x = s.length < 2 ? 0 : (j / (s.length - 1)) * w;
      const y = hgt - (p[k] / max) * (hgt - 20 * devicePixelRatio);
      j ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
}

async function overview(main) {
  const [o, nodes] = await Promise.all([api("GET", "overview"), api("GET", "nodes")]);
  const t = o.object_totals, q = o.queue_totals, ms = o.message_stats || {};
  const sample = { at: Date.now() };
  for (const [k] of RATES) sample[k] = (ms[k + "_details"] || {}).rate || 0;
  state.samples.push(sample);
  while (state.samples.length > 120) state.samples.shift(); // 10 minutes at 5 s
  const alarms = nodes.flatMap((n) => [n.mem_alarm && "memory", n.disk_free_alarm && "disk"]).filter(Boolean);
  const stat = (label, v, id) => h("div", { class: "stat", id }, h("b", {}, fmt(v)), h("span", {}, label));
  const canvas = h("canvas", { id: "rates" });
  main.replaceChildren(
    h("h2", {}, `${o.product_name} ${o.product_version} on ${o.node}`),
    alarms.length ? h("p", { class: "alarm", id: "alarms" }, "Alarm: " + alarms.join(", ") + " (publishers are blocked)")
      : h("p", { class: "ok", id: "alarms" }, "No alarms"),
    h("div", { class: "cards" },
      stat("messages", q.messages, "stat-messages"), stat("ready", q.messages_ready, "stat-ready"),
      stat("unacked", q.messages_unacknowledged, "stat-unacked"), stat("connections", t.connections, "stat-connections"),
      stat("channels", t.channels, "stat-channels"), stat("queues", t.queues, "stat-queues"),
      stat("consumers", t.consumers, "stat-consumers"),
      stat("publish/s", sample.publish, "stat-publish-rate"), stat("deliver/s", sample.deliver_get, "stat-deliver-rate")),
    h("h3", {}, "Message rates (last minutes)"),
    h("p", { class: "legend" }, RATES.map(([, label], i) => h("span", { style: "color:" + COLORS[i] }, "● " + label))),
    canvas,
    h("h3", {}, "Memory and disk"),
    table(nodes, [["name", "node"], ["mem_used", "memory used", (r) => mib(r.mem_used)],
      ["mem_limit", "memory limit", (r) => mib(r.mem_limit)], ["disk_free", "disk free", (r) => mib(r.disk_free)],
      ["disk_free_limit", "disk free limit", (r) => mib(r.disk_free_limit)], ["fd_used", "file descriptors"]]),
  );
  drawChart(canvas);
}

async function queues(main) {
  const rows = await api("GET", "queues");
  const vhosts = (await api("GET", "vhosts")).map((v) => v.name);
  main.replaceChildren(
    h("h2", {}, "Queues"),
    table(rows, [
      ["name", "name", (r) => h("a", { href: `#/queue/${enc(r.vhost)}/${enc(r.name)}` }, r.name)],
      ["vhost", "vhost"], ["messages", "messages"], ["messages_ready", "ready"],
      ["messages_unacknowledged", "unacked"], ["consumers", "consumers"],
      ["in", "publish/s", (r) => fmt(((r.message_stats || {}).publish_details || {}).rate || 0)],
      ["out", "deliver/s", (r) => fmt(((r.message_stats || {}).deliver_get_details || {}).rate || 0)],
      ["policy", "policy"],
    ], { id: "queues" }),
    form("Add queue", [["vhost", "vhost", vhosts, "select"], ["name", "name"], ["durable", "durable", ["true", "false"], "select"]],
      (d) => api("PUT", `queues/${enc(d.vhost)}/${enc(d.name)}`, { durable: d.durable === "true" })),
  );
}

async function queuePage(main, vhost, name) {
  const [q, bindings, consumers] = await Promise.all([
    api("GET", `queues/${enc(vhost)}/${enc(name)}`),
    api("GET", `queues/${enc(vhost)}/${enc(name)}/bindings`),
    api("GET", `consumers/${enc(vhost)}`),
  ]);
  main.replaceChildren(
    h("h2", {}, `Queue ${name} (vhost ${vhost})`),
    h("div", { class: "cards" },
      ...[["messages", q.messages], ["ready", q.messages_ready], ["unacked", q.messages_unacknowledged], ["consumers", q.consumers]]
        .map(([l, v]) => h("div", { class: "stat" }, h("b", {}, fmt(v)), h("span", {}, l)))),
    h("p", {}, `durable: ${q.durable}, auto-delete: ${q.auto_delete}, exclusive: ${q.exclusive}, arguments: ${JSON.stringify(q.arguments)}, policy: ${q.policy ?? "none"}`),
    h("h3", {}, "Bindings"),
    table(bindings, [["source", "from exchange", (r) => r.source || "(default)"], ["routing_key", "routing key"], ["arguments", "arguments", (r) => JSON.stringify(r.arguments)]]),
    h("h3", {}, "Consumers"),
    table(consumers.filter((c) => c.queue.name === name), [["consumer_tag", "tag"], ["channel", "channel", (r) => r.channel_details.name],
      ["ack_required", "ack required", (r) => String(r.ack_required)], ["prefetch_count", "prefetch"]]),
    form("Publish message", [["payload", "payload", ""], ["delivery_mode", "delivery mode", ["2 (persistent)", "1 (transient)"], "select"]],
      async (d) => {
        const r = await api("POST", `exchanges/${enc(vhost)}/amq.default/publish`, {
          routing_key: name, payload: d.payload, payload_encoding: "string",
          properties: { delivery_mode: Number(d.delivery_mode[0]) } });
        if (!r.routed) throw new Error("not routed");
      }),
    getForm(vhost, name),
    h("p", {}, button("Purge", () => api("DELETE", `queues/${enc(vhost)}/${enc(name)}/contents`), "danger"), " ",
      button("Delete", async () => { await api("DELETE", `queues/${enc(vhost)}/${enc(name)}`); location.hash = "#/queues"; })),
  );
}

// Get messages: shown below the form, not followed by a page refresh.
function getForm(vhost, name) {
  const f = h("form", { class: "card", id: "get-form" }, h("h3", {}, "Get messages"),
    h("label", {}, "count", h("input", { name: "count", value: "1" })),
    h("label", {}, "ack mode", h("select", { name: "ackmode" },
      ["ack_requeue_true", "ack_requeue_false", "reject_requeue_true", "reject_requeue_false"].map((m) => h("option", { value: m }, m)))),
    h("button", { type: "submit" }, "Get messages"));
  const out = h("div", { id: "got" });
  f.append(out);
  f.addEventListener("submit", async (e) => {
    e.preventDefault();
    const d = Object.fromEntries(new FormData(f));
    try {
      const got = await api("POST", `queues/${enc(vhost)}/${enc(name)}/get`,
        { count: Number(d.count), ackmode: d.ackmode, encoding: "auto", truncate: 50000 });
      out.replaceChildren(got.length ? table(got, [["payload", "payload"], ["redelivered", "redelivered", (r) => String(r.redelivered)],
        ["properties", "properties", (r) => JSON.stringify(r.properties)], ["message_count", "left"]]) : h("p", {}, "The queue is empty."));
    } catch (err) {
      out.replaceChildren(h("p", { class: "error" }, err.message));
    }
  });
  return f;
}

async function exchanges(main) {
  const rows = await api("GET", "exchanges");
  main.replaceChildren(h("h2", {}, "Exchanges"),
    table(rows.map((r) => ({ ...r, name: r.name || "(AMQP default)" })), [["name", "name"], ["vhost", "vhost"], ["type", "type"],
      ["durable", "durable", (r) => String(r.durable)], ["policy", "policy"]]));
}

async function connections(main) {
  const rows = await api("GET", "connections");
  main.replaceChildren(h("h2", {}, "Connections"),
    table(rows, [["name", "name"], ["user", "user"], ["vhost", "vhost"], ["channels", "channels"], ["ssl", "TLS", (r) => String(r.ssl)],
      ["client", "client", (r) => (r.client_properties || {}).connection_name || (r.client_properties || {}).product || ""],
      ["close", "", (r) => button("Close", () => api("DELETE", `connections/${enc(r.name)}`))]], { id: "connections" }));
}

async function channels(main) {
  const rows = await api("GET", "channels");
  main.replaceChildren(h("h2", {}, "Channels"),
    table(rows, [["name", "name"], ["user", "user"], ["vhost", "vhost"], ["consumer_count", "consumers"],
      ["messages_unacknowledged", "unacked"], ["prefetch_count", "prefetch"], ["confirm", "confirm", (r) => String(r.confirm)]]));
}

async function users(main) {
  const rows = await api("GET", "users");
  main.replaceChildren(h("h2", {}, "Users"),
    table(rows, [["name", "name"], ["tags", "tags", (r) => r.tags.join(", ")],
      ["del", "", (r) => button("Delete", () => api("DELETE", `users/${enc(r.name)}`))]]),
    form("Add user", [["name", "name"], ["password", "password", "", "password"], ["tags", "tags (comma-separated)"]],
      (d) => api("PUT", `users/${enc(d.name)}`, { password: d.password, tags: d.tags })));
  const perms = await api("GET", "permissions");
  const vhosts = (await api("GET", "vhosts")).map((v) => v.name);
  main.append(h("h2", {}, "Permissions"),
    table(perms, [["user", "user"], ["vhost", "vhost"], ["configure", "configure"], ["write", "write"], ["read", "read"],
      ["del", "", (r) => button("Clear", () => api("DELETE", `permissions/${enc(r.vhost)}/${enc(r.user)}`))]]),
    form("Set permissions", [["user", "user", rows.map((u) => u.name), "select"], ["vhost", "vhost", vhosts, "select"],
      ["configure", "configure", ".*"], ["write", "write", ".*"], ["read", "read", ".*"]],
      (d) => api("PUT", `permissions/${enc(d.vhost)}/${enc(d.user)}`, { configure: d.configure, write: d.write, read: d.read })));
}

async function vhosts(main) {
  const rows = await api("GET", "vhosts");
  main.replaceChildren(h("h2", {}, "Vhosts"),
    table(rows, [["name", "name"], ["description", "description"],
      ["del", "", (r) => button("Delete", () => api("DELETE", `vhosts/${enc(r.name)}`))]]),
    form("Add vhost", [["name", "name"], ["description", "description"]],
      (d) => api("PUT", `vhosts/${enc(d.name)}`, { description: d.description })));
}

async function policies(main) {
  const rows = await api("GET", "policies");
  const vhosts = (await api("GET", "vhosts")).map((v) => v.name);
  main.replaceChildren(h("h2", {}, "Policies"),
    table(rows, [["name", "name"], ["vhost", "vhost"], ["pattern", "pattern"], ["apply-to", "apply to"],
      ["definition", "definition", (r) => JSON.stringify(r.definition)], ["priority", "priority"],
      ["del", "", (r) => button("Delete", () => api("DELETE", `policies/${enc(r.vhost)}/${enc(r.name)}`))]]),
    form("Set policy", [["vhost", "vhost", vhosts, "select"], ["name", "name"], ["pattern", "pattern", ".*"],
      ["apply-to", "apply to", ["queues", "exchanges", "all"], "select"], ["priority", "priority", "0"],
      ["definition", "definition (JSON)", '{"max-length": 1000}']],
      (d) => api("PUT", `policies/${enc(d.vhost)}/${enc(d.name)}`, {
        pattern: d.pattern, "apply-to": d["apply-to"], priority: Number(d.priority), definition: JSON.parse(d.definition) })));
}

const PAGES = { overview, queues, exchanges, connections, channels, users, vhosts, policies };

async function route() {
  clearTimeout(state.timer);
  const main = $("#main");
  const [page, ...args] = (location.hash.replace(/^#\//, "") || "overview").split("/").map(decodeURIComponent);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("href") === "#/" + page);
  try {
    if (page === "queue") await queuePage(main, args[0], args[1]);
    else await (PAGES[page] || overview)(main);
  } catch (err) {
    main.replaceChildren(h("p", { class: "error" }, err.message));
  }
  // Live numbers: the overview and lists refresh every 5 s (forms do not).
  if (page === "overview") state.timer = setTimeout(route, 5000);
}

async function start() {
  try {
    const me = await api("GET", "whoami");
    $("#whoami").textContent = me.name + " (" + me.tags.join(", ") + ")";
    $("#nav").hidden = false;
    window.addEventListener("hashchange", route);
    route();
  } catch (err) {
    sessionStorage.removeItem("warren-auth");
    state.auth = null;
    $("#login-error").textContent = err.message;
  }
}

$("#login").addEventListener("submit", (e) => {
  e.preventDefault();
  const d = new FormData(e.target);
  state.auth = btoa(d.get("user") + ":" + d.get("pass"));
  sessionStorage.setItem("warren-auth", state.auth);
  start();
});
$("#logout").addEventListener("click", () => {
  sessionStorage.removeItem("warren-auth");
  location.hash = "";
  location.reload();
});
if (state.auth) start();
