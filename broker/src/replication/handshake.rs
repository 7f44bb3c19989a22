//! How two nodes of a group know each other: each proves it holds the group's secret
//! (`--cluster-secret-file`) without sending it, and with `--node-tls-ca` they first
//! set up mutual TLS.
//!
//! The exchange, on a fresh connection (after TLS when it is on):
//!
//! ```text
//!  dialling node                                   answering node
//!     Knock                          ──────▶
//!                                    ◀──────   Nonce(ns)               (32 random bytes)
//!     Prove { nc, mac(K, client‖ns‖nc) } ─▶      checks it, else Failed and closes
//!                                    ◀──────   Proven(mac(K, server‖ns‖nc))
//!     checks it, else closes
//! ```
//!
//! K is HMAC-SHA256 of the secret under a fixed label. The dialling node proves first,
//! so a stranger who connects learns nothing it could test guesses of the secret
//! against; the answering node proves itself too, so a node never replicates to, or
//! takes votes from, an impostor at a peer's address. Both nonces are fresh on each
//! connection: a recorded exchange cannot be replayed. Without TLS the frames after
//! the handshake are neither secret nor bound to it; the README says to keep the node
//! network private, or turn on mutual TLS.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_rustls::rustls;

use crate::config::Config;

/// A nonce or a proof.
pub type Bytes32 = [u8; 32];

/// What a node presents to the others, and checks of them.
#[derive(Clone, Default)]
pub struct Credentials {
    /// K: the key the proofs are made with, derived from the group's secret.
    key: Bytes32,
    /// Mutual TLS, when configured.
    pub tls: Option<NodeTls>,
}

/// The node port's TLS: the server side for connections in, the client side out.
#[derive(Clone)]
pub struct NodeTls {
    /// Presents this node's certificate; requires the peer's.
    pub server: Arc<rustls::ServerConfig>,
    /// Presents this node's certificate; checks the peer's.
    pub client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Bytes32 {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    for part in parts {
        m.update(part);
    }
    m.finalize().into_bytes().into()
}

impl Credentials {
    /// The credentials of a node holding `secret`, without TLS.
    pub fn new(secret: &str) -> Self {
        Self {
            key: mac(secret.as_bytes(), &[b"txmq node handshake v1"]),
            tls: None,
        }
    }

    /// The credentials the configuration gives: the cluster secret, and mutual TLS
    /// with `node_tls_ca`.
    ///
    /// # Errors
    /// A certificate, key or authority that does not parse.
    pub fn of(config: &Config) -> Result<Self, String> {
        let mut creds = Self::new(config.cluster_secret.as_deref().unwrap_or_default());
        if let (Some(ca), Some(identity)) = (&config.node_tls_ca_pem, &config.node_tls) {
            creds.tls = Some(NodeTls {
                server: crate::tls::server(identity, Some(ca), &[])?,
                client: crate::tls::client(ca, Some(identity))?,
            });
        }
        Ok(creds)
    }

    /// What the dialling node sends for the answering node's nonce `ns` and its own `nc`.
    pub fn client_proof(&self, ns: &Bytes32, nc: &Bytes32) -> Bytes32 {
        mac(&self.key, &[b"client", ns, nc])
    }

    /// What the answering node sends back.
    pub fn server_proof(&self, ns: &Bytes32, nc: &Bytes32) -> Bytes32 {
        mac(&self.key, &[b"server", ns, nc])
    }
}

/// Compares two proofs in constant time.
pub fn same(a: &Bytes32, b: &Bytes32) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_the_secret_the_side_and_both_nonces() {
        let (a, b) = (Credentials::new("one secret"), Credentials::new("another"));
        let (ns, nc) = ([1u8; 32], [2u8; 32]);
        assert!(same(&a.client_proof(&ns, &nc), &a.client_proof(&ns, &nc)));
        assert!(!same(&a.client_proof(&ns, &nc), &b.client_proof(&ns, &nc)));
        assert!(!same(&a.client_proof(&ns, &nc), &a.server_proof(&ns, &nc)));
        assert!(!same(&a.client_proof(&ns, &nc), &a.client_proof(&nc, &ns)));
        assert!(!same(
            &a.client_proof(&ns, &nc),
            &a.client_proof(&ns, &[3u8; 32])
        ));
    }
}
