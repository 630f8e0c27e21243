//! `warrenctl`: Warren's admin CLI. rabbitmqctl's verbs and column names,
//! spoken over the management HTTP API (so it works from any machine that
//! reaches the API, and against RabbitMQ too).
//!
//! Settings come from flags, then `WARRENCTL_*` environment variables, then
//! `~/.warrenctl.toml` (keys as the flags: `host`, `port`, `username`,
//! `password`, `vhost`), then the defaults.
//!
//! Exit codes, for scripts: 0 done; 1 the broker refused the request (its
//! reason is printed); 2 bad usage; 3 no such object; 69 the API cannot be
//! reached; 77 the credentials were refused or lack the rights.

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use std::io::Read;
use std::process::ExitCode;

mod table;

#[derive(Parser)]
#[command(
    name = "warrenctl",
    version,
    about = "Administer a Warren broker (rabbitmqctl's verbs, over the management API)"
)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    /// Output: aligned tables (default) or JSON for scripts.
    #[arg(long, global = true, default_value = "table", value_parser = ["table", "json"])]
    format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Conn {
    /// The broker's management API host.
    #[arg(long, global = true, env = "WARRENCTL_HOST")]
    host: Option<String>,
    /// The management API port.
    #[arg(long, global = true, env = "WARRENCTL_PORT")]
    port: Option<u16>,
    #[arg(long, global = true, env = "WARRENCTL_USERNAME")]
    username: Option<String>,
    #[arg(
        long,
        global = true,
        env = "WARRENCTL_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,
    /// The vhost a command works in (rabbitmqctl's -p).
    #[arg(long, short = 'p', global = true, env = "WARRENCTL_VHOST")]
    vhost: Option<String>,
    /// Talk HTTPS (a broker started with --management-tls true).
    #[arg(long, global = true, env = "WARRENCTL_TLS")]
    tls: bool,
    /// With --tls: trust the CA certificates in this PEM file (default:
    /// the Mozilla roots).
    #[arg(long, global = true, env = "WARRENCTL_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
}

/// rabbitmqctl's verb names: `list_queues`, `add_user`, ...
#[derive(Subcommand)]
#[command(rename_all = "snake_case")]
enum Cmd {
    /// The node: product, version, listeners, totals, alarms.
    Status,
    /// The cluster as this node sees it: its members (disk nodes), those
    /// that answer (running nodes), the metadata leader, alarms.
    ClusterStatus,
    /// Remove a member from the cluster (run it on another member).
    ForgetClusterNode {
        node: String,
    },
    /// Join the cluster of the node at PEER (its cluster address,
    /// HOST:PORT). Run it on the node that joins: it must be in no cluster
    /// but its own; its users, vhosts and policies become the cluster's.
    JoinCluster {
        peer: String,
    },
    /// Add NODE as a member of quorum queue QUEUE (-p its vhost), as
    /// `rabbitmq-queues add_member`: it catches up, then votes.
    AddMember {
        queue: String,
        node: String,
    },
    /// Remove NODE from quorum queue QUEUE's members, as
    /// `rabbitmq-queues delete_member`.
    DeleteMember {
        queue: String,
        node: String,
    },
    /// Move quorum queue leaders so every node leads its share, as
    /// `rabbitmq-queues rebalance quorum` (TYPE: quorum or all).
    Rebalance {
        #[arg(value_name = "TYPE")]
        kind: String,
    },
    /// Queues of the vhost: columns among name, messages, messages_ready,
    /// messages_unacknowledged, consumers, durable, auto_delete, exclusive,
    /// arguments, policy, vhost.
    ListQueues {
        columns: Vec<String>,
    },
    /// Exchanges: name, type, durable, auto_delete, internal, arguments, policy.
    ListExchanges {
        columns: Vec<String>,
    },
    /// Bindings: source_name, source_kind, destination_name,
    /// destination_kind, routing_key, arguments.
    ListBindings {
        columns: Vec<String>,
    },
    /// Connections: name, user, vhost, peer_host, peer_port, state,
    /// channels, ssl, connected_at, protocol.
    ListConnections {
        columns: Vec<String>,
    },
    /// Channels: name, number, user, vhost, consumer_count,
    /// messages_unacknowledged, prefetch_count, global_prefetch_count,
    /// confirm, transactional.
    ListChannels {
        columns: Vec<String>,
    },
    /// Consumers in the vhost: queue_name, channel_name, consumer_tag,
    /// ack_required, prefetch_count, exclusive, active, arguments.
    ListConsumers {
        columns: Vec<String>,
    },
    ListUsers,
    ListVhosts {
        columns: Vec<String>,
    },
    /// Permissions in the vhost.
    ListPermissions,
    /// Policies in the vhost.
    ListPolicies,
    AddUser {
        name: String,
        #[arg(value_name = "PASSWORD")]
        new_password: String,
        /// Tags, comma-separated (administrator, monitoring, ...).
        #[arg(long, default_value = "")]
        tags: String,
    },
    DeleteUser {
        name: String,
    },
    ChangePassword {
        name: String,
        #[arg(value_name = "PASSWORD")]
        new_password: String,
    },
    /// Replace a user's tags (none: no tags).
    SetUserTags {
        name: String,
        tags: Vec<String>,
    },
    AddVhost {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete a vhost with everything in it; its connections are closed.
    DeleteVhost {
        name: String,
    },
    SetPermissions {
        user: String,
        configure: String,
        write: String,
        read: String,
    },
    ClearPermissions {
        user: String,
    },
    SetTopicPermissions {
        user: String,
        exchange: String,
        write: String,
        read: String,
    },
    SetPolicy {
        name: String,
        pattern: String,
        /// The definition, JSON: '{"max-length": 1000}'.
        definition: String,
        #[arg(long, default_value_t = 0)]
        priority: i64,
        #[arg(long = "apply-to", default_value = "all")]
        apply_to: String,
    },
    ClearPolicy {
        name: String,
    },
    /// The vhost's limits, JSON: '{"max-connections": 100, "max-queues": 10}'
    /// (a limit not named is cleared).
    SetVhostLimits {
        limits: String,
    },
    /// A user's limits, JSON: '{"max-connections": 10, "max-channels": 50}'.
    SetUserLimits {
        user: String,
        limits: String,
    },
    PurgeQueue {
        name: String,
    },
    DeleteQueue {
        name: String,
        #[arg(long = "if-unused")]
        if_unused: bool,
        #[arg(long = "if-empty")]
        if_empty: bool,
    },
    /// Close a connection (its name as list_connections shows it).
    CloseConnection {
        name: String,
        reason: String,
    },
    /// Write the definitions (RabbitMQ's JSON) to FILE, or - for stdout.
    ExportDefinitions {
        file: String,
    },
    /// Import definitions from FILE, or - for stdin.
    ImportDefinitions {
        file: String,
    },
}

/// How a command failed, and the exit code that says so.
#[derive(Debug)]
enum Failure {
    Refused(String),
    Usage(String),
    NotFound(String),
    Unreachable(String),
    Credentials(String),
}

impl Failure {
    fn exit(&self) -> (u8, &str) {
        match self {
            Failure::Refused(m) => (1, m),
            Failure::Usage(m) => (2, m),
            Failure::NotFound(m) => (3, m),
            Failure::Unreachable(m) => (69, m),
            Failure::Credentials(m) => (77, m),
        }
    }
}

type Res<T = ()> = Result<T, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let (code, msg) = f.exit();
            eprintln!("Error: {msg}");
            ExitCode::from(code)
        }
    }
}

/// The connection settings after the file and the defaults.
struct Client {
    base: String,
    auth: String,
    vhost: String,
    agent: ureq::Agent,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConf {
    host: Option<String>,
    port: Option<u16>,
    username: Option<String>,
    password: Option<String>,
    vhost: Option<String>,
    tls: Option<bool>,
    tls_ca: Option<std::path::PathBuf>,
}

fn file_conf() -> Res<FileConf> {
    let Some(home) = std::env::var_os("HOME") else {
        return Ok(FileConf::default());
    };
    let path = std::path::Path::new(&home).join(".warrenctl.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            toml::from_str(&text).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
        }
        Err(_) => Ok(FileConf::default()),
    }
}

/// Percent-encode one path segment.
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Client {
    fn new(c: Conn) -> Res<Client> {
        use base64::Engine;
        let f = file_conf()?;
        let host = c.host.or(f.host).unwrap_or_else(|| "127.0.0.1".into());
        let port = c.port.or(f.port).unwrap_or(15672);
        let user = c.username.or(f.username).unwrap_or_else(|| "guest".into());
        let pass = c.password.or(f.password).unwrap_or_else(|| "guest".into());
        let vhost = c.vhost.or(f.vhost).unwrap_or_else(|| "/".into());
        let tls = c.tls || f.tls.unwrap_or(false);
        let mut tls_config = ureq::tls::TlsConfig::builder();
        if let Some(ca) = c.tls_ca.or(f.tls_ca) {
            let pem = std::fs::read(&ca)
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", ca.display())))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(Failure::Usage(format!(
                    "{}: no certificate in it",
                    ca.display()
                )));
            }
            tls_config =
                tls_config.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .tls_config(tls_config.build())
            .build()
            .into();
        let scheme = if tls { "https" } else { "http" };
        Ok(Client {
            base: format!("{scheme}://{host}:{port}/api/"),
            auth: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            ),
            vhost,
            agent,
        })
    }

    fn v(&self) -> String {
        seg(&self.vhost)
    }

    /// A request; the body of a 2xx answer (JSON, or null when empty).
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Res<Value> {
        let url = format!("{}{path}", self.base);
        let sent = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.auth)
                .call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.auth)
                .call(),
            (m, b) => {
                let text = b.map(|b| b.to_string()).unwrap_or_default();
                let req = if m == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                req.header("Authorization", &self.auth)
                    .header("Content-Type", "application/json")
                    .send(text)
            }
        };
        let mut resp = sent.map_err(|e| {
            Failure::Unreachable(format!(
                "cannot reach the management API at {}: {e}",
                self.base
            ))
        })?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let reason = || {
            parsed["reason"]
                .as_str()
                .map(|r| r.trim().to_owned())
                .unwrap_or_else(|| format!("HTTP {status}"))
        };
        match status {
            200..=299 => Ok(parsed),
            401 | 403 => Err(Failure::Credentials(format!(
                "{} (user refused or not allowed)",
                reason()
            ))),
            404 => Err(Failure::NotFound(format!(
                "{method} {path}: no such object"
            ))),
            _ => Err(Failure::Refused(reason())),
        }
    }
}

fn run(cli: Cli) -> Res {
    let c = Client::new(cli.conn)?;
    let json_out = cli.format == "json";
    let show = |rows: Value, columns: &[String], defaults: &[&str]| -> Res {
        let cols: Vec<String> = if columns.is_empty() {
            defaults.iter().map(|s| s.to_string()).collect()
        } else {
            columns.to_vec()
        };
        table::check(&cols, &rows).map_err(Failure::Usage)?;
        let rows = rows.as_array().cloned().unwrap_or_default();
        table::print(&rows, &cols, json_out).map_err(Failure::Usage)
    };
    let v = c.v();
    match cli.cmd {
        Cmd::Status => {
            let o = c.call("GET", "overview", None)?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&o).unwrap_or_default());
                return Ok(());
            }
            println!(
                "Product: {} {}",
                o["product_name"].as_str().unwrap_or("?"),
                o["product_version"].as_str().unwrap_or("?")
            );
            println!("Node: {}", o["node"].as_str().unwrap_or("?"));
            println!(
                "RabbitMQ API version: {}",
                o["rabbitmq_version"].as_str().unwrap_or("?")
            );
            for l in o["listeners"].as_array().into_iter().flatten() {
                println!(
                    "Listener: {} on {}:{}",
                    l["protocol"].as_str().unwrap_or("?"),
                    l["ip_address"].as_str().unwrap_or("?"),
                    l["port"]
                );
            }
            let t = &o["object_totals"];
            println!(
                "Totals: {} connections, {} channels, {} queues, {} exchanges, {} consumers",
                t["connections"], t["channels"], t["queues"], t["exchanges"], t["consumers"]
            );
            let q = &o["queue_totals"];
            println!(
                "Messages: {} ({} ready, {} unacknowledged)",
                q["messages"], q["messages_ready"], q["messages_unacknowledged"]
            );
            Ok(())
        }
        Cmd::ClusterStatus => {
            let nodes = c.call("GET", "nodes", None)?;
            let nodes = nodes.as_array().cloned().unwrap_or_default();
            let names = |keep: &dyn Fn(&Value) -> bool| -> Vec<String> {
                nodes
                    .iter()
                    .filter(|n| keep(n))
                    .filter_map(|n| n["name"].as_str().map(str::to_owned))
                    .collect()
            };
            let disk = names(&|_| true);
            let running = names(&|n| n["running"] == json!(true));
            let leader = names(&|n| n["metadata_leader"] == json!(true)).pop();
            let me = nodes.first().cloned().unwrap_or(Value::Null);
            let alarms: Vec<String> = nodes
                .iter()
                .flat_map(|n| {
                    let name = n["name"].as_str().unwrap_or("?");
                    [("mem_alarm", "memory"), ("disk_free_alarm", "disk")]
                        .into_iter()
                        .filter(|(k, _)| n[*k] == json!(true))
                        .map(move |(_, what)| format!("{what} alarm on node {name}"))
                })
                .collect();
            if json_out {
                let out = json!({
                    "node": me["name"],
                    "disk_nodes": disk,
                    "running_nodes": running,
                    "metadata_leader": leader,
                    "raft": me.get("raft").cloned().unwrap_or(Value::Null),
                    "alarms": alarms,
                });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                return Ok(());
            }
            println!(
                "Cluster status of node {} ...",
                me["name"].as_str().unwrap_or("?")
            );
            let section = |title: &str, lines: &[String]| {
                println!("\n{title}\n");
                if lines.is_empty() {
                    println!("(none)");
                }
                for l in lines {
                    println!("{l}");
                }
            };
            section("Disk Nodes", &disk);
            section("Running Nodes", &running);
            let leader_line: Vec<String> = match (&leader, me.get("raft")) {
                (Some(l), Some(r)) => vec![format!("{l} (term {})", r["term"])],
                (Some(l), None) => vec![l.clone()],
                (None, Some(_)) => vec!["none elected".into()],
                // A node on its own: no Raft group.
                (None, None) => vec!["(not clustered)".into()],
            };
            section("Metadata Leader", &leader_line);
            section("Alarms", &alarms);
            Ok(())
        }
        Cmd::ListQueues { columns } => {
            let rows = c.call("GET", &format!("queues/{v}"), None)?;
            show(rows, &columns, &["name", "messages"])
        }
        Cmd::ListExchanges { columns } => {
            let mut rows = c.call("GET", &format!("exchanges/{v}"), None)?;
            for r in rows.as_array_mut().into_iter().flatten() {
                if r["name"] == "" {
                    r["name"] = json!("amq.default");
                }
            }
            show(rows, &columns, &["name", "type"])
        }
        Cmd::ListBindings { columns } => {
            let mut rows = c.call("GET", &format!("bindings/{v}"), None)?;
            for r in rows.as_array_mut().into_iter().flatten() {
                let m = r.as_object_mut().expect("a binding object");
                let get = |k: &str| m.get(k).cloned().unwrap_or(Value::Null);
                let (s, d, dt) = (get("source"), get("destination"), get("destination_type"));
                m.insert("source_name".into(), s);
                m.insert("source_kind".into(), json!("exchange"));
                m.insert("destination_name".into(), d);
                m.insert("destination_kind".into(), dt);
            }
            show(
                rows,
                &columns,
                &[
                    "source_name",
                    "source_kind",
                    "destination_name",
                    "destination_kind",
                    "routing_key",
                    "arguments",
                ],
            )
        }
        Cmd::ListConnections { columns } => {
            let rows = c.call("GET", "connections", None)?;
            show(
                rows,
                &columns,
                &["name", "user", "vhost", "peer_host", "peer_port", "state"],
            )
        }
        Cmd::ListChannels { columns } => {
            let rows = c.call("GET", "channels", None)?;
            show(
                rows,
                &columns,
                &["name", "user", "consumer_count", "messages_unacknowledged"],
            )
        }
        Cmd::ListConsumers { columns } => {
            let mut rows = c.call("GET", &format!("consumers/{v}"), None)?;
            for r in rows.as_array_mut().into_iter().flatten() {
                let (q, ch) = (
                    r["queue"]["name"].clone(),
                    r["channel_details"]["name"].clone(),
                );
                r["queue_name"] = q;
                r["channel_name"] = ch;
            }
            show(
                rows,
                &columns,
                &[
                    "queue_name",
                    "channel_name",
                    "consumer_tag",
                    "ack_required",
                    "prefetch_count",
                    "active",
                    "arguments",
                ],
            )
        }
        Cmd::ListUsers => {
            let rows = c.call("GET", "users", None)?;
            show(rows, &[], &["name", "tags"])
        }
        Cmd::ListVhosts { columns } => {
            let rows = c.call("GET", "vhosts", None)?;
            show(rows, &columns, &["name"])
        }
        Cmd::ListPermissions => {
            let rows = c.call("GET", &format!("vhosts/{v}/permissions"), None)?;
            show(rows, &[], &["user", "configure", "write", "read"])
        }
        Cmd::ListPolicies => {
            let rows = c.call("GET", &format!("policies/{v}"), None)?;
            show(
                rows,
                &[],
                &[
                    "vhost",
                    "name",
                    "pattern",
                    "apply-to",
                    "definition",
                    "priority",
                ],
            )
        }
        Cmd::AddUser {
            name,
            new_password: password,
            tags,
        } => {
            let path = format!("users/{}", seg(&name));
            // rabbitmqctl add_user refuses an existing user.
            match c.call("GET", &path, None) {
                Ok(_) => return Err(Failure::Refused(format!("user '{name}' already exists"))),
                Err(Failure::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            c.call(
                "PUT",
                &path,
                Some(&json!({"password": password, "tags": tags})),
            )?;
            say(json_out, &format!("Added user '{name}'"))
        }
        Cmd::AddMember { queue, node } => {
            let path = format!("queues/quorum/{v}/{}/replicas/add", seg(&queue));
            c.call("POST", &path, Some(&json!({ "node": node })))
                .map_err(|e| not_found_as(e, format!("queue '{queue}' does not exist")))?;
            say(json_out, &format!("Added {node} to quorum queue '{queue}'"))
        }
        Cmd::DeleteMember { queue, node } => {
            let path = format!("queues/quorum/{v}/{}/replicas/delete", seg(&queue));
            c.call("POST", &path, Some(&json!({ "node": node })))
                .map_err(|e| not_found_as(e, format!("queue '{queue}' does not exist")))?;
            say(
                json_out,
                &format!("Removed {node} from quorum queue '{queue}'"),
            )
        }
        Cmd::Rebalance { kind } => {
            if kind != "quorum" && kind != "all" {
                return Err(Failure::Refused(format!(
                    "cannot rebalance '{kind}' queues: only quorum queues have leaders to move (quorum or all)"
                )));
            }
            let moves = c.call("POST", "rebalance/queues", Some(&json!({})))?;
            if json_out {
                println!("{moves}");
                return Ok(());
            }
            let list = moves.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("Every node leads its share of quorum queues already");
            }
            for m in list {
                println!(
                    "{} in vhost {}: leader {} -> {}",
                    m["name"].as_str().unwrap_or(""),
                    m["vhost"].as_str().unwrap_or(""),
                    m["from"].as_str().unwrap_or(""),
                    m["to"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Cmd::JoinCluster { peer } => {
            c.call("POST", "join-cluster", Some(&json!({ "peer": peer })))?;
            say(json_out, &format!("Joined the cluster of {peer}"))
        }
        Cmd::ForgetClusterNode { node } => {
            c.call("DELETE", &format!("nodes/{}", seg(&node)), None)
                .map_err(|e| not_found_as(e, format!("{node} is not a member of the cluster")))?;
            say(json_out, &format!("Removed {node} from the cluster"))
        }
        Cmd::DeleteUser { name } => {
            c.call("DELETE", &format!("users/{}", seg(&name)), None)
                .map_err(|e| not_found_as(e, format!("user '{name}' does not exist")))?;
            say(json_out, &format!("Deleted user '{name}'"))
        }
        Cmd::ChangePassword {
            name,
            new_password: password,
        } => {
            let path = format!("users/{}", seg(&name));
            let u = c
                .call("GET", &path, None)
                .map_err(|e| not_found_as(e, format!("user '{name}' does not exist")))?;
            c.call(
                "PUT",
                &path,
                Some(&json!({"password": password, "tags": u["tags"]})),
            )?;
            say(json_out, &format!("Changed the password of user '{name}'"))
        }
        Cmd::SetUserTags { name, tags } => {
            let path = format!("users/{}", seg(&name));
            let u = c
                .call("GET", &path, None)
                .map_err(|e| not_found_as(e, format!("user '{name}' does not exist")))?;
            c.call(
                "PUT",
                &path,
                Some(&json!({"password_hash": u["password_hash"], "hashing_algorithm": u["hashing_algorithm"], "tags": tags})),
            )?;
            say(
                json_out,
                &format!("Set the tags of user '{name}' to {tags:?}"),
            )
        }
        Cmd::AddVhost { name, description } => {
            c.call(
                "PUT",
                &format!("vhosts/{}", seg(&name)),
                Some(&json!({"description": description})),
            )?;
            say(json_out, &format!("Added vhost '{name}'"))
        }
        Cmd::DeleteVhost { name } => {
            c.call("DELETE", &format!("vhosts/{}", seg(&name)), None)
                .map_err(|e| not_found_as(e, format!("vhost '{name}' does not exist")))?;
            say(json_out, &format!("Deleted vhost '{name}'"))
        }
        Cmd::SetPermissions {
            user,
            configure,
            write,
            read,
        } => {
            c.call(
                "PUT",
                &format!("permissions/{v}/{}", seg(&user)),
                Some(&json!({"configure": configure, "write": write, "read": read})),
            )?;
            say(
                json_out,
                &format!("Set permissions for user '{user}' in vhost '{}'", c.vhost),
            )
        }
        Cmd::ClearPermissions { user } => {
            c.call("DELETE", &format!("permissions/{v}/{}", seg(&user)), None)
                .map_err(|e| {
                    not_found_as(
                        e,
                        format!("user '{user}' has no permissions in vhost '{}'", c.vhost),
                    )
                })?;
            say(
                json_out,
                &format!(
                    "Cleared permissions for user '{user}' in vhost '{}'",
                    c.vhost
                ),
            )
        }
        Cmd::SetTopicPermissions {
            user,
            exchange,
            write,
            read,
        } => {
            c.call(
                "PUT",
                &format!("topic-permissions/{v}/{}", seg(&user)),
                Some(&json!({"exchange": exchange, "write": write, "read": read})),
            )?;
            say(
                json_out,
                &format!("Set topic permissions on '{exchange}' for user '{user}'"),
            )
        }
        Cmd::SetPolicy {
            name,
            pattern,
            definition,
            priority,
            apply_to,
        } => {
            let def: Value = serde_json::from_str(&definition)
                .map_err(|e| Failure::Usage(format!("the definition is not JSON: {e}")))?;
            c.call(
                "PUT",
                &format!("policies/{v}/{}", seg(&name)),
                Some(&json!({"pattern": pattern, "definition": def, "priority": priority, "apply-to": apply_to})),
            )?;
            say(
                json_out,
                &format!("Set policy '{name}' in vhost '{}'", c.vhost),
            )
        }
        Cmd::ClearPolicy { name } => {
            c.call("DELETE", &format!("policies/{v}/{}", seg(&name)), None)
                .map_err(|e| {
                    not_found_as(
                        e,
                        format!("policy '{name}' does not exist in vhost '{}'", c.vhost),
                    )
                })?;
            say(
                json_out,
                &format!("Cleared policy '{name}' in vhost '{}'", c.vhost),
            )
        }
        Cmd::SetVhostLimits { limits } => {
            set_limits(&c, &format!("vhost-limits/{v}"), &limits)?;
            say(json_out, &format!("Set the limits of vhost '{}'", c.vhost))
        }
        Cmd::SetUserLimits { user, limits } => {
            set_limits(&c, &format!("user-limits/{}", seg(&user)), &limits)?;
            say(json_out, &format!("Set the limits of user '{user}'"))
        }
        Cmd::PurgeQueue { name } => {
            c.call(
                "DELETE",
                &format!("queues/{v}/{}/contents", seg(&name)),
                None,
            )
            .map_err(|e| {
                not_found_as(
                    e,
                    format!("queue '{name}' does not exist in vhost '{}'", c.vhost),
                )
            })?;
            say(json_out, &format!("Purged queue '{name}'"))
        }
        Cmd::DeleteQueue {
            name,
            if_unused,
            if_empty,
        } => {
            c.call(
                "DELETE",
                &format!(
                    "queues/{v}/{}?if-unused={if_unused}&if-empty={if_empty}",
                    seg(&name)
                ),
                None,
            )
            .map_err(|e| {
                not_found_as(
                    e,
                    format!("queue '{name}' does not exist in vhost '{}'", c.vhost),
                )
            })?;
            say(json_out, &format!("Deleted queue '{name}'"))
        }
        Cmd::CloseConnection { name, reason } => {
            let url = format!("{}connections/{}", c.base, seg(&name));
            let resp = c
                .agent
                .delete(&url)
                .header("Authorization", &c.auth)
                .header("X-Reason", &reason)
                .call()
                .map_err(|e| {
                    Failure::Unreachable(format!(
                        "cannot reach the management API at {}: {e}",
                        c.base
                    ))
                })?;
            match resp.status().as_u16() {
                200..=299 => say(json_out, &format!("Closed connection '{name}'")),
                404 => Err(Failure::NotFound(format!(
                    "connection '{name}' does not exist"
                ))),
                401 | 403 => Err(Failure::Credentials("user refused or not allowed".into())),
                s => Err(Failure::Refused(format!("HTTP {s}"))),
            }
        }
        Cmd::ExportDefinitions { file } => {
            let d = c.call("GET", "definitions", None)?;
            let text = serde_json::to_string_pretty(&d).unwrap_or_default();
            if file == "-" {
                println!("{text}");
                Ok(())
            } else {
                std::fs::write(&file, text + "\n")
                    .map_err(|e| Failure::Usage(format!("cannot write {file}: {e}")))?;
                say(json_out, &format!("Exported definitions to {file}"))
            }
        }
        Cmd::ImportDefinitions { file } => {
            let mut text = String::new();
            if file == "-" {
                std::io::stdin()
                    .read_to_string(&mut text)
                    .map_err(|e| Failure::Usage(format!("cannot read stdin: {e}")))?;
            } else {
                text = std::fs::read_to_string(&file)
                    .map_err(|e| Failure::Usage(format!("cannot read {file}: {e}")))?;
            }
            let d: Value = serde_json::from_str(&text)
                .map_err(|e| Failure::Usage(format!("{file} is not JSON: {e}")))?;
            c.call("POST", "definitions", Some(&d))?;
            say(json_out, &format!("Imported definitions from {file}"))
        }
    }
}

/// A 404 told as what is missing.
fn not_found_as(e: Failure, what: String) -> Failure {
    match e {
        Failure::NotFound(_) => Failure::NotFound(what),
        other => other,
    }
}

fn say(json_out: bool, text: &str) -> Res {
    if json_out {
        println!("{}", json!({"result": "ok", "message": text}));
    } else {
        println!("{text}");
    }
    Ok(())
}

/// Make `path`'s limits exactly those in `limits` (JSON object): each named
/// one set, each other one cleared.
fn set_limits(c: &Client, path: &str, limits: &str) -> Res {
    let want: serde_json::Map<String, Value> = serde_json::from_str(limits)
        .map_err(|e| Failure::Usage(format!("the limits must be a JSON object: {e}")))?;
    let current = c.call("GET", path, None)?;
    let had: Vec<String> = current
        .as_array()
        .and_then(|a| a.first())
        .and_then(|o| o["value"].as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for (k, v) in &want {
        c.call(
            "PUT",
            &format!("{path}/{}", seg(k)),
            Some(&json!({"value": v})),
        )?;
    }
    for k in had.iter().filter(|k| !want.contains_key(*k)) {
        c.call("DELETE", &format!("{path}/{}", seg(k)), None)?;
    }
    Ok(())
}
