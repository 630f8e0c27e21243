//! AMQPS: lapin connects over TLS with a CA this test makes; a client
//! certificate logs in with EXTERNAL (its CN names the user); a client
//! certificate from another CA is refused; a plain-text client on the TLS
//! port gets a clean close, not a hang; SIGHUP reloads the certificate
//! without dropping open connections; a certificate that does not parse
//! stops the start, naming the file.

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use warren_tests::daemon::{free_port, Daemon};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_warren")
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf certificate and its key, PEM.
    fn issue(&self, cn: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn tls(ca: &Ca, identity: Option<(String, String)>) -> OwnedTLSConfig {
    OwnedTLSConfig {
        identity: identity.map(|(cert, key)| OwnedIdentity::PKCS8 {
            pem: cert.into_bytes(),
            key: key.into_bytes(),
        }),
        cert_chain: Some(ca.pem()),
    }
}

async fn connect(url: &str, config: OwnedTLSConfig) -> lapin::Result<Connection> {
    let attempt = Connection::connect_with_config(
        url,
        ConnectionProperties::default(),
        config,
        lapin::runtime::default_runtime().expect("runtime"),
    );
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(r) => r,
        Err(_) => panic!("connecting to {url} hung"),
    }
}

/// Publish and get one message: the connection really works.
async fn round_trip(c: &Connection, q: &str) {
    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(q.into(), QueueDeclareOptions::default(), Default::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        q.into(),
        BasicPublishOptions::default(),
        b"over tls",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let got = ch
        .basic_get(q.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, b"over tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_client_certificates_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("Warren test CA");
    let other_ca = Ca::new("Some other CA");
    let (server_cert, server_key) = ca.issue(
        "localhost",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let cert = write(d, "server.pem", &server_cert);
    let key = write(d, "server.key", &server_key);
    let ca_file = write(d, "ca.pem", &ca.pem());
    let defs = write(
        d,
        "defs.json",
        r#"{"users": [
              {"name": "guest", "password_hash": "AQIDBEMMOXwY6PKx/JKP9PAqfsb4ozuD0Ta3pxxa9gEYBMmD", "tags": ["administrator"]},
              {"name": "tls-user", "password_hash": "", "tags": []}],
            "vhosts": [{"name": "/"}],
            "permissions": [
              {"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
              {"user": "tls-user", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}]}"#,
    );
    let (port, tls_port) = (free_port(), free_port());
    let tls_port_s = tls_port.to_string();
    let daemon = Daemon::start_with(
        bin(),
        &d.join("data"),
        port,
        &[
            "--log-level",
            "info",
            "--definitions",
            defs.to_str().unwrap(),
            "--tls-port",
            &tls_port_s,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-ca",
            ca_file.to_str().unwrap(),
            "--tls-verify-peer",
            "true",
        ],
    );
    // Wait for the TLS listener too.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let amqps = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");

    // Password login over TLS, trusting the test CA.
    let c = connect(&amqps, tls(&ca, None)).await.expect("amqps login");
    round_trip(&c, "tls-q").await;

    // EXTERNAL with a client certificate whose CN is a user.
    let client = ca.issue("tls-user", &[], ExtendedKeyUsagePurpose::ClientAuth);
    let external = format!("amqps://127.0.0.1:{tls_port}/%2f?auth_mechanism=external");
    let e = connect(&external, tls(&ca, Some(client.clone())))
        .await
        .expect("EXTERNAL login with a client certificate");
    round_trip(&e, "tls-q2").await;
    let _ = e.close(200, "bye".into()).await;
    // EXTERNAL without a certificate is not offered.
    assert!(connect(&external, tls(&ca, None)).await.is_err());
    // A client certificate from another CA: refused in the TLS handshake.
    let foreign = other_ca.issue("tls-user", &[], ExtendedKeyUsagePurpose::ClientAuth);
    assert!(connect(&external, tls(&ca, Some(foreign))).await.is_err());
    // A client that does not trust the server's CA refuses it.
    assert!(connect(&amqps, tls(&other_ca, None)).await.is_err());

    // A plain-text AMQP client on the TLS port: closed, not left hanging.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    let mut buf = [0u8; 64];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue, // a TLS alert, then the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("the TLS port left a plain-text client hanging: {e}"),
        }
    };
    assert!(closed);

    // SIGHUP with a certificate from the other CA: new clients must trust
    // it, the open connection carries on.
    let (cert2, key2) = other_ca.issue(
        "localhost",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    write(d, "server.pem", &cert2);
    write(d, "server.key", &key2);
    daemon.signal(libc::SIGHUP);
    let mut reloaded = false;
    for _ in 0..50 {
        if connect(&amqps, tls(&other_ca, None)).await.is_ok() {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "SIGHUP did not load the new certificate");
    assert!(connect(&amqps, tls(&ca, None)).await.is_err());
    round_trip(&c, "tls-q3").await;
    // A broken file on SIGHUP: the old certificate stays in use.
    write(d, "server.pem", "not a certificate");
    daemon.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    connect(&amqps, tls(&other_ca, None))
        .await
        .expect("still serving after a bad reload");
    let _ = c.close(200, "bye".into()).await;
    drop(daemon);

    // A certificate that does not parse stops the start, naming the file.
    let out = std::process::Command::new(bin())
        .args(["--port", &free_port().to_string(), "--data-dir"])
        .arg(d.join("data2"))
        .args(["--tls-port", &free_port().to_string(), "--tls-cert"])
        .arg(d.join("server.pem"))
        .arg("--tls-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.pem"), "{err}");
}

/// `--management-tls true`: the management API and the dashboard answer
/// over HTTPS with the AMQPS certificate (a client trusting the CA gets the
/// overview), and a plain-HTTP request on that port gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_over_https() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("Warren test CA");
    let (server_cert, server_key) = ca.issue(
        "localhost",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let cert = write(d, "server.pem", &server_cert);
    let key = write(d, "server.key", &server_key);
    let (port, tls_port, api_port) = (free_port(), free_port(), free_port());
    let (tls_port_s, api_port_s) = (tls_port.to_string(), api_port.to_string());
    let _daemon = Daemon::start_with(
        bin(),
        &d.join("data"),
        port,
        &[
            "--log-level",
            "warn",
            "--tls-port",
            &tls_port_s,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--management-port",
            &api_port_s,
            "--management-tls",
            "true",
        ],
    );
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let config = tokio_rustls::rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let request = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n"
        )
    };
    let mut answers = Vec::new();
    for path in ["/api/overview", "/"] {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", api_port))
            .await
            .unwrap();
        let mut s = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("a TLS handshake with the API");
        s.write_all(request(path).as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        answers.push(out);
    }
    assert!(answers[0].starts_with("HTTP/1.1 200"), "{}", answers[0]);
    assert!(
        answers[0].contains("\"product_name\":\"Warren\""),
        "{}",
        answers[0]
    );
    assert!(
        answers[1].contains("<title>Warren</title>"),
        "{}",
        answers[1]
    );
    // Plain HTTP on the HTTPS port: no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", api_port))
        .await
        .unwrap();
    tcp.write_all(request("/api/overview").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"));
}
