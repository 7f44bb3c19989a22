//! The gRPC clients' credentials: with `grpc-credentials-file`, every call must carry
//! RocketMQ's `authorization` header, `MQv2-HMAC-SHA1 Credential=<access key>, …,
//! Signature=<hex HMAC-SHA1 of the x-mq-date-time header under the key's secret>`, for
//! a key in the file. Others are refused as unauthenticated before they reach the
//! broker. (The clients' date formats differ, so the date is signed, not checked
//! against the clock.)

use hmac::{Hmac, Mac};
use sha1::Sha1;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

/// Checks a call's signature against `pairs` (access key, secret).
pub fn check(pairs: &[(String, String)], metadata: &MetadataMap) -> Result<(), Status> {
    let header = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
    let Some(authorization) = header("authorization") else {
        return Err(Status::unauthenticated(
            "this broker's gRPC endpoint needs signed requests: set the client's credentials",
        ));
    };
    let date = header("x-mq-date-time").unwrap_or_default();
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
    let signature = field("Signature").unwrap_or_default();
    // One answer for an unknown key and a bad signature: keys are not to be probed.
    let refused = || Status::unauthenticated("bad credentials");
    let Some((_, secret)) = pairs.iter().find(|(k, _)| k == key) else {
        return Err(refused());
    };
    let Ok(given) = hex(signature) else {
        return Err(Status::unauthenticated("the signature is not hex"));
    };
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(date.as_bytes());
    // A constant-time comparison.
    mac.verify_slice(&given).map_err(|_| refused())
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

/// Marks a call whose signature was checked against the credentials file.
#[derive(Debug, Clone, Copy)]
pub struct Signed;

/// The interceptor the server runs before every call.
pub fn interceptor(
    pairs: std::sync::Arc<Vec<(String, String)>>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        if !pairs.is_empty() {
            check(&pairs, request.metadata())?;
            request.extensions_mut().insert(Signed);
        }
        Ok(request)
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
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut m = MetadataMap::new();
        m.insert("x-mq-date-time", date.parse().unwrap());
        let auth = format!(
            "MQv2-HMAC-SHA1 Credential={key}, SignedHeaders=x-mq-date-time, Signature={sig}"
        );
        m.insert("authorization", auth.parse().unwrap());
        m
    }

    #[test]
    fn signatures_are_checked_against_the_keys_secret() {
        let pairs = vec![("ak".to_string(), "sk".to_string())];
        assert!(check(&pairs, &signed("ak", "sk", "20261130T070000Z")).is_ok());
        assert!(check(&pairs, &signed("ak", "wrong", "20261130T070000Z")).is_err());
        assert!(check(&pairs, &signed("other", "sk", "20261130T070000Z")).is_err());
        assert!(check(&pairs, &MetadataMap::new()).is_err());
        // The date is what is signed: another date, another signature.
        let mut m = signed("ak", "sk", "20261130T070000Z");
        m.insert("x-mq-date-time", "20261130T070001Z".parse().unwrap());
        assert!(check(&pairs, &m).is_err());
    }
}
