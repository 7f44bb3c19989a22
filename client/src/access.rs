//! Users and rules, for operators ([`Admin`]): `txmq user …` and `txmq acl …`.

use txmq_protocol::pb::{self, frame::Body};

use crate::admin::Admin;
use crate::error::{Error, Result};

fn users(r: pb::response::Result) -> Result<pb::UsersOk> {
    match r {
        pb::response::Result::Users(x) => Ok(x),
        other => Err(Error::Unexpected(format!("{other:?}"))),
    }
}

fn rules(r: pb::response::Result) -> Result<pb::RulesOk> {
    match r {
        pb::response::Result::Rules(x) => Ok(x),
        other => Err(Error::Unexpected(format!("{other:?}"))),
    }
}

/// A rule to grant or revoke.
#[derive(Debug, Clone, Default)]
pub struct RuleSpec {
    /// The user it is for.
    pub user: String,
    /// `topic:NAME`, `group:NAME`, `producer-group:NAME` or `cluster` (NAME may be `*`
    /// or end in `*`).
    pub resource: String,
    /// pub, sub, txn, create, alter, delete, read, admin, or all.
    pub actions: Vec<String>,
    /// A deny rule (a deny wins).
    pub deny: bool,
    /// Only from this network (CIDR); empty: from anywhere.
    pub source: String,
}

impl Admin {
    async fn user_call(&self, req: pb::UserRequest) -> Result<pb::UsersOk> {
        users(self.conn.call(Body::User(req)).await?)
    }

    async fn acl_call(&self, req: pb::AclRequest) -> Result<pb::response::Result> {
        self.conn.call(Body::Acl(req)).await
    }

    /// Creates a user with `secret` (a super user holds every permission).
    ///
    /// # Errors
    /// A bad name or secret, the user exists, or no `admin` on `cluster`.
    pub async fn user_create(&self, name: &str, secret: &str, superuser: bool) -> Result<()> {
        self.user_call(pb::UserRequest {
            action: pb::user_request::Action::Create as i32,
            name: name.into(),
            secret: secret.into(),
            superuser,
        })
        .await
        .map(|_| ())
    }

    /// Deletes a user and its rules.
    ///
    /// # Errors
    /// No such user, the last super user, or no `admin` on `cluster`.
    pub async fn user_delete(&self, name: &str) -> Result<()> {
        self.user_call(pb::UserRequest {
            action: pb::user_request::Action::Delete as i32,
            name: name.into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
    }

    /// Gives a user a new secret; its sessions are refused from then on.
    ///
    /// # Errors
    /// No such user, a bad secret, or no `admin` on `cluster`.
    pub async fn user_passwd(&self, name: &str, secret: &str) -> Result<()> {
        self.user_call(pb::UserRequest {
            action: pb::user_request::Action::Passwd as i32,
            name: name.into(),
            secret: secret.into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
    }

    /// Every user.
    ///
    /// # Errors
    /// No `admin` on `cluster`.
    pub async fn user_list(&self) -> Result<Vec<pb::UserInfo>> {
        self.user_call(pb::UserRequest {
            action: pb::user_request::Action::List as i32,
            ..Default::default()
        })
        .await
        .map(|u| u.users)
    }

    fn acl_request(action: pb::acl_request::Action, rule: &RuleSpec) -> pb::AclRequest {
        pb::AclRequest {
            action: action as i32,
            user: rule.user.clone(),
            resource: rule.resource.clone(),
            actions: rule.actions.clone(),
            deny: rule.deny,
            source: rule.source.clone(),
            rule_id: 0,
        }
    }

    /// Grants a rule (an identical one is answered instead of a second).
    ///
    /// # Errors
    /// No such user, a bad rule, or no `admin` on `cluster`.
    pub async fn acl_grant(&self, rule: &RuleSpec) -> Result<pb::RuleInfo> {
        let r = self
            .acl_call(Self::acl_request(pb::acl_request::Action::Grant, rule))
            .await?;
        rules(r)?
            .rules
            .pop()
            .ok_or_else(|| Error::Unexpected("a grant answered no rule".into()))
    }

    /// Revokes the rules equal to `rule`, or the rule `id`; answers what went.
    ///
    /// # Errors
    /// A bad rule, or no `admin` on `cluster`.
    pub async fn acl_revoke(&self, rule: &RuleSpec, id: Option<u64>) -> Result<Vec<pb::RuleInfo>> {
        let mut req = Self::acl_request(pb::acl_request::Action::Revoke, rule);
        req.rule_id = id.unwrap_or(0);
        rules(self.acl_call(req).await?).map(|r| r.rules)
    }

    /// The rules of `user` (every user's when empty).
    ///
    /// # Errors
    /// No `admin` on `cluster`.
    pub async fn acl_list(&self, user: &str) -> Result<Vec<pb::RuleInfo>> {
        let req = pb::AclRequest {
            action: pb::acl_request::Action::List as i32,
            user: user.into(),
            ..Default::default()
        };
        rules(self.acl_call(req).await?).map(|r| r.rules)
    }

    /// Whether `user` may do `actions` on `resource` (from `source`, an address), and
    /// which rule decides.
    ///
    /// # Errors
    /// No such user, a bad resource or action, or no `admin` on `cluster`.
    pub async fn acl_check(
        &self,
        user: &str,
        actions: &[String],
        resource: &str,
        source: &str,
    ) -> Result<pb::AclCheckOk> {
        let req = pb::AclRequest {
            action: pb::acl_request::Action::Check as i32,
            user: user.into(),
            resource: resource.into(),
            actions: actions.to_vec(),
            source: source.into(),
            ..Default::default()
        };
        match self.acl_call(req).await? {
            pb::response::Result::AclCheck(x) => Ok(x),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }
}
