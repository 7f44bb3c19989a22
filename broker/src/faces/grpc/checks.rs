//! Check-backs to gRPC producers (I4 for the second face).
//!
//! A Telemetry stream whose settings publish topics is registered with the broker's one
//! check-back scheduler as a producer connection of each topic's group (`grpc.<topic>`,
//! see [`super::send::txn_group`]), under a connection id of its own. Checks the
//! scheduler sends it are turned into `RecoverOrphanedTransactionCommand`s on the
//! stream; the client's checker answers with an EndTransaction whose source is
//! SERVER_CHECK, which goes back to the scheduler as the answer to that check, from that
//! connection — so counting, backoff, timeouts, discards, "unknown" and "only the one
//! asked may answer" are the native ones (see `send::end_transaction`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::mpsc;
use tonic::Status;
use txmq_protocol::Frame;
use txmq_protocol::pb as native;

use super::convert::outgoing;
use super::pb;
use crate::ids::Id;
use crate::service::consume::{Sink, Stall};
use crate::service::{Principal, Shared, txn};

/// Checks one stream may have on their way to it.
const BRIDGE: usize = 64;

/// Unanswered checks one stream remembers.
const MAX_PENDING: usize = 4096;

/// A Telemetry stream registered as a producer.
#[derive(Debug)]
pub struct Link {
    /// Its connection id in the producers registry.
    pub connection_id: u64,
    /// The checks sent to it and not answered: transaction → check id and the topic
    /// whose group it was asked for.
    pending: Mutex<HashMap<Id, (u64, String)>>,
    /// The registry it is in (the broker's parts at the time; not kept alive by it,
    /// so a stopping broker is not held up by an open stream).
    shared: Weak<Shared>,
}

impl Link {
    /// Registers a stream that publishes `topics` as a producer of their groups, and
    /// starts the bridge that puts the scheduler's checks on it.
    pub fn attach(
        shared: Arc<Shared>,
        who: &Principal,
        stream: mpsc::Sender<Result<pb::TelemetryCommand, Status>>,
        topics: &[String],
    ) -> Arc<Self> {
        let connection_id = shared
            .connection_ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Frame>(BRIDGE);
        let sink = Sink {
            outbound: tx,
            stall: Arc::new(Stall::default()),
        };
        for topic in topics {
            let group = super::send::txn_group(topic, who);
            if let Err(e) =
                txn::answer_checks(&shared, who, &group, connection_id, Vec::new(), &sink)
            {
                tracing::warn!(client = %who.client_id, group = %group.name, "not asked for checks: {e}");
            }
        }
        let stall = sink.stall;
        let link = Arc::new(Self {
            connection_id,
            pending: Mutex::new(HashMap::new()),
            shared: Arc::downgrade(&shared),
        });
        let weak = Arc::downgrade(&link);
        tokio::spawn(async move {
            let stall = stall;
            while let Some(frame) = rx.recv().await {
                let Some(native::frame::Body::Check(check)) = frame.body else {
                    continue;
                };
                let (Some(link), Some(txn)) = (weak.upgrade(), Id::parse(&check.txn_id)) else {
                    continue;
                };
                let Some(message) = check.messages.first() else {
                    continue;
                };
                {
                    let mut pending = link.pending.lock().expect("pending lock");
                    // Checks the scheduler gave up on (timed out) are never answered:
                    // bounded, the oldest forgotten (a late answer still ends the
                    // transaction, as the producer's own end).
                    if pending.len() >= MAX_PENDING {
                        pending.clear();
                    }
                    pending.insert(txn, (frame.id, message.topic.clone()));
                }
                let command = pb::TelemetryCommand {
                    status: Some(super::status::ok()),
                    command: Some(
                        pb::telemetry_command::Command::RecoverOrphanedTransactionCommand(
                            pb::RecoverOrphanedTransactionCommand {
                                message: Some(outgoing(message, pb::MessageType::Transaction)),
                                transaction_id: check.txn_id.clone(),
                            },
                        ),
                    ),
                };
                // Never waits on the client: a stream that does not take its checks is
                // busy (the scheduler skips it once that lasts), and the check times out.
                match stream.try_send(Ok(command)) {
                    Ok(()) => stall.writing(false),
                    Err(mpsc::error::TrySendError::Full(_)) => stall.blocked(),
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        });
        link
    }

    /// The client answered a check of `txn` (an EndTransaction from SERVER_CHECK): the
    /// check's id and its topic, when one was sent on this stream (it is now answered).
    pub fn answered(&self, txn: Id) -> Option<(u64, String)> {
        self.pending.lock().expect("pending lock").remove(&txn)
    }
}

/// Whether `who` may still hold a stream that takes the check-backs of `topics`' groups
/// after a change of users or rules: its identity, and `txn` on each group.
///
/// # Errors
/// What it lost.
pub fn still_allowed(
    shared: &Shared,
    who: &Principal,
    topics: &[String],
) -> crate::error::Result<()> {
    shared.auth.check_identity(&who.identity)?;
    for topic in topics {
        txn::may_answer_checks(shared, who, &super::send::txn_group(topic, who))?;
    }
    Ok(())
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            txn::stop_answering(&shared, self.connection_id);
        }
    }
}
