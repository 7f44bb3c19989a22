//! TLS for the broker's sockets: the server side of the native port (one certificate
//! for every face: `--tls-cert/--tls-key`), and both sides of the node port, where
//! `--node-tls-ca` turns on mutual TLS (each node presents its certificate and accepts
//! only peers whose certificate that authority signed).
//!
//! A [`Stream`] is what the faces read and write: a plain TCP stream or either side of
//! a TLS one, so that the code above the socket is the same with and without TLS.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// How long a peer may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate chain and its private key, as PEM.
#[derive(Clone)]
pub struct Identity {
    /// The certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// The private key (never printed).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no PEM certificate"));
    }
    Ok(certs)
}

fn key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("{what}: {e}"))
}

fn roots(ca: &[u8], what: &str) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    for cert in certs(ca, what)? {
        store
            .add(cert)
            .map_err(|e| format!("{what}: not a usable certificate authority: {e}"))?;
    }
    Ok(store)
}

/// A server configuration presenting `identity`; with `client_ca`, a client must
/// present a certificate that authority signed (mutual TLS).
///
/// # Errors
/// A certificate, key or authority that does not parse, or a key that does not match.
pub fn server(
    identity: &Identity,
    client_ca: Option<&[u8]>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca, "node-tls-ca")?),
                provider(),
            )
            .build()
            .map_err(|e| format!("node-tls-ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(
            certs(&identity.cert, "tls-cert")?,
            key(&identity.key, "tls-key")?,
        )
        .map_err(|e| format!("tls-cert / tls-key: {e}"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client configuration that trusts `ca` only and, for mutual TLS, presents
/// `identity`.
///
/// # Errors
/// As [`server`].
pub fn client(ca: &[u8], identity: Option<&Identity>) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca, "node-tls-ca")?);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(certs(&id.cert, "tls-cert")?, key(&id.key, "tls-key")?)
            .map_err(|e| format!("tls-cert / tls-key: {e}"))?,
    };
    Ok(Arc::new(config))
}

/// The name a peer at `addr` (`HOST:PORT`) must hold in its certificate.
///
/// # Errors
/// An address without a port, or a host that is neither an IP address nor a DNS name.
pub fn server_name(addr: &str) -> io::Result<ServerName<'static>> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))
}

/// Completes the server side of a TLS handshake on `socket` within
/// [`HANDSHAKE_TIMEOUT`], or passes it through plain when there is no configuration.
///
/// # Errors
/// The handshake failed or took too long.
pub async fn accept(
    socket: TcpStream,
    config: Option<&Arc<rustls::ServerConfig>>,
) -> io::Result<Stream> {
    let Some(config) = config else {
        return Ok(Stream::Plain(socket));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
        Ok(Ok(tls)) => Ok(Stream::Server(Box::new(tls))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no TLS handshake within 10 s",
        )),
    }
}

/// Completes the client side of a TLS handshake to `addr` on `socket`, or passes it
/// through plain when there is no configuration.
///
/// # Errors
/// The handshake failed (an untrusted or misnamed certificate) or took too long.
pub async fn connect(
    socket: TcpStream,
    addr: &str,
    config: Option<&Arc<rustls::ClientConfig>>,
) -> io::Result<Stream> {
    let Some(config) = config else {
        return Ok(Stream::Plain(socket));
    };
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        connector.connect(server_name(addr)?, socket),
    )
    .await
    {
        Ok(Ok(tls)) => Ok(Stream::Client(Box::new(tls))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{addr}: no TLS handshake within 10 s"),
        )),
    }
}

/// A connection's byte stream, with or without TLS.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// The server side of TLS.
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The client side of TLS.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The reading half of a [`Stream`].
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a [`Stream`].
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

impl Stream {
    /// Splits the stream for a reader and a writer task (plain TCP without a lock).
    pub fn split(self) -> (Reader, Writer) {
        match self {
            Self::Plain(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            other => {
                let (r, w) = tokio::io::split(other);
                (Box::new(r), Box::new(w))
            }
        }
    }

    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Self::Plain(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
