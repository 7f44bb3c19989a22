//! Receipt handles: `txmq2.<offset>.<lease id>.<mac>`.
//!
//! The offset and lease id name the lease (a redelivery makes a new lease, so the
//! handle of an earlier delivery is stale). The MAC, under a key drawn when the
//! endpoint starts, covers the group, the topic, the offset, the lease id, the
//! principal the message was handed to and its `x-mq-client-id`: a handle works only
//! for that client as that user (a reconnect of the same client keeps its handles),
//! and cannot be made up from a neighbour's, although lease ids run in sequence. A
//! handle whose MAC does not hold names no lease (lease id 0, which no lease has): the
//! service still checks permissions first, then answers it as a stale handle, so a
//! caller learns nothing more from a forged handle than from an old one.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::service::Principal;
use crate::service::consume::LeaseRef;

/// The form's prefix.
const PREFIX: &str = "txmq2.";
/// Bytes of the MAC in a handle (hex: twice as many characters).
const MAC_BYTES: usize = 16;

/// Makes and reads receipt handles.
pub struct Receipts {
    key: [u8; 32],
}

impl std::fmt::Debug for Receipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipts").finish_non_exhaustive()
    }
}

impl Default for Receipts {
    fn default() -> Self {
        Self {
            key: rand::random(),
        }
    }
}

impl Receipts {
    fn mac(&self, group: &str, topic: &str, offset: u64, lease_id: u64, who: &Principal) -> String {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key");
        // A user as of its secret: a new secret (which closes its sessions) ends its
        // handles too, as does its deletion and re-creation.
        let identity = match &who.identity {
            crate::auth::Identity::User { name, since_ms } => format!("user {name} {since_ms}"),
            other => other.name().to_string(),
        };
        for part in [
            group.as_bytes(),
            topic.as_bytes(),
            identity.as_bytes(),
            who.client_id.as_bytes(),
        ] {
            m.update(&(part.len() as u64).to_be_bytes());
            m.update(part);
        }
        m.update(&offset.to_be_bytes());
        m.update(&lease_id.to_be_bytes());
        let tag = m.finalize().into_bytes();
        tag[..MAC_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The handle of `lease` of (`group`, `topic`), handed to `who`.
    pub fn handle(&self, group: &str, topic: &str, lease: LeaseRef, who: &Principal) -> String {
        let mac = self.mac(group, topic, lease.offset, lease.lease_id, who);
        format!("{PREFIX}{}.{}.{mac}", lease.offset, lease.lease_id)
    }

    /// The lease `handle` names for `who` on (`group`, `topic`): `None` when it is no
    /// handle of this form; a lease that names nothing (id 0) when its MAC is not
    /// `who`'s for it.
    pub fn lease(
        &self,
        handle: &str,
        group: &str,
        topic: &str,
        who: &Principal,
    ) -> Option<LeaseRef> {
        let mut parts = handle.strip_prefix(PREFIX)?.split('.');
        let offset: u64 = parts.next()?.parse().ok()?;
        let lease_id: u64 = parts.next()?.parse().ok()?;
        let mac = parts.next()?;
        if parts.next().is_some() || mac.len() != 2 * MAC_BYTES {
            return None;
        }
        let expected = self.mac(group, topic, offset, lease_id, who);
        let same = mac
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        Some(LeaseRef::new(offset, if same { lease_id } else { 0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;

    fn user(name: &str, client: &str) -> Principal {
        Principal::grpc(
            Identity::User {
                name: name.into(),
                since_ms: 0,
            },
            None,
            Some(client.into()),
        )
    }

    #[test]
    fn a_handle_names_its_lease_for_its_client_only() {
        let r = Receipts::default();
        let (alice, c1) = (user("alice", "c1"), user("alice", "c1"));
        let h = r.handle("g", "t", LeaseRef::new(42, 7), &alice);
        let l = r.lease(&h, "g", "t", &c1).unwrap();
        assert_eq!(
            (l.offset, l.lease_id),
            (42, 7),
            "the same client, reconnected"
        );
        for (group, topic, who) in [
            ("g", "t", user("bob", "c1")),
            ("g", "t", user("alice", "c2")),
            ("other", "t", user("alice", "c1")),
            ("g", "other", user("alice", "c1")),
        ] {
            let l = r.lease(&h, group, topic, &who).unwrap();
            assert_eq!(l.lease_id, 0, "{group} {topic} {who:?}");
        }
        // A neighbour's lease, guessed from this one, names nothing.
        let guessed = h.replacen(".7.", ".8.", 1);
        assert_eq!(r.lease(&guessed, "g", "t", &alice).unwrap().lease_id, 0);
        // Another endpoint's (a restart's) handles name nothing.
        let other = Receipts::default();
        assert_eq!(other.lease(&h, "g", "t", &alice).unwrap().lease_id, 0);
        for bad in [
            "",
            "txmq2.",
            "txmq2.1.2",
            "txmq1.1.2",
            "txmq2.x.2.00",
            &(h.clone() + ".3"),
        ] {
            assert!(r.lease(bad, "g", "t", &alice).is_none(), "{bad:?}");
        }
    }
}
