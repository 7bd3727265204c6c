//! TLS material for the tests: a CA, a server certificate (for `localhost` and 127.0.0.1 unless
//! the test names others) and a client certificate, all signed by that CA, as PEM files in a
//! temp dir (rcgen).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A test CA and what it signed, as PEM files.
pub struct Pki {
    dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// A fresh CA named `ca_name` and its two leaves, the server's for `localhost` and
    /// 127.0.0.1.
    pub fn generate(ca_name: &str) -> Pki {
        Pki::generate_for(ca_name, &["localhost", "127.0.0.1"])
    }

    /// A fresh CA named `ca_name` and its two leaves, the server's for `server_names` (an IP
    /// address among them is an IP address SAN, the others DNS names).
    pub fn generate_for(ca_name: &str, server_names: &[&str]) -> Pki {
        let dir = tempfile::tempdir().expect("pki temp dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.distinguished_name = common_name(ca_name);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("ca key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: &[&str], usage: ExtendedKeyUsagePurpose, cn: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
            params.subject_alt_names = names.iter().map(|n| san(n)).collect();
            params.distinguished_name = common_name(cn);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &issuer).expect("sign leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (server_pem, server_key_pem) = leaf(
            server_names,
            ExtendedKeyUsagePurpose::ServerAuth,
            server_names.first().copied().unwrap_or("server"),
        );
        let (client_pem, client_key_pem) = leaf(
            &["sender.example"],
            ExtendedKeyUsagePurpose::ClientAuth,
            "ackgate test client",
        );
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write pem");
            path
        };
        Pki {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_pem),
            server_key: write("server.key", &server_key_pem),
            client_cert: write("client.pem", &client_pem),
            client_key: write("client.key", &client_key_pem),
            dir,
        }
    }

    /// The temp dir holding the files (removed on drop); tests may put their own files there.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// An IP address SAN for an address, else a DNS name SAN.
fn san(name: &str) -> SanType {
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into().expect("a DNS name")),
    }
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}
