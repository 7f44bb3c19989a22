//! Users' secrets kept for the gRPC face: RocketMQ's signature is an HMAC under the
//! secret itself, so the broker needs the secret, not only a SCRAM verifier. It is
//! kept sealed (ChaCha20-Poly1305, the user's name as associated data) under a key
//! derived from the broker group's cluster secret, or a single broker's key file; it
//! is never in plain text in the data directory, the Raft log or a snapshot. A broker
//! with neither key keeps no secret: its users authenticate on the native face only.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key users' secrets are sealed under.
#[derive(Clone)]
pub struct SealKey([u8; 32]);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// The key derived from a secret the operator keeps (the cluster secret, or the
    /// broker key file's).
    pub fn derive(secret: &str) -> Self {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
        mac.update(b"txmq: users' secrets, v1");
        Self(mac.finalize().into_bytes().into())
    }

    /// `secret` of `user`, sealed: a random nonce, then the ciphertext and its tag.
    pub fn seal(&self, user: &str, secret: &str) -> Vec<u8> {
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.0));
        let nonce: [u8; 12] = rand::random();
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: user.as_bytes(),
                },
            )
            .expect("sealing a short secret cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// The secret `sealed` holds for `user`; `None` when it was sealed under another
    /// key, for another user, or altered.
    pub fn open(&self, user: &str, sealed: &[u8]) -> Option<String> {
        if sealed.len() < 12 + 16 {
            return None;
        }
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.0));
        let (nonce, body) = sealed.split_at(12);
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: user.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(plain).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_and_user() {
        let key = SealKey::derive("cluster-secret");
        let sealed = key.seal("app", "s3cret-app");
        assert!(!sealed.windows(10).any(|w| w == b"s3cret-app"));
        assert_eq!(key.open("app", &sealed).as_deref(), Some("s3cret-app"));
        assert_eq!(key.open("other", &sealed), None);
        assert_eq!(SealKey::derive("another").open("app", &sealed), None);
        let mut altered = sealed.clone();
        altered[20] ^= 1;
        assert_eq!(key.open("app", &altered), None);
        assert_ne!(key.seal("app", "s3cret-app"), sealed, "a nonce per seal");
    }
}
