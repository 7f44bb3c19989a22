//! SCRAM-SHA-256 (RFC 5802, RFC 7677): how a native client proves it knows its user's
//! secret without sending it, and how the broker proves it knows the user.
//!
//! The messages are the RFC's own strings, carried in the handshake frames
//! (`ScramStart`, `ScramFinish`), so any SCRAM implementation's test vectors apply. No
//! channel binding (`n,,`): TLS, when on, protects the connection underneath.
//!
//! The broker keeps per user only what the RFC calls the stored key and the server key
//! (with the salt and iteration count): neither lets anyone log in as the user.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// PBKDF2 iterations for new credentials (RFC 7677 asks for at least 4096).
pub const ITERATIONS: u32 = 4096;
/// Most iterations a broker's challenge may ask a client to compute.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// The header of a client-first message without channel binding.
const GS2: &str = "n,,";

/// What the broker stores of a user's secret. (Its `Debug` hides the keys.)
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The salt (16 random bytes for new credentials).
    pub salt: Vec<u8>,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// `H(HMAC(SaltedPassword, "Client Key"))`.
    pub stored_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn salted(secret: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(secret, salt, iterations, &mut out);
    out
}

impl Credential {
    /// The credential of `secret` with `salt` and `iterations`.
    pub fn new(secret: &[u8], salt: Vec<u8>, iterations: u32) -> Self {
        let salted = salted(secret, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        Self {
            salt,
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

/// Why a SCRAM exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// A message is not of the RFC's form.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The proof (or, on the client, the server's signature) does not match.
    #[error("authentication failed")]
    Failed,
}

/// `=` and `,` escaped as the RFC's `saslname` wants.
fn escape(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

fn unescape(name: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3);
        out.push(match code {
            Some("2C") => ',',
            Some("3D") => '=',
            _ => return Err(ScramError::Malformed("a user name with a stray '='")),
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of `key=` among `fields`.
fn field<'a>(fields: &[&'a str], key: char) -> Result<&'a str, ScramError> {
    fields
        .iter()
        .find_map(|f| f.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .ok_or(ScramError::Malformed("a field is missing"))
}

/// The broker's side of one exchange.
#[derive(Debug)]
pub struct ServerExchange {
    user: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ServerExchange {
    /// Reads a client-first message: answers the user it names and the exchange.
    ///
    /// # Errors
    /// Not of the RFC's form, or a channel binding asked for.
    pub fn start(client_first: &str) -> Result<(String, PartialExchange), ScramError> {
        let bare = client_first.strip_prefix(GS2).ok_or(ScramError::Malformed(
            "the client-first message must start with n,,",
        ))?;
        let fields: Vec<&str> = bare.split(',').collect();
        let user = unescape(field(&fields, 'n')?)?;
        let nonce = field(&fields, 'r')?;
        if nonce.is_empty() || nonce.contains(',') {
            return Err(ScramError::Malformed("an empty client nonce"));
        }
        if user.is_empty() {
            return Err(ScramError::Malformed("an empty user name"));
        }
        Ok((
            user.clone(),
            PartialExchange {
                user,
                client_first_bare: bare.to_string(),
                client_nonce: nonce.to_string(),
            },
        ))
    }
}

/// A started exchange, waiting for the broker to look its user up.
#[derive(Debug)]
pub struct PartialExchange {
    user: String,
    client_first_bare: String,
    client_nonce: String,
}

impl PartialExchange {
    /// The server-first message for `credential` with the broker's nonce part.
    pub fn challenge(self, credential: &Credential, server_nonce: &str) -> ServerExchange {
        let nonce = format!("{}{server_nonce}", self.client_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&credential.salt),
            credential.iterations
        );
        ServerExchange {
            user: self.user,
            client_first_bare: self.client_first_bare,
            server_first,
            nonce,
        }
    }
}

impl ServerExchange {
    /// The server-first message to send.
    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// The user this exchange is for.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Checks the client-final message against `credential`: answers the server-final
    /// message (the broker's signature) when the proof holds.
    ///
    /// # Errors
    /// Malformed, another nonce, or the proof does not match.
    pub fn finish(
        &self,
        client_final: &str,
        credential: &Credential,
    ) -> Result<String, ScramError> {
        let (without_proof, proof) =
            client_final
                .rsplit_once(",p=")
                .ok_or(ScramError::Malformed(
                    "the client-final message has no proof",
                ))?;
        let fields: Vec<&str> = without_proof.split(',').collect();
        if field(&fields, 'c')? != B64.encode(GS2) {
            return Err(ScramError::Malformed("channel binding is not n,,"));
        }
        if field(&fields, 'r')? != self.nonce {
            return Err(ScramError::Failed);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("the proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Failed);
        }
        let auth = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&credential.stored_key, auth.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let same = stored
            .iter()
            .zip(credential.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if !same {
            return Err(ScramError::Failed);
        }
        let server_signature = hmac(&credential.server_key, auth.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// The client's side of one exchange.
#[derive(Debug)]
pub struct ClientExchange {
    client_first_bare: String,
    client_nonce: String,
}

/// The client's state after the challenge: what it expects the broker to sign.
#[derive(Debug)]
pub struct ClientFinal {
    /// The client-final message to send.
    pub message: String,
    expected: String,
}

impl ClientExchange {
    /// Starts an exchange for `user` with `nonce` (random, printable, no comma): answers
    /// the client-first message to send.
    pub fn start(user: &str, nonce: &str) -> (Self, String) {
        let bare = format!("n={},r={nonce}", escape(user));
        let first = format!("{GS2}{bare}");
        (
            Self {
                client_first_bare: bare,
                client_nonce: nonce.to_string(),
            },
            first,
        )
    }

    /// Answers the broker's challenge with the proof of `secret`.
    ///
    /// # Errors
    /// A challenge not of the RFC's form, a nonce that does not extend ours, or more
    /// iterations than [`MAX_ITERATIONS`].
    pub fn answer(&self, server_first: &str, secret: &[u8]) -> Result<ClientFinal, ScramError> {
        let fields: Vec<&str> = server_first.split(',').collect();
        let nonce = field(&fields, 'r')?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(ScramError::Failed);
        }
        let salt = B64
            .decode(field(&fields, 's')?)
            .map_err(|_| ScramError::Malformed("the salt is not base64"))?;
        let iterations: u32 = field(&fields, 'i')?
            .parse()
            .map_err(|_| ScramError::Malformed("the iteration count is not a number"))?;
        // Fewer than the RFC's least would make an offline guess of the secret cheap
        // for whoever sits between client and broker.
        if !(ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::Malformed("an iteration count out of range"));
        }
        let salted = salted(secret, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c={},r={nonce}", B64.encode(GS2));
        let auth = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, auth.as_bytes());
        let mut proof = [0u8; 32];
        for i in 0..32 {
            proof[i] = client_key[i] ^ signature[i];
        }
        let server_key = hmac(&salted, b"Server Key");
        Ok(ClientFinal {
            message: format!("{without_proof},p={}", B64.encode(proof)),
            expected: format!("v={}", B64.encode(hmac(&server_key, auth.as_bytes()))),
        })
    }
}

impl ClientFinal {
    /// Checks the broker's server-final message: it knew the user's credential.
    ///
    /// # Errors
    /// [`ScramError::Failed`] when it did not.
    pub fn verify(&self, server_final: &str) -> Result<(), ScramError> {
        if server_final == self.expected {
            Ok(())
        } else {
            Err(ScramError::Failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677, section 3.
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_credential() -> Credential {
        Credential::new(
            b"pencil",
            B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
            4096,
        )
    }

    #[test]
    fn the_client_side_matches_rfc_7677() {
        let (client, first) = ClientExchange::start("user", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(first, CLIENT_FIRST);
        let fin = client.answer(SERVER_FIRST, b"pencil").unwrap();
        assert_eq!(fin.message, CLIENT_FINAL);
        fin.verify(SERVER_FINAL).unwrap();
        assert_eq!(fin.verify("v=AAAA"), Err(ScramError::Failed));
    }

    #[test]
    fn the_server_side_matches_rfc_7677() {
        let (user, partial) = ServerExchange::start(CLIENT_FIRST).unwrap();
        assert_eq!(user, "user");
        let cred = rfc_credential();
        let server = partial.challenge(&cred, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
        assert_eq!(server.server_first(), SERVER_FIRST);
        assert_eq!(server.finish(CLIENT_FINAL, &cred).unwrap(), SERVER_FINAL);
    }

    #[test]
    fn a_wrong_secret_or_a_replayed_nonce_fails() {
        let cred = rfc_credential();
        let (client, first) = ClientExchange::start("user", "abc");
        let (_, partial) = ServerExchange::start(&first).unwrap();
        let server = partial.challenge(&cred, "xyz");
        let wrong = client.answer(server.server_first(), b"pencil2").unwrap();
        assert_eq!(
            server.finish(&wrong.message, &cred),
            Err(ScramError::Failed)
        );
        let right = client.answer(server.server_first(), b"pencil").unwrap();
        let sig = server.finish(&right.message, &cred).unwrap();
        right.verify(&sig).unwrap();
        // The same final message against another exchange (another server nonce).
        let (_, partial) = ServerExchange::start(&first).unwrap();
        let other = partial.challenge(&cred, "other");
        assert_eq!(other.finish(&right.message, &cred), Err(ScramError::Failed));
    }

    #[test]
    fn names_with_commas_and_equals_round_trip() {
        let (_, first) = ClientExchange::start("a,b=c", "n1");
        assert_eq!(first, "n,,n=a=2Cb=3Dc,r=n1");
        assert_eq!(ServerExchange::start(&first).unwrap().0, "a,b=c");
        assert!(ServerExchange::start("n,,n=a=2Xb,r=n1").is_err());
        assert!(ServerExchange::start("y,,n=a,r=n1").is_err());
    }
}
