//! Leases the broker renews on a client's behalf while the client is there: a gRPC
//! push consumer's (ReceiveMessage with `auto_renew`, while its Telemetry stream is
//! open), a Remoting consumer's (what it pulled and has not committed, while its
//! connection is open). Such a delivery's lease is the broker's (`lease`, 30 s by
//! default), and a task renews it once half of it is gone, until it is acked, its
//! invisible time changed, or it is sent to the dead letters — and for at most
//! [`MAX_RENEWED`] in all (as RocketMQ's proxy), so a consumer that hangs or lost the
//! message does not hide it for good (I6). A client that goes away stops the renewals:
//! its leases end and the messages are delivered again. The renewals are found through
//! a time-ordered index, so a pass costs what is due (I5).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use txmq_protocol::now_ms;

use crate::service::consume::{self, Handle, LeaseRef};
use crate::service::{Principal, Shared};

/// Most leases renewed at once; beyond, a lease is not renewed (it ends, and the
/// message comes again).
const MAX_HELD: usize = 65_536;

/// How often the task looks.
const TICK: Duration = Duration::from_secs(1);

/// Longest a delivery is kept invisible by renewals.
pub const MAX_RENEWED: Duration = Duration::from_secs(3 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    group: String,
    topic: String,
    offset: u64,
}

#[derive(Debug, Clone)]
struct Held {
    lease_id: u64,
    /// Who holds it (its `client_id` names the client): renewals are made as it.
    who: Principal,
    deadline_ms: u64,
    /// No renewal past this (received + [`MAX_RENEWED`]).
    until_ms: u64,
}

#[derive(Debug, Default)]
struct Inner {
    held: HashMap<Key, Held>,
    /// (deadline, key) of every entry: what is due first.
    by_deadline: BTreeSet<(u64, Key)>,
    /// Warned that the table was full (once until it has room again).
    warned: bool,
}

impl Inner {
    fn remove(&mut self, key: &Key) -> Option<Held> {
        let h = self.held.remove(key)?;
        self.by_deadline.remove(&(h.deadline_ms, key.clone()));
        Some(h)
    }

    fn insert(&mut self, key: Key, h: Held) {
        self.remove(&key);
        self.by_deadline.insert((h.deadline_ms, key.clone()));
        self.held.insert(key, h);
    }
}

/// The leases being renewed.
#[derive(Debug, Default)]
pub struct Renewals {
    inner: Mutex<Inner>,
}

impl Renewals {
    /// Renews this lease from now on, for `client` (a redelivery's lease replaces the
    /// earlier one of the same message).
    pub fn hold(
        &self,
        group: &str,
        topic: &str,
        lease: LeaseRef,
        who: &Principal,
        deadline_ms: u64,
    ) {
        let key = Key {
            group: group.into(),
            topic: topic.into(),
            offset: lease.offset,
        };
        let mut inner = self.inner.lock().expect("renewals lock");
        if inner.held.len() >= MAX_HELD && !inner.held.contains_key(&key) {
            if !inner.warned {
                inner.warned = true;
                tracing::warn!("{MAX_HELD} leases renewed already: more are not, until some end");
            }
            return;
        }
        inner.warned = false;
        let until_ms = now_ms().saturating_add(MAX_RENEWED.as_millis() as u64);
        inner.insert(
            key,
            Held {
                lease_id: lease.lease_id,
                who: who.clone(),
                deadline_ms,
                until_ms,
            },
        );
    }

    /// Stops renewing this lease (acked, changed, dead-lettered).
    pub fn release(&self, group: &str, topic: &str, lease: LeaseRef) {
        let key = Key {
            group: group.into(),
            topic: topic.into(),
            offset: lease.offset,
        };
        let mut inner = self.inner.lock().expect("renewals lock");
        if inner
            .held
            .get(&key)
            .is_some_and(|h| h.lease_id == lease.lease_id)
        {
            inner.remove(&key);
        }
    }

    /// The entries due by `by_ms`, earliest first, at most `limit`: a walk of the index
    /// that stops at the first not due.
    fn due(&self, by_ms: u64, limit: usize) -> Vec<(Key, Held)> {
        let inner = self.inner.lock().expect("renewals lock");
        inner
            .by_deadline
            .iter()
            .take_while(|(at, _)| *at <= by_ms)
            .take(limit)
            .filter_map(|(_, k)| Some((k.clone(), inner.held.get(k)?.clone())))
            .collect()
    }

    /// A renewal's outcome: the new deadline, or `None` to stop renewing.
    fn set(&self, key: &Key, lease_id: u64, deadline_ms: Option<u64>) {
        let mut inner = self.inner.lock().expect("renewals lock");
        let Some(h) = inner
            .held
            .get(key)
            .filter(|h| h.lease_id == lease_id)
            .cloned()
        else {
            return;
        };
        match deadline_ms {
            Some(at) => inner.insert(
                key.clone(),
                Held {
                    deadline_ms: at,
                    ..h
                },
            ),
            None => {
                inner.remove(key);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().expect("renewals lock").held.len()
    }
}

/// Most renewals one pass makes (the rest wait for the next tick).
const PASS: usize = 4096;

/// Renews what is due until `stop`, from the parts `shared` gives (while the broker
/// serves), for the clients `connected` says are there.
pub async fn run(
    shared: impl Fn() -> Option<Arc<Shared>>,
    renewals: Arc<Renewals>,
    connected: impl Fn(&str) -> bool,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(shared) = shared().filter(|s| s.serving.holds()) else {
            continue;
        };
        let lease = shared.config.lease;
        let now = now_ms();
        let by = now.saturating_add(lease.as_millis() as u64 / 2);
        let due = renewals.due(by, PASS);
        let clients: std::collections::HashSet<String> =
            due.iter().map(|(_, h)| h.who.client_id.clone()).collect();
        let there: std::collections::HashSet<String> =
            clients.into_iter().filter(|c| connected(c)).collect();
        for (key, held) in due {
            // Gone, or kept long enough: the lease runs out, the message comes again.
            if !there.contains(&held.who.client_id) || now >= held.until_ms {
                renewals.set(&key, held.lease_id, None);
                continue;
            }
            // Renewed on the client's behalf, as it would extend the lease itself.
            let who = held.who.clone();
            let handle = Handle {
                group: key.group.clone(),
                topic: key.topic.clone(),
                lease: LeaseRef::new(key.offset, held.lease_id),
            };
            let extended = consume::extend(&shared, &who, handle, lease).await.await;
            // A lease that is gone (acked, expired) is not renewed any more.
            renewals.set(&key, held.lease_id, extended.ok());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c() -> Principal {
        Principal::grpc(crate::auth::Identity::Anonymous, None, Some("c".into()))
    }

    fn lease(offset: u64, lease_id: u64) -> LeaseRef {
        LeaseRef::new(offset, lease_id)
    }

    /// What is due comes in deadline order and stops at the first not due; a release
    /// names the lease, so a stale one releases nothing; a redelivery's lease replaces
    /// the earlier one.
    #[test]
    fn renewals_are_found_by_deadline_and_named_by_lease() {
        let r = Renewals::default();
        r.hold("g", "t", lease(1, 10), &c(), 300);
        r.hold("g", "t", lease(2, 20), &c(), 100);
        r.hold("g", "t", lease(3, 30), &c(), 900);
        let due: Vec<u64> = r.due(500, 10).iter().map(|(k, _)| k.offset).collect();
        assert_eq!(due, [2, 1]);
        r.release("g", "t", lease(2, 99));
        assert_eq!(r.len(), 3, "a stale lease id released a renewal");
        r.release("g", "t", lease(2, 20));
        assert_eq!(r.len(), 2);
        r.hold("g", "t", lease(1, 11), &c(), 50);
        assert_eq!(r.len(), 2, "a redelivery added instead of replacing");
        let due = r.due(60, 10);
        assert_eq!((due.len(), due[0].1.lease_id), (1, 11));
        r.set(&due[0].0, 11, Some(700));
        assert!(r.due(600, 10).is_empty());
        r.set(&due[0].0, 11, None);
        assert_eq!(r.len(), 1);
    }
}
