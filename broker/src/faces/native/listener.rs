//! The native port's listener: TCP, with TLS when the broker has a certificate
//! (`--tls-cert/--tls-key`). Accepting is quick; the TLS handshake runs in the
//! connection's own task ([`Incoming::open`]), so a slow or hostile client holds up
//! nobody else.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::ServerConfig;

use crate::config::Config;
use crate::tls::{self, Stream};

/// The native port.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    tls: Option<Arc<ServerConfig>>,
}

impl Listener {
    /// Serves on `tcp`, with TLS when `config` names a certificate.
    ///
    /// # Errors
    /// The certificate or key does not parse or does not match.
    pub fn new(tcp: TcpListener, config: &Config) -> Result<Self, String> {
        let tls = match &config.tls {
            Some(identity) => Some(tls::server(identity, None, &[])?),
            None => None,
        };
        Ok(Self { tcp, tls })
    }

    /// Where it listens.
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Whether clients must speak TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The next connection, not yet through its TLS handshake.
    ///
    /// # Errors
    /// As [`TcpListener::accept`] (out of file descriptors and the like).
    pub async fn accept(&self) -> io::Result<(Incoming, SocketAddr)> {
        let (socket, peer) = self.tcp.accept().await?;
        let _ = socket.set_nodelay(true);
        // Finds clients whose host vanished without a FIN, even while nothing is sent.
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = socket2::SockRef::from(&socket).set_tcp_keepalive(&ka);
        Ok((
            Incoming {
                socket,
                peer,
                tls: self.tls.clone(),
            },
            peer,
        ))
    }
}

/// An accepted connection.
#[derive(Debug)]
pub struct Incoming {
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
}

impl Incoming {
    /// Its stream, after the TLS handshake when the port speaks TLS; `None` (logged)
    /// when that handshake fails or does not come within 10 s.
    pub async fn open(self) -> Option<Stream> {
        match tls::accept(self.socket, self.tls.as_ref()).await {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::info!(peer = %self.peer, "connection closed: TLS handshake failed: {e}");
                None
            }
        }
    }
}
