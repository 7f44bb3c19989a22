//! txmq's stored messages in the gRPC form: what a check-back (and a delivery) carries.

use md5::{Digest as _, Md5};
use txmq_protocol::pb as native;

use super::pb;
use super::send::CLIENT_ID_PROPERTY;

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A stored message as a gRPC client reads it: its own message id if it came through
/// gRPC (else txmq's), keys split back on spaces, the body's MD5 (upper-case hex: the
/// one digest every client formats alike; some crash without one), identity encoding.
pub fn outgoing(m: &native::StoredMessage, kind: pb::MessageType) -> pb::Message {
    let mut properties = m.properties.clone();
    let message_id = properties
        .remove(CLIENT_ID_PROPERTY)
        .unwrap_or_else(|| m.message_id.clone());
    let digest = Md5::digest(&m.body);
    let checksum: String = digest.iter().map(|b| format!("{b:02X}")).collect();
    pb::Message {
        topic: Some(pb::Resource {
            resource_namespace: String::new(),
            name: m.topic.clone(),
        }),
        user_properties: properties,
        system_properties: Some(pb::SystemProperties {
            tag: (!m.tag.is_empty()).then(|| m.tag.clone()),
            keys: m
                .key
                .split(' ')
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect(),
            message_id,
            body_digest: Some(pb::Digest {
                r#type: pb::DigestType::Md5 as i32,
                checksum,
            }),
            body_encoding: pb::Encoding::Identity as i32,
            message_type: kind as i32,
            born_timestamp: Some(timestamp(m.born_ms)),
            born_host: String::new(),
            store_timestamp: Some(timestamp(m.store_ms)),
            store_host: "txmq".into(),
            delivery_timestamp: (m.deliver_ms > 0).then(|| timestamp(m.deliver_ms)),
            queue_id: 0,
            queue_offset: Some(m.offset as i64),
            message_group: (!m.message_group.is_empty()).then(|| m.message_group.clone()),
            ..Default::default()
        }),
        body: m.body.to_vec(),
    }
}
