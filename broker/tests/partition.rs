//! A network partition of the metadata group, made with network namespaces
//! this test creates (root only; skipped with a message otherwise): three
//! daemons, each in its own namespace on a bridge, addressed 10.199.N.1-3.
//! The metadata leader is cut off from the other two by blackhole routes
//! (its management API stays reachable from the bridge). The majority
//! elects a new leader and takes changes; the cut-off node refuses changes
//! with 503 and never applies one it could not commit; once the routes go,
//! it converges on the majority's state and leader.

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
    _dir: tempfile::TempDir,
}

impl Net {
    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }
    fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 199, self.subnet, i as u8 + 1)
    }

    /// Make the network: a bridge in this namespace, one namespace per node.
    fn make(nodes: usize) -> Result<Net, String> {
        let pid = std::process::id();
        let net = Net {
            tag: format!("wp{}", pid % 100_000),
            subnet: (pid % 200) as u8 + 20,
            daemons: Vec::new(),
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
        let peers = (0..nodes)
            .map(|j| format!("{}:{CLUSTER}", self.addr(j)))
            .collect::<Vec<_>>()
            .join(",");
        let dir = self._dir.path().join(format!("n{i}"));
        let log = std::fs::File::create(self._dir.path().join(format!("n{i}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i), WARREN])
            .args(["--bind", &self.addr(i).to_string(), "--log-level", "warn"])
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
            .args([
                "--node-name",
                &format!("warren@p{i}"),
                "--cluster-secret",
                "s",
            ])
            // The bridge's address is not loopback: guest may log in from it.
            .args(["--loopback-users", ""])
            .arg("--data-dir")
            .arg(&dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn warren in its namespace");
        self.daemons.push(child);
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

impl Drop for Net {
    fn drop(&mut self) {
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

#[test]
fn a_cut_off_leader_stops_taking_changes_and_catches_up_after() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: making network namespaces needs root");
        return;
    }
    let n = 3;
    let mut net = match Net::make(n) {
        Ok(net) => net,
        Err(e) => {
            eprintln!("skipped: cannot make network namespaces here: {e}");
            return;
        }
    };
    for i in 0..n {
        net.start(i, n);
    }
    let mut leader = None;
    eventually(
        "three nodes with one leader",
        Duration::from_secs(60),
        || {
            let views: Vec<_> = (0..n).map(|i| view(&net, i)).collect();
            leader = views[0].as_ref().and_then(|v| v.1.clone());
            leader.is_some()
                && views
                    .iter()
                    .all(|v| v.as_ref() == Some(&(n, leader.clone())))
        },
    );
    eventually("a first change", Duration::from_secs(30), || {
        matches!(put_user(&net, 0, "before"), 201 | 204)
    });
    let leader = leader.expect("a leader");
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
