//! Certificates for TLS tests: a private authority and a certificate it signed for
//! loopback, written as PEM files to a temporary directory.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair,
};

/// An authority and one certificate (with its key) it signed for `127.0.0.1` and
/// `localhost`, usable by a server and a client alike.
pub struct Pki {
    _dir: tempfile::TempDir,
    /// The authority's certificate.
    pub ca: PathBuf,
    /// The signed certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl Pki {
    /// A fresh authority and certificate.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Names of their own: with rcgen's one default name for both, the certificate
        // would name itself as its issuer and look self-signed.
        ca_params.distinguished_name = name("txmq test authority");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key"))
            .expect("the authority");
        let mut leaf_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("params");
        leaf_params.distinguished_name = name("txmq test broker");
        leaf_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf_key = KeyPair::generate().expect("key");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca)
            .expect("the certificate");
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), ca.pem()).expect("write");
        std::fs::write(path("cert.pem"), leaf.pem()).expect("write");
        std::fs::write(path("key.pem"), leaf_key.serialize_pem()).expect("write");
        Self {
            ca: path("ca.pem"),
            cert: path("cert.pem"),
            key: path("key.pem"),
            _dir: dir,
        }
    }

    /// The flags that give a broker this certificate on every client face.
    pub fn broker_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

fn name(common: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common);
    dn
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
