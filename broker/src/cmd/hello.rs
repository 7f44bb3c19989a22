//! The handshake: protocol version, role, producer group, shared secret.

use std::sync::Arc;

use txmq_protocol::pb::{self, Role};

use super::Session;
use super::Shared;
use crate::error::{Error, Result};

/// Most check scopes one producer may declare.
pub const MAX_CHECK_SCOPES: usize = 16;
/// Longest check scope.
pub const MAX_CHECK_SCOPE_LEN: usize = 256;

/// Accepts or refuses a `Hello`. A producer with a group is registered for check-backs.
///
/// # Errors
/// Version, secret or group name refused.
pub fn hello(
    hello: pb::Hello,
    session: &mut Session,
    shared: &Arc<Shared>,
) -> Result<pb::response::Result> {
    if hello.protocol_version != txmq_protocol::PROTOCOL_VERSION {
        return Err(Error::UnsupportedVersion(hello.protocol_version));
    }
    if let Some(secret) = &shared.config.auth_token {
        if hello.auth_token.is_empty() {
            return Err(Error::NotAuthenticated(
                "this broker requires a token (txmq --auth-token, TXMQ_AUTH_TOKEN)",
            ));
        }
        if !constant_time_eq(secret.as_bytes(), hello.auth_token.as_bytes()) {
            return Err(Error::NotAuthenticated("the token does not match"));
        }
    }
    if session.hello.is_some() {
        return Err(Error::Invalid(
            "Hello was already sent on this connection".into(),
        ));
    }
    let role = Role::try_from(hello.role).unwrap_or(Role::Unspecified);
    if hello.check_scopes.len() > MAX_CHECK_SCOPES
        || hello
            .check_scopes
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_CHECK_SCOPE_LEN)
    {
        return Err(Error::Invalid(format!(
            "check_scopes: at most {MAX_CHECK_SCOPES}, each 1 to {MAX_CHECK_SCOPE_LEN} bytes"
        )));
    }
    if !hello.producer_group.is_empty() {
        super::name("producer group", &hello.producer_group)?;
        // Only a producer that answers checks is asked: one without a checker would let
        // every check sent to it time out, and each would count.
        if role == Role::Producer && hello.answers_checks {
            shared.producers.register_scoped(
                &hello.producer_group,
                session.id,
                session.outbound.clone(),
                session.stall.clone(),
                hello.check_scopes.clone(),
            );
        }
    }
    tracing::debug!(connection = session.id, client = %hello.client_id, ?role, "hello");
    session.hello = Some(hello);
    Ok(pb::response::Result::Hello(pb::HelloOk {
        protocol_version: txmq_protocol::PROTOCOL_VERSION,
        broker_version: env!("CARGO_PKG_VERSION").to_string(),
        connection_id: session.id,
        max_frame_len: shared.config.max_frame_len as u32,
        max_schedule_delay_ms: shared.config.max_schedule_delay.as_millis() as u64,
    }))
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    constant_time_eq(a, b)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
