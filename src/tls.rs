//! rustls settings for both directions: the ingress listener (optionally requiring client
//! certificates) and upstream connections to aggregators (fluentd `<transport tls>`,
//! PROTOCOL.md §10–§11). The Forward protocol runs unchanged inside the TLS stream.
//!
//! Only configuration lives here: files are read and checked once, at start-up, and every
//! error names the file and what is wrong with it, so `ackgate check` can report it before any
//! socket is opened. The crypto provider is *ring*, passed explicitly rather than through
//! rustls' process-wide default, so no other crate's choice of provider can make a build panic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Why TLS could not be set up. Every variant names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed PEM: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("no certificate found in {path}")]
    NoCertificate { path: PathBuf },
    #[error("no private key found in {path} (expected PKCS#8, PKCS#1 or SEC1 PEM)")]
    NoPrivateKey { path: PathBuf },
    #[error("{path}: CA certificate rejected: {detail}")]
    BadCa { path: PathBuf, detail: String },
    #[error("certificate {cert} with key {key}: {detail}")]
    CertKey {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("no usable system root certificates: set a CA file, or verify = false")]
    NoSystemRoots,
    #[error("invalid TLS server name {name:?}")]
    ServerName { name: String },
    #[error("TLS protocol setup: {0}")]
    Protocol(String),
}

/// Ingress TLS: our certificate chain and key, and optionally the CA that client certificates
/// must chain to (fluentd's `client_cert_auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key for `cert`.
    pub key: PathBuf,
    /// With a CA file, every client must present a certificate signed by it.
    pub client_ca: Option<PathBuf>,
}

/// Upstream TLS: how to trust the aggregator, and what to present to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsSettings {
    /// PEM CA certificates to trust; without one, the system's roots.
    pub ca: Option<PathBuf>,
    /// false accepts any server certificate (a self-signed aggregator in a lab). Dangerous:
    /// the connection is encrypted but the peer is not authenticated.
    pub verify: bool,
    /// `(certificate chain, key)` PEM files for aggregators that require client certificates.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Name to verify the certificate against (and send as SNI) instead of the node's host.
    pub server_name: Option<String>,
}

impl Default for ClientTlsSettings {
    fn default() -> Self {
        ClientTlsSettings {
            ca: None,
            verify: true,
            client_cert: None,
            server_name: None,
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, e: pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// Every certificate in a PEM file; an error if there is none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        other => pem_error(path, other),
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn cert_key_error(cert: &Path, key: &Path, e: rustls::Error) -> TlsError {
    TlsError::CertKey {
        cert: cert.to_owned(),
        key: key.to_owned(),
        detail: e.to_string(),
    }
}

/// The listener's rustls configuration (TLS 1.2 and 1.3).
pub fn server_config(settings: &ServerTlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&settings.cert)?;
    let key = load_key(&settings.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Protocol(e.to_string()))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider)
                    .build()
                    .map_err(|e| TlsError::BadCa {
                        path: ca.clone(),
                        detail: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| cert_key_error(&settings.cert, &settings.key, e))?;
    Ok(Arc::new(config))
}

/// The upstream connections' rustls configuration.
pub fn client_config(settings: &ClientTlsSettings) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Protocol(e.to_string()))?;
    let builder = if !settings.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert { provider }))
    } else {
        let roots = match &settings.ca {
            Some(ca) => load_roots(ca)?,
            None => system_roots()?,
        };
        builder.with_root_certificates(roots)
    };
    let config = match &settings.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| cert_key_error(cert, key, e))?,
    };
    Ok(Arc::new(config))
}

/// The name a connection to `host` verifies and sends as SNI: `server_name` if set, else the
/// host itself (a DNS name or an IP address).
pub fn server_name(
    settings: &ClientTlsSettings,
    host: &str,
) -> Result<ServerName<'static>, TlsError> {
    let name = settings.server_name.as_deref().unwrap_or(host);
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName {
        name: name.to_owned(),
    })
}

/// The operating system's trust store; unreadable entries are skipped.
fn system_roots() -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if roots.is_empty() {
        return Err(TlsError::NoSystemRoots);
    }
    Ok(roots)
}

/// `verify = false`: any certificate chain and name are accepted. The handshake signatures are
/// still checked, so the peer at least holds the key of the certificate it sent; what is lost is
/// knowing *who* it is. Chosen explicitly in configuration; nothing is logged from here.
#[derive(Debug)]
struct AcceptAnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::timeout;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const WAIT: Duration = Duration::from_secs(10);

    /// A CA and PEM files under a temp dir.
    struct Pki {
        dir: tempfile::TempDir,
        ca_params: CertificateParams,
        ca_key: KeyPair,
    }

    impl Pki {
        fn new(name: &str) -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, format!("{name} test CA"));
            let ca_key = KeyPair::generate().unwrap();
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
            Pki {
                dir,
                ca_params,
                ca_key,
            }
        }

        fn path(&self, file: &str) -> PathBuf {
            self.dir.path().join(file)
        }

        /// Issue a leaf for `names`, written as `<stem>.pem` and `<stem>.key`.
        fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let params = CertificateParams::new(names).unwrap();
            let key = KeyPair::generate().unwrap();
            let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
            let cert = params.signed_by(&key, &issuer).unwrap();
            let (cert_path, key_path) = (
                self.path(&format!("{stem}.pem")),
                self.path(&format!("{stem}.key")),
            );
            std::fs::write(&cert_path, cert.pem()).unwrap();
            std::fs::write(&key_path, key.serialize_pem()).unwrap();
            (cert_path, key_path)
        }
    }

    /// Accept one TLS connection, echo what it sends back uppercased; report the accept result.
    async fn serve_once(
        config: Arc<ServerConfig>,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<Result<(), String>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            tls.write_all(&buf.to_ascii_uppercase())
                .await
                .map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok(())
        });
        (addr, task)
    }

    /// Connect, send "hello", expect "HELLO".
    async fn exchange(
        addr: std::net::SocketAddr,
        settings: &ClientTlsSettings,
    ) -> Result<(), String> {
        let config = client_config(settings).map_err(|e| e.to_string())?;
        let name = server_name(settings, "127.0.0.1").map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        if &buf != b"HELLO" {
            return Err(format!("got {buf:?}"));
        }
        Ok(())
    }

    async fn run(
        server: Arc<ServerConfig>,
        client: &ClientTlsSettings,
    ) -> (Result<(), String>, Result<(), String>) {
        let (addr, task) = serve_once(server).await;
        let client = timeout(WAIT, exchange(addr, client))
            .await
            .unwrap_or_else(|_| Err("client timed out".into()));
        let server = match timeout(WAIT, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(join.to_string()),
            Err(_) => Err("server timed out".into()),
        };
        (client, server)
    }

    fn trusting(pki: &Pki) -> ClientTlsSettings {
        ClientTlsSettings {
            ca: Some(pki.path("ca.pem")),
            server_name: Some("relay.test".into()),
            ..ClientTlsSettings::default()
        }
    }

    #[tokio::test]
    async fn server_and_client_exchange_bytes() {
        let pki = Pki::new("main");
        let (cert, key) = pki.issue("server", &["relay.test", "127.0.0.1"]);
        let server = server_config(&ServerTlsSettings {
            cert,
            key,
            client_ca: None,
        })
        .unwrap();
        let (client, served) = run(server.clone(), &trusting(&pki)).await;
        assert_eq!(client, Ok(()));
        assert_eq!(served, Ok(()));
        // The host itself as the name: the certificate also covers 127.0.0.1.
        let by_ip = ClientTlsSettings {
            server_name: None,
            ..trusting(&pki)
        };
        assert_eq!(run(server, &by_ip).await, (Ok(()), Ok(())));
    }

    #[tokio::test]
    async fn client_certificate_required() {
        let pki = Pki::new("main");
        let (cert, key) = pki.issue("server", &["relay.test"]);
        let (client_cert, client_key) = pki.issue("client", &["sender.test"]);
        let server = server_config(&ServerTlsSettings {
            cert,
            key,
            client_ca: Some(pki.path("ca.pem")),
        })
        .unwrap();

        let with_cert = ClientTlsSettings {
            client_cert: Some((client_cert, client_key)),
            ..trusting(&pki)
        };
        assert_eq!(run(server.clone(), &with_cert).await, (Ok(()), Ok(())));

        let (client, served) = run(server.clone(), &trusting(&pki)).await;
        assert!(client.is_err(), "client without a certificate: {client:?}");
        let served = served.unwrap_err();
        assert!(served.contains("certificate"), "{served}");

        // A client certificate from another CA is refused too.
        let other = Pki::new("other");
        let (foreign_cert, foreign_key) = other.issue("client", &["sender.test"]);
        let foreign = ClientTlsSettings {
            client_cert: Some((foreign_cert, foreign_key)),
            ..trusting(&pki)
        };
        let (client, served) = run(server, &foreign).await;
        assert!(client.is_err(), "{client:?}");
        assert!(served.is_err(), "{served:?}");
    }

    #[tokio::test]
    async fn wrong_ca_fails_and_verify_false_succeeds() {
        let pki = Pki::new("main");
        let other = Pki::new("other");
        let (cert, key) = pki.issue("server", &["relay.test"]);
        let server = server_config(&ServerTlsSettings {
            cert,
            key,
            client_ca: None,
        })
        .unwrap();

        let (client, _) = run(server.clone(), &trusting(&other)).await;
        let client = client.unwrap_err();
        assert!(
            client.contains("UnknownIssuer") || client.contains("issuer"),
            "{client}"
        );

        // A name the certificate does not cover fails with the right CA.
        let wrong_name = ClientTlsSettings {
            server_name: Some("elsewhere.test".into()),
            ..trusting(&pki)
        };
        assert!(run(server.clone(), &wrong_name).await.0.is_err());

        let insecure = ClientTlsSettings {
            verify: false,
            ..trusting(&other)
        };
        assert_eq!(run(server.clone(), &insecure).await, (Ok(()), Ok(())));
        let insecure_no_ca = ClientTlsSettings {
            ca: None,
            verify: false,
            client_cert: None,
            server_name: Some("elsewhere.test".into()),
        };
        assert_eq!(run(server, &insecure_no_ca).await, (Ok(()), Ok(())));
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let pki = Pki::new("main");
        let (cert, key) = pki.issue("server", &["relay.test"]);
        let empty = pki.path("empty.pem");
        std::fs::write(&empty, "nothing to see\n").unwrap();
        let missing = pki.path("missing.pem");

        let err = |s: ServerTlsSettings| server_config(&s).unwrap_err().to_string();
        let e = err(ServerTlsSettings {
            cert: empty.clone(),
            key: key.clone(),
            client_ca: None,
        });
        assert_eq!(e, format!("no certificate found in {}", empty.display()));
        let e = err(ServerTlsSettings {
            cert: cert.clone(),
            key: empty.clone(),
            client_ca: None,
        });
        assert!(
            e.starts_with(&format!("no private key found in {}", empty.display())),
            "{e}"
        );
        // The certificate file holds no key.
        let e = err(ServerTlsSettings {
            cert: cert.clone(),
            key: cert.clone(),
            client_ca: None,
        });
        assert!(e.contains("no private key found in"), "{e}");
        let e = err(ServerTlsSettings {
            cert: missing.clone(),
            key: key.clone(),
            client_ca: None,
        });
        assert!(
            e.starts_with(&format!("cannot read {}", missing.display())),
            "{e}"
        );
        let e = err(ServerTlsSettings {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: Some(empty.clone()),
        });
        assert_eq!(e, format!("no certificate found in {}", empty.display()));
        // A key that does not belong to the certificate.
        let (_, other_key) = pki.issue("other", &["x.test"]);
        let e = err(ServerTlsSettings {
            cert: cert.clone(),
            key: other_key,
            client_ca: None,
        });
        assert!(
            e.starts_with(&format!("certificate {}", cert.display())),
            "{e}"
        );

        let broken = pki.path("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load_certs(&broken).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: malformed PEM", broken.display())),
            "{e}"
        );

        let e = client_config(&ClientTlsSettings {
            ca: Some(missing.clone()),
            ..ClientTlsSettings::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        assert!(matches!(
            server_name(&ClientTlsSettings::default(), "not a name!"),
            Err(TlsError::ServerName { .. })
        ));
    }
}
