//! Network partitions and kills of the metadata group, made with network
//! namespaces this test creates (root only; skipped with a message
//! otherwise): three daemons, each in its own namespace on a bridge,
//! addressed 10.199.N.1-3; a node is cut off from the others by blackhole
//! routes (its management API stays reachable from the bridge).
//!
//! - The metadata leader cut off: the majority elects a new leader and
//!   takes changes; the cut-off node refuses changes with 503 and never
//!   applies one it could not commit; healed, it converges.
//! - A checker in the spirit of Jepsen's: clients create users through
//!   random nodes while a random schedule kills, restarts, cuts off and
//!   heals nodes; at the end every acknowledged user must be on every node
//!   (lost: none), and no user that was never asked for (unexpected: none).
//! - The same for messages: publishers (with confirms) and a consumer use
//!   a queue of one node through random nodes under such a schedule; every
//!   confirmed message must be consumed or left in the queue, and nothing
//!   else may appear; duplicates are counted.

use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use warren_tests::http::request;

const WARREN: &str = env!("CARGO_BIN_EXE_warren");
const API: u16 = 15672;
const CLUSTER: u16 = 25672;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces, the bridge and the daemons; all removed when dropped.
struct Net {
    tag: String,
    subnet: u8,
    daemons: Vec<Child>,
    /// Each place's generation: a node replaced by a new one (new name, new
    /// data directory, same namespace and address) is the next.
    gens: Vec<u32>,
    _dir: tempfile::TempDir,
}

impl Net {
    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }
    fn name(&self, i: usize) -> String {
        match self.gens[i] {
            0 => format!("warren@p{i}"),
            g => format!("warren@p{i}g{g}"),
        }
    }
    fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 199, self.subnet, i as u8 + 1)
    }

    /// Make the network: a bridge in this namespace, one namespace per node.
    fn make(nodes: usize) -> Result<Net, String> {
        // Unique per test in this process, and across processes.
        static NETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let net = Net {
            tag: format!("wp{}{k}", pid % 100_000),
            subnet: ((pid * 2 + k) % 200) as u8 + 20,
            daemons: Vec::new(),
            gens: vec![0; nodes],
            _dir: tempfile::tempdir().map_err(|e| e.to_string())?,
        };
        let br = format!("{}br", net.tag);
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("10.199.{}.254/24", net.subnet),
            "dev",
            &br,
        ])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..nodes {
            let ns = net.ns(i);
            let (host, peer) = (format!("{}h{i}", net.tag), format!("{}p{i}", net.tag));
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &peer, "netns", &ns])?;
            ip(&["link", "set", &host, "master", &br])?;
            ip(&["link", "set", &host, "up"])?;
            let a = format!("{}/24", net.addr(i));
            ip(&["-n", &ns, "addr", "add", &a, "dev", &peer])?;
            ip(&["-n", &ns, "link", "set", &peer, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn start(&mut self, i: usize, nodes: usize) {
        let child = self.spawn(i, nodes);
        if i < self.daemons.len() {
            self.daemons[i] = child;
        } else {
            self.daemons.push(child);
        }
    }

    /// SIGKILL node `i`.
    fn kill(&mut self, i: usize) {
        let _ = self.daemons[i].kill();
        let _ = self.daemons[i].wait();
    }

    /// Replace node `i` by a new one: killed, forgotten through node `via`
    /// (forget_cluster_node), and a new node (name, empty data directory)
    /// started in its place, which joins the cluster by itself.
    fn replace(&mut self, i: usize, via: usize, nodes: usize) {
        self.kill(i);
        let gone = self.name(i).replace('@', "%40");
        let mut status = 0;
        eventually("the dead node forgotten", Duration::from_secs(30), || {
            if std::net::TcpStream::connect_timeout(&self.api(via), Duration::from_secs(1)).is_err()
            {
                return false;
            }
            status = call(self, via, "DELETE", &format!("/api/nodes/{gone}"), None).0;
            status == 204
        });
        self.gens[i] += 1;
        self.start(i, nodes);
    }

    fn spawn(&self, i: usize, nodes: usize) -> Child {
        let peers = (0..nodes)
            .map(|j| format!("{}:{CLUSTER}", self.addr(j)))
            .collect::<Vec<_>>()
            .join(",");
        let g = self.gens[i];
        let dir = self._dir.path().join(format!("n{i}g{g}"));
        // Appended to: a node restarted goes on in the same log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self._dir.path().join(format!("n{i}g{g}.log")))
            .unwrap();
        Command::new("ip")
            .args(["netns", "exec", &self.ns(i), WARREN])
            .args([
                "--bind",
                &self.addr(i).to_string(),
                "--log-level",
                &log_level(),
            ])
            .args([
                "--management-port",
                &API.to_string(),
                "--prometheus-port",
                "0",
            ])
            .args([
                "--cluster-port",
                &CLUSTER.to_string(),
                "--cluster-peers",
                &peers,
            ])
            .args(["--node-name", &self.name(i), "--cluster-secret", "s"])
            // The bridge's address is not loopback: guest may log in from it.
            .args(["--loopback-users", ""])
            .arg("--data-dir")
            .arg(&dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn warren in its namespace")
    }

    /// Cut node `i` off from the others (both ways), or heal it.
    fn isolate(&self, i: usize, nodes: usize, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        for j in (0..nodes).filter(|&j| j != i) {
            let (a, b) = (self.addr(j).to_string(), self.addr(i).to_string());
            ip(&["-n", &self.ns(i), "route", verb, "blackhole", &a]).unwrap();
            ip(&["-n", &self.ns(j), "route", verb, "blackhole", &b]).unwrap();
        }
    }

    fn api(&self, i: usize) -> SocketAddr {
        (self.addr(i), API).into()
    }
}

/// The nodes' log level: `WARREN_TEST_LOG`, else warn.
fn log_level() -> String {
    std::env::var("WARREN_TEST_LOG").unwrap_or_else(|_| "warn".into())
}

impl Drop for Net {
    fn drop(&mut self) {
        if std::env::var_os("WARREN_TEST_KEEP").is_some() {
            // The nodes' logs and data, to read after a failure.
            let kept = std::mem::replace(&mut self._dir, tempfile::tempdir().expect("a temp dir"));
            eprintln!("kept the nodes' logs and data in {}", kept.keep().display());
        }
        for c in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 0..8 {
            let _ = ip(&["netns", "del", &self.ns(i)]);
            let _ = ip(&["link", "del", &format!("{}h{i}", self.tag)]);
        }
        let _ = ip(&["link", "del", &format!("{}br", self.tag)]);
    }
}

fn call(net: &Net, i: usize, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let r = request(net.api(i), method, path, ("guest", "guest"), body.as_ref());
    (r.status, r.body)
}

/// (members, leader) in node `i`'s view; None while its API does not answer.
fn view(net: &Net, i: usize) -> Option<(usize, Option<String>)> {
    std::net::TcpStream::connect_timeout(&net.api(i), Duration::from_secs(1)).ok()?;
    let (status, body) = call(net, i, "GET", "/api/nodes", None);
    if status != 200 {
        return None;
    }
    let nodes: Vec<Value> = serde_json::from_str(&body).ok()?;
    let leader = nodes
        .iter()
        .find(|n| n["metadata_leader"] == json!(true))
        .and_then(|n| n["name"].as_str().map(str::to_owned));
    Some((nodes.len(), leader))
}

fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn put_user(net: &Net, i: usize, name: &str) -> u16 {
    let body = json!({"password": "pw", "tags": ""});
    call(net, i, "PUT", &format!("/api/users/{name}"), Some(body)).0
}

/// Wait (up to `timeout`) until all `n` nodes name one leader; its name.
fn agreed_leader(net: &Net, n: usize, what: &str, timeout: Duration) -> String {
    let mut leader = None;
    eventually(what, timeout, || {
        let views: Vec<_> = (0..n).map(|i| view(net, i)).collect();
        leader = views[0].as_ref().and_then(|v| v.1.clone());
        leader.is_some()
            && views
                .iter()
                .all(|v| v.as_ref() == Some(&(n, leader.clone())))
    });
    leader.expect("a leader")
}

/// `n` daemons, each in a namespace of its own, agreeing on a leader and
/// past a first change (the user `before`); the leader's name. None where
/// namespaces cannot be made (not root, no `ip`): the test is skipped, and
/// says why.
fn formed(n: usize) -> Option<(Net, String)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: making network namespaces needs root");
        return None;
    }
    let mut net = match Net::make(n) {
        Ok(net) => net,
        Err(e) => {
            eprintln!("skipped: cannot make network namespaces here: {e}");
            return None;
        }
    };
    for i in 0..n {
        net.start(i, n);
    }
    let leader = agreed_leader(
        &net,
        n,
        "three nodes with one leader",
        Duration::from_secs(60),
    );
    eventually("a first change", Duration::from_secs(30), || {
        matches!(put_user(&net, 0, "before"), 201 | 204)
    });
    Some((net, leader))
}

#[test]
fn a_cut_off_leader_stops_taking_changes_and_catches_up_after() {
    let n = 3;
    let Some((net, leader)) = formed(n) else {
        return;
    };
    let cut: usize = leader
        .trim_start_matches("warren@p")
        .parse()
        .expect("a node");
    let rest: Vec<usize> = (0..n).filter(|&i| i != cut).collect();

    net.isolate(cut, n, true);
    // The majority elects another leader and takes changes.
    let mut new_leader = None;
    eventually(
        "a new leader on the majority side",
        Duration::from_secs(30),
        || {
            new_leader = view(&net, rest[0]).and_then(|v| v.1);
            new_leader.as_ref().is_some_and(|l| *l != leader)
                && rest
                    .iter()
                    .all(|&i| view(&net, i).and_then(|v| v.1) == new_leader)
        },
    );
    assert_eq!(put_user(&net, rest[0], "majority"), 201);
    // The cut-off node refuses changes: 503, nothing applied.
    let started = Instant::now();
    let (status, body) = call(
        &net,
        cut,
        "PUT",
        "/api/users/minority",
        Some(json!({"password": "pw", "tags": ""})),
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cluster unavailable"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(call(&net, cut, "GET", "/api/users/majority", None).0, 404);
    assert_eq!(call(&net, cut, "GET", "/api/users/minority", None).0, 404);

    // Healed: one leader again, the majority's change everywhere, the
    // refused one nowhere.
    net.isolate(cut, n, false);
    eventually("one leader after healing", Duration::from_secs(30), || {
        (0..n).all(|i| view(&net, i) == Some((n, new_leader.clone())))
    });
    for i in 0..n {
        eventually(
            "the majority's change everywhere",
            Duration::from_secs(15),
            || call(&net, i, "GET", "/api/users/majority", None).0 == 200,
        );
        assert_eq!(call(&net, i, "GET", "/api/users/minority", None).0, 404);
        assert_eq!(call(&net, i, "GET", "/api/users/before", None).0, 200);
    }
    // And the healed node takes changes again.
    eventually(
        "a change through the healed node",
        Duration::from_secs(15),
        || matches!(put_user(&net, cut, "after"), 201 | 204),
    );
}

/// A PUT that never panics: the status, or None when there was no answer
/// (refused, reset, timed out).
fn try_put(addr: SocketAddr, path: &str, body: &Value) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let body = body.to_string();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Users on node `i` (None if its API does not answer).
fn users(net: &Net, i: usize) -> Option<std::collections::BTreeSet<String>> {
    std::net::TcpStream::connect_timeout(&net.api(i), Duration::from_secs(1)).ok()?;
    let (status, body) = call(net, i, "GET", "/api/users", None);
    if status != 200 {
        return None;
    }
    let list: Vec<Value> = serde_json::from_str(&body).ok()?;
    Some(
        list.iter()
            .filter_map(|u| u["name"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// xorshift64: the schedule's randomness, reproducible from the printed seed.
/// The random schedule's seed: `WARREN_CHECKER_SEED`, else the clock.
fn checker_seed() -> u64 {
    std::env::var("WARREN_CHECKER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn acknowledged_changes_survive_random_kills_and_partitions() {
    let n = 3;
    let Some((mut net, _)) = formed(n) else {
        return;
    };
    let seed = checker_seed();
    eprintln!("checker seed {seed} (WARREN_CHECKER_SEED to repeat)");
    let mut rng = Rng(seed);

    // Two clients, each creating users through random nodes until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let apis: Vec<SocketAddr> = (0..n).map(|i| net.api(i)).collect();
    let clients: Vec<_> = (0..2u64)
        .map(|c| {
            let (stop, apis) = (stop.clone(), apis.clone());
            let mut rng = Rng(seed.wrapping_mul(c + 7) | 1);
            std::thread::spawn(move || {
                let (mut acked, mut unknown) = (Vec::new(), Vec::new());
                let mut k = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = format!("c{c}-u{k}");
                    k += 1;
                    let node = rng.below(apis.len());
                    let body = json!({"password": "pw", "tags": ""});
                    match try_put(apis[node], &format!("/api/users/{name}"), &body) {
                        Some(201 | 204) => acked.push(name),
                        _ => {
                            unknown.push(name);
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
                (acked, unknown)
            })
        })
        .collect();

    // The nemesis: six rounds, each a kill or a cut-off of a random node; in
    // one of them a node is replaced by a new one (a membership change
    // under load).
    let mut events = Vec::new();
    let replace_at = 1 + rng.below(4);
    for round in 0..6 {
        let i = rng.below(n);
        if round == replace_at {
            let gone = net.name(i);
            net.replace(i, (i + 1) % n, n);
            events.push(format!("replace {gone} by {}", net.name(i)));
        } else if rng.below(2) == 0 {
            net.kill(i);
            std::thread::sleep(Duration::from_millis(500 + rng.below(2000) as u64));
            net.start(i, n);
            events.push(format!("kill+restart p{i}"));
        } else {
            net.isolate(i, n, true);
            std::thread::sleep(Duration::from_millis(1000 + rng.below(3000) as u64));
            net.isolate(i, n, false);
            events.push(format!("cut+heal p{i}"));
        }
        std::thread::sleep(Duration::from_millis(1000 + rng.below(1000) as u64));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut unknown) = (Vec::new(), Vec::new());
    for c in clients {
        let (a, u) = c.join().expect("a client");
        acked.extend(a);
        unknown.extend(u);
    }

    // Everything healed: the final reads.
    agreed_leader(
        &net,
        n,
        "one leader after the schedule",
        Duration::from_secs(60),
    );
    // A last change through each node: once it is everywhere, so is all before it.
    for i in 0..n {
        let last = format!("last-{i}");
        eventually("a last change", Duration::from_secs(30), || {
            matches!(put_user(&net, i, &last), 201 | 204)
        });
    }
    let mut finals = Vec::new();
    for i in 0..n {
        let mut got = None;
        eventually(
            "the last changes on every node",
            Duration::from_secs(30),
            || {
                got = users(&net, i).filter(|u| (0..n).all(|j| u.contains(&format!("last-{j}"))));
                got.is_some()
            },
        );
        finals.push(got.expect("users"));
    }
    let asked: std::collections::BTreeSet<&String> = acked.iter().chain(&unknown).collect();
    let mut lost = 0;
    let mut unexpected = 0;
    for (i, present) in finals.iter().enumerate() {
        lost += acked.iter().filter(|u| !present.contains(*u)).count();
        unexpected += present
            .iter()
            .filter(|u| u.starts_with('c') && u.contains("-u") && !asked.contains(u))
            .count();
        assert_eq!(present, &finals[0], "node p{i} differs from p0");
    }
    let recovered = unknown.iter().filter(|u| finals[0].contains(*u)).count();
    eprintln!(
        "checker: schedule {events:?}; {} asked, {} acknowledged, {} unknown ({} of them applied); \
         lost {lost}, unexpected {unexpected}",
        asked.len(),
        acked.len(),
        unknown.len(),
        recovered
    );
    assert!(
        acked.len() > 10,
        "too few acknowledged changes to mean anything"
    );
    assert_eq!((lost, unexpected), (0, 0));
}

/// The AMQP address of node `i` (the default port, in its namespace).
fn amqp_url(net: &Net, i: usize) -> String {
    format!("amqp://guest:guest@{}:5672/%2f", net.addr(i))
}

/// Run `f` on a runtime of this thread's own (the checker's clients are
/// threads, as the nemesis is).
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}

/// One publisher: persistent messages `p{c}-{k}` with confirms, one at a
/// time, each through the connection it has (a random node, again after a
/// failure). Returns (confirmed, unknown: nacked or no answer).
/// The time of day (UTC, as the nodes' logs print it), to set what a
/// checker saw beside what the nodes logged.
fn stamp() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

/// Where (the node's index) and when (see [`stamp`]) each message was
/// confirmed or consumed.
type Trail = std::collections::HashMap<String, (usize, String)>;

async fn publisher(
    c: u64,
    urls: Vec<String>,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<String>, Vec<String>, Trail) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let mut rng = Rng(seed | 1);
    let (mut acked, mut unknown, mut trail) = (Vec::new(), Vec::new(), Trail::new());
    let mut k = 0;
    let mut conn: Option<(lapin::Connection, lapin::Channel)> = None;
    let mut node = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if conn.is_none() {
            node = rng.below(urls.len());
            let url = &urls[node];
            let opened = tokio::time::timeout(Duration::from_secs(3), async {
                let c = lapin::Connection::connect(url, Default::default()).await?;
                let ch = c.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok::<_, lapin::Error>((c, ch))
            })
            .await;
            match opened {
                Ok(Ok(x)) => conn = Some(x),
                _ => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let ch = &conn.as_ref().expect("connected").1;
        let body = format!("p{c}-{k}");
        k += 1;
        let confirmed = tokio::time::timeout(Duration::from_secs(40), async {
            ch.basic_publish(
                "".into(),
                "jq".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await
        })
        .await;
        match confirmed {
            Ok(Ok(c)) if c.is_ack() => {
                trail.insert(body.clone(), (node, stamp()));
                acked.push(body)
            }
            Ok(Ok(_)) => unknown.push(body),
            _ => {
                unknown.push(body);
                conn = None;
            }
        }
    }
    (acked, unknown, trail)
}

/// One consumer: takes `jq`'s messages through a random node, acking
/// each, reconnecting after a failure, until told to stop. Returns what it
/// was given (duplicates included), and how often a publisher's message
/// came first-hand (not redelivered) after a later one of the same
/// publisher on the same channel.
async fn consumer(
    urls: Vec<String>,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<String>, usize, Trail) {
    let mut out_of_order = 0;
    let mut trail = Trail::new();
    use futures_lite::StreamExt;
    use lapin::options::BasicConsumeOptions;
    let mut rng = Rng(seed | 1);
    let mut got = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let node = rng.below(urls.len());
        let url = &urls[node];
        let opened = tokio::time::timeout(Duration::from_secs(3), async {
            let c = lapin::Connection::connect(url, Default::default()).await?;
            let ch = c.create_channel().await?;
            ch.basic_qos(20, Default::default()).await?;
            let cons = ch
                .basic_consume(
                    "jq".into(),
                    "chk".into(),
                    BasicConsumeOptions::default(),
                    Default::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((c, ch, cons))
        })
        .await;
        let Ok(Ok((_c, _ch, mut cons))) = opened else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // Stay on this node a while, then move.
        let until = Instant::now() + Duration::from_millis(2000 + rng.below(3000) as u64);
        let mut last: std::collections::HashMap<String, u64> = Default::default();
        while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(500), cons.next()).await {
                Ok(Some(Ok(d))) => {
                    let body = String::from_utf8_lossy(&d.data).into_owned();
                    if let (false, Some((p, k))) = (d.redelivered, body.split_once('-')) {
                        let k: u64 = k.parse().unwrap_or(0);
                        let prev = last.insert(p.to_owned(), k);
                        if let Some(prev) = prev.filter(|prev| k < *prev) {
                            out_of_order += 1;
                            eprintln!(
                                "out of order through p{node} at {}: {body} after {p}-{prev}",
                                stamp()
                            );
                        }
                    }
                    if d.ack(Default::default()).await.is_ok() {
                        trail.insert(body.clone(), (node, stamp()));
                        got.push(body);
                    }
                }
                Ok(_) => break, // cancelled or failed: another node
                Err(_) => {}    // nothing for now
            }
        }
    }
    (got, out_of_order, trail)
}

/// Runs of consecutive lost messages of one publisher ("pC-K" bodies):
/// (first, last, how many), in order.
fn lost_runs<'a>(lost: &[&'a String]) -> Vec<(&'a String, &'a String, usize)> {
    let key = |m: &String| {
        let (p, k) = m.split_once('-').unwrap_or((m, "0"));
        (p.to_owned(), k.parse::<u64>().unwrap_or(0))
    };
    let mut sorted: Vec<&String> = lost.to_vec();
    sorted.sort_by_key(|m| key(m));
    let mut runs: Vec<(&String, &String, usize)> = Vec::new();
    for m in sorted {
        let (p, k) = key(m);
        match runs.last_mut() {
            // (Gaps of one, every other message, count as one run.)
            Some((_, last, n)) if key(last).0 == p && k <= key(last).1 + 2 => {
                *last = m;
                *n += 1;
            }
            _ => runs.push((m, m, 1)),
        }
    }
    runs
}

/// The queue checker: publishers and a consumer use a durable queue of
/// node 0 through random nodes while a random schedule kills, restarts,
/// cuts off and heals nodes (node 0 included); then everything is healed
/// and the queue drained through node 0. Every confirmed message must have
/// been consumed or be drained (lost: none), and nothing else may appear
/// (unexpected: none); duplicates (a delivery whose ack did not arrive,
/// given again) are counted, allowed as in any at-least-once broker.
#[test]
fn confirmed_messages_survive_kills_and_partitions_through_any_node() {
    queue_checker(false);
}

/// The queue checker on a quorum queue of all three nodes: kills and
/// partitions of its leader and followers, its leader moving, and still
/// nothing confirmed lost; on each consumer channel, each publisher's
/// messages that are not redeliveries also come in the order they were
/// published.
#[test]
fn a_quorum_queue_loses_nothing_confirmed_through_kills_and_partitions() {
    queue_checker(true);
}

fn queue_checker(quorum: bool) {
    let n = 3;
    let Some((mut net, _)) = formed(n) else {
        return;
    };
    let seed = checker_seed();
    let kind = if quorum { "quorum" } else { "classic" };
    eprintln!("{kind} queue checker seed {seed} (WARREN_CHECKER_SEED to repeat)");
    let mut rng = Rng(seed);
    let urls: Vec<String> = (0..n).map(|i| amqp_url(&net, i)).collect();
    // The queue (a classic one on node 0), known everywhere.
    let body = match quorum {
        true => json!({"durable": true, "arguments": {"x-queue-type": "quorum"}}),
        false => json!({"durable": true}),
    };
    eventually("jq declared", Duration::from_secs(30), || {
        matches!(
            call(&net, 0, "PUT", "/api/queues/%2F/jq", Some(body.clone())).0,
            201 | 204
        )
    });
    for i in 0..n {
        eventually("jq everywhere", Duration::from_secs(30), || {
            call(&net, i, "GET", "/api/queues/%2F/jq", None).0 == 200
        });
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pubs: Vec<_> = (0..3u64)
        .map(|c| {
            let (urls, stop) = (urls.clone(), stop.clone());
            let s = seed.wrapping_mul(c + 11);
            std::thread::spawn(move || block_on(publisher(c, urls, s, stop)))
        })
        .collect();
    let cons = {
        let (urls, stop) = (urls.clone(), stop.clone());
        let s = seed.wrapping_mul(5);
        std::thread::spawn(move || block_on(consumer(urls, s, stop)))
    };

    let (mut events, mut times) = (Vec::new(), Vec::new());
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..5 {
        let i = rng.below(n);
        if rng.below(2) == 0 {
            let at = stamp();
            net.kill(i);
            std::thread::sleep(Duration::from_millis(500 + rng.below(2000) as u64));
            net.start(i, n);
            events.push(format!("kill+restart p{i}"));
            times.push(format!("killed p{i} at {at}, restarted at {}", stamp()));
        } else {
            let at = stamp();
            net.isolate(i, n, true);
            std::thread::sleep(Duration::from_millis(1000 + rng.below(3000) as u64));
            net.isolate(i, n, false);
            events.push(format!("cut+heal p{i}"));
            times.push(format!("cut p{i} off at {at}, healed at {}", stamp()));
        }
        std::thread::sleep(Duration::from_millis(1500 + rng.below(1500) as u64));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut unknown, mut confirmed_at) = (Vec::new(), Vec::new(), Trail::new());
    for p in pubs {
        let (a, u, t) = p.join().expect("a publisher");
        acked.extend(a);
        unknown.extend(u);
        confirmed_at.extend(t);
    }
    let (consumed, out_of_order, consumed_at) = cons.join().expect("the consumer");

    // Healed: whatever is left (unacked deliveries come back once their
    // channels are closed or their leases run out), drained on node 0.
    let mut drained = Vec::new();
    let mut quiet_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(90);
    while quiet_since.elapsed() < Duration::from_secs(20) && Instant::now() < deadline {
        let got = block_on(async {
            let c = lapin::Connection::connect(&urls[0], Default::default())
                .await
                .ok()?;
            let ch = c.create_channel().await.ok()?;
            let mut out = Vec::new();
            while let Ok(Some(m)) = ch
                .basic_get(
                    "jq".into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
            {
                out.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
            }
            Some(out)
        });
        match got {
            Some(v) if !v.is_empty() => {
                drained.extend(v);
                quiet_since = Instant::now();
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    let asked: std::collections::BTreeSet<&String> = acked.iter().chain(&unknown).collect();
    let mut seen: std::collections::BTreeMap<&String, usize> = Default::default();
    for m in consumed.iter().chain(&drained) {
        *seen.entry(m).or_default() += 1;
    }
    let lost: Vec<&String> = acked.iter().filter(|m| !seen.contains_key(m)).collect();
    let unexpected = seen.keys().filter(|m| !asked.contains(*m)).count();
    let duplicated = seen.values().filter(|n| **n > 1).count();
    let recovered = unknown.iter().filter(|m| seen.contains_key(m)).count();
    eprintln!(
        "{kind} queue checker: schedule {events:?}; {} published, {} confirmed, {} unknown ({} of them \
         delivered); {} consumed, {} drained; lost {}, duplicated {duplicated}, unexpected {unexpected}, \
         out of order {out_of_order}",
        asked.len(),
        acked.len(),
        unknown.len(),
        recovered,
        consumed.len(),
        drained.len(),
        lost.len(),
    );
    assert!(
        acked.len() > 20,
        "too few confirmed messages to mean anything"
    );
    if !lost.is_empty() {
        eprintln!("{}", times.join("; "));
        // Each run of lost messages of a publisher: where and when its
        // first and last were confirmed, and what was consumed last before.
        let runs = lost_runs(&lost);
        for (first, last, count) in runs {
            let at = |m: &String| {
                confirmed_at
                    .get(m)
                    .map_or("?".into(), |(n, t)| format!("through p{n} at {t}"))
            };
            eprintln!(
                "lost {count}: {first} (confirmed {}) .. {last} (confirmed {})",
                at(first),
                at(last)
            );
        }
        let mut eaten: Vec<(&String, &(usize, String))> = consumed_at.iter().collect();
        eaten.sort_by(|a, b| a.1 .1.cmp(&b.1 .1));
        let tail: Vec<String> = eaten
            .iter()
            .rev()
            .take(5)
            .map(|(m, (n, t))| format!("{m} through p{n} at {t}"))
            .collect();
        eprintln!("consumed last: {tail:?}");
        // What each node says of the queue: where the missing ones may be.
        for i in 0..n {
            eprintln!(
                "node {i}: {}",
                call(&net, i, "GET", "/api/queues/%2F/jq", None).1
            );
        }
    }
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert_eq!(unexpected, 0);
    if quorum {
        assert_eq!(out_of_order, 0, "a publisher's messages out of order");
    }
}
