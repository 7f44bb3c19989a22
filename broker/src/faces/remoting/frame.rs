//! RemotingCommand frames, in both header serialisations RocketMQ clients use.
//!
//! ```text
//! | L: i32 BE | T << 24 | H: i32 BE | header (H bytes) | body (L - 4 - H bytes) |
//! ```
//!
//! `L` does not count itself; `T` is the header's serialisation (0 JSON, 1 ROCKETMQ's
//! binary form). A length is checked against the maximum before anything is reserved
//! (I7); the protocol carries no checksum (TCP's and TLS's are what there is). A frame
//! that does not parse is an error that closes its connection; a frame that parses but
//! asks for something invalid is answered with an error code by the face.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Largest frame RocketMQ clients take (`com.rocketmq.remoting.frameMaxLength`); the
/// broker takes no larger either.
pub const MAX_FRAME: usize = 16 << 20;

/// Longest remark an answer carries, in bytes.
pub const MAX_REMARK: usize = 4096;

/// The `version` every answer carries (RocketMQ 5.3.3's ordinal): a Java client keeps
/// its heartbeat answer's as the broker's version, and refuses SQL92 pulls below 232.
pub const VERSION: i32 = 479;

/// A header's serialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// fastjson (the clients' default).
    #[default]
    Json,
    /// RocketMQ's binary header.
    RocketMq,
}

/// One request or response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Command {
    /// Request code, or response code.
    pub code: i32,
    /// The sender's language (`JAVA`, `GO`, ...).
    pub language: String,
    /// The sender's version ordinal.
    pub version: i32,
    /// Matches a response to its request.
    pub opaque: i32,
    /// Bit 0: response; bit 1: one-way request.
    pub flag: i32,
    /// Free text (an error's reason).
    pub remark: Option<String>,
    /// The custom header's fields, all strings.
    pub ext: HashMap<String, String>,
    /// The body.
    pub body: Bytes,
    /// How its header was (or is to be) serialised.
    pub encoding: Encoding,
}

const RESPONSE: i32 = 1;
const ONEWAY: i32 = 2;

/// The binary header's language codes (`LanguageCode`'s ordinals).
const LANGUAGES: [&str; 13] = [
    "JAVA", "CPP", "DOTNET", "PYTHON", "DELPHI", "ERLANG", "RUBY", "OTHER", "HTTP", "GO", "PHP",
    "OMS", "RUST",
];

impl Command {
    /// Whether this is a response.
    pub fn is_response(&self) -> bool {
        self.flag & RESPONSE != 0
    }

    /// Whether the sender expects no response.
    pub fn is_oneway(&self) -> bool {
        self.flag & ONEWAY != 0
    }

    /// A header field.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.ext.get(name).map(String::as_str)
    }

    /// The answer to `request`: its opaque, in its serialisation. A remark is cut to
    /// [`MAX_REMARK`] bytes (it may quote what the client sent).
    pub fn answer(request: &Command, code: i32, remark: Option<String>) -> Self {
        let remark = remark.map(|mut r| {
            if r.len() > MAX_REMARK {
                let mut end = MAX_REMARK;
                while !r.is_char_boundary(end) {
                    end -= 1;
                }
                r.truncate(end);
                r.push('…');
            }
            r
        });
        Self {
            code,
            language: "JAVA".into(),
            version: VERSION,
            opaque: request.opaque,
            flag: RESPONSE,
            remark,
            ext: HashMap::new(),
            body: Bytes::new(),
            encoding: request.encoding,
        }
    }

    /// A one-way request from the broker to a client (a check-back, a rebalance
    /// notice): clients never answer those.
    pub fn oneway(code: i32, opaque: i32, encoding: Encoding) -> Self {
        Self {
            code,
            language: "JAVA".into(),
            version: VERSION,
            opaque,
            flag: ONEWAY,
            encoding,
            ..Self::default()
        }
    }

    /// Adds a header field.
    pub fn with(mut self, name: &str, value: impl ToString) -> Self {
        self.ext.insert(name.to_string(), value.to_string());
        self
    }

    /// Sets the body.
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
}

/// Why a frame could not be read: its connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The frame is not a RemotingCommand.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn malformed(why: impl Into<String>) -> FrameError {
    FrameError::Malformed(why.into())
}

/// The codec; `max` bounds a whole frame.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    max: usize,
}

impl Codec {
    /// A codec taking frames of at most `max` bytes (and never above [`MAX_FRAME`]).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.min(MAX_FRAME),
        }
    }
}

impl Decoder for Codec {
    type Item = Command;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Command>, FrameError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        let len = usize::try_from(len)
            .ok()
            .filter(|l| (4..=self.max).contains(l))
            .ok_or_else(|| {
                malformed(format!(
                    "frame length {len} is outside 4..={} bytes",
                    self.max
                ))
            })?;
        if src.len() < 4 + len {
            // Room as the bytes come, not all the length claims at once.
            src.reserve((4 + len - src.len()).min(64 * 1024));
            return Ok(None);
        }
        src.advance(4);
        let mut frame = src.split_to(len).freeze();
        let word = frame.get_u32();
        let kind = word >> 24;
        let header_len = (word & 0x00FF_FFFF) as usize;
        if header_len > frame.len() {
            return Err(malformed(format!(
                "header length {header_len} exceeds the frame's {} bytes",
                frame.len()
            )));
        }
        let header = frame.split_to(header_len);
        let mut command = match kind {
            0 => json_header(&header)?,
            1 => binary_header(header)?,
            other => return Err(malformed(format!("unknown header serialisation {other}"))),
        };
        command.body = frame;
        Ok(Some(command))
    }
}

impl Encoder<Command> for Codec {
    type Error = FrameError;

    fn encode(&mut self, command: Command, dst: &mut BytesMut) -> Result<(), FrameError> {
        let header = match command.encoding {
            Encoding::Json => write_json_header(&command),
            Encoding::RocketMq => write_binary_header(&command),
        };
        let len = 4 + header.len() + command.body.len();
        if len > MAX_FRAME {
            return Err(malformed(format!(
                "an answer of {len} bytes exceeds the {MAX_FRAME}-byte frame"
            )));
        }
        let kind: u32 = match command.encoding {
            Encoding::Json => 0,
            Encoding::RocketMq => 1,
        };
        dst.reserve(4 + len);
        dst.put_u32(len as u32);
        dst.put_u32(kind << 24 | header.len() as u32);
        dst.put_slice(&header);
        dst.put_slice(&command.body);
        Ok(())
    }
}

fn int(value: Option<&serde_json::Value>, name: &str) -> Result<i32, FrameError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(0),
        Some(v) => v
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| malformed(format!("header field {name} is not a 32-bit integer"))),
    }
}

/// A fastjson header. Custom-header values are strings; numbers and booleans are
/// taken as their text.
fn json_header(header: &[u8]) -> Result<Command, FrameError> {
    let value: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| malformed(format!("JSON header does not parse: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(malformed("JSON header is not an object"));
    };
    let language = match map.get("language") {
        // One of the known names (a client's text is not kept).
        Some(serde_json::Value::String(s)) => LANGUAGES
            .iter()
            .find(|l| **l == s.as_str())
            .map_or("OTHER", |l| l)
            .to_string(),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|n| LANGUAGES.get(n as usize))
            .map_or_else(|| "OTHER".into(), |s| (*s).to_string()),
        _ => "OTHER".into(),
    };
    let mut ext = HashMap::new();
    match map.get("extFields") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(fields)) => {
            for (k, v) in fields {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => continue,
                    serde_json::Value::Number(_) | serde_json::Value::Bool(_) => v.to_string(),
                    _ => return Err(malformed(format!("header field {k} is not a scalar"))),
                };
                ext.insert(k.clone(), text);
            }
        }
        Some(_) => return Err(malformed("extFields is not an object")),
    }
    Ok(Command {
        code: int(map.get("code"), "code")?,
        language,
        version: int(map.get("version"), "version")?,
        opaque: int(map.get("opaque"), "opaque")?,
        flag: int(map.get("flag"), "flag")?,
        remark: map.get("remark").and_then(|r| r.as_str()).map(String::from),
        ext,
        body: Bytes::new(),
        encoding: Encoding::Json,
    })
}

fn take(header: &mut Bytes, n: usize, what: &str) -> Result<Bytes, FrameError> {
    if header.len() < n {
        return Err(malformed(format!("binary header ends inside {what}")));
    }
    Ok(header.split_to(n))
}

fn text(bytes: Bytes, what: &str) -> Result<String, FrameError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| malformed(format!("{what} is not UTF-8")))
}

fn length(n: i32, what: &str) -> Result<usize, FrameError> {
    usize::try_from(n).map_err(|_| malformed(format!("{what} has a negative length")))
}

/// RocketMQ's binary header.
fn binary_header(mut h: Bytes) -> Result<Command, FrameError> {
    let mut fixed = take(&mut h, 17, "the fixed fields")?;
    let code = i32::from(fixed.get_i16());
    let language = LANGUAGES
        .get(fixed.get_u8() as usize)
        .map_or("OTHER", |s| s)
        .to_string();
    let version = i32::from(fixed.get_i16());
    let opaque = fixed.get_i32();
    let flag = fixed.get_i32();
    let remark_len = length(fixed.get_i32(), "the remark")?;
    let remark = match remark_len {
        0 => None,
        n => Some(text(take(&mut h, n, "the remark")?, "the remark")?),
    };
    let ext_len = length(
        take(&mut h, 4, "the fields' length")?.get_i32(),
        "the fields",
    )?;
    let mut fields = take(&mut h, ext_len, "the fields")?;
    let mut ext = HashMap::new();
    while fields.has_remaining() {
        let key_len = take(&mut fields, 2, "a field's name length")?.get_u16() as usize;
        let key = text(
            take(&mut fields, key_len, "a field's name")?,
            "a field name",
        )?;
        let value_len = length(
            take(&mut fields, 4, "a field's length")?.get_i32(),
            "a field",
        )?;
        let value = text(
            take(&mut fields, value_len, "a field's value")?,
            "a field value",
        )?;
        ext.insert(key, value);
    }
    Ok(Command {
        code,
        language,
        version,
        opaque,
        flag,
        remark,
        ext,
        body: Bytes::new(),
        encoding: Encoding::RocketMq,
    })
}

fn write_json_header(c: &Command) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("code".into(), c.code.into());
    // Every value a string: Go decodes extFields as map[string]string.
    let ext: serde_json::Map<String, serde_json::Value> = c
        .ext
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    map.insert("extFields".into(), ext.into());
    map.insert("flag".into(), c.flag.into());
    map.insert("language".into(), c.language.clone().into());
    map.insert("opaque".into(), c.opaque.into());
    if let Some(r) = &c.remark {
        map.insert("remark".into(), r.clone().into());
    }
    map.insert("serializeTypeCurrentRPC".into(), "JSON".into());
    map.insert("version".into(), c.version.into());
    serde_json::to_vec(&map).unwrap_or_default()
}

fn write_binary_header(c: &Command) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.put_i16(c.code as i16);
    out.put_u8(LANGUAGES.iter().position(|l| *l == c.language).unwrap_or(0) as u8);
    out.put_i16(c.version as i16);
    out.put_i32(c.opaque);
    out.put_i32(c.flag);
    match &c.remark {
        Some(r) => {
            out.put_i32(r.len() as i32);
            out.put_slice(r.as_bytes());
        }
        None => out.put_i32(0),
    }
    let mut fields = Vec::new();
    for (k, v) in &c.ext {
        fields.put_u16(k.len() as u16);
        fields.put_slice(k.as_bytes());
        fields.put_i32(v.len() as i32);
        fields.put_slice(v.as_bytes());
    }
    out.put_i32(fields.len() as i32);
    out.extend_from_slice(&fields);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(c: Command) -> Command {
        let mut buf = BytesMut::new();
        Codec::new(MAX_FRAME).encode(c, &mut buf).unwrap();
        Codec::new(MAX_FRAME).decode(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn both_serialisations_round_trip() {
        for encoding in [Encoding::Json, Encoding::RocketMq] {
            let c = Command {
                code: 310,
                language: "GO".into(),
                version: 317,
                opaque: 42,
                flag: 2,
                remark: Some("why".into()),
                ext: [
                    ("a".to_string(), "pg".to_string()),
                    ("e".into(), "3".into()),
                ]
                .into(),
                body: Bytes::from_static(b"hello"),
                encoding,
            };
            assert_eq!(roundtrip(c.clone()), c);
        }
    }

    /// What a Java 5.3 client writes, byte for byte (fastjson; numbers as strings).
    #[test]
    fn a_java_json_frame_decodes() {
        let header = br#"{"code":105,"extFields":{"topic":"T1","n":4},"flag":0,"language":"JAVA","opaque":7,"serializeTypeCurrentRPC":"JSON","version":479}"#;
        let mut buf = BytesMut::new();
        buf.put_u32(4 + header.len() as u32);
        buf.put_u32(header.len() as u32);
        buf.put_slice(header);
        let c = Codec::new(MAX_FRAME).decode(&mut buf).unwrap().unwrap();
        assert_eq!((c.code, c.opaque, c.version), (105, 7, 479));
        assert_eq!(c.field("topic"), Some("T1"));
        assert_eq!(c.field("n"), Some("4"));
        assert!(c.body.is_empty() && !c.is_oneway() && !c.is_response());
    }

    #[test]
    fn lengths_are_checked_before_anything_is_read() {
        let mut codec = Codec::new(1024);
        for len in [-1i32, 0, 3, 1025, i32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_i32(len);
            assert!(codec.decode(&mut buf).is_err(), "length {len}");
        }
        // A header longer than its frame, an unknown serialisation, a binary header
        // cut short: each refused, none panics.
        for (word, header) in [
            (0x0000_0010u32, &b"{}"[..]),
            (0x0200_0002, b"{}"),
            (0x0100_0003, b"\0\x01\0"),
            (0x0000_0003, b"[1]"),
        ] {
            let mut buf = BytesMut::new();
            buf.put_u32(4 + header.len() as u32);
            buf.put_u32(word);
            buf.put_slice(header);
            assert!(codec.decode(&mut buf).is_err(), "{word:x}");
        }
        // Partial frames wait.
        let mut buf = BytesMut::from(&[0u8, 0, 0, 20, 0][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    proptest::proptest! {
        #[test]
        fn no_input_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = Codec::new(4096);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
