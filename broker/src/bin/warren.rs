//! The Warren daemon.

use clap::Parser;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use warren_broker::config::{parse_memory_limit, parse_size, MemoryLimit};
use warren_broker::{Config, Server};

/// Warren: an AMQP 0-9-1 message broker.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// AMQP port.
    #[arg(long, default_value_t = 5672)]
    port: u16,
    /// Directory for durable state.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
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
    /// Sync the write-ahead log on every write (turn off only for benchmarks).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fsync: bool,
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
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level).unwrap_or_else(|e| {
        eprintln!(
            "warren: bad --log-level '{}': {e}; using info",
            args.log_level
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();

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
    let config = Config {
        listen: SocketAddr::new(args.bind, args.port),
        data_dir: args.data_dir,
        max_message_size: args.max_message_size,
        max_connections: max_connections.max(1),
        fsync: args.fsync,
        memory_limit,
        disk_free_limit: args.disk_free_limit,
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
        let server = match Server::bind(config.clone()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("warren: cannot start on {}: {e}", config.listen);
                return std::process::ExitCode::FAILURE;
            }
        };
        store_threads = Some(server.store_threads());
        let addr = server.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "Warren {} listening", env!("CARGO_PKG_VERSION"));
        server.run(shutdown_signal()).await;
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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
