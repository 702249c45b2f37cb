//! Test certificates (feature `tls`): a CA and leaf certificates it signs, made with rcgen and
//! written as PEM files into a temporary directory, for brokers started with TLS.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A certificate authority for tests. Files live as long as the value.
pub struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca: PathBuf,
}

impl Pki {
    /// A new self-signed CA with common name `name`.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        let ca = dir.path().join(format!("{name}.pem"));
        std::fs::write(&ca, cert.pem()).expect("write CA");
        Pki {
            dir,
            issuer: Issuer::new(params, key),
            ca,
        }
    }

    /// The CA certificate (PEM file).
    pub fn ca(&self) -> &std::path::Path {
        &self.ca
    }

    /// A leaf certificate for `names` (DNS names or IP addresses); returns (cert, key) paths.
    pub fn leaf(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, file);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let (c, k) = (
            self.dir.path().join(format!("{file}.pem")),
            self.dir.path().join(format!("{file}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    /// nats-server arguments for TLS with a certificate for `names` signed by this CA;
    /// `verify` also requires client certificates signed by it.
    pub fn nats_args(&self, names: &[&str], verify: bool) -> Vec<String> {
        let (cert, key) = self.leaf("server", names);
        let mut args = vec![
            "--tls".to_owned(),
            "--tlscert".into(),
            cert.display().to_string(),
            "--tlskey".into(),
            key.display().to_string(),
        ];
        if verify {
            args.extend([
                "--tlsverify".into(),
                "--tlscacert".into(),
                self.ca.display().to_string(),
            ]);
        }
        args
    }
}
