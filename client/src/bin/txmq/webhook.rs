//! `txmq webhook`: best-effort notification (最大努力通知). A consumer group of a topic
//! whose every message is POSTed to an HTTP endpoint, signed; a 2xx answer acks it,
//! anything else (a redirect included, or no answer) nacks it into the group's backoff,
//! and after the group's max attempts the broker moves it to the dead-letter queue. The
//! receiver can ask what it gave up on with a small signed query interface
//! (`--query-listen`; serve it on loopback or behind TLS: it returns bodies).
//!
//! Signatures are HMAC-SHA256 with the shared secret, hex, each over a labelled text so
//! one kind can never pass for the other:
//! - a notification: `X-Txmq-Signature: v1=<hex>` over
//!   `"txmq-webhook-v1\n<timestamp>\n<message id>\n<topic>\n<attempt>\n"` followed by the body;
//! - a query: the same header over `"txmq-query-v1\n<timestamp>\nGET\n<path and query>"`,
//!   within five minutes of the bridge's clock.
//!
//! `<timestamp>` is `X-Txmq-Timestamp`, ms since the Unix epoch. Key and tag travel in
//! headers unsigned.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use txmq_client::{Admin, Consumer, ConsumerOptions, Delivery, pb};

/// How far a query's timestamp may be from the bridge's clock.
const QUERY_SKEW_MS: u64 = 5 * 60 * 1000;
/// Most dead letters a `/missed` query reads.
const MISSED_SCAN: usize = 10_000;

#[derive(Debug, clap::Args)]
pub struct WebhookArgs {
    /// Consumer group the bridge consumes as.
    #[arg(long)]
    group: String,
    /// Topic whose messages are POSTed.
    #[arg(long)]
    topic: String,
    /// Where each message is POSTed (http:// or https://).
    #[arg(long)]
    url: String,
    /// File holding the signing secret (else TXMQ_WEBHOOK_SECRET).
    #[arg(long)]
    secret_file: Option<std::path::PathBuf>,
    /// POSTs in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// How long a POST may take before it counts as failed, in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Deliveries before a message is dead-lettered (0: the broker's max-attempts).
    #[arg(long, default_value_t = 0)]
    max_attempts: u32,
    /// Serve the receiver's queries here (`HOST:PORT`): `GET /messages/ID` and
    /// `GET /missed?since_ms=…&limit=…`.
    #[arg(long)]
    query_listen: Option<std::net::SocketAddr>,
}

type Signer = Hmac<Sha256>;

/// The hex HMAC-SHA256 of `text` under `secret`.
fn sign(secret: &[u8], text: &[&[u8]]) -> String {
    let mut mac = Signer::new_from_slice(secret).expect("HMAC takes any key length");
    for part in text {
        mac.update(part);
    }
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a notification's signature covers, before its body.
fn notification_head(at: &str, id: &str, topic: &str, attempt: u32) -> String {
    format!("txmq-webhook-v1\n{at}\n{id}\n{topic}\n{attempt}\n")
}

/// What a query's signature covers.
fn query_text(at: &str, path: &str) -> String {
    format!("txmq-query-v1\n{at}\nGET\n{path}")
}

fn secret(a: &WebhookArgs) -> anyhow::Result<Vec<u8>> {
    let text = match &a.secret_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read the secret file {}", p.display()))?,
        None => std::env::var("TXMQ_WEBHOOK_SECRET")
            .context("no signing secret: give --secret-file or set TXMQ_WEBHOOK_SECRET")?,
    };
    let text = text.trim();
    anyhow::ensure!(!text.is_empty(), "the signing secret is empty");
    Ok(text.as_bytes().to_vec())
}

/// Runs the bridge until the process is stopped.
pub async fn run(addr: &str, token: &str, a: WebhookArgs) -> anyhow::Result<()> {
    let secret = Arc::new(secret(&a)?);
    anyhow::ensure!(
        a.url.starts_with("http://") || a.url.starts_with("https://"),
        "--url must be an http:// or https:// URL, not {:?}",
        a.url
    );
    anyhow::ensure!(a.timeout > 0.0, "--timeout must be more than zero");
    // A redirect is a failure: followed, a POST turns into a GET without its body (an
    // ack for nothing received), or the signed request goes to another host.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(a.timeout))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("HTTP client")?;
    if let Some(at) = a.query_listen {
        let listener = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("cannot listen on {at}"))?;
        println!("txmq webhook queries on {}", listener.local_addr()?);
        let query = Query {
            admin: crate::access::admin(addr, token).await?,
            group: a.group.clone(),
            topic: a.topic.clone(),
            secret: secret.clone(),
        };
        tokio::spawn(serve_queries(listener, Arc::new(query)));
    }
    // The lease outlasts a POST that runs to its timeout: a message is never POSTed
    // twice at once.
    let lease = Duration::from_secs_f64(a.timeout * 2.0).max(Duration::from_secs(30));
    let options = ConsumerOptions {
        window: a.concurrency.max(1),
        lease: Some(lease),
        max_attempts: a.max_attempts,
        auth_token: token.to_string(),
        user: crate::access::user(),
        tls: crate::access::tls(),
        ..ConsumerOptions::new(a.group.clone(), a.topic.clone())
    };
    let mut consumer = Consumer::subscribe(addr, options).await?;
    tracing::info!(group = %a.group, topic = %a.topic, url = %a.url, "webhook bridge running");
    let mut posting = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            next = consumer.next() => {
                let Some(delivery) = next else { break };
                let delivery = delivery?;
                posting.push(post(http.clone(), a.url.clone(), secret.clone(), delivery));
            }
            Some(()) = posting.next(), if !posting.is_empty() => {}
        }
    }
    while posting.next().await.is_some() {}
    Ok(())
}

/// POSTs one delivery; acks it on a 2xx, else nacks it into the group's backoff.
async fn post(http: reqwest::Client, url: String, secret: Arc<Vec<u8>>, d: Delivery) {
    let m = &d.message;
    let at = txmq_protocol::now_ms().to_string();
    let head = notification_head(&at, &m.message_id, &m.topic, d.attempt);
    let signature = sign(&secret, &[head.as_bytes(), m.body.as_ref()]);
    // A content type no header can carry is none at all.
    let content_type = m
        .properties
        .get("content-type")
        .filter(|t| !has_control(t))
        .cloned()
        .unwrap_or_else(|| "application/octet-stream".into());
    // Key and tag are the producer's text: control characters (a line break, say) are
    // percent-encoded, and the header `x-txmq-encoded` names what was, so the receiver
    // can decode it exactly. Sent raw, they made every POST of the message fail.
    let (key, key_encoded) = header_text(&m.key);
    let (tag, tag_encoded) = header_text(&m.tag);
    let encoded: Vec<&str> = [("x-txmq-key", key_encoded), ("x-txmq-tag", tag_encoded)]
        .into_iter()
        .filter_map(|(name, yes)| yes.then_some(name))
        .collect();
    let mut request = http
        .post(&url)
        .header("content-type", content_type)
        .header("x-txmq-message-id", &m.message_id)
        .header("x-txmq-topic", &m.topic)
        .header("x-txmq-key", key)
        .header("x-txmq-tag", tag);
    if !encoded.is_empty() {
        request = request.header("x-txmq-encoded", encoded.join(", "));
    }
    let sent = request
        .header("x-txmq-attempt", d.attempt.to_string())
        .header("x-txmq-timestamp", &at)
        .header("x-txmq-signature", format!("v1={signature}"))
        .body(m.body.to_vec())
        .send()
        .await;
    let outcome = match sent {
        Ok(r) if r.status().is_success() => d.ack().await,
        Ok(r) if r.status().is_redirection() => {
            tracing::info!(message = %m.message_id, attempt = d.attempt, status = %r.status(), "receiver redirected (not followed); retrying with the group's backoff");
            d.nack(None).await
        }
        Ok(r) => {
            tracing::info!(message = %m.message_id, attempt = d.attempt, status = %r.status(), "receiver refused; retrying with the group's backoff");
            d.nack(None).await
        }
        Err(e) => {
            tracing::info!(message = %m.message_id, attempt = d.attempt, "POST failed ({e}); retrying with the group's backoff");
            d.nack(None).await
        }
    };
    if let Err(e) = outcome {
        // The lease went elsewhere or the broker is away: the message comes back.
        tracing::warn!(message = %m.message_id, "settling the delivery failed: {e}");
    }
}

/// Whether `text` holds a character no HTTP header value may (controls but tab).
fn has_control(text: &str) -> bool {
    text.chars().any(|c| c.is_ascii_control() && c != '\t')
}

/// `text` as a header value: as it is when it can be; else with its control characters
/// and `%` percent-encoded (`true`).
fn header_text(text: &str) -> (String, bool) {
    if !has_control(text) {
        return (text.to_string(), false);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if (c.is_ascii_control() && c != '\t') || c == '%' {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    (out, true)
}

struct Query {
    admin: Admin,
    group: String,
    topic: String,
    secret: Arc<Vec<u8>>,
}

/// Serves `GET /messages/ID` and `GET /missed` to a receiver that signs its requests.
async fn serve_queries(listener: tokio::net::TcpListener, query: Arc<Query>) {
    use axum::extract::{OriginalUri, Path, RawQuery, State};
    use axum::http::{HeaderMap, StatusCode};
    async fn message(
        State(q): State<Arc<Query>>,
        OriginalUri(uri): OriginalUri,
        headers: HeaderMap,
        Path(id): Path<String>,
    ) -> (StatusCode, String) {
        if let Err(e) = q.check(&uri, &headers) {
            return e;
        }
        match q.admin.show_message(&id, true).await {
            Ok(shown) => {
                let state = shown
                    .groups
                    .iter()
                    .find(|g| g.group == q.group)
                    .map(|g| (g.state.clone(), g.attempts));
                match shown.message.and_then(|f| f.message) {
                    Some(m) if m.topic == q.topic => (
                        StatusCode::OK,
                        json!({
                            "message": describe(&m),
                            "state": state.as_ref().map(|s| s.0.clone()),
                            "attempts": state.map(|s| s.1),
                        })
                        .to_string(),
                    ),
                    _ => (
                        StatusCode::NOT_FOUND,
                        "no such message on this topic\n".into(),
                    ),
                }
            }
            Err(e) if e.code() == Some(txmq_client::ErrorCode::MessageNotFound) => {
                (StatusCode::NOT_FOUND, "no such message\n".into())
            }
            Err(e) => (StatusCode::BAD_GATEWAY, format!("{e}\n")),
        }
    }
    async fn missed(
        State(q): State<Arc<Query>>,
        OriginalUri(uri): OriginalUri,
        headers: HeaderMap,
        RawQuery(raw): RawQuery,
    ) -> (StatusCode, String) {
        if let Err(e) = q.check(&uri, &headers) {
            return e;
        }
        let param = |name: &str| -> Option<u64> {
            raw.as_deref()?
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        };
        let since = param("since_ms").unwrap_or(0);
        let limit = param("limit").unwrap_or(100).clamp(1, 1000) as usize;
        // At most MISSED_SCAN of the group's dead letters are read per query.
        match q.admin.dead_letters(&q.group, MISSED_SCAN).await {
            Ok(mut dead) => {
                dead.retain(|d| d.topic == q.topic && d.dead_ms >= since);
                dead.sort_by_key(|d| d.dead_ms);
                let out: Vec<_> = dead
                    .iter()
                    .take(limit)
                    .map(|d| {
                        json!({
                            "message": d.message.as_ref().map(describe),
                            "attempts": d.attempts,
                            "dead_ms": d.dead_ms,
                            "reason": d.reason,
                        })
                    })
                    .collect();
                (StatusCode::OK, json!({ "missed": out }).to_string())
            }
            Err(e) => (StatusCode::BAD_GATEWAY, format!("{e}\n")),
        }
    }
    let app = axum::Router::new()
        .route("/messages/{id}", axum::routing::get(message))
        .route("/missed", axum::routing::get(missed))
        .with_state(query);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("webhook query interface stopped: {e}");
    }
}

fn describe(m: &pb::StoredMessage) -> serde_json::Value {
    json!({
        "id": m.message_id, "topic": m.topic, "key": m.key, "tag": m.tag,
        "store_ms": m.store_ms, "body": String::from_utf8_lossy(&m.body),
    })
}

impl Query {
    /// Whether a query is signed with the secret, recently.
    fn check(
        &self,
        uri: &axum::http::Uri,
        headers: &axum::http::HeaderMap,
    ) -> Result<(), (axum::http::StatusCode, String)> {
        let unauthorized =
            |why: &str| Err((axum::http::StatusCode::UNAUTHORIZED, format!("{why}\n")));
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(at), Some(signature)) = (header("x-txmq-timestamp"), header("x-txmq-signature"))
        else {
            return unauthorized("sign the query: x-txmq-timestamp and x-txmq-signature");
        };
        let Ok(at_ms) = at.parse::<u64>() else {
            return unauthorized("x-txmq-timestamp is not milliseconds since the epoch");
        };
        if txmq_protocol::now_ms().abs_diff(at_ms) > QUERY_SKEW_MS {
            return unauthorized("x-txmq-timestamp is more than five minutes off");
        }
        let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
        let expected = format!(
            "v1={}",
            sign(&self.secret, &[query_text(at, path).as_bytes()])
        );
        let same = expected.len() == signature.len()
            && expected
                .bytes()
                .zip(signature.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(())
        } else {
            unauthorized("bad signature")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 25, item 12: a key or tag with a control character made every POST of its
    /// message fail (an invalid header value), and the message was dead-lettered.
    #[test]
    fn control_characters_are_encoded_so_every_value_makes_a_header() {
        for text in [
            "plain",
            "tab\there",
            "línea",
            "a\r\nb",
            "50%\u{1}",
            "\u{7f}",
        ] {
            let (value, encoded) = header_text(text);
            assert!(
                reqwest::header::HeaderValue::from_str(&value).is_ok(),
                "{text:?} gave {value:?}"
            );
            assert_eq!(encoded, has_control(text), "{text:?}");
        }
        assert_eq!(header_text("a\r\nb"), ("a%0D%0Ab".to_string(), true));
        assert_eq!(header_text("50%\u{1}"), ("50%25%01".to_string(), true));
        assert_eq!(header_text("50%"), ("50%".to_string(), false));
    }
}
