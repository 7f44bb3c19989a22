//! `txmq user` and `txmq acl`: the broker's users and rules; and who this command runs
//! as (`--user NAME` with `--user-secret-file FILE` or `TXMQ_USER_SECRET`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use txmq_client::{Admin, RuleSpec, Tls, User, pb};

/// Who every connection of this command authenticates as (set once, from the flags).
static USER: OnceLock<Option<User>> = OnceLock::new();

/// Reads a secret file: its first line, trimmed.
fn read_secret(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the secret file {}", path.display()))?;
    let secret = text.lines().next().unwrap_or_default().trim().to_string();
    anyhow::ensure!(
        !secret.is_empty(),
        "the secret file {} is empty",
        path.display()
    );
    Ok(secret)
}

/// Sets the user of this command from `--user` and its secret (a file, or the
/// `TXMQ_USER_SECRET` environment variable).
pub fn login(user: Option<String>, secret_file: Option<PathBuf>) -> anyhow::Result<()> {
    let user = match user.filter(|u| !u.is_empty()) {
        None => {
            anyhow::ensure!(
                secret_file.is_none(),
                "--user-secret-file needs --user NAME"
            );
            None
        }
        Some(name) => {
            let secret = match secret_file {
                Some(path) => read_secret(&path)?,
                None => std::env::var("TXMQ_USER_SECRET").map_err(|_| {
                    anyhow::anyhow!(
                        "--user {name} needs its secret: --user-secret-file FILE or \
                         TXMQ_USER_SECRET"
                    )
                })?,
            };
            Some(User::new(name, secret))
        }
    };
    let _ = USER.set(user);
    Ok(())
}

/// The user of this command, if it named one.
pub fn user() -> Option<User> {
    USER.get().cloned().flatten()
}

/// How every connection of this command reaches the broker: TLS or plain.
static TLS: OnceLock<Option<Tls>> = OnceLock::new();

/// Sets TLS from `--tls` and `--ca FILE` (which implies it).
pub fn secure(tls: bool, ca: Option<&Path>) -> anyhow::Result<()> {
    let config = match ca {
        Some(path) => Some(Tls::with_ca_file(path)?),
        None if tls => Some(Tls::public_roots()?),
        None => None,
    };
    let _ = TLS.set(config);
    Ok(())
}

/// TLS for this command's connections, if asked for.
pub fn tls() -> Option<Tls> {
    TLS.get().cloned().flatten()
}

/// An operator's connection, as this command's user.
pub async fn admin(addr: &str, token: &str) -> anyhow::Result<Admin> {
    Ok(Admin::connect_secure(addr, token, user().as_ref(), tls().as_ref()).await?)
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Create a user.
    Create {
        /// Its name.
        name: String,
        /// File whose first line is its secret (at least 8 bytes).
        #[arg(long)]
        new_secret_file: PathBuf,
        /// A super user: every permission, rules or not.
        #[arg(long = "super")]
        superuser: bool,
    },
    /// Delete a user and its rules (its sessions are refused from then on).
    Delete {
        /// Its name.
        name: String,
    },
    /// Give a user a new secret (its sessions are refused from then on).
    Passwd {
        /// Its name.
        name: String,
        /// File whose first line is the new secret.
        #[arg(long)]
        new_secret_file: PathBuf,
    },
    /// List users.
    List {
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
}

pub async fn user_cmd(addr: &str, token: &str, cmd: UserCmd) -> anyhow::Result<()> {
    let admin = admin(addr, token).await?;
    match cmd {
        UserCmd::Create {
            name,
            new_secret_file,
            superuser,
        } => {
            let secret = read_secret(&new_secret_file)?;
            admin.user_create(&name, &secret, superuser).await?;
            println!(
                "user {name} created{}",
                if superuser { " (super)" } else { "" }
            );
        }
        UserCmd::Delete { name } => {
            admin.user_delete(&name).await?;
            println!("user {name} deleted");
        }
        UserCmd::Passwd {
            name,
            new_secret_file,
        } => {
            let secret = read_secret(&new_secret_file)?;
            admin.user_passwd(&name, &secret).await?;
            println!("user {name}: secret changed");
        }
        UserCmd::List { json } => {
            for u in admin.user_list().await? {
                if json {
                    println!(
                        "{}",
                        json!({"name": u.name, "super": u.superuser,
                               "created_ms": u.created_ms, "changed_ms": u.changed_ms})
                    );
                } else {
                    let kind = if u.superuser { "super" } else { "normal" };
                    println!("{}\t{kind}", u.name);
                }
            }
        }
    }
    Ok(())
}

/// What a rule names on the command line.
#[derive(Debug, clap::Args)]
pub struct RuleArgs {
    /// The user.
    #[arg(id = "rule_user", value_name = "USER")]
    user: String,
    /// Actions, comma-separated: pub, sub, txn, create, alter, delete, read, admin, all.
    actions: String,
    /// topic:NAME, group:NAME, producer-group:NAME or cluster (NAME may be * or end
    /// in *).
    resource: String,
    /// A deny rule (a deny wins over any allow).
    #[arg(long)]
    deny: bool,
    /// Only from this network (CIDR, 10.0.0.0/8).
    #[arg(long, default_value = "")]
    source: String,
}

impl RuleArgs {
    fn spec(&self) -> RuleSpec {
        RuleSpec {
            user: self.user.clone(),
            resource: self.resource.clone(),
            actions: split(&self.actions),
            deny: self.deny,
            source: self.source.clone(),
        }
    }
}

fn split(actions: &str) -> Vec<String> {
    actions
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect()
}

#[derive(Debug, Subcommand)]
pub enum AclCmd {
    /// Allow (or, with --deny, deny) a user actions on a resource.
    Grant {
        #[command(flatten)]
        rule: RuleArgs,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove the rules equal to this one.
    Revoke {
        #[command(flatten)]
        rule: RuleArgs,
    },
    /// Remove a rule by its id.
    RevokeId {
        /// The rule's id (`txmq acl list`).
        id: u64,
    },
    /// List rules (of one user, or all).
    List {
        /// Only this user's.
        #[arg(id = "rule_user", value_name = "USER")]
        user: Option<String>,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
    /// Whether a user may do actions on a resource, and which rule decides.
    Check {
        /// The user.
        #[arg(id = "rule_user", value_name = "USER")]
        user: String,
        /// Actions, comma-separated.
        actions: String,
        /// One resource: topic:NAME, group:NAME, producer-group:NAME or cluster.
        resource: String,
        /// As if from this address.
        #[arg(long, default_value = "")]
        source: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

fn rule_json(r: &pb::RuleInfo) -> serde_json::Value {
    json!({"id": r.id, "user": r.user, "resource": r.resource, "actions": r.actions,
           "decision": if r.deny { "deny" } else { "allow" }, "source": r.source,
           "created_ms": r.created_ms})
}

fn rule_line(r: &pb::RuleInfo) -> String {
    let decision = if r.deny { "deny" } else { "allow" };
    let source = if r.source.is_empty() {
        String::new()
    } else {
        format!(" from {}", r.source)
    };
    format!(
        "{}\t{}\t{decision} {} on {}{source}",
        r.id,
        r.user,
        r.actions.join(","),
        r.resource
    )
}

pub async fn acl_cmd(addr: &str, token: &str, cmd: AclCmd) -> anyhow::Result<()> {
    let admin = admin(addr, token).await?;
    match cmd {
        AclCmd::Grant { rule, json } => {
            let r = admin.acl_grant(&rule.spec()).await?;
            if json {
                println!("{}", rule_json(&r));
            } else {
                println!("rule {}", rule_line(&r));
            }
        }
        AclCmd::Revoke { rule } => {
            let gone = admin.acl_revoke(&rule.spec(), None).await?;
            println!("{} rule(s) revoked", gone.len());
        }
        AclCmd::RevokeId { id } => {
            let gone = admin.acl_revoke(&RuleSpec::default(), Some(id)).await?;
            println!("{} rule(s) revoked", gone.len());
        }
        AclCmd::List { user, json } => {
            for r in admin.acl_list(user.as_deref().unwrap_or_default()).await? {
                if json {
                    println!("{}", rule_json(&r));
                } else {
                    println!("{}", rule_line(&r));
                }
            }
        }
        AclCmd::Check {
            user,
            actions,
            resource,
            source,
            json,
        } => {
            let c = admin
                .acl_check(&user, &split(&actions), &resource, &source)
                .await?;
            if json {
                println!(
                    "{}",
                    json!({"allowed": c.allowed, "reason": c.reason, "rule": c.rule_id})
                );
            } else {
                println!("{}", c.reason);
            }
            if !c.allowed {
                std::process::exit(3);
            }
        }
    }
    Ok(())
}
