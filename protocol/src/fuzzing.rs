//! The properties the fuzz targets check (`fuzz/`), kept here so that an ordinary test
//! (`tests/fuzz_corpus.rs`) replays the fuzz corpus through exactly the same code.
//!
//! Each function panics when a property breaks; libFuzzer reports the panic with the
//! input that caused it.

use bytes::BytesMut;
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::codec::{HEADER_LEN, READ_AHEAD};
use crate::pb::{self, frame::Body};
use crate::{Frame, FrameCodec, names};

/// What a stream of bytes decodes to: the frames, then how the stream ended.
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<Frame>,
    end: String,
    peak_capacity: usize,
}

/// The frame decoder on arbitrary bytes. The first byte picks the codec's limit and how the
/// rest is cut into reads. Properties:
/// - no panic, and no buffer grows past what the limit allows, whatever the header says;
/// - the frames and the error do not depend on how the bytes were split into reads;
/// - every decoded frame encodes and decodes back to itself.
pub fn frame_decoder(data: &[u8]) {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let max = [0usize, 64, 4096, crate::DEFAULT_MAX_FRAME_LEN][usize::from(first & 3)];
    let chunk = usize::from(first >> 2) + 1;
    let whole = decode_stream(max, [input].into_iter());
    let pieces = decode_stream(max, input.chunks(chunk));
    assert_eq!(whole.frames, pieces.frames, "frames depend on read sizes");
    assert_eq!(whole.end, pieces.end, "the error depends on read sizes");
    let bound = 2 * (input.len() + HEADER_LEN + READ_AHEAD.min(max)) + 64;
    for d in [&whole, &pieces] {
        assert!(
            d.peak_capacity <= bound,
            "decoder buffer grew to {} bytes for {} input bytes",
            d.peak_capacity,
            input.len()
        );
    }
    let mut codec = FrameCodec::new(max);
    for frame in whole.frames {
        let mut buf = BytesMut::new();
        codec
            .encode(frame.clone(), &mut buf)
            .expect("a frame that decoded within the limit encodes within it");
        let again = codec.decode(&mut buf).expect("own encoding decodes");
        assert_eq!(
            again.as_ref(),
            Some(&frame),
            "encode/decode changed a frame"
        );
        assert!(buf.is_empty(), "encoding left bytes behind");
    }
}

fn decode_stream<'a>(max: usize, reads: impl Iterator<Item = &'a [u8]>) -> Decoded {
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut peak_capacity = 0;
    for read in reads {
        buf.extend_from_slice(read);
        loop {
            let next = codec.decode(&mut buf);
            peak_capacity = peak_capacity.max(buf.capacity());
            match next {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    return Decoded {
                        frames,
                        end: e.to_string(),
                        peak_capacity,
                    };
                }
            }
        }
    }
    let end = match codec.decode_eof(&mut buf) {
        Ok(Some(frame)) => {
            frames.push(frame);
            "frame at eof".to_string()
        }
        Ok(None) => "clean eof".to_string(),
        Err(e) => e.to_string(),
    };
    Decoded {
        frames,
        end,
        peak_capacity,
    }
}

/// The request decoder on arbitrary frame bodies (already past the checksum). Properties:
/// - no panic;
/// - a body framed with a correct checksum decodes through the codec to the same result
///   as decoding it directly;
/// - a decoded request re-encodes to a canonical form that decodes to the same request;
/// - every topic and group name in it either fails the one name rule with a message, or
///   meets the rule's contract (length and character set).
pub fn request_decoder(data: &[u8]) {
    let direct = Frame::decode(data);
    let mut framed = BytesMut::with_capacity(HEADER_LEN + data.len());
    framed.extend_from_slice(&(data.len() as u32).to_be_bytes());
    framed.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
    framed.extend_from_slice(data);
    let through_codec = FrameCodec::new(data.len()).decode(&mut framed);
    match (&direct, &through_codec) {
        (Ok(a), Ok(Some(b))) => assert_eq!(a, b, "codec and direct decode disagree"),
        (Err(_), Err(_)) => {}
        other => panic!("codec and direct decode disagree: {other:?}"),
    }
    let Ok(frame) = direct else { return };
    let canonical = frame.encode_to_vec();
    let again = Frame::decode(canonical.as_slice()).expect("canonical encoding decodes");
    assert_eq!(again, frame, "re-encoding changed the request");
    assert_eq!(
        again.encode_to_vec(),
        canonical,
        "encoding is not canonical"
    );
    for (kind, name) in names_in(&frame) {
        match names::validate(kind, name) {
            Ok(()) => assert!(
                !name.is_empty()
                    && name.len() <= names::MAX_NAME_LEN
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
                "{kind} name {name:?} was accepted against the rule"
            ),
            Err(message) => assert!(!message.is_empty()),
        }
    }
}

/// Every topic and group name a request carries, as the broker validates them.
fn names_in(frame: &Frame) -> Vec<(&'static str, &str)> {
    match &frame.body {
        Some(Body::Hello(h)) => vec![("producer group", h.producer_group.as_str())],
        Some(Body::Send(s)) => s
            .messages
            .iter()
            .map(|m| ("topic", m.topic.as_str()))
            .chain([("producer group", s.producer_group.as_str())])
            .collect(),
        Some(Body::Subscribe(s)) => vec![("group", s.group.as_str()), ("topic", s.topic.as_str())],
        Some(Body::Ack(a)) => a
            .handles
            .iter()
            .flat_map(|h| [("group", h.group.as_str()), ("topic", h.topic.as_str())])
            .collect(),
        Some(Body::Nack(n)) => handle_names(n.handle.as_ref()),
        Some(Body::Extend(e)) => handle_names(e.handle.as_ref()),
        Some(Body::CreateTopic(c)) => vec![("topic", c.topic.as_str())],
        Some(Body::ListTxns(l)) => vec![("producer group", l.producer_group.as_str())],
        Some(Body::DescribeGroup(d)) => vec![("group", d.group.as_str())],
        Some(Body::ListDeadLetters(l)) => vec![("group", l.group.as_str())],
        Some(Body::Redrive(r)) => vec![("group", r.group.as_str())],
        _ => Vec::new(),
    }
}

fn handle_names(h: Option<&pb::DeliveryHandle>) -> Vec<(&'static str, &str)> {
    h.map(|h| vec![("group", h.group.as_str()), ("topic", h.topic.as_str())])
        .unwrap_or_default()
}
