//! Users and rules: who may do what (issue 26, items 2 and 3).
//!
//! Users and rules live in the broker's own storage (`meta`, `user/<name>` and
//! `rule/<id>`), written through the writer like every other state, so a broker group
//! replicates them. [`Auth`] keeps them in memory for the checks every request makes;
//! it is loaded when the broker starts serving (a new leader loads what it applied)
//! and changed only through its own methods, one change at a time, after the write is
//! durable.
//!
//! A broker with no users (and without `--require-auth`) is open, as before users
//! existed: every principal that passed the face's own check (the shared token, when
//! one is set) holds every permission. Once a user exists, every request needs an
//! authenticated user: a super user holds every permission; a normal user what its
//! rules allow (a deny wins; no rule denies).
//!
//! Audit events go to the `tracing` target [`AUDIT`].

pub mod rules;
pub mod seal;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use rules::{Decision, Rule};
use seal::SealKey;
use txmq_protocol::scram::Credential;

use crate::error::{Error, Result};
use crate::service::access::{Action, Resource};
use crate::storage::Storage;
use crate::storage::records::{RuleRecord, UserRecord};

/// The `tracing` target of audit events: authentication results, denials, changes of
/// users and rules, and every operator action.
pub const AUDIT: &str = "txmq::audit";

/// Who a principal authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Nobody: allowed everything while the broker has no users, nothing after.
    Anonymous,
    /// The broker's shared token (`--auth-token-file`), kept for one release: a super
    /// user.
    Token,
    /// A user, as of the change of its secret it authenticated under (a later change
    /// refuses the session).
    User {
        /// The user's name.
        name: String,
        /// Its `changed_ms` when it authenticated.
        since_ms: u64,
    },
}

impl Identity {
    /// The name in logs and audit events.
    pub fn name(&self) -> &str {
        match self {
            Identity::Anonymous => "anonymous",
            Identity::Token => "token",
            Identity::User { name, .. } => name,
        }
    }
}

/// Users and rules, as stored.
#[derive(Default)]
struct State {
    users: BTreeMap<String, UserRecord>,
    rules: BTreeMap<u64, Rule>,
    /// The next rule id (stored: ids are never given twice).
    next_rule: u64,
}

/// The broker's users and rules, in memory. (Its `Debug` shows counts only: the
/// records hold SCRAM keys and sealed secrets.)
pub struct Auth {
    state: RwLock<Arc<State>>,
    /// Held across a change's read, write and update: changes do not interleave.
    changes: tokio::sync::Mutex<()>,
    /// `--require-auth`: authenticated users only, even with none stored.
    require: bool,
    /// Keys the decoy salts of unknown users.
    decoy: std::hash::RandomState,
    /// What users' secrets are sealed under for the gRPC face (`None`: not kept).
    seal: Option<SealKey>,
    /// Counts changes: open sessions watch it and check again what they hold.
    generation: tokio::sync::watch::Sender<u64>,
    /// Whether any user is stored (read on every request: no lock).
    has_users: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("Auth")
            .field("users", &state.users.len())
            .field("rules", &state.rules.len())
            .field("require", &self.require)
            .field("sealing", &self.seal.is_some())
            .finish()
    }
}

/// The longest user name.
pub const MAX_USER_NAME: usize = 128;
/// The shortest secret a user may be given.
pub const MIN_SECRET: usize = 8;
/// The longest secret.
pub const MAX_SECRET: usize = 1024;
/// The most rules a broker holds (each is checked on the requests of its user).
pub const MAX_RULES: usize = 10_000;

/// Checks a user name: 1 to [`MAX_USER_NAME`] printable characters, no space.
///
/// # Errors
/// What is wrong with it.
pub fn check_user_name(name: &str) -> Result<()> {
    // `%` separates a gRPC transaction's group from the user it is bound to; the names
    // of the built-in identities would read as them in audit events and handles.
    if name.is_empty()
        || name.len() > MAX_USER_NAME
        || name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '%')
        || name == "anonymous"
        || name == "token"
    {
        return Err(Error::Invalid(format!(
            "{name:?} is not a user name: 1 to {MAX_USER_NAME} characters, no spaces, \
             control characters or %, and not anonymous or token"
        )));
    }
    Ok(())
}

fn check_secret(secret: &str) -> Result<()> {
    if secret.len() < MIN_SECRET || secret.len() > MAX_SECRET {
        return Err(Error::Invalid(format!(
            "a user's secret is {MIN_SECRET} to {MAX_SECRET} bytes"
        )));
    }
    Ok(())
}

/// The SCRAM credential a user record keeps.
fn credential(record: &UserRecord) -> Option<Credential> {
    Some(Credential {
        salt: record.salt.clone(),
        iterations: record.iterations,
        stored_key: record.stored_key.as_slice().try_into().ok()?,
        server_key: record.server_key.as_slice().try_into().ok()?,
    })
}

/// A new user record for `secret`.
#[cfg(test)]
fn user_record(secret: &str, superuser: bool, created_ms: u64, changed_ms: u64) -> UserRecord {
    user_record_sealed(secret, superuser, created_ms, changed_ms, None)
}

/// A new user record for `secret` of `name`, its secret sealed under `seal` if any.
fn user_record_sealed(
    secret: &str,
    superuser: bool,
    created_ms: u64,
    changed_ms: u64,
    seal: Option<(&SealKey, &str)>,
) -> UserRecord {
    let salt: [u8; 16] = rand::random();
    let c = Credential::new(
        secret.as_bytes(),
        salt.to_vec(),
        txmq_protocol::scram::ITERATIONS,
    );
    UserRecord {
        superuser,
        salt: c.salt,
        iterations: c.iterations,
        stored_key: c.stored_key.to_vec(),
        server_key: c.server_key.to_vec(),
        created_ms,
        changed_ms,
        sealed_secret: seal
            .map(|(key, name)| key.seal(name, secret))
            .unwrap_or_default(),
    }
}

impl Auth {
    /// Loads users and rules from storage.
    ///
    /// # Errors
    /// Storage failure, or a stored rule this version cannot read.
    pub fn load(storage: &Storage, require: bool, seal: Option<SealKey>) -> Result<Self> {
        let users: BTreeMap<String, UserRecord> = storage.users()?.into_iter().collect();
        let has_users = !users.is_empty();
        let next_rule = storage.next_rule_id()?;
        let rules = storage
            .rules()?
            .into_iter()
            .map(|(id, r)| Rule::from_record(id, r).map(|r| (id, r)))
            .collect::<Result<_>>()?;
        Ok(Self {
            state: RwLock::new(Arc::new(State {
                users,
                rules,
                next_rule,
            })),
            changes: tokio::sync::Mutex::new(()),
            require,
            decoy: std::hash::RandomState::new(),
            seal,
            generation: tokio::sync::watch::Sender::new(0),
            has_users: std::sync::atomic::AtomicBool::new(has_users),
        })
    }

    /// No users and nothing required (a test's, or a broker before its first user).
    pub fn open() -> Self {
        Self {
            state: RwLock::default(),
            changes: tokio::sync::Mutex::new(()),
            require: false,
            decoy: std::hash::RandomState::new(),
            seal: None,
            generation: tokio::sync::watch::Sender::new(0),
            has_users: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn state(&self) -> Arc<State> {
        self.state.read().expect("auth lock").clone()
    }

    /// Whether requests need an authenticated user (users exist, or it is required).
    pub fn active(&self) -> bool {
        self.require || self.has_users.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether `identity` holds every permission without a look at the rules: the
    /// token, or anybody while the broker is open (the path every request of a broker
    /// without users takes: no lock).
    pub fn unrestricted(&self, identity: &Identity) -> bool {
        match identity {
            Identity::Token => true,
            Identity::Anonymous => !self.active(),
            Identity::User { .. } => false,
        }
    }

    /// Whether any user is stored.
    pub fn has_users(&self) -> bool {
        !self.state().users.is_empty()
    }

    /// Whether user `name` is stored.
    pub fn has_user(&self, name: &str) -> bool {
        self.state().users.contains_key(name)
    }

    /// A user's credential and its `changed_ms`.
    pub fn credential(&self, user: &str) -> Option<(Credential, u64)> {
        let state = self.state();
        let record = state.users.get(user)?;
        Some((credential(record)?, record.changed_ms))
    }

    /// A credential for a user that does not exist: the same salt for the same name
    /// while the broker runs (a probe cannot tell it from a real user's), and no
    /// secret matches it.
    pub fn decoy(&self, user: &str) -> Credential {
        use std::hash::{BuildHasher, Hasher};
        let part = |n: u8| {
            let mut h = self.decoy.build_hasher();
            h.write_u8(n);
            h.write(user.as_bytes());
            h.finish().to_be_bytes()
        };
        let mut salt = part(0).to_vec();
        salt.extend_from_slice(&part(1));
        Credential {
            salt,
            iterations: txmq_protocol::scram::ITERATIONS,
            stored_key: rand::random(),
            server_key: rand::random(),
        }
    }

    /// Seals users' secrets under `key` from now on (tests; a broker gets it at load).
    #[must_use]
    pub fn sealing(mut self, key: SealKey) -> Self {
        self.seal = Some(key);
        self
    }

    /// A user's secret for the gRPC face's signature, with its `changed_ms`: `None`
    /// for no such user, or one whose secret the broker does not keep (no seal key
    /// when it was set, or another key now).
    pub fn grpc_secret(&self, user: &str) -> Option<(String, u64)> {
        let key = self.seal.as_ref()?;
        let state = self.state();
        let record = state.users.get(user)?;
        Some((key.open(user, &record.sealed_secret)?, record.changed_ms))
    }

    /// Whether `identity` may do `action` on `resource` from `peer`.
    ///
    /// # Errors
    /// [`Error::NotAuthenticated`] for no user while users exist, a deleted user or
    /// one whose secret changed since; [`Error::PermissionDenied`] naming the rule (or
    /// its absence).
    pub fn check(
        &self,
        identity: &Identity,
        action: Action,
        resource: &Resource<'_>,
        peer: Option<IpAddr>,
    ) -> Result<()> {
        let state = self.state();
        let (name, since_ms) = match identity {
            Identity::Token => return Ok(()),
            Identity::Anonymous if !self.require && state.users.is_empty() => return Ok(()),
            Identity::Anonymous => {
                return Err(Error::NotAuthenticated(
                    "this broker has users: authenticate as one (txmq --user NAME \
                     --user-secret-file FILE)",
                ));
            }
            Identity::User { name, since_ms } => (name, *since_ms),
        };
        let Some(user) = state.users.get(name) else {
            return Err(Error::NotAuthenticated("the user was deleted"));
        };
        if user.changed_ms != since_ms {
            return Err(Error::NotAuthenticated(
                "the user's secret changed: authenticate again",
            ));
        }
        if user.superuser {
            return Ok(());
        }
        let theirs = state.rules.values().filter(|r| r.user == *name);
        match rules::decide(theirs, action, resource, peer) {
            Decision::Allowed(_) => Ok(()),
            Decision::Denied(id) => Err(Error::PermissionDenied(format!(
                "user {name:?} may not {} on {}: rule {id} denies it",
                action.name(),
                describe(resource)
            ))),
            Decision::NoRule => Err(Error::PermissionDenied(format!(
                "user {name:?} may not {} on {}: no rule allows it",
                action.name(),
                describe(resource)
            ))),
        }
    }

    /// What `user`'s rules decide for each of `actions` on `resource` from `peer`
    /// (`txmq acl check`): allowed only when every action is; the reason names the
    /// deciding rule.
    ///
    /// # Errors
    /// No such user.
    pub fn explain(
        &self,
        user: &str,
        actions: &[Action],
        resource: &Resource<'_>,
        peer: Option<IpAddr>,
    ) -> Result<(bool, String, u64)> {
        let state = self.state();
        let record = state
            .users
            .get(user)
            .ok_or_else(|| Error::Invalid(format!("no user {user:?}")))?;
        if record.superuser {
            return Ok((true, "allowed: super user".into(), 0));
        }
        let mut last = (true, String::new(), 0);
        for &action in actions {
            let theirs = state.rules.values().filter(|r| r.user == user);
            last = match rules::decide(theirs, action, resource, peer) {
                Decision::Allowed(id) => (true, format!("allowed by rule {id}"), id),
                Decision::Denied(id) => {
                    return Ok((false, format!("{}: denied by rule {id}", action.name()), id));
                }
                Decision::NoRule => {
                    return Ok((false, format!("{}: denied: no rule", action.name()), 0));
                }
            };
        }
        Ok(last)
    }

    /// Every user, by name.
    pub fn users(&self) -> Vec<(String, UserRecord)> {
        self.state()
            .users
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    /// Every rule (of `user`, when given), by id.
    pub fn rules(&self, user: Option<&str>) -> Vec<Rule> {
        self.state()
            .rules
            .values()
            .filter(|r| user.is_none_or(|u| r.user == u))
            .cloned()
            .collect()
    }

    /// Replaces the state after a durable change, and tells the sessions.
    fn set(&self, change: impl FnOnce(&mut State)) {
        {
            let mut guard = self.state.write().expect("auth lock");
            let mut next = State {
                users: guard.users.clone(),
                rules: guard.rules.clone(),
                next_rule: guard.next_rule,
            };
            change(&mut next);
            self.has_users
                .store(!next.users.is_empty(), std::sync::atomic::Ordering::Release);
            *guard = Arc::new(next);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes as they happen: a session checks again what it holds (its identity,
    /// its subscriptions, its producer registration) on each.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Whether `identity` is still who it authenticated as: a user not deleted, its
    /// secret unchanged; nobody only while the broker is open.
    ///
    /// # Errors
    /// [`Error::NotAuthenticated`] saying which.
    pub fn check_identity(&self, identity: &Identity) -> Result<()> {
        match identity {
            Identity::Token => Ok(()),
            Identity::Anonymous if !self.active() => Ok(()),
            Identity::Anonymous => Err(Error::NotAuthenticated(
                "this broker has users now: authenticate as one",
            )),
            Identity::User { name, since_ms } => match self.state().users.get(name) {
                None => Err(Error::NotAuthenticated("the user was deleted")),
                Some(u) if u.changed_ms != *since_ms => Err(Error::NotAuthenticated(
                    "the user's secret changed: authenticate again",
                )),
                Some(_) => Ok(()),
            },
        }
    }

    /// Creates a user (a super user holds every permission).
    ///
    /// # Errors
    /// A bad name or secret, the user exists, the write failed.
    pub async fn create_user(
        &self,
        store: &impl Store,
        name: &str,
        secret: &str,
        superuser: bool,
    ) -> Result<UserRecord> {
        check_user_name(name)?;
        check_secret(secret)?;
        let _one = self.changes.lock().await;
        if self.state().users.contains_key(name) {
            return Err(Error::Invalid(format!("user {name:?} exists")));
        }
        let now = txmq_protocol::now_ms();
        let seal = self.seal.as_ref().map(|k| (k, name));
        let record = user_record_sealed(secret, superuser, now, now, seal);
        store.put_user(name, &record).await?;
        let stored = record.clone();
        self.set(|s| {
            s.users.insert(name.to_string(), stored);
        });
        Ok(record)
    }

    /// Gives a user a new secret: its sessions are refused from now on.
    ///
    /// # Errors
    /// No such user, a bad secret, the write failed.
    pub async fn passwd(&self, store: &impl Store, name: &str, secret: &str) -> Result<UserRecord> {
        check_secret(secret)?;
        let _one = self.changes.lock().await;
        let Some(old) = self.state().users.get(name).cloned() else {
            return Err(Error::Invalid(format!("no user {name:?}")));
        };
        // Strictly later, so a session of the old secret never matches.
        let changed = txmq_protocol::now_ms().max(old.changed_ms + 1);
        let seal = self.seal.as_ref().map(|k| (k, name));
        let record = user_record_sealed(secret, old.superuser, old.created_ms, changed, seal);
        store.put_user(name, &record).await?;
        let stored = record.clone();
        self.set(|s| {
            s.users.insert(name.to_string(), stored);
        });
        Ok(record)
    }

    /// Deletes a user and its rules: its sessions are refused from now on. The last
    /// super user is not deleted: nobody could change users any more, and a broker
    /// that has had users does not fall back to open.
    ///
    /// # Errors
    /// No such user, the last super user, the write failed.
    pub async fn delete_user(&self, store: &impl Store, name: &str) -> Result<()> {
        let _one = self.changes.lock().await;
        let state = self.state();
        let Some(user) = state.users.get(name) else {
            return Err(Error::Invalid(format!("no user {name:?}")));
        };
        let supers = state.users.values().filter(|u| u.superuser).count();
        if user.superuser && supers == 1 {
            return Err(Error::Invalid(format!(
                "{name:?} is the last super user: make another one first (a broker with \
                 users never goes back to open)"
            )));
        }
        let rules: Vec<u64> = state
            .rules
            .values()
            .filter(|r| r.user == name)
            .map(|r| r.id)
            .collect();
        store.delete_user(name, &rules).await?;
        self.set(|s| {
            s.users.remove(name);
            s.rules.retain(|_, r| r.user != name);
        });
        Ok(())
    }

    /// Adds a rule; an identical one already there is answered instead.
    ///
    /// # Errors
    /// No such user, a bad rule, too many rules, the write failed.
    pub async fn grant(&self, store: &impl Store, record: RuleRecord) -> Result<Rule> {
        let _one = self.changes.lock().await;
        let state = self.state();
        if !state.users.contains_key(&record.user) {
            return Err(Error::Invalid(format!("no user {:?}", record.user)));
        }
        let probe = Rule::from_record(0, record.clone())?;
        if let Some(same) = state.rules.values().find(|r| same_rule(r, &probe)) {
            return Ok(same.clone());
        }
        if state.rules.len() >= MAX_RULES {
            return Err(Error::LimitReached(format!(
                "the broker holds {MAX_RULES} rules, its most; revoke some first"
            )));
        }
        let last = state.rules.keys().next_back().map_or(0, |last| *last);
        let id = state.next_rule.max(last + 1).max(1);
        let rule = Rule::from_record(id, record)?;
        store.put_rule(id, &rule.record).await?;
        let stored = rule.clone();
        self.set(|s| {
            s.rules.insert(id, stored);
            s.next_rule = id + 1;
        });
        Ok(rule)
    }

    /// Removes rules: the one with `id`, or those equal to `record`'s content.
    /// Answers what was removed (nothing is not an error: a revoke is idempotent).
    ///
    /// # Errors
    /// A bad rule, the write failed.
    pub async fn revoke(
        &self,
        store: &impl Store,
        id: Option<u64>,
        record: Option<RuleRecord>,
    ) -> Result<Vec<Rule>> {
        let _one = self.changes.lock().await;
        let state = self.state();
        let gone: Vec<Rule> = match (id, record) {
            (Some(id), _) => state.rules.get(&id).cloned().into_iter().collect(),
            (None, Some(record)) => {
                let probe = Rule::from_record(0, record)?;
                state
                    .rules
                    .values()
                    .filter(|r| same_rule(r, &probe))
                    .cloned()
                    .collect()
            }
            (None, None) => return Err(Error::Invalid("revoke names no rule".into())),
        };
        if gone.is_empty() {
            return Ok(gone);
        }
        let ids: Vec<u64> = gone.iter().map(|r| r.id).collect();
        store.delete_rules(&ids).await?;
        self.set(|s| {
            for id in &ids {
                s.rules.remove(id);
            }
        });
        Ok(gone)
    }
}

fn same_rule(a: &Rule, b: &Rule) -> bool {
    a.user == b.user
        && a.pattern == b.pattern
        && a.actions == b.actions
        && a.deny == b.deny
        && a.source == b.source
}

/// A resource as errors name it.
pub fn describe(resource: &Resource<'_>) -> String {
    match resource {
        Resource::Topic("") => "every topic".into(),
        Resource::Group("") => "every group".into(),
        Resource::ProducerGroup("") => "every producer group".into(),
        Resource::Topic(n) => format!("topic:{n}"),
        Resource::Group(n) => format!("group:{n}"),
        Resource::ProducerGroup(n) => format!("producer-group:{n}"),
        Resource::Cluster => "cluster".into(),
    }
}

/// Where changes of users and rules are written (the writer; a map in tests).
pub trait Store {
    /// Writes a user record.
    fn put_user(
        &self,
        name: &str,
        record: &UserRecord,
    ) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Removes a user and the rules `rules`.
    fn delete_user(
        &self,
        name: &str,
        rules: &[u64],
    ) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Writes a rule.
    fn put_rule(
        &self,
        id: u64,
        record: &RuleRecord,
    ) -> impl std::future::Future<Output = Result<()>> + Send;
    /// Removes rules.
    fn delete_rules(&self, ids: &[u64]) -> impl std::future::Future<Output = Result<()>> + Send;
}

#[cfg(test)]
mod tests;
