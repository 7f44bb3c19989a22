//! Live producer connections per producer group, for check-backs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use txmq_protocol::Frame;

use crate::delivery::Stall;

/// Most unanswered checks one connection may hold before it counts as busy.
pub const MAX_PENDING_CHECKS: usize = 64;

#[derive(Debug, Clone)]
struct Conn {
    id: u64,
    outbound: mpsc::Sender<Frame>,
    pending: Arc<AtomicUsize>,
    /// A connection whose client stopped reading is busy: a check queued behind it would
    /// only time out and count.
    stall: Arc<Stall>,
    /// What its checker answers for (`Hello.check_scopes`); empty: unscoped ones.
    scopes: Arc<[String]>,
}

/// Where a check went.
#[derive(Debug)]
pub enum Picked {
    /// Queued on this connection; `pending` is its counter of unanswered checks.
    Sent {
        /// The connection.
        connection_id: u64,
        /// Decrement when the check is answered or times out.
        pending: Arc<AtomicUsize>,
    },
    /// No producer of the group is connected.
    NoneConnected,
    /// Every connection of the group is busy or closing.
    AllBusy,
}

/// The registry.
#[derive(Debug, Default)]
pub struct Producers {
    groups: Mutex<HashMap<String, (Vec<Conn>, usize)>>,
}

impl Producers {
    /// A connection registered as a producer of `group`, answering for transactions
    /// without a check scope.
    pub fn register(
        &self,
        group: &str,
        connection_id: u64,
        outbound: mpsc::Sender<Frame>,
        stall: Arc<Stall>,
    ) {
        self.register_scoped(group, connection_id, outbound, stall, Vec::new());
    }

    /// [`Producers::register`] for a connection whose checker answers for the
    /// transactions of `scopes` (see [`Producers::send_check`]).
    pub fn register_scoped(
        &self,
        group: &str,
        connection_id: u64,
        outbound: mpsc::Sender<Frame>,
        stall: Arc<Stall>,
        scopes: Vec<String>,
    ) {
        let mut groups = self.groups.lock().expect("producers lock");
        groups.entry(group.to_string()).or_default().0.push(Conn {
            id: connection_id,
            outbound,
            pending: Arc::default(),
            stall,
            scopes: scopes.into(),
        });
    }

    /// A connection closed.
    pub fn unregister(&self, connection_id: u64) {
        let mut groups = self.groups.lock().expect("producers lock");
        for (conns, _) in groups.values_mut() {
            conns.retain(|c| c.id != connection_id);
        }
        groups.retain(|_, (conns, _)| !conns.is_empty());
    }

    /// Connected producers of a group.
    pub fn count(&self, group: &str) -> usize {
        let groups = self.groups.lock().expect("producers lock");
        groups.get(group).map_or(0, |(c, _)| c.len())
    }

    /// Sends `frame` to the next live, not busy connection of `group` that answers for
    /// `scope`, round-robin. A scoped transaction (a database's identity) goes only to
    /// connections that declared its scope: another database's checker would find no
    /// record of it and fence it (roll back committed work). An unscoped one goes to
    /// connections that declared no scope; with `legacy` (prepared before scopes
    /// existed), when the group has none, to any: such checkers answered them before.
    pub fn send_check(
        &self,
        group: &str,
        scope: Option<&str>,
        legacy: bool,
        frame: Frame,
    ) -> Picked {
        let mut groups = self.groups.lock().expect("producers lock");
        let Some((conns, next)) = groups.get_mut(group) else {
            return Picked::NoneConnected;
        };
        let answers = |c: &Conn| match scope {
            Some(s) => c.scopes.iter().any(|mine| mine == s),
            None => c.scopes.is_empty(),
        };
        let any_unscoped = legacy && scope.is_none() && !conns.iter().any(answers);
        let eligible = |c: &Conn| any_unscoped || answers(c);
        if !conns.iter().any(eligible) {
            return Picked::NoneConnected;
        }
        let n = conns.len();
        let mut frame = Some(frame);
        for step in 0..n {
            let i = (*next + step) % n;
            let c = &conns[i];
            if !eligible(c)
                || c.outbound.is_closed()
                || c.pending.load(Ordering::Relaxed) >= MAX_PENDING_CHECKS
                || c.stall.is_stalled()
            {
                continue;
            }
            match c.outbound.try_send(frame.take().expect("frame unsent")) {
                Ok(()) => {
                    *next = (i + 1) % n;
                    c.pending.fetch_add(1, Ordering::Relaxed);
                    return Picked::Sent {
                        connection_id: c.id,
                        pending: c.pending.clone(),
                    };
                }
                Err(mpsc::error::TrySendError::Full(f) | mpsc::error::TrySendError::Closed(f)) => {
                    frame = Some(f);
                }
            }
        }
        Picked::AllBusy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 25, item 5: a transaction scoped to a database is checked only by producers
    /// that declared that database; an unscoped one by those that declared none, or by
    /// any when the group has none.
    #[test]
    fn checks_go_to_the_producers_of_their_scope() {
        let p = Producers::default();
        let (a, _ra) = mpsc::channel(8);
        let (b, _rb) = mpsc::channel(8);
        p.register_scoped("g", 1, a, Arc::default(), vec!["db-a".into()]);
        p.register_scoped("g", 2, b, Arc::default(), vec!["db-b".into()]);
        let sent_as = |scope, legacy| match p.send_check("g", scope, legacy, frame()) {
            Picked::Sent { connection_id, .. } => Some(connection_id),
            _ => None,
        };
        let sent = |scope| sent_as(scope, true);
        for _ in 0..3 {
            assert_eq!(sent(Some("db-a")), Some(1));
            assert_eq!(sent(Some("db-b")), Some(2));
        }
        assert_eq!(sent(Some("db-c")), None, "nobody answers for db-c");
        assert!(matches!(
            p.send_check("g", Some("db-c"), false, frame()),
            Picked::NoneConnected
        ));
        // Unscoped and prepared since scopes exist (a plain producer's, whose checker
        // is gone): never a database's checker, which would fence it.
        assert_eq!(sent_as(None, false), None);
        // Unscoped (prepared before scopes): any, while nobody declared none.
        let mut ids: Vec<_> = (0..2).filter_map(|_| sent(None)).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2]);
        let (c, _rc) = mpsc::channel(8);
        p.register("g", 3, c, Arc::default());
        assert_eq!(sent(None), Some(3));
        assert_eq!(
            sent(None),
            Some(3),
            "an unscoped producer takes the unscoped"
        );
    }

    fn frame() -> Frame {
        Frame { id: 1, body: None }
    }

    #[test]
    fn round_robin_skips_dead_and_busy_connections() {
        let p = Producers::default();
        let (a, mut ra) = mpsc::channel(8);
        let (b, rb) = mpsc::channel(8);
        let (c, mut rc) = mpsc::channel(1);
        p.register("g", 1, a, Arc::default());
        p.register("g", 2, b, Arc::default());
        p.register("g", 3, c, Arc::default());
        drop(rb); // connection 2 died
        let ids: Vec<u64> = (0..4)
            .map(|_| match p.send_check("g", None, true, frame()) {
                Picked::Sent { connection_id, .. } => connection_id,
                other => panic!("{other:?}"),
            })
            .collect();
        // 3's channel holds one frame: after that it is full and skipped.
        assert_eq!(ids, vec![1, 3, 1, 1]);
        assert!(ra.try_recv().is_ok());
        assert!(rc.try_recv().is_ok());
        assert!(matches!(
            p.send_check("x", None, true, frame()),
            Picked::NoneConnected
        ));
        p.unregister(1);
        p.unregister(3);
        assert!(matches!(
            p.send_check("g", None, true, frame()),
            Picked::AllBusy
        ));
        p.unregister(2);
        assert_eq!(p.count("g"), 0);
    }

    #[test]
    fn a_connection_with_too_many_unanswered_checks_is_busy() {
        let p = Producers::default();
        let (a, _ra) = mpsc::channel(1000);
        p.register("g", 1, a, Arc::default());
        for _ in 0..MAX_PENDING_CHECKS {
            assert!(matches!(
                p.send_check("g", None, true, frame()),
                Picked::Sent { .. }
            ));
        }
        assert!(matches!(
            p.send_check("g", None, true, frame()),
            Picked::AllBusy
        ));
    }
}
