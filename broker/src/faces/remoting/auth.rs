//! Who a Remoting request is: RocketMQ's `AclClientRPCHook` signs each request with
//! the fields `AccessKey` and `Signature`, the base64 HMAC-SHA1, under the user's
//! secret, of every header field's value (`Signature` left out) in the order of their
//! names, followed by the body. The access key is a txmq user's name and the secret
//! its own (kept sealed, as for the gRPC face), or a pair of `grpc-credentials-file`.
//! A broker with users (or told to have them) takes no unsigned request.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use super::frame::Command;
use crate::auth::{Auth, Identity};

/// The field that names the key.
pub const ACCESS_KEY: &str = "AccessKey";
/// The field that carries the signature.
pub const SIGNATURE: &str = "Signature";

/// Whether `signature` (base64) signs `request` under `secret`, in constant time.
fn signs(secret: &str, request: &Command, signature: &str) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()).expect("any key");
    let mut names: Vec<&String> = request.ext.keys().filter(|k| *k != SIGNATURE).collect();
    names.sort();
    for name in names {
        mac.update(request.ext[name].as_bytes());
    }
    mac.update(&request.body);
    mac.verify_slice(&given).is_ok()
}

/// Who `request` proves it is.
///
/// # Errors
/// A sentence (the same for an unknown key and a bad signature: nothing to probe).
pub fn identify(
    request: &Command,
    auth: Option<&Auth>,
    pairs: &[(String, String)],
    closed: bool,
) -> Result<Identity, &'static str> {
    let users = closed || auth.is_some_and(Auth::active);
    let Some(key) = request.field(ACCESS_KEY) else {
        if users || !pairs.is_empty() {
            return Err(
                "this broker needs signed requests: give the client an AclClientRPCHook \
                 with a user's name and secret",
            );
        }
        return Ok(Identity::Anonymous);
    };
    let signature = request.field(SIGNATURE).unwrap_or_default();
    let refused = "bad credentials";
    if let Some((secret, since_ms)) = auth.and_then(|a| a.grpc_secret(key)) {
        return if signs(&secret, request, signature) {
            Ok(Identity::User {
                name: key.to_string(),
                since_ms,
            })
        } else {
            Err(refused)
        };
    }
    if auth.is_some_and(|a| a.has_user(key)) {
        return Err(refused);
    }
    match pairs.iter().find(|(k, _)| k == key) {
        Some((_, secret)) if signs(secret, request, signature) => Ok(Identity::Token),
        _ if !users && pairs.is_empty() => Ok(Identity::Anonymous),
        _ => Err(refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(secret: &str) -> Command {
        let mut c = Command {
            code: 310,
            body: bytes::Bytes::from_static(b"body"),
            ..Command::default()
        }
        .with("b", "T1")
        .with("a", "pg")
        .with(ACCESS_KEY, "alice");
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
        // Sorted by name: AccessKey, a, b.
        mac.update(b"alicepgT1body");
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        c.ext.insert(SIGNATURE.into(), sig);
        c
    }

    #[test]
    fn signatures_are_checked_against_the_pairs() {
        let pairs = vec![("alice".to_string(), "s3cret".to_string())];
        assert!(matches!(
            identify(&signed("s3cret"), None, &pairs, false),
            Ok(Identity::Token)
        ));
        assert!(identify(&signed("other"), None, &pairs, false).is_err());
        let mut tampered = signed("s3cret");
        tampered.body = bytes::Bytes::from_static(b"bodY");
        assert!(identify(&tampered, None, &pairs, false).is_err());
        let unsigned = Command::default();
        assert!(identify(&unsigned, None, &pairs, false).is_err());
        assert!(identify(&unsigned, None, &[], true).is_err());
        assert!(matches!(
            identify(&unsigned, None, &[], false),
            Ok(Identity::Anonymous)
        ));
    }
}
