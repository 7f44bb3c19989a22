//! The framed, checksummed codec: `len: u32 BE | crc32: u32 BE | body`.
//!
//! The decoder follows the `tokio_util::codec` contract: `Ok(None)` means "need more
//! bytes", `Err` means the stream is corrupt and the connection must close. The length is
//! checked against the maximum *before* any buffer is reserved, and the CRC before the
//! body is handed to prost, so a hostile peer can neither make us allocate what it
//! announces nor feed garbage to the decoder.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::pb::Frame;

/// Bytes before the body: length and checksum.
pub const HEADER_LEN: usize = 8;

/// Most the decoder reserves ahead of bytes that have arrived. A header alone must not
/// make the broker allocate the length it announces (even within the limit): thousands
/// of connections each announcing 16 MiB would otherwise cost gigabytes before one body
/// byte arrived. The buffer grows as the body does.
pub const READ_AHEAD: usize = 64 * 1024;

/// Why a stream of frames cannot be read any further.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announces a body longer than the codec accepts.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced body length.
        len: usize,
        /// The codec's limit.
        max: usize,
    },
    /// The body's CRC-32 does not match the header.
    #[error("frame checksum mismatch (header {expected:#010x}, body {actual:#010x})")]
    BadChecksum {
        /// CRC in the header.
        expected: u32,
        /// CRC of the received body.
        actual: u32,
    },
    /// The checksum matched but the body is not a valid `Frame`.
    #[error("frame body is not a valid protobuf Frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({0} bytes pending)")]
    Truncated(usize),
    /// Reading or writing the socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes and decodes [`Frame`]s.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_len: usize,
}

impl FrameCodec {
    /// A codec that refuses bodies longer than `max_len` bytes, in both directions.
    pub fn new(max_len: usize) -> Self {
        Self { max_len }
    }

    /// The largest body this codec accepts.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Changes the limit (a client adopts the one the broker announced in its handshake).
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(crate::DEFAULT_MAX_FRAME_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes(src[0..4].try_into().expect("4 bytes")) as usize;
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        let total = HEADER_LEN + len;
        if src.len() < total {
            src.reserve((total - src.len()).min(READ_AHEAD));
            return Ok(None);
        }
        let expected = u32::from_be_bytes(src[4..8].try_into().expect("4 bytes"));
        src.advance(HEADER_LEN);
        let body = src.split_to(len).freeze();
        let actual = crc32fast::hash(&body);
        if actual != expected {
            return Err(FrameError::BadChecksum { expected, actual });
        }
        Ok(Some(Frame::decode(body)?))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(src.len())),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = frame.encoded_len();
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        dst.reserve(HEADER_LEN + len);
        dst.put_u32(len as u32);
        let crc_at = dst.len();
        dst.put_u32(0);
        let body_at = dst.len();
        frame
            .encode(dst)
            .expect("reserved exactly encoded_len bytes");
        let crc = crc32fast::hash(&dst[body_at..]);
        dst[crc_at..body_at].copy_from_slice(&crc.to_be_bytes());
        Ok(())
    }
}

/// Writes `first` and every frame already waiting on `rx` into `sink`, then flushes once:
/// the batching both the broker's and the client's connection writers use.
///
/// # Errors
/// The sink failed; the connection is done.
pub async fn write_ready<S>(
    sink: &mut S,
    first: Frame,
    rx: &mut tokio::sync::mpsc::Receiver<Frame>,
) -> Result<(), FrameError>
where
    S: futures::Sink<Frame, Error = FrameError> + Unpin,
{
    use futures::SinkExt;
    sink.feed(first).await?;
    while let Ok(frame) = rx.try_recv() {
        sink.feed(frame).await?;
    }
    sink.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{self, frame::Body};
    use proptest::prelude::*;

    fn send_frame(id: u64, body: &[u8]) -> Frame {
        Frame {
            id,
            body: Some(Body::Send(pb::SendRequest {
                messages: vec![pb::Message {
                    topic: "t".into(),
                    body: body.to_vec().into(),
                    ..Default::default()
                }],
                ..Default::default()
            })),
        }
    }

    fn encoded(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(frame.clone(), &mut buf)
            .unwrap();
        buf
    }

    #[test]
    fn split_input_waits_then_decodes() {
        let frame = send_frame(7, b"hello");
        let bytes = encoded(&frame);
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.put_u8(*b);
            let out = codec.decode(&mut buf).unwrap();
            if i + 1 < bytes.len() {
                assert!(out.is_none(), "decoded early at byte {i}");
            } else {
                assert_eq!(out, Some(frame.clone()));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn coalesced_frames_decode_one_by_one() {
        let a = send_frame(1, b"a");
        let b = send_frame(2, b"bb");
        let mut buf = encoded(&a);
        buf.extend_from_slice(&encoded(&b));
        let mut codec = FrameCodec::default();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(a));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(b));
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn truncated_stream_is_an_error_at_eof() {
        let mut buf = encoded(&send_frame(1, b"abc"));
        buf.truncate(buf.len() - 1);
        let mut codec = FrameCodec::default();
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::Truncated(_))
        ));
        let mut empty = BytesMut::new();
        assert!(codec.decode_eof(&mut empty).unwrap().is_none());
    }

    #[test]
    fn oversize_header_is_refused_before_reserving() {
        let mut buf = BytesMut::with_capacity(HEADER_LEN);
        buf.put_u32(u32::MAX);
        buf.put_u32(0);
        let mut codec = FrameCodec::new(1024);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, max: 1024 } if len == u32::MAX as usize));
        assert!(buf.capacity() < 1024, "reserved {} bytes", buf.capacity());
    }

    #[test]
    fn length_just_at_the_limit_is_accepted() {
        let frame = send_frame(3, &[9; 100]);
        let bytes = encoded(&frame);
        let mut codec = FrameCodec::new(bytes.len() - HEADER_LEN);
        let mut buf = bytes.clone();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame));
        let mut codec = FrameCodec::new(bytes.len() - HEADER_LEN - 1);
        let mut buf = bytes;
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_crc_is_refused() {
        let mut buf = encoded(&send_frame(1, b"payload"));
        let last = buf.len() - 1;
        buf[last] ^= 0x40;
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::BadChecksum { .. }), "{err}");
    }

    #[test]
    fn matching_crc_over_garbage_is_a_decode_error() {
        let body = [0xff_u8; 12];
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.put_u32(crc32fast::hash(&body));
        buf.extend_from_slice(&body);
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }

    #[test]
    fn encoder_refuses_frames_over_the_limit() {
        let mut buf = BytesMut::new();
        let err = FrameCodec::new(10)
            .encode(send_frame(1, &[0; 64]), &mut buf)
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert!(buf.is_empty());
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let message = (
            "[a-z]{0,8}",
            proptest::collection::vec(any::<u8>(), 0..256),
            "[a-zA-Z0-9]{0,8}",
            "[A-Z]{0,4}",
            proptest::collection::btree_map("[a-z]{1,4}", "[ -~]{0,8}", 0..3),
            any::<u64>(),
        )
            .prop_map(|(topic, body, key, tag, props, born_ms)| pb::Message {
                topic,
                body: body.into(),
                key,
                tag: tag.clone(),
                properties: props.into_iter().collect(),
                born_ms,
                deliver_at_ms: born_ms / 2,
                message_group: String::new(),
                idempotency_key: tag.to_lowercase(),
            });
        let body = prop_oneof![
            (
                proptest::collection::vec(message, 0..4),
                any::<bool>(),
                "[0-9a-f]{0,32}"
            )
                .prop_map(|(messages, transactional, txn_id)| Body::Send(
                    pb::SendRequest {
                        messages,
                        transactional,
                        txn_id,
                        ..Default::default()
                    }
                )),
            ("[0-9a-f]{0,32}", 0..4_i32).prop_map(|(txn_id, outcome)| Body::EndTxn(
                pb::EndTxnRequest {
                    txn_id,
                    outcome,
                    operator: false
                }
            )),
            (0..29_i32, "[ -~]{0,40}", "[ -~]{0,20}").prop_map(|(code, message, leader)| {
                Body::Response(pb::Response {
                    code,
                    message,
                    leader,
                    result: None,
                })
            }),
            ("[a-z]{1,8}", "[a-z]{1,8}", any::<u64>(), any::<u64>()).prop_map(
                |(group, topic, offset, lease_id)| Body::Ack(pb::AckRequest {
                    handles: vec![pb::DeliveryHandle {
                        group,
                        topic,
                        offset,
                        lease_id
                    }]
                })
            ),
        ];
        (any::<u64>(), proptest::option::of(body)).prop_map(|(id, body)| Frame { id, body })
    }

    proptest! {
        #[test]
        fn encode_then_decode_round_trips(frames in proptest::collection::vec(arb_frame(), 1..5), cut in any::<prop::sample::Index>()) {
            let mut bytes = BytesMut::new();
            let mut codec = FrameCodec::default();
            for f in &frames {
                codec.encode(f.clone(), &mut bytes).unwrap();
            }
            // Feed the stream in two arbitrary pieces: frames must come out whole and in order.
            let cut = cut.index(bytes.len() + 1);
            let mut buf = BytesMut::from(&bytes[..cut]);
            let mut out = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
            buf.extend_from_slice(&bytes[cut..]);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(out, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = FrameCodec::new(4096);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
