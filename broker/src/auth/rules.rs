//! Rules: a resource pattern, actions, allow or deny, and an optional source network;
//! and how a set of them decides.

use std::net::IpAddr;

use crate::error::{Error, Result};
use crate::service::access::{Action, Kind, Resource};
use crate::storage::records::RuleRecord;

/// Every action, by name.
pub const ACTIONS: [Action; 8] = [
    Action::Pub,
    Action::Sub,
    Action::Txn,
    Action::Create,
    Action::Alter,
    Action::Delete,
    Action::Read,
    Action::Admin,
];

/// An action by name (`all` is not one: [`parse_actions`] expands it).
fn action(name: &str) -> Option<Action> {
    ACTIONS.into_iter().find(|a| a.name() == name)
}

/// Action names as a rule takes them (`all` for every one), checked and in the
/// table's order, each once.
///
/// # Errors
/// An unknown name, or none.
pub fn parse_actions(names: &[String]) -> Result<Vec<Action>> {
    let mut out = Vec::new();
    for name in names.iter().flat_map(|n| n.split(',')).map(str::trim) {
        if name == "all" {
            return Ok(ACTIONS.to_vec());
        }
        let a = action(name).ok_or_else(|| {
            Error::Invalid(format!(
                "{name:?} is not an action: pub, sub, txn, create, alter, delete, read, \
                 admin or all"
            ))
        })?;
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid("a rule needs at least one action".into()));
    }
    out.sort_by_key(|a| ACTIONS.iter().position(|b| b == a));
    Ok(out)
}

/// A resource pattern: a kind and a name pattern (exact, prefix `…*`, or `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// What kind of resource.
    pub kind: Kind,
    /// The name pattern (empty for `cluster`).
    pub name: String,
}

impl Pattern {
    /// Reads `topic:NAME`, `group:NAME`, `producer-group:NAME` or `cluster`.
    ///
    /// # Errors
    /// Another form, or a name that is neither a valid name nor a pattern.
    pub fn parse(text: &str) -> Result<Self> {
        if text == "cluster" {
            return Ok(Self {
                kind: Kind::Cluster,
                name: String::new(),
            });
        }
        let (kind, name) = text
            .split_once(':')
            .and_then(|(k, n)| {
                let kind = match k {
                    "topic" => Kind::Topic,
                    "group" => Kind::Group,
                    "producer-group" => Kind::ProducerGroup,
                    _ => return None,
                };
                Some((kind, n))
            })
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{text:?} is not a resource: topic:NAME, group:NAME, \
                     producer-group:NAME or cluster (NAME may be *, or end in *)"
                ))
            })?;
        let stem = name.strip_suffix('*').unwrap_or(name);
        // The gRPC face's transactions belong to the producer group `%GRPC%<topic>`.
        let stem = match kind {
            Kind::ProducerGroup => stem.strip_prefix("%GRPC%").unwrap_or(stem),
            _ => stem,
        };
        if !stem.is_empty() {
            let kind_name = match kind {
                Kind::Topic => "topic",
                Kind::Group => "group",
                _ => "producer group",
            };
            txmq_protocol::names::validate(kind_name, stem).map_err(Error::InvalidName)?;
        } else if name.is_empty() {
            return Err(Error::Invalid(format!(
                "{text:?} names no resource: give a name, a prefix ending in *, or *"
            )));
        }
        Ok(Self {
            kind,
            name: name.to_string(),
        })
    }

    /// Whether it covers `resource`. A request that spans every resource of a kind (a
    /// listing, an operator's action on any transaction) names the empty name: only
    /// `*` covers it.
    pub fn covers(&self, resource: &Resource<'_>) -> bool {
        if self.kind != resource.kind() {
            return false;
        }
        let name = match resource {
            Resource::Topic(n) | Resource::Group(n) | Resource::ProducerGroup(n) => *n,
            Resource::Cluster => return true,
        };
        if self.name == "*" {
            return true;
        }
        if name.is_empty() {
            return false;
        }
        match self.name.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => self.name == name,
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Kind::Cluster => f.write_str("cluster"),
            Kind::Topic => write!(f, "topic:{}", self.name),
            Kind::Group => write!(f, "group:{}", self.name),
            Kind::ProducerGroup => write!(f, "producer-group:{}", self.name),
        }
    }
}

/// A source network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Reads `10.0.0.0/8`, `::1/128`, or a bare address (the whole length).
    ///
    /// # Errors
    /// Not of that form.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("{text:?} is not a network (10.0.0.0/8, ::1/128)"));
        let (addr, bits) = match text.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self { addr, bits })
    }

    /// Whether `ip` is in it (an IPv4 address seen as IPv6-mapped counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A stored rule, read.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its id.
    pub id: u64,
    /// The user it is for.
    pub user: String,
    /// What it is on.
    pub pattern: Pattern,
    /// What it allows or denies.
    pub actions: Vec<Action>,
    /// A deny rule.
    pub deny: bool,
    /// Only from this network.
    pub source: Option<Cidr>,
    /// The record it came from.
    pub record: RuleRecord,
}

impl Rule {
    /// Reads a stored rule.
    ///
    /// # Errors
    /// A record that does not parse (written by a later version, or corrupt).
    pub fn from_record(id: u64, record: RuleRecord) -> Result<Self> {
        let source = if record.source.is_empty() {
            None
        } else {
            Some(Cidr::parse(&record.source)?)
        };
        Ok(Self {
            id,
            user: record.user.clone(),
            pattern: Pattern::parse(&record.resource)?,
            actions: parse_actions(&record.actions)?,
            deny: record.deny,
            source,
            record,
        })
    }

    /// Whether it speaks to `action` on `resource` from `peer`.
    pub fn matches(&self, action: Action, resource: &Resource<'_>, peer: Option<IpAddr>) -> bool {
        self.actions.contains(&action)
            && self.pattern.covers(resource)
            && match (self.source, peer) {
                (None, _) => true,
                (Some(net), Some(ip)) => net.contains(ip),
                (Some(_), None) => false,
            }
    }
}

/// How a user's rules decide one (action, resource): a deny wins; else an allow; else
/// denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this rule.
    Allowed(u64),
    /// Denied by this rule.
    Denied(u64),
    /// No rule allows it.
    NoRule,
}

/// The decision of `rules` (one user's) on `action` on `resource` from `peer`.
pub fn decide<'a>(
    rules: impl Iterator<Item = &'a Rule>,
    action: Action,
    resource: &Resource<'_>,
    peer: Option<IpAddr>,
) -> Decision {
    // A request that spans every resource of a kind (a listing) shows what a deny on
    // part of them withholds: any deny of the kind and action refuses it.
    let spanning = matches!(
        resource,
        Resource::Topic("") | Resource::Group("") | Resource::ProducerGroup("")
    );
    let from = |r: &Rule| match (r.source, peer) {
        (None, _) => true,
        (Some(net), Some(ip)) => net.contains(ip),
        (Some(_), None) => false,
    };
    let withholds = |r: &Rule| {
        spanning
            && r.deny
            && r.pattern.kind == resource.kind()
            && r.actions.contains(&action)
            && from(r)
    };
    let mut allowed = None;
    for rule in rules.filter(|r| r.matches(action, resource, peer) || withholds(r)) {
        if rule.deny {
            return Decision::Denied(rule.id);
        }
        allowed.get_or_insert(rule.id);
    }
    allowed.map_or(Decision::NoRule, Decision::Allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: u64, resource: &str, actions: &[&str], deny: bool, source: &str) -> Rule {
        Rule::from_record(
            id,
            RuleRecord {
                user: "u".into(),
                resource: resource.into(),
                actions: actions.iter().map(|s| s.to_string()).collect(),
                deny,
                source: source.into(),
                created_ms: 0,
            },
        )
        .unwrap()
    }

    #[test]
    fn patterns_match_exactly_by_prefix_or_all() {
        let exact = Pattern::parse("topic:orders").unwrap();
        assert!(exact.covers(&Resource::Topic("orders")));
        assert!(!exact.covers(&Resource::Topic("orders2")));
        assert!(!exact.covers(&Resource::Group("orders")));
        assert!(!exact.covers(&Resource::Topic("")));
        let prefix = Pattern::parse("group:billing-*").unwrap();
        assert!(prefix.covers(&Resource::Group("billing-eu")));
        assert!(!prefix.covers(&Resource::Group("billin")));
        let grpc = Pattern::parse("producer-group:%GRPC%orders").unwrap();
        assert!(grpc.covers(&Resource::ProducerGroup("%GRPC%orders")));
        assert!(!grpc.covers(&Resource::ProducerGroup("orders")));
        let all = Pattern::parse("producer-group:*").unwrap();
        assert!(all.covers(&Resource::ProducerGroup("")));
        assert!(
            Pattern::parse("cluster")
                .unwrap()
                .covers(&Resource::Cluster)
        );
        for bad in ["topic:", "queue:x", "topic:a b", "orders", "topic:%GRPC%x"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(prefix.to_string(), "group:billing-*");
    }

    #[test]
    fn a_deny_wins_and_no_rule_denies() {
        let rules = [
            rule(1, "topic:*", &["pub", "read"], false, ""),
            rule(2, "topic:secret-*", &["pub"], true, ""),
        ];
        let d = |a, t| decide(rules.iter(), a, &Resource::Topic(t), None);
        assert_eq!(d(Action::Pub, "orders"), Decision::Allowed(1));
        assert_eq!(d(Action::Pub, "secret-x"), Decision::Denied(2));
        assert_eq!(d(Action::Read, "secret-x"), Decision::Allowed(1));
        assert_eq!(d(Action::Sub, "orders"), Decision::NoRule);
        // A listing of every topic is refused by a deny on some of them.
        assert_eq!(d(Action::Pub, ""), Decision::Denied(2));
        assert_eq!(d(Action::Read, ""), Decision::Allowed(1));
    }

    #[test]
    fn a_source_network_limits_a_rule() {
        let rules = [rule(1, "cluster", &["all"], false, "10.1.0.0/16")];
        let from = |ip: &str| {
            decide(
                rules.iter(),
                Action::Admin,
                &Resource::Cluster,
                ip.parse().ok(),
            )
        };
        assert_eq!(from("10.1.2.3"), Decision::Allowed(1));
        assert_eq!(from("::ffff:10.1.2.3"), Decision::Allowed(1));
        assert_eq!(from("10.2.0.1"), Decision::NoRule);
        assert_eq!(from("not an address"), Decision::NoRule);
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
    }

    #[test]
    fn actions_parse_with_all_and_commas() {
        assert_eq!(parse_actions(&["all".into()]).unwrap().len(), 8);
        assert_eq!(
            parse_actions(&["sub,pub".into(), "pub".into()]).unwrap(),
            vec![Action::Pub, Action::Sub]
        );
        assert!(parse_actions(&["write".into()]).is_err());
        assert!(parse_actions(&[]).is_err());
    }
}
