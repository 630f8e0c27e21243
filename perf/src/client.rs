//! A minimal AMQP 0-9-1 client connection: the handshake and synchronous
//! setup methods; the hot loops (in `run`) take over the socket afterwards.

use crate::stream::Stream;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_protocol::client::{self as wire, Args, Frame};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Res<T> = Result<T, Error>;

/// Where to connect and as whom.
#[derive(Clone, Debug)]
pub struct Target {
    /// TLS, trusting these CAs (None: plain TCP).
    pub tls: Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub pass: String,
    pub vhost: String,
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Target {
    /// `amqp://user:pass@host:port/vhost` (vhost percent-decoded; empty means `/`).
    pub fn parse(uri: &str) -> Res<Target> {
        let rest = uri
            .strip_prefix("amqp://")
            .ok_or("only amqp:// URIs are supported")?;
        let (auth_host, vhost) = match rest.split_once('/') {
            Some((a, v)) => (a, unescape(v)),
            None => (rest, "/".to_string()),
        };
        let vhost = if vhost.is_empty() { "/".into() } else { vhost };
        let (auth, hostport) = match auth_host.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, auth_host),
        };
        let (user, pass) = match auth {
            Some(a) => match a.split_once(':') {
                Some((u, p)) => (unescape(u), unescape(p)),
                None => (unescape(a), String::new()),
            },
            None => ("guest".into(), "guest".into()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| "bad port in URI")?),
            None => (hostport.to_string(), 5672),
        };
        let host = if host.is_empty() {
            "127.0.0.1".into()
        } else {
            host
        };
        Ok(Target {
            tls: None,
            host,
            port,
            user,
            pass,
            vhost,
        })
    }
}

pub struct Conn {
    pub stream: Stream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub frame_max: u32,
    /// Highest channel number the broker allows (0 = no limit).
    pub channel_max: u16,
}

impl Conn {
    pub async fn connect(t: &Target) -> Res<Conn> {
        let stream = Stream::connect(&t.host, t.port, t.tls.as_ref()).await?;
        let mut c = Conn {
            stream,
            rbuf: BytesMut::with_capacity(1 << 16),
            wbuf: BytesMut::with_capacity(1 << 16),
            frame_max: 131072,
            channel_max: 0,
        };
        c.stream.write_all(wire::PROTOCOL_HEADER).await?;
        c.expect(0, wire::CONNECTION_START).await?;
        let mut props = BytesMut::new();
        wire::table(&mut props, &[("product", "warren-perf")]);
        wire::start_ok(&mut c.wbuf, &props, &t.user, &t.pass);
        c.flush().await?;
        let tune = c.expect(0, wire::CONNECTION_TUNE).await?;
        let mut a = Args(&tune);
        let channel_max = a.u16().ok_or("bad tune")?;
        let frame_max = a.u32().ok_or("bad tune")?;
        let frame_max = if frame_max == 0 {
            131072
        } else {
            frame_max.min(131072)
        };
        c.frame_max = frame_max;
        c.channel_max = channel_max;
        // Heartbeats off (0 in tune-ok disables them on both sides, whatever
        // the broker proposed): runs are short and both ends are busy, and
        // `idle` answers any heartbeat a broker sends regardless.
        wire::tune_ok(&mut c.wbuf, channel_max, frame_max, 0);
        wire::open(&mut c.wbuf, &t.vhost);
        c.flush().await?;
        c.expect(0, wire::CONNECTION_OPEN_OK).await?;
        Ok(c)
    }

    pub async fn flush(&mut self) -> Res<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Flush, then wait for method `id` on channel `ch` and return its arguments.
    /// Heartbeats and stray content are skipped; a close is an error.
    pub async fn expect(&mut self, ch: u16, id: (u16, u16)) -> Res<Vec<u8>> {
        self.flush().await?;
        loop {
            while let Some((f, n)) = wire::parse(&self.rbuf, u32::MAX)? {
                let out = match f {
                    Frame::Method { ch: c, id: i, args } if c == ch && i == id => {
                        Some(Ok(args.to_vec()))
                    }
                    Frame::Method {
                        id: wire::CONNECTION_CLOSE,
                        args,
                        ..
                    } => Some(Err(format!(
                        "connection closed by broker: {}",
                        wire::close_reason(args)
                    ))),
                    Frame::Method {
                        id: wire::CHANNEL_CLOSE,
                        args,
                        ..
                    } => Some(Err(format!(
                        "channel closed by broker: {}",
                        wire::close_reason(args)
                    ))),
                    _ => None,
                };
                self.rbuf.advance(n);
                match out {
                    Some(Ok(a)) => return Ok(a),
                    Some(Err(e)) => return Err(e.into()),
                    None => {}
                }
            }
            self.rbuf.reserve(1 << 16);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(
                    format!("connection closed while waiting for {}.{}", id.0, id.1).into(),
                );
            }
        }
    }

    pub async fn channel(&mut self, ch: u16) -> Res<()> {
        wire::channel_open(&mut self.wbuf, ch);
        self.expect(ch, wire::CHANNEL_OPEN_OK).await?;
        Ok(())
    }

    /// Graceful close (best effort, bounded wait).
    pub async fn close(mut self) {
        wire::connection_close(&mut self.wbuf);
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.expect(0, wire::CONNECTION_CLOSE_OK),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let t = Target::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.user.as_str(),
                t.pass.as_str(),
                t.vhost.as_str()
            ),
            ("127.0.0.1", 5672, "guest", "guest", "/")
        );
        assert!(t.tls.is_none());
        let t = Target::parse("amqp://u%40x:p%3Aw@broker:5673/prod").unwrap();
        assert_eq!((t.user.as_str(), t.pass.as_str()), ("u@x", "p:w"));
        assert_eq!(
            (t.host.as_str(), t.port, t.vhost.as_str()),
            ("broker", 5673, "prod")
        );
        let t = Target::parse("amqp://localhost").unwrap();
        assert_eq!(
            (t.port, t.vhost.as_str(), t.user.as_str()),
            (5672, "/", "guest")
        );
        assert!(Target::parse("amqps://x").is_err());
        assert!(Target::parse("amqp://h:notaport/").is_err());
    }
}
