//! The Warren daemon.

use clap::{CommandFactory, FromArgMatches, Parser};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use warren_broker::config::{parse_memory_limit, parse_size, MemoryLimit};
use warren_broker::{Config, Server};

/// Warren: an AMQP 0-9-1 message broker.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// A TOML file of settings: each key is a flag's name ("memory-limit =
    /// \"1GiB\""). Every flag may also be set by a WARREN_* environment
    /// variable (WARREN_MEMORY_LIMIT). Flags win over the environment, the
    /// environment over the file. See warren.example.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// AMQP port (plain TCP). 0 turns plain AMQP off (TLS only).
    #[arg(long, default_value_t = 5672)]
    port: u16,
    /// Management HTTP API port (RabbitMQ's API, on --bind). 0 turns it off.
    #[arg(long, default_value_t = 15672, value_name = "PORT")]
    management_port: u16,
    /// Serve the management API (and the dashboard) over HTTPS, with the
    /// AMQPS certificate (--tls-cert, --tls-key) and its client-certificate
    /// settings.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    management_tls: bool,
    /// Prometheus metrics port (/metrics, /metrics/per-object, on --bind).
    /// 0 turns it off.
    #[arg(long, default_value_t = 15692, value_name = "PORT")]
    prometheus_port: u16,
    /// AMQPS (TLS) port. Default: 5671 when a certificate is configured.
    #[arg(long, value_name = "PORT")]
    tls_port: Option<u16>,
    /// The server's certificate chain (PEM). Turns the AMQPS listener on.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Ask TLS clients for a certificate and verify it against --tls-ca
    /// (RabbitMQ's verify_peer). Verified certificates can log in with the
    /// EXTERNAL mechanism.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    tls_verify_peer: bool,
    /// With --tls-verify-peer: refuse TLS clients without a certificate.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    tls_fail_if_no_peer_cert: bool,
    /// Which part of a client certificate names the user for EXTERNAL:
    /// common_name (the subject's CN) or distinguished_name (RFC 4514).
    #[arg(long, default_value = "common_name", value_name = "PART")]
    tls_login_from: warren_broker::tls::LoginFrom,
    /// Directory for durable state.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Log format: text (colours only on a terminal) or json (one JSON
    /// object per line, with the connection's span: id, peer, name).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Largest accepted message body in bytes.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    max_message_size: u64,
    /// Most open client connections (one more is refused with 530 at
    /// connection.open). Default: what the open-file limit allows, after
    /// raising its soft limit to the hard one.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Milliseconds a delivery may stay unacknowledged before its consumer
    /// is cancelled (or, for a client that cannot take a cancel, its channel
    /// closed with 406) and its messages returned, on queues that set no
    /// `x-consumer-timeout` of their own. 0: off (the default).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    consumer_timeout: u64,
    /// Sync the write-ahead log on every write (turn off only for benchmarks).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fsync: bool,
    /// Microseconds a store write of a few persistent messages may wait
    /// for consumers' acks that make it unnecessary (a message acked before
    /// it is written is never written) and for more publishers to share its
    /// sync. Only confirms wait, never deliveries, and only while waiting
    /// has recently paid off. 0: write at once.
    #[arg(long, default_value_t = 200, value_name = "MICROSECONDS", value_parser = clap::value_parser!(u64).range(0..=100_000))]
    commit_wait: u64,
    /// Memory high watermark: publishers are blocked while the broker's
    /// resident memory is at or above it. A fraction of total memory ("0.4",
    /// "40%"; the total is MemTotal or a lower cgroup limit) or an absolute
    /// size ("512MiB", "2GB", "1073741824"). 0 blocks every publisher.
    #[arg(long, default_value = "0.4", value_parser = parse_memory_limit, value_name = "SIZE|FRACTION")]
    memory_limit: MemoryLimit,
    /// Publishers are blocked while the data directory's file system has
    /// less free space than this ("50MB", "1GiB", bytes). 0 disables.
    #[arg(long, default_value = "50MB", value_parser = parse_size, value_name = "SIZE")]
    disk_free_limit: u64,
    /// A definitions file (RabbitMQ's JSON format) to import at start:
    /// users, vhosts, permissions, exchanges, queues, bindings. Nothing that
    /// exists is overwritten; a file with an invalid item stops the start
    /// and changes nothing. A blank node given one gets no guest user.
    #[arg(long, value_name = "FILE")]
    definitions: Option<PathBuf>,
    /// Users who may connect only from loopback addresses (comma-separated;
    /// "" for none).
    #[arg(long, default_value = "guest", value_name = "USERS")]
    loopback_users: String,
    /// This node's name, unique in its cluster. Default: warren@ and the
    /// host name.
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// The cluster port (on --bind), where nodes of a cluster talk to each
    /// other: 25672 unless given. Open only on a clustered node (one given
    /// a cluster secret).
    #[arg(long, value_name = "PORT")]
    cluster_port: Option<u16>,
    /// The other initial members' cluster addresses, comma-separated
    /// (HOST:PORT,HOST:PORT). Nodes started with each other as peers form
    /// one cluster. Needs a cluster secret.
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    cluster_peers: Vec<String>,
    /// The address other nodes reach this one's cluster port at. Default:
    /// --bind and --cluster-port (give it when --bind is 0.0.0.0).
    #[arg(long, value_name = "HOST:PORT")]
    cluster_advertise: Option<String>,
    /// The secret cluster nodes authenticate each other with (as the Erlang
    /// cookie). Giving one (or --cluster-secret-file) makes the node
    /// clustered. Visible to other local users in the process list: prefer
    /// the file.
    #[arg(long, value_name = "SECRET", conflicts_with = "cluster_secret_file")]
    cluster_secret: Option<String>,
    /// A file holding the cluster secret (trailing white space ignored).
    #[arg(long, value_name = "FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// TLS between cluster nodes, with --tls-cert, --tls-key and --tls-ca:
    /// each node presents its certificate (for server and client use,
    /// naming the address peers dial) and requires the other's, chained to
    /// the CA. Every node of a cluster must have it or none.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    cluster_tls: bool,
}

/// The cluster settings the flags give: None without a secret.
fn cluster_settings(
    args: &Args,
    tls: Option<&warren_broker::tls::TlsSettings>,
) -> Result<Option<warren_broker::config::ClusterSettings>, String> {
    let secret = match (&args.cluster_secret, &args.cluster_secret_file) {
        (Some(s), _) => Some(s.as_bytes().to_vec()),
        (None, Some(f)) => {
            let raw = std::fs::read(f)
                .map_err(|e| format!("--cluster-secret-file {}: {e}", f.display()))?;
            let end = raw
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())
                .map_or(0, |i| i + 1);
            Some(raw[..end].to_vec())
        }
        (None, None) => None,
    };
    let Some(secret) = secret else {
        if !args.cluster_peers.is_empty()
            || args.cluster_advertise.is_some()
            || args.cluster_tls
            || args.cluster_port.is_some()
        {
            return Err(
                "--cluster-port, --cluster-peers, --cluster-advertise and --cluster-tls need a cluster secret (--cluster-secret or --cluster-secret-file)"
                    .into(),
            );
        }
        return Ok(None);
    };
    let tls = match (args.cluster_tls, tls) {
        (false, _) => None,
        (true, None) => return Err("--cluster-tls needs --tls-cert, --tls-key and --tls-ca".into()),
        (true, Some(t)) if t.ca.is_none() => {
            return Err("--cluster-tls needs --tls-ca (the CA nodes' certificates chain to)".into())
        }
        (true, Some(t)) => Some(t.clone()),
    };
    if secret.is_empty() {
        return Err("the cluster secret is empty".into());
    }
    for p in &args.cluster_peers {
        let ok = p
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0));
        if !ok {
            return Err(format!("--cluster-peers: '{p}' is not HOST:PORT"));
        }
    }
    if args.definitions.is_some() {
        return Err(
            "--definitions on a clustered node is not supported (the import would run before the \
             cluster is up): import the file once the cluster runs, with POST /api/definitions \
             (rabbitmqadmin definitions import)"
                .into(),
        );
    }
    let cluster_port = args.cluster_port.unwrap_or(25672);
    if cluster_port == 0 {
        return Err("--cluster-port 0: a cluster port must be fixed, peers dial it".into());
    }
    Ok(Some(warren_broker::config::ClusterSettings {
        listen: SocketAddr::new(args.bind, cluster_port),
        advertise: args.cluster_advertise.clone(),
        peers: args.cluster_peers.clone(),
        secret,
        tls,
    }))
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Write the definitions stored in a data directory (users with their
    /// password hashes, vhosts, permissions, durable exchanges, queues and
    /// bindings) in RabbitMQ's JSON format. The broker must be stopped.
    ExportDefinitions {
        /// The broker's data directory.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Where to write them ("-": standard output).
        #[arg(default_value = "-")]
        file: PathBuf,
    },
}

/// `warren export-definitions`.
fn export_definitions(data_dir: &std::path::Path, file: &std::path::Path) -> Result<(), String> {
    use warren_storage::MetaStore;
    let store_dir = data_dir.join("store");
    if !store_dir.exists() {
        return Err(format!("{} holds no Warren store", data_dir.display()));
    }
    let store = warren_storage_rocksdb::RocksStore::open(&store_dir, true)
        .map_err(|e| format!("cannot open {}: {e}", store_dir.display()))?;
    let (state, _) = warren_broker::access::read_state(&store)?;
    let defs = store
        .load()
        .map_err(|e| format!("cannot read definitions: {e}"))?;
    let json = warren_broker::definitions::export(&state, &defs);
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    if file.as_os_str() == "-" {
        println!("{text}");
        Ok(())
    } else {
        std::fs::write(file, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", file.display()))
    }
}

/// Parse the flags over the environment over the config file.
fn parse_args() -> Result<Args, String> {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cmd = warren_broker::config_file::with_env(Args::command());
    if let Some(path) = warren_broker::config_file::config_path(&raw) {
        cmd = warren_broker::config_file::apply_file(cmd, &path)?;
    }
    let matches = cmd.get_matches_from(raw);
    Ok(Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("warren: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(Command::ExportDefinitions { data_dir, file }) = &args.command {
        return match export_definitions(data_dir, file) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("warren export-definitions: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level).unwrap_or_else(|e| {
        eprintln!(
            "warren: bad --log-level '{}': {e}; using info",
            args.log_level
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    // openraft warns of routine Raft events (a vote superseded, a stale
    // reply); its errors still show. A filter that names it decides.
    let filter = match args.log_level.contains("openraft") {
        true => filter,
        false => filter.add_directive("openraft=error".parse().expect("a valid directive")),
    };
    // Colours only for a terminal; JSON lines for log shippers.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if args.log_format == "json" {
        fmt.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        fmt.init();
    }

    if let Err(e) = std::fs::create_dir_all(&args.data_dir) {
        eprintln!(
            "warren: cannot create data directory {}: {e}",
            args.data_dir.display()
        );
        return std::process::ExitCode::FAILURE;
    }
    if args.max_message_size == 0 || args.max_message_size > 512 * 1024 * 1024 {
        eprintln!("warren: --max-message-size must be between 1 and 536870912 bytes");
        return std::process::ExitCode::FAILURE;
    }
    let memory_limit = match args.memory_limit.resolve() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("warren: --memory-limit: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let max_connections = match connection_capacity() {
        Some(capacity) => {
            let n = args.max_connections.unwrap_or(capacity);
            if n > capacity {
                tracing::warn!(
                    max_connections = n,
                    capacity,
                    "--max-connections is above what the open-file limit allows"
                );
            }
            n
        }
        None => args.max_connections.unwrap_or(65536),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(warren_broker::config::TlsListener {
            listen: SocketAddr::new(args.bind, args.tls_port.unwrap_or(5671)),
            settings: warren_broker::tls::TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                ca: args.tls_ca.clone(),
                verify_peer: args.tls_verify_peer,
                fail_if_no_peer_cert: args.tls_fail_if_no_peer_cert,
                login_from: args.tls_login_from,
            },
        }),
        _ => None,
    };
    if tls.is_none() && (args.tls_port.is_some() || args.tls_ca.is_some() || args.tls_verify_peer) {
        eprintln!(
            "warren: --tls-port, --tls-ca and --tls-verify-peer need --tls-cert and --tls-key"
        );
        return std::process::ExitCode::FAILURE;
    }
    let cluster = match cluster_settings(&args, tls.as_ref().map(|t| &t.settings)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let node_name = match args.node_name.clone() {
        Some(n) if n.trim().is_empty() || n.len() > 255 => {
            eprintln!("warren: --node-name must be 1 to 255 characters");
            return std::process::ExitCode::FAILURE;
        }
        Some(n) => n,
        None => warren_broker::config::default_node_name(),
    };
    if args.port == 0 && tls.is_none() {
        eprintln!("warren: --port 0 turns plain AMQP off, and no TLS listener is configured (--tls-cert, --tls-key)");
        return std::process::ExitCode::FAILURE;
    }
    let config = Config {
        listen: SocketAddr::new(args.bind, args.port),
        plain: args.port != 0,
        tls,
        management: (args.management_port != 0)
            .then(|| SocketAddr::new(args.bind, args.management_port)),
        management_tls: args.management_tls,
        prometheus: (args.prometheus_port != 0)
            .then(|| SocketAddr::new(args.bind, args.prometheus_port)),
        data_dir: args.data_dir,
        max_message_size: args.max_message_size,
        max_connections: max_connections.max(1),
        fsync: args.fsync,
        commit_wait: std::time::Duration::from_micros(args.commit_wait),
        consumer_timeout: (args.consumer_timeout > 0).then_some(args.consumer_timeout),
        memory_limit,
        disk_free_limit: args.disk_free_limit,
        definitions: args.definitions,
        loopback_users: args
            .loopback_users
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect(),
        node_name,
        cluster,
        ..Config::default()
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(4 << 20)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut store_threads = None;
    let code = rt.block_on(async {
        // Before the listeners open: a SIGTERM that comes while the broker
        // starts stops it cleanly instead of killing it.
        let signal = shutdown_signal();
        let server = match Server::bind(config.clone()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("warren: cannot start on {}: {e}", config.listen);
                return std::process::ExitCode::FAILURE;
            }
        };
        store_threads = Some(server.store_threads());
        let addr = server.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "off".into());
        let tls_addr = server.tls_local_addr().map(|a| a.to_string()).unwrap_or_else(|| "off".into());
        tracing::info!(%addr, %tls_addr, data_dir = %config.data_dir.display(), "Warren {} listening on {addr} (AMQPS: {tls_addr})", env!("CARGO_PKG_VERSION"));
        server.run(signal).await;
        std::process::ExitCode::SUCCESS
    });
    // Dropping the runtime drops every queue and connection task, and with
    // them every handle on the store; its threads then finish their last
    // writes and close RocksDB. Exiting before that lets the exit handlers
    // tear RocksDB down under its own background threads (an abort).
    drop(rt);
    if let Some(t) = store_threads {
        if !t.join(std::time::Duration::from_secs(30)) {
            // Confirmed writes are in the WAL already; skip the exit
            // handlers rather than crash in them.
            tracing::warn!("message store still busy after 30 s; exiting without closing it");
            // SAFETY: _exit ends the process at once; nothing runs after it.
            unsafe { libc::_exit(1) };
        }
    }
    tracing::info!("stopped");
    code
}

/// Raise the soft open-file limit to the hard one, and say how many
/// connections that leaves room for: one descriptor each, after a reserve
/// for the store's files and the process's own. None if the limit cannot
/// be read.
fn connection_capacity() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let files = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    let reserve = (files / 4).min(1024);
    let capacity = files.saturating_sub(reserve).max(1);
    tracing::info!(
        open_files = files,
        connections = capacity,
        "open-file limit (soft raised to hard)"
    );
    Some(capacity)
}

/// Take SIGINT and SIGTERM now (the handlers are installed by this call,
/// not when the future is first polled), and return the future that ends
/// at the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            match (int, term) {
                (Ok(mut i), Ok(mut t)) => {
                    tokio::select! {
                        _ = i.recv() => {}
                        _ = t.recv() => {}
                    }
                }
                (Ok(mut i), Err(_)) => {
                    i.recv().await;
                }
                (Err(_), Ok(mut t)) => {
                    t.recv().await;
                }
                (Err(_), Err(_)) => std::future::pending::<()>().await,
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
