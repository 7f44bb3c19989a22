//! One long poll of a consumer group's queue, for the faces whose clients ask for
//! messages rather than keep a subscription open (gRPC's ReceiveMessage, Remoting's
//! PULL_MESSAGE): the face joins the queue as a consumer for as long as it waits, with
//! a window of its batch size and the lease it asks for; what it hands to the client
//! stays leased when it leaves (the client acks it, or it becomes visible again when
//! the lease ends and is delivered anew with one more attempt), and anything pushed to
//! it but not handed out goes back without counting an attempt.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use txmq_protocol::pb as native;

use crate::error::Result;
use crate::service::consume::{self, Join, Membership, Sink, Stall};
use crate::service::{Principal, Shared};

/// A poll's place in its group's queue, taken out when it leaves, or when it is
/// dropped unfinished (the client went away with the call).
struct Joined {
    shared: Arc<Shared>,
    membership: Membership,
    armed: bool,
}

impl Joined {
    /// Leaves: the leases at `keep` stay the client's, the rest go back uncounted.
    /// Disarmed only once the queue has the message: dropped before that (the client
    /// went away), the guard sends its own, keeping nothing.
    async fn leave(mut self, keep: Vec<u64>) {
        let _ = consume::leave(&self.shared, &self.membership, true, keep).await;
        self.armed = false;
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (shared, membership) = (self.shared.clone(), self.membership.clone());
        runtime.spawn(async move {
            let _ = consume::leave(&shared, &membership, true, Vec::new()).await;
        });
    }
}

/// What a poll got.
#[derive(Debug)]
pub struct Polled {
    /// The consumer group.
    pub group: String,
    /// The topic's name.
    pub topic: String,
    /// Its id in storage.
    pub topic_id: u32,
    /// The deliveries handed out, each leased to the client.
    pub deliveries: Vec<native::Delivery>,
}

/// Joins (`join.window` is the batch), waits up to `wait` for a first delivery, takes
/// what else is there already, up to the batch and about `max_bytes` of bodies (always
/// one), and leaves keeping those.
///
/// # Errors
/// The join was refused (names, permissions, a filter or order that conflicts with the
/// group's).
pub async fn poll(
    shared: &Arc<Shared>,
    who: &Principal,
    join: Join,
    wait: Duration,
    max_bytes: usize,
) -> Result<Polled> {
    let batch = join.window.max(1) as usize;
    let (tx, mut rx) = mpsc::channel(batch + 1);
    let sink = Sink {
        outbound: tx,
        stall: Arc::new(Stall::default()),
    };
    let (membership, accepted) = consume::join(shared, who, join, sink).await?;
    // From here the poll is in the queue: if the client cancels it (the future is
    // dropped), the guard takes it out, and what was pushed goes back uncounted.
    let joined = Joined {
        shared: shared.clone(),
        membership,
        armed: true,
    };
    if let Err(e) = accepted.await {
        joined.leave(Vec::new()).await;
        return Err(e);
    }
    let mut got = Vec::new();
    if let Ok(Some(frame)) = tokio::time::timeout(wait, rx.recv()).await {
        got.push(frame);
        while got.len() < batch {
            match rx.try_recv() {
                Ok(frame) => got.push(frame),
                Err(_) => break,
            }
        }
    }
    let mut deliveries = Vec::with_capacity(got.len());
    let mut keep = Vec::with_capacity(got.len());
    let mut bytes = 0;
    for frame in got {
        let Some(native::frame::Body::Delivery(d)) = frame.body else {
            continue;
        };
        let (Some(m), Some(h)) = (&d.message, &d.handle) else {
            continue;
        };
        bytes += m.body.len() + 1024;
        if bytes > max_bytes && !keep.is_empty() {
            break;
        }
        keep.push(h.offset);
        deliveries.push(d);
    }
    let (group, topic, topic_id) = (
        joined.membership.group.clone(),
        joined.membership.topic.name.clone(),
        joined.membership.topic.id,
    );
    // Leaves the queue; what it handed out stays leased to the client.
    joined.leave(keep).await;
    Ok(Polled {
        group,
        topic,
        topic_id,
        deliveries,
    })
}
