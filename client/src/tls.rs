//! TLS to the broker's native port: which authorities the client trusts.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use crate::error::{Error, Result};

/// How a client speaks TLS: the certificate authorities it trusts to sign the broker's
/// certificate, which must name the host the client dials (a DNS name or an IP).
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

fn builder() -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Invalid(format!("TLS: {e}")))
}

impl Tls {
    /// Trusts the public web's authorities (Mozilla's list, built in).
    ///
    /// # Errors
    /// None in practice: the built-in list is valid.
    pub fn public_roots() -> Result<Self> {
        let roots =
            rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Ok(Self {
            config: Arc::new(
                builder()?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ),
        })
    }

    /// Trusts only the authorities in `pem` (one or more PEM certificates: a private
    /// authority, or the broker's own self-signed certificate).
    ///
    /// # Errors
    /// [`Error::Invalid`] when `pem` holds no usable certificate.
    pub fn with_ca_pem(pem: &[u8]) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::Invalid(format!("CA certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Invalid(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::Invalid("no PEM certificate in the CA file".into()));
        }
        Ok(Self {
            config: Arc::new(
                builder()?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ),
        })
    }

    /// [`Tls::with_ca_pem`] from a file.
    ///
    /// # Errors
    /// The file cannot be read or holds no usable certificate.
    pub fn with_ca_file(path: &std::path::Path) -> Result<Self> {
        let pem = std::fs::read(path)
            .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
        Self::with_ca_pem(&pem).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }

    /// The TLS handshake over `socket` to `addr`, and the halves of the stream.
    pub(crate) async fn connect(
        &self,
        socket: TcpStream,
        addr: &str,
    ) -> std::io::Result<(Reader, Writer)> {
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}"))
        })?;
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, socket)
            .await?;
        let (r, w) = tokio::io::split(tls);
        Ok((Box::new(r), Box::new(w)))
    }
}

/// The reading half of a connection's stream.
pub(crate) type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half.
pub(crate) type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The halves of a plain stream.
pub(crate) fn plain(socket: TcpStream) -> (Reader, Writer) {
    let (r, w) = socket.into_split();
    (Box::new(r), Box::new(w))
}
