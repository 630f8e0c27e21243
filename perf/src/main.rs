use clap::{Args, Parser, Subcommand};
use std::io::Write;
use warren_perf::client::Target;
use warren_perf::idle::{idle, IdleConfig};
use warren_perf::run::{run, Config};

/// Load generator for AMQP 0-9-1 brokers (Warren, RabbitMQ, ...).
///
/// Producer i publishes to queue perf-q{i % queues}; consumer i consumes from
/// queue perf-q{i % queues}. One connection per producer and per consumer.
#[derive(Parser, Debug)]
#[command(name = "warren-perf", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    opts: RunOpts,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A fake broker that accepts, handshakes, discards publishes and acks
    /// confirms; it never delivers. Measures the client alone.
    Sink {
        #[arg(long, default_value_t = 5699)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
    },
    /// Open connections, channels and queues and hold them idle, to measure
    /// the broker's memory per resource.
    ///
    /// Opens --connections connections (at most --parallel at a time), each
    /// with --channels-per-connection channels, and declares --queues queues
    /// perf-idle-q0.. (not exclusive, not auto-delete; durable with --durable),
    /// queue i on channel 1 of connection i % connections, one declare at a
    /// time. With --connections 0 the queues are declared through one
    /// short-lived connection and then stay with no connection open.
    ///
    /// When everything is established it prints one line on stdout,
    /// `ready connections=N channels=C queues=M`, then holds: for --seconds,
    /// or with --seconds 0 until SIGINT, SIGTERM or end of stdin (stdin is
    /// not watched when it is /dev/null, e.g. a background job). SIGINT or
    /// SIGTERM also end a timed hold early. Heartbeats are negotiated off
    /// (0 in tune-ok), and any heartbeat the broker sends anyway is answered,
    /// so idle connections stay up however long they are held.
    ///
    /// Then it deletes the queues (unless --keep) and closes every connection
    /// with connection.close. Exit status 1 if anything failed, including a
    /// connection the broker closed while held.
    Idle {
        #[command(flatten)]
        target: TargetOpts,
        /// Connections to hold.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Channels opened on each connection (1..=channel-max).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        channels_per_connection: u16,
        /// Queues to declare (perf-idle-q0 ..).
        #[arg(long, default_value_t = 0)]
        queues: usize,
        /// Durable queues.
        #[arg(long)]
        durable: bool,
        /// Seconds to hold after ready; 0 = until SIGINT/SIGTERM/end of stdin.
        #[arg(long, default_value_t = 0)]
        seconds: u64,
        /// Leave the queues on the broker at the end.
        #[arg(long)]
        keep: bool,
        /// Connections being opened at the same time.
        #[arg(long, default_value_t = 32)]
        parallel: usize,
        /// Seconds to wait for one connection's TCP connect and handshake.
        #[arg(long, default_value_t = 30)]
        connect_timeout: u64,
    },
}

#[derive(Args, Debug)]
struct TargetOpts {
    /// Broker URI.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// Overrides the URI's host.
    #[arg(long)]
    host: Option<String>,
    /// Overrides the URI's port.
    #[arg(long)]
    port: Option<u16>,
    /// Connect with TLS, trusting the CA certificates in this PEM file (the
    /// server is verified as the URI's host).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
}

impl TargetOpts {
    fn target(&self) -> Result<Target, String> {
        let mut t = Target::parse(&self.uri).map_err(|e| format!("bad --uri: {e}"))?;
        if let Some(h) = &self.host {
            t.host = h.clone();
        }
        if let Some(p) = self.port {
            t.port = p;
        }
        if let Some(ca) = &self.tls_ca {
            t.tls = Some(warren_perf::stream::tls_config(ca)?);
        }
        Ok(t)
    }
}

#[derive(Args, Debug)]
struct RunOpts {
    #[command(flatten)]
    target: TargetOpts,
    /// Several brokers (the nodes of a cluster), comma-separated URIs:
    /// producer i and consumer i connect to the (i mod n)-th, and the
    /// queues are declared and deleted through the first. Instead of
    /// --uri, --host and --port.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["uri", "host", "port"])]
    uris: Vec<String>,
    #[arg(long, short = 'x', default_value_t = 1)]
    producers: usize,
    #[arg(long, short = 'y', default_value_t = 1)]
    consumers: usize,
    /// Number of queues (perf-q0 ..).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Body size in bytes; the first 8 carry the send time (latency needs >= 8).
    #[arg(long, short = 's', default_value_t = 16)]
    size: usize,
    /// Persistent messages (delivery-mode 2) and durable queues.
    #[arg(long)]
    persistent: bool,
    /// Durable queues even for transient messages (streams must be durable).
    #[arg(long)]
    durable: bool,
    /// A queue argument, KEY=VALUE (repeatable): an integer VALUE is sent
    /// as a long, anything else as a string (`x-queue-type=stream`).
    #[arg(long = "queue-arg", value_name = "KEY=VALUE", value_parser = key_value)]
    queue_args: Vec<(String, String)>,
    /// A `basic.consume` argument, KEY=VALUE, as --queue-arg
    /// (`x-stream-offset=first`).
    #[arg(long = "consumer-arg", value_name = "KEY=VALUE", value_parser = key_value)]
    consumer_args: Vec<(String, String)>,
    /// Publisher confirms with at most W outstanding per producer (0 = off).
    #[arg(long, short = 'c', default_value_t = 0)]
    confirm: u32,
    /// Consumer prefetch (basic.qos), 0 = unlimited.
    #[arg(long, short = 'q', default_value_t = 1000)]
    prefetch: u16,
    /// Ack every N messages (capped at the prefetch).
    #[arg(long, default_value_t = 1)]
    ack_every: u32,
    /// Ack with multiple=true (one ack per --ack-every messages).
    #[arg(long)]
    multiple: bool,
    /// Consume with no-ack (automatic acknowledgement).
    #[arg(long)]
    no_ack: bool,
    /// Total publish rate limit in msg/s across producers (0 = unlimited).
    #[arg(long, short = 'r', default_value_t = 0)]
    rate: u64,
    /// Publish to a fanout exchange (perf-fanout) bound to all queues.
    #[arg(long)]
    fanout: bool,
    /// Measured duration in seconds.
    #[arg(long, short = 'z', default_value_t = 10)]
    seconds: u64,
    /// Warm-up seconds, run before and excluded from the summary.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Keep the queues (and exchange) at the end.
    #[arg(long)]
    keep: bool,
    /// Print the summary as one JSON line on stdout.
    #[arg(long)]
    json: bool,
    /// No per-second lines.
    #[arg(long)]
    quiet: bool,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

/// Completes after `seconds` (0 = never), on SIGINT or SIGTERM, or, when
/// `seconds` is 0, at the end of stdin unless stdin is /dev/null.
async fn hold_until(seconds: u64) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    let devnull = std::fs::read_link("/proc/self/fd/0")
        .map(|p| p == std::path::Path::new("/dev/null"))
        .unwrap_or(false);
    if seconds == 0 && !devnull {
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            while matches!(std::io::Read::read(&mut stdin, &mut buf), Ok(n) if n > 0) {}
            let _ = eof_tx.send(());
        });
    } else {
        std::mem::forget(eof_tx);
    }
    let timer = async {
        if seconds > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(seconds)).await
        } else {
            std::future::pending().await
        }
    };
    tokio::select! {
        _ = timer => {}
        _ = term.recv() => eprintln!("idle: SIGTERM"),
        _ = int.recv() => eprintln!("idle: SIGINT"),
        _ = eof_rx => eprintln!("idle: end of stdin"),
    }
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async move {
        match cli.cmd {
            Some(Cmd::Sink { port, bind }) => {
                let l = match tokio::net::TcpListener::bind((bind.as_str(), port)).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("sink: cannot listen on {bind}:{port}: {e}");
                        return 1;
                    }
                };
                eprintln!(
                    "sink: listening on {}",
                    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
                );
                if let Err(e) = warren_perf::sink::serve_and_report(l).await {
                    eprintln!("sink: {e}");
                    return 1;
                }
                0
            }
            Some(Cmd::Idle {
                target,
                connections,
                channels_per_connection,
                queues,
                durable,
                seconds,
                keep,
                parallel,
                connect_timeout,
            }) => {
                let target = match target.target() {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("{e}");
                        return 2;
                    }
                };
                let cfg = IdleConfig {
                    target,
                    connections,
                    channels: channels_per_connection,
                    queues,
                    durable,
                    keep,
                    parallel,
                    connect_timeout: std::time::Duration::from_secs(connect_timeout.max(1)),
                };
                let t0 = std::time::Instant::now();
                let ready = |s: &warren_perf::idle::IdleSummary| {
                    eprintln!(
                        "idle: established in {:.2}s, holding",
                        t0.elapsed().as_secs_f64()
                    );
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{}", s.ready_line());
                    let _ = out.flush();
                };
                match idle(cfg, ready, hold_until(seconds)).await {
                    Ok(s) => {
                        eprintln!(
                            "idle: held {:.1}s; deleted {} queues; {} of {} connections closed cleanly",
                            s.held.as_secs_f64(),
                            s.deleted,
                            s.closed,
                            s.connections
                        );
                        for e in &s.errors {
                            eprintln!("idle: {e}");
                        }
                        let clean = s.errors.is_empty()
                            && s.closed == s.connections
                            && (keep || s.deleted == queues);
                        if clean {
                            0
                        } else {
                            1
                        }
                    }
                    Err(e) => {
                        eprintln!("warren-perf idle: {e}");
                        1
                    }
                }
            }
            None => {
                let o = cli.opts;
                let mut targets = Vec::new();
                for u in &o.uris {
                    let mut t = match Target::parse(u) {
                        Ok(t) => t,
                        Err(e) => {
                            eprintln!("bad --uris entry '{u}': {e}");
                            return 2;
                        }
                    };
                    if let Some(ca) = &o.target.tls_ca {
                        match warren_perf::stream::tls_config(ca) {
                            Ok(c) => t.tls = Some(c),
                            Err(e) => {
                                eprintln!("{e}");
                                return 2;
                            }
                        }
                    }
                    targets.push(t);
                }
                let target = match targets.is_empty() {
                    true => match o.target.target() {
                        Ok(t) => t,
                        Err(e) => {
                            eprintln!("{e}");
                            return 2;
                        }
                    },
                    false => targets.remove(0),
                };
                if o.queues == 0 {
                    eprintln!("--queues must be at least 1");
                    return 2;
                }
                let cfg = Config {
                    target,
                    others: targets,
                    producers: o.producers,
                    consumers: o.consumers,
                    queues: o.queues,
                    size: o.size,
                    persistent: o.persistent,
                    durable: o.durable || o.persistent,
                    queue_args: o.queue_args.clone(),
                    consumer_args: o.consumer_args.clone(),
                    confirm: o.confirm,
                    prefetch: o.prefetch,
                    ack_every: o.ack_every,
                    multiple: o.multiple,
                    no_ack: o.no_ack,
                    rate: o.rate,
                    fanout: o.fanout,
                    seconds: o.seconds,
                    warmup: o.warmup,
                    keep: o.keep,
                    progress: !o.quiet,
                };
                match run(cfg.clone()).await {
                    Ok(s) => {
                        eprint!("{}", s.text());
                        if o.json {
                            println!("{}", s.json(&cfg));
                        }
                        if s.error.is_some() {
                            1
                        } else {
                            0
                        }
                    }
                    Err(e) => {
                        eprintln!("warren-perf: {e}");
                        1
                    }
                }
            }
        }
    });
    std::process::exit(code);
}
