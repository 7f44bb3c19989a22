//! Check-backs to Remoting producers (I4 for the third face).
//!
//! A connection that declares a producer group (in a heartbeat, or by sending a half
//! message) is registered with the broker's one check-back scheduler as a producer
//! connection of that group, under a connection id of its own. The scheduler's checks
//! become one-way CHECK_TRANSACTION_STATE requests carrying the half message's record
//! (RocketMQ clients never answer those); the client's checker answers with an
//! END_TRANSACTION marked `fromTransactionCheck`, which goes back to the scheduler as
//! the answer to that check from that connection: counting, backoff, timeouts,
//! discards and "unknown" are the scheduler's, as on every face.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::mpsc;
use txmq_protocol::Frame;
use txmq_protocol::pb as native;

use super::codes;
use super::connection::Conn;
use super::frame::Command;
use super::record::{self, Record};
use crate::ids::Id;
use crate::service::consume::{Sink, Stall};
use crate::service::{Principal, Shared, admin, txn};

/// Checks on their way to one connection.
const BRIDGE: usize = 64;

/// Producer groups one connection answers for.
const MAX_GROUPS: usize = 256;

/// Unanswered checks one connection remembers.
const MAX_PENDING: usize = 4096;

/// A connection registered as a producer.
#[derive(Debug)]
pub struct Link {
    /// Its connection id in the producers registry.
    pub connection_id: u64,
    /// The groups it answers for.
    groups: Mutex<Vec<String>>,
    /// Checks sent and not answered: transaction → check id and its group.
    pending: Mutex<HashMap<Id, (u64, String)>>,
    shared: Weak<Shared>,
    sink: Sink,
}

impl Link {
    /// A link to `conn` through `shared`'s scheduler, with its bridge.
    pub fn new(shared: &Arc<Shared>, conn: &Arc<Conn>, store_host: SocketAddr) -> Arc<Self> {
        let connection_id = shared
            .connection_ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<Frame>(BRIDGE);
        let link = Arc::new(Self {
            connection_id,
            groups: Mutex::new(Vec::new()),
            pending: Mutex::new(HashMap::new()),
            shared: Arc::downgrade(shared),
            sink: Sink {
                outbound: tx,
                stall: Arc::new(Stall::default()),
            },
        });
        tokio::spawn(bridge(
            Arc::downgrade(&link),
            Arc::downgrade(conn),
            shared.clone(),
            rx,
            store_host,
        ));
        link
    }

    /// Whether this link was made through `shared`.
    pub fn is_of(&self, shared: &Arc<Shared>) -> bool {
        std::ptr::eq(self.shared.as_ptr(), Arc::as_ptr(shared))
    }

    /// Registers the connection as a producer of `group` (once).
    ///
    /// # Errors
    /// Not permitted to answer the group's checks.
    pub fn answer_for(
        &self,
        shared: &Shared,
        who: &Principal,
        group: &str,
    ) -> crate::error::Result<()> {
        let mut groups = self.groups.lock().expect("groups lock");
        if groups.iter().any(|g| g == group) {
            return Ok(());
        }
        if groups.len() >= MAX_GROUPS {
            return Err(crate::error::Error::LimitReached(format!(
                "a connection answers the check-backs of at most {MAX_GROUPS} producer groups"
            )));
        }
        let own = txn::OwnGroup::declared(group);
        txn::answer_checks(
            shared,
            who,
            &own,
            self.connection_id,
            Vec::new(),
            &self.sink,
        )?;
        groups.push(group.to_string());
        Ok(())
    }

    /// The client answered a check of `txn`: the check's id and group, when one was
    /// sent on this connection (it is now answered).
    pub fn answered(&self, txn: Id) -> Option<(u64, String)> {
        self.pending.lock().expect("pending lock").remove(&txn)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            txn::stop_answering(&shared, self.connection_id);
        }
    }
}

/// The request that asks a client about `check`'s transaction.
fn check_request(
    shared: &Shared,
    check: &native::CheckRequest,
    store_host: SocketAddr,
    conn: &Conn,
) -> Option<Command> {
    let m = check.messages.first()?;
    let handle = admin::topic_id(shared, &m.topic).map_or(0, |id| record::handle(id, 0));
    let uniq = m
        .properties
        .get(super::send::UNIQ_KEY)
        .cloned()
        .unwrap_or_else(|| m.message_id.clone());
    let props = super::send::outgoing_properties(
        m,
        &[
            ("PGROUP", check.producer_group.as_str()),
            ("TRAN_MSG", "true"),
            ("__transactionId__", check.txn_id.as_str()),
        ],
    );
    let mut body = Vec::new();
    Record {
        queue_id: 0,
        flag: super::send::user_flag(m),
        queue_offset: 0,
        handle,
        sys_flag: record::sys_flag::PREPARED,
        born_ms: m.born_ms as i64,
        born_host: store_host,
        store_ms: m.store_ms as i64,
        store_host,
        reconsume_times: 0,
        body: &m.body,
        topic: &m.topic,
        properties: &props,
    }
    .write(&mut body)
    .ok()?;
    let offset_id = record::message_id(store_host, handle);
    Some(
        Command::oneway(codes::CHECK_TRANSACTION_STATE, 0, conn.encoding())
            .with("topic", &m.topic)
            .with("commitLogOffset", handle)
            .with("tranStateTableOffset", 0)
            .with("msgId", &uniq)
            .with("transactionId", &check.txn_id)
            .with("offsetMsgId", offset_id)
            .with("bname", super::route::BROKER_NAME)
            .with_body(body),
    )
}

/// Puts the scheduler's checks on the connection, until either is gone.
async fn bridge(
    link: Weak<Link>,
    conn: Weak<Conn>,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Frame>,
    store_host: SocketAddr,
) {
    let shared = Arc::downgrade(&shared);
    while let Some(frame) = rx.recv().await {
        let Some(native::frame::Body::Check(check)) = frame.body else {
            continue;
        };
        let (Some(link), Some(conn), Some(shared)) =
            (link.upgrade(), conn.upgrade(), shared.upgrade())
        else {
            return;
        };
        let Some(txn) = Id::parse(&check.txn_id) else {
            continue;
        };
        let Some(request) = check_request(&shared, &check, store_host, &conn) else {
            tracing::warn!(txn = %check.txn_id, "a check-back cannot be put in a RocketMQ record (topic over 127 bytes?)");
            continue;
        };
        {
            let mut pending = link.pending.lock().expect("pending lock");
            if pending.len() >= MAX_PENDING {
                // Checks the scheduler gave up on are never answered: forgotten (a late
                // answer still ends the transaction, as the producer's own end).
                pending.clear();
            }
            pending.insert(txn, (frame.id, check.producer_group.clone()));
        }
        // Never waits on the client: a connection that does not take its checks is
        // busy (the scheduler skips it once that lasts), and the check times out.
        if conn.push(request) {
            link.sink.stall.writing(false);
        } else {
            link.sink.stall.blocked();
        }
    }
}
