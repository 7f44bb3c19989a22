//! The operation → permission table: every operation of the service, once, with what
//! it needs on which resource (`docs/one-door.md` prints the same table).
//!
//! Every service function names its [`Operation`] and the resources it touches in a
//! call of [`permit`] before it does anything; a test checks that each operation of
//! [`Operation::ALL`] is asked for somewhere in the service, so an operation added
//! without a permission fails the build's tests.
//!
//! Who holds which permission is decided by the broker's users and rules
//! ([`crate::auth`]); until a broker has users, every principal that passed its face's
//! check (the shared token, or none configured) holds every permission, as before.

use super::{Principal, Shared};
use crate::error::Result;

/// What a permission allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Send to a topic.
    Pub,
    /// Consume a topic in a group.
    Sub,
    /// Prepare, end and answer checks of a producer group's transactions.
    Txn,
    /// Create a topic.
    Create,
    /// Change a topic's settings.
    Alter,
    /// Delete a topic or a group.
    Delete,
    /// Describe, list, find, show.
    Read,
    /// Operator actions: resets, redrive, re-arm, resolution, cluster changes.
    Admin,
}

impl Action {
    /// Its name in rules and errors.
    pub fn name(self) -> &'static str {
        match self {
            Action::Pub => "pub",
            Action::Sub => "sub",
            Action::Txn => "txn",
            Action::Create => "create",
            Action::Alter => "alter",
            Action::Delete => "delete",
            Action::Read => "read",
            Action::Admin => "admin",
        }
    }
}

/// What a permission is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A topic, by name.
    Topic(&'a str),
    /// A consumer group, by name.
    Group(&'a str),
    /// A producer group (its transactions), by name.
    ProducerGroup(&'a str),
    /// The broker (or broker group) itself.
    Cluster,
}

/// The kind of a [`Resource`], as the table names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// [`Resource::Topic`].
    Topic,
    /// [`Resource::Group`].
    Group,
    /// [`Resource::ProducerGroup`].
    ProducerGroup,
    /// [`Resource::Cluster`].
    Cluster,
}

impl Resource<'_> {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Topic(_) => Kind::Topic,
            Resource::Group(_) => Kind::Group,
            Resource::ProducerGroup(_) => Kind::ProducerGroup,
            Resource::Cluster => Kind::Cluster,
        }
    }
}

macro_rules! operations {
    ($( $(#[$doc:meta])* $op:ident = $name:literal : [$( ($action:ident, $kind:ident) ),*] ),* $(,)?) => {
        /// Every operation of the service.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Operation {
            $( $(#[$doc])* $op, )*
        }

        impl Operation {
            /// All of them, in the table's order.
            pub const ALL: &'static [Operation] = &[$(Operation::$op),*];

            /// Its name in logs, metrics and the audit log.
            pub fn name(self) -> &'static str {
                match self { $(Operation::$op => $name,)* }
            }

            /// What it needs: each action on a resource of each kind.
            pub fn needs(self) -> &'static [(Action, Kind)] {
                match self { $(Operation::$op => &[$((Action::$action, Kind::$kind)),*],)* }
            }
        }
    };
}

operations! {
    /// Store plain messages (`create` on the topic too when it is made on demand).
    Send = "send": [(Pub, Topic)],
    /// Store half messages of a transaction.
    Prepare = "prepare": [(Pub, Topic), (Txn, ProducerGroup)],
    /// Commit or roll back a transaction as its producer.
    EndTxn = "end-txn": [(Txn, ProducerGroup)],
    /// Be asked a producer group's check-backs, and answer them.
    AnswerChecks = "answer-checks": [(Txn, ProducerGroup)],
    /// Cancel one's own delayed message before its time (a gRPC recall).
    Recall = "recall": [(Pub, Topic)],
    /// Find a topic's route (made on demand when topics are): `pub` here, or `sub` on
    /// the topic instead (consumers ask for routes too).
    Route = "route": [(Pub, Topic)],
    /// Join a group's queue: subscribe, or one gRPC receive.
    Subscribe = "subscribe": [(Sub, Topic), (Sub, Group)],
    /// Acknowledge deliveries.
    Ack = "ack": [(Sub, Topic), (Sub, Group)],
    /// Refuse a delivery.
    Nack = "nack": [(Sub, Topic), (Sub, Group)],
    /// Move a lease's end.
    Extend = "extend": [(Sub, Topic), (Sub, Group)],
    /// Send a delivery to the dead letters now.
    DeadLetter = "dead-letter": [(Sub, Topic), (Sub, Group)],
    /// Create a topic.
    CreateTopic = "topic-create": [(Create, Topic)],
    /// Change a topic's retention.
    AlterTopic = "topic-alter": [(Alter, Topic)],
    /// Delete a topic.
    DeleteTopic = "topic-delete": [(Delete, Topic)],
    /// List topics.
    ListTopics = "topic-list": [(Read, Topic)],
    /// List (group, topic) rows.
    ListGroups = "group-list": [(Read, Group)],
    /// Describe a group.
    DescribeGroup = "group-describe": [(Read, Group)],
    /// List a group's dead letters (their bodies, of any of its topics).
    ListDeadLetters = "dead-letter-list": [(Read, Group), (Read, Topic)],
    /// Put dead letters back.
    Redrive = "redrive": [(Admin, Group)],
    /// Move a group's position.
    ResetGroup = "group-reset": [(Admin, Group)],
    /// Delete a group.
    DeleteGroup = "group-delete": [(Delete, Group)],
    /// List transactions.
    ListTxns = "txn-list": [(Read, ProducerGroup)],
    /// Re-arm a discarded transaction.
    RearmTxn = "txn-rearm": [(Admin, ProducerGroup)],
    /// Commit or roll back a transaction as an operator.
    ResolveTxn = "txn-resolve": [(Admin, ProducerGroup)],
    /// Show one message's life.
    ShowMessage = "message-show": [(Read, Topic)],
    /// Find messages by key or time.
    FindMessages = "message-find": [(Read, Topic)],
    /// List scheduled messages.
    ListScheduled = "scheduled-list": [(Read, Topic)],
    /// Cancel a scheduled message (an operator, by its id).
    CancelScheduled = "scheduled-cancel": [(Admin, Topic)],
    /// The broker's counters.
    Stats = "stats": [(Read, Cluster)],
    /// The broker group's members and progress.
    ClusterStatus = "cluster-status": [(Read, Cluster)],
    /// Add or remove a node, hand the leadership over.
    ClusterChange = "cluster-change": [(Admin, Cluster)],
    /// Create or delete a user, or change its secret.
    UserChange = "user-change": [(Admin, Cluster)],
    /// List users.
    UserList = "user-list": [(Admin, Cluster)],
    /// Grant or revoke a rule.
    AclChange = "acl-change": [(Admin, Cluster)],
    /// List rules.
    AclList = "acl-list": [(Admin, Cluster)],
    /// Check what a user may do.
    AclCheck = "acl-check": [(Admin, Cluster)],
}

/// Whether `who` may make topic `name` on demand (a send, a subscription or a route to
/// a topic that does not exist, when the broker creates topics so): `create` on it.
///
/// # Errors
/// Not permitted.
pub fn may_create(shared: &Shared, who: &Principal, name: &str) -> Result<()> {
    if shared.auth.unrestricted(&who.identity) {
        return Ok(());
    }
    if shared.config.auto_create_topics && shared.topics.get(name).is_none() {
        permit(
            shared,
            who,
            Operation::CreateTopic,
            &[Resource::Topic(name)],
        )?;
    }
    Ok(())
}

/// Whether `who` may do `op` on `on` (one resource for each kind the operation needs,
/// in the table's order; a listing that spans many names its kind with an empty name).
///
/// # Errors
/// [`crate::Error::Internal`] when a call site names other resources than the table
/// says (a bug, refused rather than half-checked).
pub fn permit(shared: &Shared, who: &Principal, op: Operation, on: &[Resource<'_>]) -> Result<()> {
    let needs = op.needs();
    let kinds_match =
        needs.len() == on.len() && needs.iter().zip(on).all(|((_, k), r)| *k == r.kind());
    if !kinds_match {
        return Err(crate::error::Error::Internal(format!(
            "{} was asked with {on:?}; the table says {needs:?}",
            op.name()
        )));
    }
    if shared.auth.unrestricted(&who.identity) {
        return Ok(());
    }
    let peer = who.peer.map(|p| p.ip());
    for ((action, _), resource) in needs.iter().zip(on) {
        if let Err(e) = shared.auth.check(&who.identity, *action, resource, peer) {
            shared
                .metrics
                .auth_denials
                .with_label_values(&[op.name()])
                .inc();
            tracing::info!(
                target: crate::auth::AUDIT,
                who = %who.identity.name(),
                from = ?who.peer,
                face = who.face.name(),
                operation = op.name(),
                resource = %crate::auth::describe(resource),
                "denied: {e}"
            );
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation of the table is asked for by some service function: an
    /// operation with no `permit` call would be one nobody checks.
    #[test]
    fn every_operation_is_asked_for_in_the_service() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/service");
        let code: String = std::fs::read_dir(&dir)
            .expect("service dir")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs") && !p.ends_with("access.rs"))
            .map(|p| std::fs::read_to_string(p).expect("read"))
            .collect();
        for op in Operation::ALL {
            let call = format!("Operation::{op:?}");
            let named = code.match_indices(&call).any(|(at, _)| {
                !code[at + call.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
            });
            assert!(named, "no service function asks permit for {}", op.name());
        }
    }

    #[test]
    fn names_are_unique_and_every_operation_needs_something() {
        let mut names = std::collections::HashSet::new();
        for op in Operation::ALL {
            assert!(names.insert(op.name()), "{} twice", op.name());
            assert!(!op.needs().is_empty(), "{} needs nothing", op.name());
        }
    }
}
