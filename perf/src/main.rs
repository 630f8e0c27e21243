use clap::{Args, Parser, Subcommand};
use warren_perf::client::Target;
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
}

#[derive(Args, Debug)]
struct RunOpts {
    /// Broker URI.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// Overrides the URI's host.
    #[arg(long)]
    host: Option<String>,
    /// Overrides the URI's port.
    #[arg(long)]
    port: Option<u16>,
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
            None => {
                let o = cli.opts;
                let mut target = match Target::parse(&o.uri) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("bad --uri: {e}");
                        return 2;
                    }
                };
                if let Some(h) = o.host {
                    target.host = h;
                }
                if let Some(p) = o.port {
                    target.port = p;
                }
                if o.queues == 0 {
                    eprintln!("--queues must be at least 1");
                    return 2;
                }
                let cfg = Config {
                    target,
                    producers: o.producers,
                    consumers: o.consumers,
                    queues: o.queues,
                    size: o.size,
                    persistent: o.persistent,
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
