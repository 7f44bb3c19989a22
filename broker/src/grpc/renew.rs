//! Push consumers ask the broker to keep what they received invisible while they work
//! on it (ReceiveMessage with `auto_renew`): such a delivery's lease is the broker's
//! (`lease`, 30 s by default), and a task renews it once half of it is gone, for as long
//! as the client that holds it keeps a Telemetry stream open, until it is acked, its
//! invisible time changed, or it is sent to the dead letters. A client that goes away
//! stops the renewals: its leases end and the messages are delivered again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use txmq_protocol::now_ms;

use super::Live;
use super::telemetry::Sessions;
use crate::delivery::{LeaseRef, QueueMsg};
use crate::error::Error;

/// Most leases renewed at once; beyond, a lease is not renewed (it ends, and the
/// message comes again).
const MAX_HELD: usize = 65_536;

/// How often the task looks.
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    group: String,
    topic: String,
    offset: u64,
}

#[derive(Debug, Clone)]
struct Held {
    lease_id: u64,
    client: String,
    deadline_ms: u64,
}

/// The leases being renewed.
#[derive(Debug, Default)]
pub struct Renewals {
    held: Mutex<HashMap<Key, Held>>,
}

impl Renewals {
    /// Renews this lease from now on, for `client`.
    pub fn hold(&self, group: &str, topic: &str, lease: LeaseRef, client: &str, deadline_ms: u64) {
        let mut held = self.held.lock().expect("renewals lock");
        if held.len() >= MAX_HELD {
            tracing::warn!(
                group,
                topic,
                "{MAX_HELD} leases renewed already: this one is not"
            );
            return;
        }
        held.insert(
            Key {
                group: group.into(),
                topic: topic.into(),
                offset: lease.offset,
            },
            Held {
                lease_id: lease.lease_id,
                client: client.into(),
                deadline_ms,
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
        let mut held = self.held.lock().expect("renewals lock");
        if held.get(&key).is_some_and(|h| h.lease_id == lease.lease_id) {
            held.remove(&key);
        }
    }

    fn due(&self, by_ms: u64) -> Vec<(Key, Held)> {
        self.held
            .lock()
            .expect("renewals lock")
            .iter()
            .filter(|(_, h)| h.deadline_ms <= by_ms)
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect()
    }

    fn set(&self, key: &Key, lease_id: u64, deadline_ms: Option<u64>) {
        let mut held = self.held.lock().expect("renewals lock");
        match deadline_ms {
            Some(at) => {
                if let Some(h) = held.get_mut(key).filter(|h| h.lease_id == lease_id) {
                    h.deadline_ms = at;
                }
            }
            None => {
                if held.get(key).is_some_and(|h| h.lease_id == lease_id) {
                    held.remove(key);
                }
            }
        }
    }
}

/// Renews what is due until `stop`.
pub async fn run(
    live: Arc<Live>,
    renewals: Arc<Renewals>,
    sessions: Arc<Sessions>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(shared) = live.get() else { continue };
        let lease = shared.config.lease;
        let by = now_ms().saturating_add(lease.as_millis() as u64 / 2);
        for (key, held) in renewals.due(by) {
            if !sessions.has_client(&held.client) {
                renewals.set(&key, held.lease_id, None);
                continue;
            }
            let Ok(topic) = shared.groups.existing_topic(&key.topic) else {
                renewals.set(&key, held.lease_id, None);
                continue;
            };
            let (reply, rx) = oneshot::channel();
            let msg = QueueMsg::Extend {
                lease: LeaseRef {
                    offset: key.offset,
                    lease_id: held.lease_id,
                },
                lease_for: lease,
                reply,
            };
            let extended = match shared.groups.send_existing(&key.group, topic, msg).await {
                Ok(()) => rx.await.unwrap_or(Err(Error::ShuttingDown)),
                Err(e) => Err(e),
            };
            // A lease that is gone (acked, expired) is not renewed any more.
            renewals.set(&key, held.lease_id, extended.ok());
        }
    }
}
