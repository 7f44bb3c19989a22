//! Users and rules as operations (`txmq user …`, `txmq acl …`), the first super user
//! from `--bootstrap-admin-file`, and the broker's side of a SCRAM authentication.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use txmq_protocol::pb;
use txmq_protocol::scram::{Credential, PartialExchange, ServerExchange};

use super::access::{Operation, Resource, permit};
use super::{Answer, Principal, Shared, later, now};
use crate::auth::rules::{Pattern, Rule, parse_actions};
use crate::auth::{AUDIT, Identity, Store};
use crate::error::{Error, Result};
use crate::storage::Cf;
use crate::storage::keys;
use crate::storage::records::{RuleRecord, UserRecord};
use crate::storage::writer::{Command, Op, WriterHandle};

/// Users and rules written through the writer: one durable (and, in a group,
/// replicated) write each.
struct Written<'a>(&'a WriterHandle);

impl Store for Written<'_> {
    async fn put_user(&self, name: &str, record: &UserRecord) -> Result<()> {
        let put = Op::Put(
            Cf::Meta,
            keys::user(name),
            prost::Message::encode_to_vec(record),
        );
        self.0.submit(Command::Raw(vec![put])).await.map(|_| ())
    }

    async fn delete_user(&self, name: &str, rules: &[u64]) -> Result<()> {
        let mut ops = vec![Op::Delete(Cf::Meta, keys::user(name))];
        ops.extend(rules.iter().map(|id| Op::Delete(Cf::Meta, keys::rule(*id))));
        self.0.submit(Command::Raw(ops)).await.map(|_| ())
    }

    async fn put_rule(&self, id: u64, record: &RuleRecord) -> Result<()> {
        let put = Op::Put(
            Cf::Meta,
            keys::rule(id),
            prost::Message::encode_to_vec(record),
        );
        // With the rule, in the same write: no id is given twice.
        let next = Op::Put(
            Cf::Meta,
            keys::NEXT_RULE_ID.to_vec(),
            (id + 1).to_be_bytes().to_vec(),
        );
        self.0
            .submit(Command::Raw(vec![put, next]))
            .await
            .map(|_| ())
    }

    async fn delete_rules(&self, ids: &[u64]) -> Result<()> {
        let ops = ids
            .iter()
            .map(|id| Op::Delete(Cf::Meta, keys::rule(*id)))
            .collect();
        self.0.submit(Command::Raw(ops)).await.map(|_| ())
    }
}

/// Makes the `--bootstrap-admin-file` user when the broker serves with no user stored
/// (its first start, or a broker that never had one); once users exist it does
/// nothing, so the file cannot bring a deleted admin back or change a secret.
pub async fn bootstrap(shared: &Arc<Shared>) {
    let Some((name, secret)) = &shared.config.bootstrap_admin else {
        return;
    };
    if shared.auth.has_users() {
        return;
    }
    match shared
        .auth
        .create_user(&Written(&shared.writer), name, secret, true)
        .await
    {
        Ok(_) => {
            tracing::info!(target: AUDIT, user = %name, "bootstrap super user created");
        }
        Err(e) => tracing::error!("the bootstrap super user was not created: {e}"),
    }
}

/// Makes each key of `--grpc-credentials-file` a super user of that name and secret
/// (the rights its key had), at the first start with users, when none is stored yet
/// (alone, or beside the bootstrap user): a user deleted later is not made again. It needs
/// the key users' secrets are sealed under (the cluster secret, or
/// `--broker-key-file`): without one the keys stay shared credentials, as before.
pub async fn migrate_grpc_credentials(shared: &Arc<Shared>) {
    let pairs = &shared.config.grpc_credentials;
    if pairs.is_empty() {
        return;
    }
    if shared.config.cluster_secret.is_none() && shared.config.broker_key.is_none() {
        tracing::warn!(
            "the keys of --grpc-credentials-file stay shared credentials with every \
             right: give --broker-key-file to make them users (that file is deprecated)"
        );
        return;
    }
    // Users other than the bootstrap one: the migration ran, or users came otherwise.
    let bootstrap = shared
        .config
        .bootstrap_admin
        .as_ref()
        .map(|(n, _)| n.as_str());
    if shared
        .auth
        .users()
        .iter()
        .any(|(name, _)| Some(name.as_str()) != bootstrap)
    {
        return;
    }
    let mut made = 0;
    for (key, secret) in pairs {
        if shared.auth.has_user(key) {
            continue;
        }
        match shared
            .auth
            .create_user(&Written(&shared.writer), key, secret, true)
            .await
        {
            Ok(_) => {
                made += 1;
                tracing::info!(target: AUDIT, user = %key, "user made from --grpc-credentials-file");
            }
            Err(e) => {
                tracing::error!("the --grpc-credentials-file key {key:?} was not made a user: {e}")
            }
        }
    }
    tracing::warn!(
        made,
        "--grpc-credentials-file is deprecated: its keys are users now (super users; \
         narrow them with txmq acl), and the file can go"
    );
}

fn info(name: String, r: &UserRecord) -> pb::UserInfo {
    pb::UserInfo {
        name,
        superuser: r.superuser,
        created_ms: r.created_ms,
        changed_ms: r.changed_ms,
    }
}

fn rule_info(r: &Rule) -> pb::RuleInfo {
    pb::RuleInfo {
        id: r.id,
        user: r.user.clone(),
        resource: r.pattern.to_string(),
        actions: r.actions.iter().map(|a| a.name().to_string()).collect(),
        deny: r.deny,
        source: r.record.source.clone(),
        created_ms: r.record.created_ms,
    }
}

/// Creates, deletes, lists users, or changes a user's secret; answers the users
/// concerned (all of them for a list).
pub fn user(shared: &Arc<Shared>, who: &Principal, req: pb::UserRequest) -> Answer<pb::UsersOk> {
    use pb::user_request::Action as A;
    let action = A::try_from(req.action).unwrap_or(A::Unspecified);
    let op = if action == A::List {
        Operation::UserList
    } else {
        Operation::UserChange
    };
    if let Err(e) = permit(shared, who, op, &[Resource::Cluster]) {
        return now(Err(e));
    }
    let (shared, who) = (shared.clone(), who.clone());
    later(async move {
        let store = Written(&shared.writer);
        let auth = &shared.auth;
        let users = match action {
            A::Create => {
                let r = auth
                    .create_user(&store, &req.name, &req.secret, req.superuser)
                    .await?;
                vec![info(req.name.clone(), &r)]
            }
            A::Passwd => {
                let r = auth.passwd(&store, &req.name, &req.secret).await?;
                vec![info(req.name.clone(), &r)]
            }
            A::Delete => {
                auth.delete_user(&store, &req.name).await?;
                Vec::new()
            }
            A::List => {
                return Ok(pb::UsersOk {
                    users: auth.users().into_iter().map(|(n, r)| info(n, &r)).collect(),
                });
            }
            A::Unspecified => {
                return Err(Error::Invalid(
                    "a user request is create, delete, list or passwd".into(),
                ));
            }
        };
        tracing::info!(
            target: AUDIT,
            by = %who.identity.name(),
            from = ?who.peer,
            action = ?action,
            user = %req.name,
            superuser = req.superuser,
            "user changed"
        );
        Ok(pb::UsersOk { users })
    })
}

/// What an ACL request answers.
#[derive(Debug)]
pub enum AclAnswer {
    /// The rules granted, revoked or listed.
    Rules(pb::RulesOk),
    /// A check's decision.
    Check(pb::AclCheckOk),
}

/// The rule a grant or revoke describes.
fn rule_record(req: &pb::AclRequest) -> Result<RuleRecord> {
    let record = RuleRecord {
        user: req.user.clone(),
        resource: req.resource.clone(),
        actions: req.actions.clone(),
        deny: req.deny,
        source: req.source.clone(),
        created_ms: txmq_protocol::now_ms(),
    };
    // Read back as stored, so a bad one is refused before it is written.
    Rule::from_record(0, record.clone())?;
    Ok(record)
}

/// The resource a check names.
fn checked_resource(pattern: &Pattern) -> Result<Resource<'_>> {
    use crate::service::access::Kind;
    if pattern.name.contains('*') {
        return Err(Error::Invalid(
            "a check names one resource, not a pattern".into(),
        ));
    }
    Ok(match pattern.kind {
        Kind::Topic => Resource::Topic(&pattern.name),
        Kind::Group => Resource::Group(&pattern.name),
        Kind::ProducerGroup => Resource::ProducerGroup(&pattern.name),
        Kind::Cluster => Resource::Cluster,
    })
}

/// Grants, revokes, lists rules, or checks what a user may do.
pub fn acl(shared: &Arc<Shared>, who: &Principal, req: pb::AclRequest) -> Answer<AclAnswer> {
    use pb::acl_request::Action as A;
    let action = A::try_from(req.action).unwrap_or(A::Unspecified);
    let op = match action {
        A::List => Operation::AclList,
        A::Check => Operation::AclCheck,
        _ => Operation::AclChange,
    };
    if let Err(e) = permit(shared, who, op, &[Resource::Cluster]) {
        return now(Err(e));
    }
    let (shared, who) = (shared.clone(), who.clone());
    later(async move {
        let store = Written(&shared.writer);
        let auth = &shared.auth;
        let rules = match action {
            A::Grant => vec![auth.grant(&store, rule_record(&req)?).await?],
            A::Revoke if req.rule_id != 0 => auth.revoke(&store, Some(req.rule_id), None).await?,
            A::Revoke => auth.revoke(&store, None, Some(rule_record(&req)?)).await?,
            A::List => {
                let user = Some(req.user.as_str()).filter(|u| !u.is_empty());
                let rules = auth.rules(user).iter().map(rule_info).collect();
                return Ok(AclAnswer::Rules(pb::RulesOk { rules }));
            }
            A::Check => {
                let pattern = Pattern::parse(&req.resource)?;
                let resource = checked_resource(&pattern)?;
                let actions = parse_actions(&req.actions)?;
                let source = if req.source.is_empty() {
                    None
                } else {
                    Some(req.source.parse::<IpAddr>().map_err(|_| {
                        Error::Invalid(format!("{:?} is not an address", req.source))
                    })?)
                };
                let (allowed, reason, rule_id) =
                    auth.explain(&req.user, &actions, &resource, source)?;
                return Ok(AclAnswer::Check(pb::AclCheckOk {
                    allowed,
                    reason,
                    rule_id,
                }));
            }
            A::Unspecified => {
                return Err(Error::Invalid(
                    "an acl request is grant, revoke, list or check".into(),
                ));
            }
        };
        for r in &rules {
            tracing::info!(
                target: AUDIT,
                by = %who.identity.name(),
                from = ?who.peer,
                action = ?action,
                rule = r.id,
                user = %r.user,
                resource = %r.pattern,
                deny = r.deny,
                "rule changed"
            );
        }
        Ok(AclAnswer::Rules(pb::RulesOk {
            rules: rules.iter().map(rule_info).collect(),
        }))
    })
}

/// A SCRAM exchange in progress on one connection.
pub struct Scram {
    exchange: ServerExchange,
    /// The credential the challenge was made from (`None`: no such user; the exchange
    /// goes on so the answer does not say which part was wrong).
    credential: Option<(Credential, u64)>,
}

impl std::fmt::Debug for Scram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scram")
            .field("user", &self.exchange.user())
            .finish_non_exhaustive()
    }
}

/// Starts a SCRAM authentication: answers the challenge (server-first message).
///
/// # Errors
/// A malformed client-first message.
pub fn scram_start(shared: &Shared, client_first: &str) -> Result<(Scram, String)> {
    let (user, partial): (String, PartialExchange) =
        txmq_protocol::scram::ServerExchange::start(client_first)
            .map_err(|e| Error::Invalid(e.to_string()))?;
    let credential = shared.auth.credential(&user);
    let shown = credential
        .as_ref()
        .map_or_else(|| shared.auth.decoy(&user), |(c, _)| c.clone());
    let nonce: [u8; 18] = rand::random();
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let exchange = partial.challenge(&shown, &nonce);
    let first = exchange.server_first().to_string();
    Ok((
        Scram {
            exchange,
            credential,
        },
        first,
    ))
}

/// Finishes a SCRAM authentication: answers who it proved and the broker's signature.
/// A failure is counted, logged and slowed; its error says nothing of which part was
/// wrong.
///
/// # Errors
/// [`Error::NotAuthenticated`].
pub async fn scram_finish(
    shared: &Shared,
    scram: Scram,
    client_final: &str,
    peer: Option<std::net::SocketAddr>,
) -> Result<(Identity, String)> {
    let user = scram.exchange.user().to_string();
    let proved = scram.credential.as_ref().and_then(|(credential, since)| {
        let signature = scram.exchange.finish(client_final, credential).ok()?;
        Some((since, signature))
    });
    match proved {
        Some((since, signature)) => {
            shared
                .metrics
                .auth_successes
                .with_label_values(&["native"])
                .inc();
            tracing::info!(target: AUDIT, user = %user, from = ?peer, face = "native", "authenticated");
            Ok((
                Identity::User {
                    name: user,
                    since_ms: *since,
                },
                signature,
            ))
        }
        None => {
            shared
                .metrics
                .auth_failures
                .with_label_values(&["native"])
                .inc();
            tracing::warn!(target: AUDIT, user = %user, from = ?peer, face = "native", "authentication failed");
            // Slowed, so guessing costs time.
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err(Error::NotAuthenticated("bad user or secret"))
        }
    }
}
