//! Who a gRPC call is: RocketMQ's `authorization` header, `MQv2-HMAC-SHA1
//! Credential=<access key>[/…], SignedHeaders=x-mq-date-time, Signature=<hex
//! HMAC-SHA1 of the x-mq-date-time header under the key's secret>`.
//!
//! The access key is a user's name (its secret kept sealed: `auth::seal`), or a key
//! of `--grpc-credentials-file` (the shared credentials, a super user's rights as the
//! native token). A broker with neither takes unsigned calls as anonymous, as before
//! users existed; once either exists, every call must be signed.
//!
//! The signature covers only the date, so it cannot be bound to a request: a
//! captured header works for as long as its date is accepted. The date must be within
//! 15 minutes of the broker's clock, widened by the world's time-zone offsets (−12 h to
//! +14 h): the Java, Go and Python clients send their local time with a literal `Z`
//! (`yyyyMMdd'T'HHmmss'Z'`), only Node.js sends UTC. So a captured header is good for
//! at most about a day, and a gRPC endpoint with users belongs behind TLS.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::auth::{AUDIT, Auth, Identity};

/// How far a signed date may be from the broker's clock, before time zones.
const SKEW_SECS: i64 = 15 * 60;
/// The time-zone offsets a client's local time may carry.
const EARLIEST_ZONE_SECS: i64 = -12 * 3600;
const LATEST_ZONE_SECS: i64 = 14 * 3600;

/// What the interceptor proved of a call, kept in its extensions.
#[derive(Debug, Clone)]
pub struct Signed(pub Identity);

/// Seconds since the epoch of `yyyyMMddTHHmmssZ` (the fields as given, whatever zone
/// they were in).
fn date_secs(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, s) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s)
}

/// Whether a signed date is one the broker takes now (`now` in seconds).
fn date_ok(date: &str, now: i64) -> bool {
    date_secs(date).is_some_and(|t| {
        let off = t - now;
        (EARLIEST_ZONE_SECS - SKEW_SECS..=LATEST_ZONE_SECS + SKEW_SECS).contains(&off)
    })
}

fn hex(text: &str) -> Result<Vec<u8>, ()> {
    if !text.len().is_multiple_of(2) {
        return Err(());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2).ok_or(())?, 16).map_err(|_| ()))
        .collect()
}

/// Whether `signature` (hex) is the HMAC-SHA1 of `date` under `secret`, in constant
/// time.
fn signs(secret: &str, date: &str, signature: &[u8]) -> bool {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(date.as_bytes());
    mac.verify_slice(signature).is_ok()
}

/// Who a call's metadata proves it is: `None` for an anonymous call a broker without
/// users or credentials takes.
///
/// # Errors
/// Unauthenticated: no signature where one is needed, an unknown key, a bad
/// signature, or a date outside the window (one answer for the last three).
pub fn verify(
    pairs: &[(String, String)],
    auth: Option<&Auth>,
    closed: bool,
    metadata: &MetadataMap,
    now_secs: i64,
) -> Result<Option<Identity>, Status> {
    let users = closed || auth.is_some_and(Auth::active);
    if pairs.is_empty() && !users {
        // Open: a header is not checked (the Python client sends one with empty keys).
        return Ok(None);
    }
    let header = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
    let Some(authorization) = header("authorization") else {
        return Err(Status::unauthenticated(
            "this broker's gRPC endpoint needs signed requests: set the client's credentials \
             (access key: a user's name, secret: its secret)",
        ));
    };
    let fields = authorization
        .strip_prefix("MQv2-HMAC-SHA1 ")
        .ok_or_else(|| Status::unauthenticated("authorization is not MQv2-HMAC-SHA1"))?;
    let field = |name: &str| {
        fields
            .split(',')
            .map(str::trim)
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
    };
    let key = field("Credential")
        .map(|c| c.split('/').next().unwrap_or(c))
        .unwrap_or_default();
    let date = header("x-mq-date-time").unwrap_or_default();
    // One answer for an unknown key, a bad signature and a stale date: nothing to probe.
    let refused = || Status::unauthenticated("bad credentials");
    let Ok(given) = hex(field("Signature").unwrap_or_default()) else {
        return Err(refused());
    };
    if !date_ok(date, now_secs) {
        return Err(refused());
    }
    // A user of that name decides first: a key of the credentials file made a user
    // (and maybe narrowed since, or given a new secret) is that user, not the file's key.
    if let Some((secret, since_ms)) = auth.and_then(|a| a.grpc_secret(key)) {
        return if signs(&secret, date, &given) {
            Ok(Some(Identity::User {
                name: key.to_string(),
                since_ms,
            }))
        } else {
            Err(refused())
        };
    }
    if auth.is_some_and(|a| a.has_user(key)) {
        // A user whose secret this broker cannot unseal: not the file's key either.
        return Err(refused());
    }
    match pairs.iter().find(|(k, _)| k == key) {
        Some((_, secret)) if signs(secret, date, &given) => Ok(Some(Identity::Token)),
        _ => Err(refused()),
    }
}

/// The interceptor the server runs before every call: it marks the call with who it
/// is ([`Signed`]) or refuses it. Results are counted and audited.
pub fn interceptor(
    pairs: std::sync::Arc<Vec<(String, String)>>,
    live: std::sync::Arc<super::Live>,
    closed: bool,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let shared = live.get();
        let now = i64::try_from(txmq_protocol::now_ms() / 1000).unwrap_or(i64::MAX);
        let auth = live.auth();
        match verify(&pairs, auth.as_deref(), closed, request.metadata(), now) {
            Ok(Some(identity)) => {
                if let Some(s) = &shared {
                    s.metrics.auth_successes.with_label_values(&["grpc"]).inc();
                }
                request.extensions_mut().insert(Signed(identity));
                Ok(request)
            }
            Ok(None) => Ok(request),
            Err(status) => {
                if let Some(s) = &shared {
                    s.metrics.auth_failures.with_label_values(&["grpc"]).inc();
                }
                tracing::warn!(target: AUDIT, face = "grpc", from = ?request.remote_addr(), "authentication failed: {}", status.message());
                // Slowed by the endpoint's outer layer (`limits::REFUSAL_DELAY`): a sleep
                // here, in a synchronous interceptor, would hold a runtime worker.
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(key: &str, secret: &str, date: &str) -> MetadataMap {
        let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(date.as_bytes());
        let sig: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        let mut m = MetadataMap::new();
        m.insert("x-mq-date-time", date.parse().unwrap());
        let auth = format!(
            "MQv2-HMAC-SHA1 Credential={key}//Rocketmq, SignedHeaders=x-mq-date-time, \
             Signature={sig}"
        );
        m.insert("authorization", auth.parse().unwrap());
        m
    }

    /// 2026-11-30T07:00:00Z.
    const NOW: i64 = 1_796_022_000;

    #[test]
    fn dates_parse_as_civil_time() {
        assert_eq!(date_secs("19700101T000000Z"), Some(0));
        assert_eq!(date_secs("20261130T070000Z"), Some(NOW));
        assert_eq!(date_secs("20000229T235959Z"), Some(951_868_799));
        for bad in [
            "2026-11-30T07:00:00Z",
            "20261330T070000Z",
            "20261130T070000",
            "",
        ] {
            assert_eq!(date_secs(bad), None, "{bad}");
        }
    }

    #[test]
    fn signatures_are_checked_against_the_keys_secret_and_the_date_window() {
        let pairs = vec![("ak".to_string(), "sk".to_string())];
        let ok = |m: &MetadataMap| verify(&pairs, None, false, m, NOW);
        assert!(matches!(
            ok(&signed("ak", "sk", "20261130T070000Z")),
            Ok(Some(Identity::Token))
        ));
        assert!(ok(&signed("ak", "wrong", "20261130T070000Z")).is_err());
        assert!(ok(&signed("other", "sk", "20261130T070000Z")).is_err());
        assert!(ok(&MetadataMap::new()).is_err());
        // The date is what is signed: another date, another signature.
        let mut m = signed("ak", "sk", "20261130T070000Z");
        m.insert("x-mq-date-time", "20261130T070001Z".parse().unwrap());
        assert!(ok(&m).is_err());
        // Local time of a client in UTC+8 and in UTC-10 is taken; a day old is not.
        assert!(ok(&signed("ak", "sk", "20261130T150000Z")).is_ok());
        assert!(ok(&signed("ak", "sk", "20261129T210000Z")).is_ok());
        assert!(ok(&signed("ak", "sk", "20261129T070000Z")).is_err());
        assert!(ok(&signed("ak", "sk", "20261201T070000Z")).is_err());
        assert!(ok(&signed("ak", "sk", "not a date")).is_err());
    }

    #[tokio::test]
    async fn users_sign_with_their_own_secret() {
        use crate::auth::seal::SealKey;
        use crate::storage::records::{RuleRecord, UserRecord};
        struct Nowhere;
        impl crate::auth::Store for Nowhere {
            async fn put_user(&self, _: &str, _: &UserRecord) -> crate::Result<()> {
                Ok(())
            }
            async fn delete_user(&self, _: &str, _: &[u64]) -> crate::Result<()> {
                Ok(())
            }
            async fn put_rule(&self, _: u64, _: &RuleRecord) -> crate::Result<()> {
                Ok(())
            }
            async fn delete_rules(&self, _: &[u64]) -> crate::Result<()> {
                Ok(())
            }
        }
        let auth = Auth::open().sealing(SealKey::derive("cluster"));
        // Told to be closed, with no users at hand (a node that has not served yet):
        // unsigned calls are refused.
        assert!(verify(&[], None, true, &MetadataMap::new(), NOW).is_err());
        // Open: unsigned calls are anonymous.
        assert!(matches!(
            verify(&[], Some(&auth), false, &MetadataMap::new(), NOW),
            Ok(None)
        ));
        auth.create_user(&Nowhere, "app", "s3cret-app", false)
            .await
            .unwrap();
        let date = "20261130T070000Z";
        let who = verify(
            &[],
            Some(&auth),
            false,
            &signed("app", "s3cret-app", date),
            NOW,
        )
        .unwrap();
        assert!(matches!(who, Some(Identity::User { ref name, .. }) if name == "app"));
        assert!(verify(&[], Some(&auth), false, &signed("app", "guess", date), NOW).is_err());
        assert!(verify(&[], Some(&auth), false, &MetadataMap::new(), NOW).is_err());
        // Sealed under another key: not a secret this broker can use.
        let other = Auth::open().sealing(SealKey::derive("other"));
        other
            .create_user(&Nowhere, "app", "s3cret-app", false)
            .await
            .unwrap();
        let unsealed = Auth::open();
        unsealed
            .create_user(&Nowhere, "app", "s3cret-app", false)
            .await
            .unwrap();
        assert!(
            verify(
                &[],
                Some(&unsealed),
                false,
                &signed("app", "s3cret-app", date),
                NOW
            )
            .is_err()
        );
    }
}
