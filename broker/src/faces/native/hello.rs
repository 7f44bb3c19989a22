//! The handshake: a user's SCRAM authentication (`AuthStart`, `AuthFinish`), then
//! `Hello`: protocol version, role, producer group, and the shared token of a broker
//! that has one.

use std::sync::Arc;

use txmq_protocol::pb::{self, Role};

use super::Session;
use crate::error::{Error, Result};
use crate::service::consume::Sink;
use crate::service::principal::Identity;
use crate::service::{Principal, Shared, txn, users};

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
    // A user proved by SCRAM; else the shared token (a super user's rights, kept for
    // one release); else nobody, which only a broker without users takes.
    let identity = match (&session.identity, &shared.config.auth_token) {
        (Some(user), _) => user.clone(),
        (None, Some(secret)) => {
            if hello.auth_token.is_empty() {
                return Err(Error::NotAuthenticated(
                    "this broker requires a token (txmq --auth-token) or a user (txmq --user NAME \
                     --user-secret-file FILE)",
                ));
            }
            if !constant_time_eq(secret.as_bytes(), hello.auth_token.as_bytes()) {
                return Err(Error::NotAuthenticated("the token does not match"));
            }
            Identity::Token
        }
        (None, None) if shared.auth.active() => {
            return Err(Error::NotAuthenticated(
                "this broker has users: authenticate as one (txmq --user NAME \
                 --user-secret-file FILE)",
            ));
        }
        (None, None) => Identity::Anonymous,
    };
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
        crate::service::name("producer group", &hello.producer_group)?;
    }
    let who = Principal::native(
        identity,
        Some(session.peer),
        session.id,
        hello.client_id.clone(),
        hello.producer_group.clone(),
        role == Role::Admin,
    );
    // Only a producer that answers checks is asked: one without a checker would let
    // every check sent to it time out, and each would count.
    if !hello.producer_group.is_empty() && role == Role::Producer && hello.answers_checks {
        let sink = Sink {
            outbound: session.outbound.clone(),
            stall: session.stall.clone(),
        };
        txn::answer_checks(
            shared,
            &who,
            &txn::OwnGroup::declared(&hello.producer_group),
            session.id,
            hello.check_scopes.clone(),
            &sink,
        )?;
    }
    tracing::debug!(connection = session.id, client = %hello.client_id, ?role, "hello");
    session.who = Some(Arc::new(who));
    session.hello = Some(hello);
    Ok(pb::response::Result::Hello(pb::HelloOk {
        protocol_version: txmq_protocol::PROTOCOL_VERSION,
        broker_version: env!("CARGO_PKG_VERSION").to_string(),
        connection_id: session.id,
        max_frame_len: shared.config.max_frame_len as u32,
        max_schedule_delay_ms: shared.config.max_schedule_delay.as_millis() as u64,
    }))
}

/// Starts a user's SCRAM authentication: answers the broker's challenge.
///
/// # Errors
/// After Hello, or a malformed message.
pub fn auth_start(
    start: &pb::AuthStart,
    session: &mut Session,
    shared: &Shared,
) -> Result<pb::response::Result> {
    if session.hello.is_some() || session.identity.is_some() {
        return Err(Error::Invalid(
            "authenticate before Hello, once a connection".into(),
        ));
    }
    let (scram, server_first) = users::scram_start(shared, &start.client_first)?;
    session.scram = Some(scram);
    Ok(pb::response::Result::AuthChallenge(pb::AuthChallenge {
        server_first,
    }))
}

/// Finishes a user's SCRAM authentication: the connection is the user's from here
/// (its Hello names no token). A failure closes the connection.
///
/// # Errors
/// No exchange started, or the proof fails.
pub async fn auth_finish(
    finish: &pb::AuthFinish,
    session: &mut Session,
    shared: &Shared,
) -> Result<pb::response::Result> {
    if session.hello.is_some() || session.identity.is_some() {
        return Err(Error::Invalid(
            "authenticate before Hello, once a connection".into(),
        ));
    }
    let Some(scram) = session.scram.take() else {
        return Err(Error::Invalid("AuthFinish without AuthStart".into()));
    };
    let (identity, server_final) =
        users::scram_finish(shared, scram, &finish.client_final, Some(session.peer)).await?;
    session.identity = Some(identity);
    Ok(pb::response::Result::AuthOk(pb::AuthOk { server_final }))
}

/// Whether the connection may still hold what it holds after a change of users or
/// rules: its identity, each subscription (`sub` on its topic and group), its
/// registration for check-backs (`txn` on its producer group).
///
/// # Errors
/// What it lost: the connection is then closed.
pub fn still_allowed(session: &Session, shared: &Shared) -> Result<()> {
    use crate::service::access::{Operation, Resource, permit};
    let Some(who) = &session.who else {
        return Ok(());
    };
    shared.auth.check_identity(&who.identity)?;
    for m in session.subscriptions.values() {
        let on = [Resource::Topic(&m.topic.name), Resource::Group(&m.group)];
        permit(shared, who, Operation::Subscribe, &on)?;
    }
    let answers = session.hello.as_ref().is_some_and(|h| {
        h.answers_checks && h.role == Role::Producer as i32 && !h.producer_group.is_empty()
    });
    if answers {
        let on = [Resource::ProducerGroup(&who.producer_group)];
        permit(shared, who, Operation::AnswerChecks, &on)?;
    }
    Ok(())
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    constant_time_eq(a, b)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
