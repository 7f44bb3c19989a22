//! What RocketMQ clients read and write inside bodies: message properties, stored
//! message records (the pull body, a check-back's body), message ids, batch bodies,
//! and compressed bodies.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes};

/// The first record version (`MessageVersion.MESSAGE_VERSION_V1`): a topic's length in
/// one byte. Every client reads it (4.9 and Go read no other).
pub const MAGIC_V1: i32 = 0xDAA3_20A7_u32 as i32;

/// sysFlag bits (`MessageSysFlag`).
pub mod sys_flag {
    /// The body is compressed.
    pub const COMPRESSED: i32 = 0x1;
    /// A half message (`TRANSACTION_PREPARED_TYPE`).
    pub const PREPARED: i32 = 0x4;
    /// The transaction bits.
    pub const TRANSACTION: i32 = 0xC;
    /// The born host is IPv6.
    pub const BORN_V6: i32 = 0x10;
    /// The store host is IPv6.
    pub const STORE_V6: i32 = 0x20;
    /// The compression type (0 with COMPRESSED: zlib; 0x300 zlib; 0x100 LZ4; 0x200 ZSTD).
    pub const COMPRESSION: i32 = 0x700;
}

const NAME_SEP: char = '\u{1}';
const PROP_SEP: char = '\u{2}';

/// Properties as `name \1 value \2 ...`; entries without a separator are skipped, as
/// the clients skip them.
pub fn properties(text: &str) -> Vec<(String, String)> {
    text.split(PROP_SEP)
        .filter_map(|entry| {
            let (k, v) = entry.split_once(NAME_SEP)?;
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// The text form of `props`.
pub fn properties_text<'a>(props: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in props {
        out.push_str(k);
        out.push(NAME_SEP);
        out.push_str(v);
        out.push(PROP_SEP);
    }
    out
}

/// A message as its record says it (`MessageDecoder` layout, V1).
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub queue_id: i32,
    pub flag: i32,
    pub queue_offset: i64,
    /// PHYSICALOFFSET: the broker's handle of the message (see [`handle`]).
    pub handle: i64,
    pub sys_flag: i32,
    pub born_ms: i64,
    pub born_host: SocketAddr,
    pub store_ms: i64,
    pub store_host: SocketAddr,
    pub reconsume_times: i32,
    pub body: &'a [u8],
    pub topic: &'a str,
    pub properties: &'a str,
}

fn put_host(out: &mut Vec<u8>, host: SocketAddr) {
    match host.ip() {
        IpAddr::V4(ip) => out.put_slice(&ip.octets()),
        IpAddr::V6(ip) => out.put_slice(&ip.octets()),
    }
    out.put_i32(i32::from(host.port()));
}

/// Why a message cannot be written as a V1 record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("topic {0:?} is longer than the 127 bytes a RocketMQ record carries")]
    TopicTooLong(String),
    #[error("the message's properties take {0} bytes; a RocketMQ record carries 32767")]
    PropertiesTooLong(usize),
}

impl Record<'_> {
    /// Appends the record to `out`.
    ///
    /// # Errors
    /// What does not fit the V1 layout.
    pub fn write(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let topic_len = u8::try_from(self.topic.len())
            .ok()
            .filter(|l| *l <= 127)
            .ok_or_else(|| RecordError::TopicTooLong(self.topic.to_string()))?;
        let props_len = i16::try_from(self.properties.len())
            .map_err(|_| RecordError::PropertiesTooLong(self.properties.len()))?;
        let mut sys = self.sys_flag & !(sys_flag::BORN_V6 | sys_flag::STORE_V6);
        let host_len = |h: SocketAddr| if h.is_ipv4() { 8 } else { 20 };
        if self.born_host.is_ipv6() {
            sys |= sys_flag::BORN_V6;
        }
        if self.store_host.is_ipv6() {
            sys |= sys_flag::STORE_V6;
        }
        let total = 4
            + 4
            + 4
            + 4
            + 4
            + 8
            + 8
            + 4
            + 8
            + host_len(self.born_host)
            + 8
            + host_len(self.store_host)
            + 4
            + 8
            + 4
            + self.body.len()
            + 1
            + self.topic.len()
            + 2
            + self.properties.len();
        let start = out.len();
        out.reserve(total);
        out.put_i32(total as i32);
        out.put_i32(MAGIC_V1);
        out.put_i32((crc32fast::hash(self.body) & 0x7FFF_FFFF) as i32);
        out.put_i32(self.queue_id);
        out.put_i32(self.flag);
        out.put_i64(self.queue_offset);
        out.put_i64(self.handle);
        out.put_i32(sys);
        out.put_i64(self.born_ms);
        put_host(out, self.born_host);
        out.put_i64(self.store_ms);
        put_host(out, self.store_host);
        out.put_i32(self.reconsume_times);
        out.put_i64(0);
        out.put_i32(self.body.len() as i32);
        out.put_slice(self.body);
        out.put_u8(topic_len);
        out.put_slice(self.topic.as_bytes());
        out.put_i16(props_len);
        out.put_slice(self.properties.as_bytes());
        debug_assert_eq!(out.len() - start, total);
        Ok(())
    }
}

/// Bits of a handle that carry the offset in its topic's log.
const OFFSET_BITS: u32 = 40;

/// The PHYSICALOFFSET of the message at `offset` of topic `topic_id`: clients echo it
/// back (a send-back, a look-up by id), so it names both. Topic ids above 2^24 or
/// offsets above 2^40 do not fit and wrap (documented in docs/remoting.md).
pub fn handle(topic_id: u32, offset: u64) -> i64 {
    (((u64::from(topic_id) & 0xFF_FFFF) << OFFSET_BITS) | (offset & ((1 << OFFSET_BITS) - 1)))
        as i64
}

/// A handle's (topic id, offset).
pub fn unhandle(handle: i64) -> (u32, u64) {
    let h = handle as u64;
    ((h >> OFFSET_BITS) as u32, h & ((1 << OFFSET_BITS) - 1))
}

/// An "offset message id": the upper-case hex of the broker's address and a handle,
/// as clients decode it (`MessageDecoder.createMessageId`).
pub fn message_id(host: SocketAddr, handle: i64) -> String {
    let mut bytes = Vec::with_capacity(28);
    put_host(&mut bytes, host);
    bytes.put_i64(handle);
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// An offset message id's address and handle.
pub fn parse_message_id(id: &str) -> Option<(SocketAddr, i64)> {
    if !matches!(id.len(), 32 | 56) || !id.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&id[i..i + 2], 16).ok())
        .collect();
    let mut b = Bytes::from(bytes?);
    let ip: IpAddr = if id.len() == 32 {
        let mut o = [0u8; 4];
        b.copy_to_slice(&mut o);
        Ipv4Addr::from(o).into()
    } else {
        let mut o = [0u8; 16];
        b.copy_to_slice(&mut o);
        std::net::Ipv6Addr::from(o).into()
    };
    let port = u16::try_from(b.get_i32()).ok()?;
    Some((SocketAddr::new(ip, port), b.get_i64()))
}

/// One message of a batch body (`MessageDecoder.encodeMessage`).
#[derive(Debug, Clone, PartialEq)]
pub struct Batched {
    pub flag: i32,
    pub body: Bytes,
    pub properties: String,
}

/// The messages of a batch body (at most `max`); an error when it is not an exact
/// concatenation of them, or holds more.
pub fn batch(mut body: Bytes, max: usize) -> Result<Vec<Batched>, String> {
    let mut out = Vec::new();
    while body.has_remaining() {
        if out.len() == max {
            return Err(format!("the batch holds more than {max} messages"));
        }
        if body.len() < 20 {
            return Err("a batch ends inside a message's fixed fields".into());
        }
        let total = body.get_i32();
        let rest = usize::try_from(total)
            .ok()
            .and_then(|t| t.checked_sub(4))
            .filter(|r| *r <= body.len() && *r >= 16)
            .ok_or_else(|| format!("a batched message's size {total} does not fit the batch"))?;
        let mut m = body.split_to(rest);
        let _magic = m.get_i32();
        let _crc = m.get_i32();
        let flag = m.get_i32();
        let body_len = usize::try_from(m.get_i32())
            .ok()
            .filter(|l| *l <= m.len())
            .ok_or("a batched message's body length does not fit it")?;
        let payload = m.split_to(body_len);
        if m.len() < 2 {
            return Err("a batched message ends before its properties".into());
        }
        let props_len = m.get_u16() as usize;
        if m.len() != props_len {
            return Err("a batched message's properties do not fill it".into());
        }
        let properties = String::from_utf8(m.to_vec())
            .map_err(|_| "a batched message's properties are not UTF-8".to_string())?;
        out.push(Batched {
            flag,
            body: payload,
            properties,
        });
    }
    Ok(out)
}

/// A compressed body inflated (zlib, which Java and Go use; LZ4 and ZSTD are
/// refused), to at most `max` bytes.
///
/// # Errors
/// A sentence for the client.
pub fn inflate(body: &[u8], sys: i32, max: usize) -> Result<Vec<u8>, String> {
    match sys & sys_flag::COMPRESSION {
        0 | 0x300 => {}
        0x100 => return Err("LZ4-compressed bodies are not taken: use zlib (the default)".into()),
        0x200 => return Err("ZSTD-compressed bodies are not taken: use zlib (the default)".into()),
        other => return Err(format!("unknown compression type {other:#x}")),
    }
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(body)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("the compressed body does not inflate: {e}"))?;
    if out.len() > max {
        return Err(format!(
            "the body inflates to more than the {max}-byte message limit"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip_and_skip_malformed_entries() {
        let text = properties_text([("KEYS", "k1 k2"), ("TAGS", "A")]);
        assert_eq!(text, "KEYS\u{1}k1 k2\u{2}TAGS\u{1}A\u{2}");
        assert_eq!(
            properties(&text),
            [("KEYS".into(), "k1 k2".into()), ("TAGS".into(), "A".into())]
        );
        assert_eq!(properties("junk\u{2}\u{1}v\u{2}K\u{1}\u{2}").len(), 1);
    }

    #[test]
    fn message_ids_carry_the_address_and_the_handle() {
        let at: SocketAddr = "127.0.0.1:10911".parse().unwrap();
        let h = handle(7, 12345);
        let id = message_id(at, h);
        assert_eq!(id.len(), 32);
        assert_eq!(&id[..16], "7F00000100002A9F");
        assert_eq!(parse_message_id(&id), Some((at, h)));
        assert_eq!(unhandle(h), (7, 12345));
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(parse_message_id(&message_id(v6, 5)), Some((v6, 5)));
        assert_eq!(parse_message_id("zz"), None);
        assert_eq!(parse_message_id(&"G".repeat(32)), None);
    }

    #[test]
    fn a_record_has_the_layout_clients_decode() {
        let host: SocketAddr = "10.0.0.5:10911".parse().unwrap();
        let r = Record {
            queue_id: 3,
            flag: 0,
            queue_offset: 9,
            handle: 77,
            sys_flag: 0,
            born_ms: 1,
            born_host: host,
            store_ms: 2,
            store_host: host,
            reconsume_times: 1,
            body: b"hi",
            topic: "T1",
            properties: "UNIQ_KEY\u{1}X\u{2}",
        };
        let mut out = Vec::new();
        r.write(&mut out).unwrap();
        let mut b = Bytes::from(out.clone());
        assert_eq!(b.get_i32() as usize, out.len());
        assert_eq!(b.get_i32(), MAGIC_V1);
        b.advance(4);
        assert_eq!(b.get_i32(), 3);
        let long = "t".repeat(128);
        let r = Record { topic: &long, ..r };
        assert!(r.write(&mut Vec::new()).is_err());
    }

    #[test]
    fn batches_must_be_exact() {
        let mut body = Vec::new();
        for (payload, props) in [(&b"one"[..], "UNIQ_KEY\u{1}A\u{2}"), (b"two", "")] {
            body.put_i32((20 + payload.len() + 2 + props.len()) as i32);
            body.put_i32(0);
            body.put_i32(0);
            body.put_i32(5);
            body.put_i32(payload.len() as i32);
            body.put_slice(payload);
            body.put_i16(props.len() as i16);
            body.put_slice(props.as_bytes());
        }
        assert!(
            batch(Bytes::from(body.clone()), 1).is_err(),
            "over the count"
        );
        let got = batch(Bytes::from(body.clone()), 2).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].flag, &got[1].body[..]), (5, &b"two"[..]));
        body.push(0);
        assert!(batch(Bytes::from(body.clone()), 2).is_err());
        body[3] = 200;
        assert!(batch(Bytes::from(body), 2).is_err());
    }

    proptest::proptest! {
        #[test]
        fn no_body_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = batch(Bytes::from(bytes.clone()), 100);
            let text = String::from_utf8_lossy(&bytes);
            let _ = properties(&text);
            let _ = parse_message_id(&text);
            let _ = inflate(&bytes, sys_flag::COMPRESSED, 1024);
        }
    }

    #[test]
    fn zlib_bodies_inflate_within_the_limit() {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(5));
        z.write_all(&[b'x'; 10_000]).unwrap();
        let packed = z.finish().unwrap();
        assert_eq!(inflate(&packed, 0x1 | 0x300, 10_000).unwrap().len(), 10_000);
        assert_eq!(inflate(&packed, 0x1, 10_000).unwrap().len(), 10_000);
        assert!(inflate(&packed, 0x1, 9_999).is_err());
        assert!(inflate(&packed, 0x1 | 0x100, 10_000).is_err());
        assert!(inflate(b"not zlib", 0x1, 10_000).is_err());
    }
}
