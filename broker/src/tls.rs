//! TLS for the AMQPS listener, with rustls (TLS 1.2 and 1.3 only, no
//! OpenSSL): the server certificate and key from PEM files, optionally a CA
//! bundle to verify client certificates, as RabbitMQ's `ssl_options`
//! (`verify_peer`, `fail_if_no_peer_cert`). [`Tls::reload`] re-reads the
//! files (on SIGHUP): new connections get the new certificate, open ones
//! keep theirs; files that do not load leave the old configuration in use.
//!
//! A verified client certificate names a user for the `EXTERNAL` SASL
//! mechanism ([`peer_identity`]): its subject's common name, or its whole
//! distinguished name, as RabbitMQ's `ssl_cert_login_from`.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Which part of a client certificate names the user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoginFrom {
    /// The subject's CN (RabbitMQ's `common_name`).
    #[default]
    CommonName,
    /// The whole subject, RFC 4514 (RabbitMQ's `distinguished_name`).
    DistinguishedName,
}

impl std::str::FromStr for LoginFrom {
    type Err = String;
    fn from_str(s: &str) -> Result<LoginFrom, String> {
        match s {
            "common_name" | "cn" | "CN" => Ok(LoginFrom::CommonName),
            "distinguished_name" | "dn" | "DN" => Ok(LoginFrom::DistinguishedName),
            other => Err(format!(
                "'{other}' is not common_name or distinguished_name"
            )),
        }
    }
}

/// Where the TLS files are and how clients are verified.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to.
    pub ca: Option<PathBuf>,
    /// Ask clients for a certificate and verify it against `ca`.
    pub verify_peer: bool,
    /// With `verify_peer`: refuse clients that present none.
    pub fail_if_no_peer_cert: bool,
    pub login_from: LoginFrom,
}

pub struct Tls {
    settings: TlsSettings,
    acceptor: RwLock<TlsAcceptor>,
}

impl Tls {
    /// Load the files; an error names the file and what is wrong with it.
    pub fn load(settings: TlsSettings) -> Result<Tls, String> {
        let config = server_config(&settings)?;
        Ok(Tls {
            settings,
            acceptor: RwLock::new(TlsAcceptor::from(Arc::new(config))),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-read the files; on error the current configuration stays.
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.settings)?;
        *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) =
            TlsAcceptor::from(Arc::new(config));
        Ok(())
    }

    pub fn login_from(&self) -> LoginFrom {
        self.settings.login_from
    }
}

fn certs(path: &PathBuf, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// TLS between cluster nodes, from the same files: each node presents its
/// certificate (which must allow server and client use, and name the
/// address peers dial) and requires the other's, chained to the CA.
pub fn cluster_tls(s: &TlsSettings) -> Result<warren_cluster::ClusterTls, String> {
    let Some(ca) = &s.ca else {
        return Err("TLS between cluster nodes needs a CA file (--tls-ca)".into());
    };
    let chain = certs(&s.cert, "certificate file")?;
    let key = || {
        PrivateKeyDer::from_pem_file(&s.key)
            .map_err(|e| format!("key file {}: {e}", s.key.display()))
    };
    let mut roots = RootCertStore::empty();
    for c in certs(ca, "CA file")? {
        roots
            .add(c)
            .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
    }
    let roots = Arc::new(roots);
    let versions: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    let verifier = WebPkiClientVerifier::builder(roots.clone())
        .build()
        .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
    let pair = |e: rustls::Error| {
        format!(
            "certificate {} and key {}: {e}",
            s.cert.display(),
            s.key.display()
        )
    };
    let server = ServerConfig::builder_with_protocol_versions(versions)
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key()?)
        .map_err(pair)?;
    let client = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key()?)
        .map_err(pair)?;
    Ok(warren_cluster::ClusterTls {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
    })
}

fn server_config(s: &TlsSettings) -> Result<ServerConfig, String> {
    let chain = certs(&s.cert, "certificate file")?;
    let key = PrivateKeyDer::from_pem_file(&s.key)
        .map_err(|e| format!("key file {}: {e}", s.key.display()))?;
    let versions: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    let builder = ServerConfig::builder_with_protocol_versions(versions);
    let builder = if s.verify_peer {
        let Some(ca) = &s.ca else {
            return Err("verifying client certificates needs a CA file (--tls-ca)".into());
        };
        let mut roots = RootCertStore::empty();
        for c in certs(ca, "CA file")? {
            roots
                .add(c)
                .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
        }
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
        let verifier = if s.fail_if_no_peer_cert {
            verifier
        } else {
            verifier.allow_unauthenticated()
        };
        let verifier = verifier
            .build()
            .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "certificate {} and key {}: {e}",
            s.cert.display(),
            s.key.display()
        )
    })
}

/// The user a client certificate (DER) names, as `login_from` says.
pub fn peer_identity(der: &[u8], login_from: LoginFrom) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    match login_from {
        LoginFrom::CommonName => subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        LoginFrom::DistinguishedName => {
            // RFC 4514: the most specific part first.
            let mut parts = Vec::new();
            for rdn in subject.iter() {
                let mut attrs = Vec::new();
                for a in rdn.iter() {
                    let oid = a.attr_type();
                    let name =
                        x509_parser::objects::oid2abbrev(oid, x509_parser::objects::oid_registry())
                            .map(str::to_owned)
                            .unwrap_or_else(|_| oid.to_id_string());
                    let value = a.as_str().ok()?;
                    attrs.push(format!("{name}={}", escape_dn(value)));
                }
                parts.push(attrs.join("+"));
            }
            parts.reverse();
            Some(parts.join(","))
        }
    }
}

fn escape_dn(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
