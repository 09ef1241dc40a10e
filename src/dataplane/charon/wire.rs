//! The VICI wire format (strongSwan `src/libcharon/plugins/vici/README.md`), pure: no I/O.
//!
//! A frame is a 4-byte big-endian length followed by a packet of that length. A packet is
//! one type byte, for the named types (`CMD_REQUEST`, `EVENT_REGISTER`,
//! `EVENT_UNREGISTER`, `EVENT`) a `u8` length + name, then a message: a sequence of
//! elements
//!
//! | type | element        | encoding                                  |
//! |------|----------------|-------------------------------------------|
//! | 1    | SECTION_START  | `u8` len + name                           |
//! | 2    | SECTION_END    |                                           |
//! | 3    | KEY_VALUE      | `u8` len + name, `u16` len + value        |
//! | 4    | LIST_START     | `u8` len + name                           |
//! | 5    | LIST_ITEM      | `u16` len + value                         |
//! | 6    | LIST_END       |                                           |
//!
//! charon drops a connection whose frame exceeds [`MAX_PACKET_LEN`] (512 KiB), so the
//! encoder refuses to build one and the decoder refuses to accept one.

use std::fmt;

use thiserror::Error;
use zeroize::Zeroizing;

/// charon's `VICI_MESSAGE_SIZE_MAX`: the largest packet (without the length prefix).
pub const MAX_PACKET_LEN: usize = 512 * 1024;

const SECTION_START: u8 = 1;
const SECTION_END: u8 = 2;
const KEY_VALUE: u8 = 3;
const LIST_START: u8 = 4;
const LIST_ITEM: u8 = 5;
const LIST_END: u8 = 6;

/// Packet types on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    CmdRequest = 0,
    CmdResponse = 1,
    CmdUnknown = 2,
    EventRegister = 3,
    EventUnregister = 4,
    EventConfirm = 5,
    EventUnknown = 6,
    Event = 7,
}

impl PacketType {
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::CmdRequest,
            1 => Self::CmdResponse,
            2 => Self::CmdUnknown,
            3 => Self::EventRegister,
            4 => Self::EventUnregister,
            5 => Self::EventConfirm,
            6 => Self::EventUnknown,
            7 => Self::Event,
            _ => return None,
        })
    }

    /// Whether a name follows the type byte.
    pub fn is_named(self) -> bool {
        matches!(
            self,
            Self::CmdRequest | Self::EventRegister | Self::EventUnregister | Self::Event
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::CmdRequest => "CMD_REQUEST",
            Self::CmdResponse => "CMD_RESPONSE",
            Self::CmdUnknown => "CMD_UNKNOWN",
            Self::EventRegister => "EVENT_REGISTER",
            Self::EventUnregister => "EVENT_UNREGISTER",
            Self::EventConfirm => "EVENT_CONFIRM",
            Self::EventUnknown => "EVENT_UNKNOWN",
            Self::Event => "EVENT",
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One value of a message.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// KEY_VALUE: raw bytes (charon sends text; some values, e.g. certificates, are binary).
    Bytes(Vec<u8>),
    /// KEY_VALUE holding a secret (a PSK): zeroed on drop, never printed. The decoder never
    /// produces it.
    Secret(Zeroizing<Vec<u8>>),
    /// LIST_START .. LIST_ITEM* .. LIST_END
    List(Vec<Vec<u8>>),
    /// SECTION_START .. elements .. SECTION_END
    Section(Message),
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bytes(b) => write!(f, "{:?}", String::from_utf8_lossy(b)),
            Value::Secret(_) => f.write_str("<redacted>"),
            Value::List(items) => f
                .debug_list()
                .entries(items.iter().map(|b| String::from_utf8_lossy(b)))
                .finish(),
            Value::Section(m) => m.fmt(f),
        }
    }
}

/// A VICI message: an ordered sequence of named values (order matters to charon, e.g. for
/// auth rounds, and is kept; duplicate names are kept as sent).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Message {
    entries: Vec<(String, Value)>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl Message {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn entries(&self) -> &[(String, Value)] {
        &self.entries
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Appends a raw value.
    pub fn push(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        self.entries.push((key.into(), value));
        self
    }

    pub fn push_str(&mut self, key: impl Into<String>, value: impl AsRef<[u8]>) -> &mut Self {
        self.push(key, Value::Bytes(value.as_ref().to_vec()))
    }

    pub fn push_secret(&mut self, key: impl Into<String>, value: &[u8]) -> &mut Self {
        self.push(key, Value::Secret(Zeroizing::new(value.to_vec())))
    }

    pub fn push_list<I, S>(&mut self, key: impl Into<String>, items: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        self.push(
            key,
            Value::List(items.into_iter().map(|s| s.as_ref().to_vec()).collect()),
        )
    }

    pub fn push_section(&mut self, key: impl Into<String>, section: Message) -> &mut Self {
        self.push(key, Value::Section(section))
    }

    /// Appends `key = value` (as text) when there is a value.
    pub fn push_some(
        &mut self,
        key: impl Into<String>,
        value: Option<impl fmt::Display>,
    ) -> &mut Self {
        if let Some(v) = value {
            self.push_str(key, v.to_string());
        }
        self
    }

    /// Appends `key = yes` when `on`.
    pub fn push_yes(&mut self, key: impl Into<String>, on: bool) -> &mut Self {
        if on {
            self.push_str(key, "yes");
        }
        self
    }

    /// Builder form of [`Message::push_str`].
    pub fn with_str(mut self, key: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        self.push_str(key, value);
        self
    }

    /// Builder form of [`Message::push_list`].
    pub fn with_list<I, S>(mut self, key: impl Into<String>, items: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        self.push_list(key, items);
        self
    }

    /// Builder form of [`Message::push_section`].
    pub fn with_section(mut self, key: impl Into<String>, section: Message) -> Self {
        self.push_section(key, section);
        self
    }

    /// The first value named `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A key/value as bytes.
    pub fn bytes(&self, key: &str) -> Option<&[u8]> {
        match self.get(key)? {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// A key/value as UTF-8 text (`None` if absent, not a key/value, or not UTF-8).
    pub fn str(&self, key: &str) -> Option<&str> {
        std::str::from_utf8(self.bytes(key)?).ok()
    }

    /// A list's items as UTF-8 text (`None` if absent or not a list; items that are not
    /// UTF-8 are replaced lossily).
    pub fn list(&self, key: &str) -> Option<Vec<String>> {
        match self.get(key)? {
            Value::List(items) => Some(
                items
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect(),
            ),
            _ => None,
        }
    }

    pub fn section(&self, key: &str) -> Option<&Message> {
        match self.get(key)? {
            Value::Section(m) => Some(m),
            _ => None,
        }
    }

    /// All sections, in order, with their names.
    pub fn sections(&self) -> impl Iterator<Item = (&str, &Message)> {
        self.entries.iter().filter_map(|(k, v)| match v {
            Value::Section(m) => Some((k.as_str(), m)),
            _ => None,
        })
    }
}

/// One VICI packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    CmdRequest { command: String, message: Message },
    CmdResponse(Message),
    CmdUnknown,
    EventRegister(String),
    EventUnregister(String),
    EventConfirm,
    EventUnknown,
    Event { name: String, message: Message },
}

impl Packet {
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::CmdRequest { .. } => PacketType::CmdRequest,
            Packet::CmdResponse(_) => PacketType::CmdResponse,
            Packet::CmdUnknown => PacketType::CmdUnknown,
            Packet::EventRegister(_) => PacketType::EventRegister,
            Packet::EventUnregister(_) => PacketType::EventUnregister,
            Packet::EventConfirm => PacketType::EventConfirm,
            Packet::EventUnknown => PacketType::EventUnknown,
            Packet::Event { .. } => PacketType::Event,
        }
    }

    /// The name of a named packet (command or event).
    pub fn name(&self) -> Option<&str> {
        match self {
            Packet::CmdRequest { command: n, .. }
            | Packet::EventRegister(n)
            | Packet::EventUnregister(n)
            | Packet::Event { name: n, .. } => Some(n),
            _ => None,
        }
    }

    pub fn message(&self) -> Option<&Message> {
        match self {
            Packet::CmdRequest { message, .. }
            | Packet::CmdResponse(message)
            | Packet::Event { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// Why bytes are not a valid VICI packet or a message cannot be encoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated VICI packet: {what} at byte {offset} needs {needed} more byte(s)")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
    },
    #[error("empty VICI packet (no type byte)")]
    Empty,
    #[error("unknown VICI packet type {0}")]
    UnknownPacketType(u8),
    #[error("unknown VICI element type {ty} at byte {offset}")]
    UnknownElement { ty: u8, offset: usize },
    #[error("VICI {what} at byte {offset} is not UTF-8")]
    NotUtf8 { what: &'static str, offset: usize },
    #[error("VICI {element} at byte {offset} outside of {expected}")]
    Misplaced {
        element: &'static str,
        offset: usize,
        expected: &'static str,
    },
    #[error("VICI list `{name}` holds element type {ty} at byte {offset}: only items may follow LIST_START")]
    InsideList { ty: u8, offset: usize, name: String },
    #[error("VICI message ends inside {open} `{name}`")]
    Unterminated { open: &'static str, name: String },
    #[error("VICI {what} is {len} bytes, the limit is {max}")]
    TooLong {
        what: String,
        len: usize,
        max: usize,
    },
    #[error("VICI packet of type {0} carries a message, which that type never does")]
    UnexpectedMessage(PacketType),
    #[error("{0} trailing byte(s) after the last complete VICI frame")]
    TrailingBytes(usize),
}

// ---------------------------------------------------------------------------------------
// encoding

fn put_name(out: &mut Vec<u8>, what: &str, name: &str) -> Result<(), WireError> {
    let b = name.as_bytes();
    if b.len() > u8::MAX as usize {
        return Err(WireError::TooLong {
            what: format!("{what} `{name}`"),
            len: b.len(),
            max: 255,
        });
    }
    out.push(b.len() as u8);
    out.extend_from_slice(b);
    Ok(())
}

fn put_value(out: &mut Vec<u8>, key: &str, v: &[u8]) -> Result<(), WireError> {
    if v.len() > u16::MAX as usize {
        return Err(WireError::TooLong {
            what: format!("value of `{key}`"),
            len: v.len(),
            max: u16::MAX as usize,
        });
    }
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
    Ok(())
}

/// Appends the elements of `message` to `out`.
pub fn encode_message(message: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    for (key, value) in &message.entries {
        match value {
            Value::Bytes(v) => {
                out.push(KEY_VALUE);
                put_name(out, "key", key)?;
                put_value(out, key, v)?;
            }
            Value::Secret(v) => {
                out.push(KEY_VALUE);
                put_name(out, "key", key)?;
                put_value(out, key, v)?;
            }
            Value::List(items) => {
                out.push(LIST_START);
                put_name(out, "list name", key)?;
                for item in items {
                    out.push(LIST_ITEM);
                    put_value(out, key, item)?;
                }
                out.push(LIST_END);
            }
            Value::Section(m) => {
                out.push(SECTION_START);
                put_name(out, "section name", key)?;
                encode_message(m, out)?;
                out.push(SECTION_END);
            }
        }
    }
    Ok(())
}

/// Encodes one packet as a frame (4-byte big-endian length + packet).
///
/// The result may hold a secret (`load-shared`): callers writing it to a socket should
/// zero it afterwards (the client does).
pub fn encode_packet(packet: &Packet) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0, 0, 0, 0, packet.packet_type() as u8];
    if let Some(name) = packet.name() {
        put_name(&mut out, "packet name", name)?;
    }
    if let Some(m) = packet.message() {
        encode_message(m, &mut out)?;
    }
    let len = out.len() - 4;
    if len > MAX_PACKET_LEN {
        return Err(WireError::TooLong {
            what: format!(
                "{} packet",
                packet.name().unwrap_or(packet.packet_type().as_str())
            ),
            len,
            max: MAX_PACKET_LEN,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// decoding

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    /// offset of `b` in the frame, for error messages
    base: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        let rest = self.b.len() - self.pos;
        if rest < n {
            return Err(WireError::Truncated {
                what,
                offset: self.base + self.pos,
                needed: n - rest,
            });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    fn name(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.u8(what)? as usize;
        let at = self.base + self.pos;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::NotUtf8 { what, offset: at })
    }

    fn value(&mut self, what: &'static str) -> Result<Vec<u8>, WireError> {
        let l = self.take(2, what)?;
        let n = u16::from_be_bytes([l[0], l[1]]) as usize;
        Ok(self.take(n, what)?.to_vec())
    }

    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }
}

/// Decodes the elements of a message (the part of a packet after type and name).
pub fn decode_message(bytes: &[u8]) -> Result<Message, WireError> {
    decode_message_at(bytes, 0)
}

fn decode_message_at(bytes: &[u8], base: usize) -> Result<Message, WireError> {
    let mut r = Reader {
        b: bytes,
        pos: 0,
        base,
    };
    // stack of open sections: (name, message being filled)
    let mut stack: Vec<(String, Message)> = vec![(String::new(), Message::new())];
    let mut list: Option<(String, Vec<Vec<u8>>)> = None;
    while !r.done() {
        let offset = base + r.pos;
        let ty = r.u8("element type")?;
        if let Some((name, _)) = list
            .as_ref()
            .filter(|_| !matches!(ty, LIST_ITEM | LIST_END))
        {
            return Err(WireError::InsideList {
                ty,
                offset,
                name: name.clone(),
            });
        }
        let top = &mut stack.last_mut().expect("root").1;
        match ty {
            SECTION_START => {
                let name = r.name("section name")?;
                stack.push((name, Message::new()));
            }
            SECTION_END => {
                if stack.len() == 1 {
                    return Err(WireError::Misplaced {
                        element: "SECTION_END",
                        offset,
                        expected: "a section",
                    });
                }
                let (name, m) = stack.pop().expect("len > 1");
                stack
                    .last_mut()
                    .expect("root")
                    .1
                    .push(name, Value::Section(m));
            }
            KEY_VALUE => {
                let name = r.name("key")?;
                let v = r.value("value")?;
                top.push(name, Value::Bytes(v));
            }
            LIST_START => {
                let name = r.name("list name")?;
                list = Some((name, Vec::new()));
            }
            LIST_ITEM => match list.as_mut() {
                Some((_, items)) => items.push(r.value("list item")?),
                None => {
                    return Err(WireError::Misplaced {
                        element: "LIST_ITEM",
                        offset,
                        expected: "a list",
                    })
                }
            },
            LIST_END => match list.take() {
                Some((name, items)) => {
                    top.push(name, Value::List(items));
                }
                None => {
                    return Err(WireError::Misplaced {
                        element: "LIST_END",
                        offset,
                        expected: "a list",
                    })
                }
            },
            ty => return Err(WireError::UnknownElement { ty, offset }),
        }
    }
    if let Some((name, _)) = list {
        return Err(WireError::Unterminated { open: "list", name });
    }
    if stack.len() > 1 {
        let (name, _) = stack.pop().expect("len > 1");
        return Err(WireError::Unterminated {
            open: "section",
            name,
        });
    }
    Ok(stack.pop().expect("root").1)
}

/// Decodes one packet (without its 4-byte length prefix).
pub fn decode_packet(bytes: &[u8]) -> Result<Packet, WireError> {
    if bytes.len() > MAX_PACKET_LEN {
        return Err(WireError::TooLong {
            what: "packet".into(),
            len: bytes.len(),
            max: MAX_PACKET_LEN,
        });
    }
    let ty = *bytes.first().ok_or(WireError::Empty)?;
    let ty = PacketType::from_u8(ty).ok_or(WireError::UnknownPacketType(ty))?;
    let mut r = Reader {
        b: bytes,
        pos: 1,
        base: 0,
    };
    let name = if ty.is_named() {
        Some(r.name("packet name")?)
    } else {
        None
    };
    let rest = &bytes[r.pos..];
    let with_msg = |rest: &[u8]| decode_message_at(rest, bytes.len() - rest.len());
    let no_msg = |rest: &[u8]| {
        if rest.is_empty() {
            Ok(())
        } else {
            Err(WireError::UnexpectedMessage(ty))
        }
    };
    Ok(match ty {
        PacketType::CmdRequest => Packet::CmdRequest {
            command: name.expect("named"),
            message: with_msg(rest)?,
        },
        PacketType::CmdResponse => Packet::CmdResponse(with_msg(rest)?),
        PacketType::Event => Packet::Event {
            name: name.expect("named"),
            message: with_msg(rest)?,
        },
        PacketType::CmdUnknown => no_msg(rest).map(|_| Packet::CmdUnknown)?,
        PacketType::EventRegister => {
            no_msg(rest).map(|_| Packet::EventRegister(name.expect("named")))?
        }
        PacketType::EventUnregister => {
            no_msg(rest).map(|_| Packet::EventUnregister(name.expect("named")))?
        }
        PacketType::EventConfirm => no_msg(rest).map(|_| Packet::EventConfirm)?,
        PacketType::EventUnknown => no_msg(rest).map(|_| Packet::EventUnknown)?,
    })
}

/// Splits a byte stream into frames: feed bytes as they arrive with [`FrameBuffer::extend`],
/// take complete packets with [`FrameBuffer::next_packet`].
#[derive(Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet a complete frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete packet, `Ok(None)` if more bytes are needed. An error (oversized
    /// frame, malformed packet) means the stream cannot be trusted any more.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_PACKET_LEN {
            return Err(WireError::TooLong {
                what: "frame".into(),
                len,
                max: MAX_PACKET_LEN,
            });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let packet = decode_packet(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        packet.map(Some)
    }
}

/// Decodes a whole recorded byte stream (one direction of a session) into packets.
pub fn decode_stream(bytes: &[u8]) -> Result<Vec<Packet>, WireError> {
    let mut fb = FrameBuffer::new();
    fb.extend(bytes);
    let mut out = Vec::new();
    while let Some(p) = fb.next_packet()? {
        out.push(p);
    }
    match fb.pending() {
        0 => Ok(out),
        n => Err(WireError::TrailingBytes(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message::new()
            .with_str("version", "2")
            .with_list("local_addrs", ["192.168.77.1"])
            .with_section(
                "local",
                Message::new()
                    .with_str("auth", "psk")
                    .with_section("inner", Message::new().with_list("empty", [""; 0])),
            )
    }

    #[test]
    fn roundtrip_all_packet_types() {
        let packets = vec![
            Packet::CmdRequest {
                command: "load-conn".into(),
                message: sample(),
            },
            Packet::CmdResponse(Message::new().with_str("success", "yes")),
            Packet::CmdUnknown,
            Packet::EventRegister("ike-updown".into()),
            Packet::EventUnregister("ike-updown".into()),
            Packet::EventConfirm,
            Packet::EventUnknown,
            Packet::Event {
                name: "child-updown".into(),
                message: sample(),
            },
        ];
        let mut stream = Vec::new();
        for p in &packets {
            let f = encode_packet(p).unwrap();
            assert_eq!(decode_packet(&f[4..]).unwrap(), *p);
            stream.extend(f);
        }
        assert_eq!(decode_stream(&stream).unwrap(), packets);
        // byte by byte through the frame buffer
        let mut fb = FrameBuffer::new();
        let mut got = Vec::new();
        for b in &stream {
            fb.extend(std::slice::from_ref(b));
            while let Some(p) = fb.next_packet().unwrap() {
                got.push(p);
            }
        }
        assert_eq!(got, packets);
    }

    #[test]
    fn exact_bytes_of_a_small_request() {
        let p = Packet::CmdRequest {
            command: "unload-conn".into(),
            message: Message::new().with_str("name", "x"),
        };
        let f = encode_packet(&p).unwrap();
        let want: &[u8] = b"\x00\x00\x00\x16\x00\x0bunload-conn\x03\x04name\x00\x01x";
        assert_eq!(f, want);
    }

    #[test]
    fn secrets_encode_like_values_but_never_print() {
        let mut m = Message::new();
        m.push_secret("data", b"hunter2");
        let dbg = format!("{m:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        let f = encode_packet(&Packet::CmdResponse(m)).unwrap();
        let back = decode_packet(&f[4..]).unwrap();
        assert_eq!(back.message().unwrap().str("data"), Some("hunter2"));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let bad: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"\x09", "unknown VICI packet type 9"),
            (b"\x00\x05ab", "truncated"),
            (b"\x01\x09", "unknown VICI element type 9"),
            (b"\x01\x02", "SECTION_END at byte 1 outside of a section"),
            (b"\x01\x05", "LIST_ITEM"),
            (b"\x01\x06", "LIST_END"),
            (b"\x01\x01\x01s", "ends inside section `s`"),
            (b"\x01\x04\x01l\x05\x00\x01x", "ends inside list `l`"),
            (b"\x01\x04\x01l\x03\x01k\x00\x00", "only items may follow"),
            (b"\x01\x03\x01k\x00\x05ab", "truncated"),
            (b"\x05\x03\x01k\x00\x00", "carries a message"),
            (b"\x01\x03\x01\xff\x00\x00", "not UTF-8"),
        ];
        for (bytes, want) in bad {
            let e = decode_packet(bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{bytes:?}: {e}");
        }
        assert!(matches!(
            decode_stream(b"\x00\x00\x00\x05\x01"),
            Err(WireError::TrailingBytes(5))
        ));
        let mut fb = FrameBuffer::new();
        fb.extend(&((MAX_PACKET_LEN + 1) as u32).to_be_bytes());
        assert!(matches!(fb.next_packet(), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn limits_are_enforced_when_encoding() {
        let long_key = "k".repeat(256);
        let e = encode_packet(&Packet::CmdResponse(Message::new().with_str(long_key, "v")))
            .unwrap_err();
        assert!(e.to_string().contains("limit is 255"), "{e}");
        let e = encode_packet(&Packet::CmdResponse(
            Message::new().with_str("k", vec![b'x'; 70_000]),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("value of `k`"), "{e}");
        let mut big = Message::new();
        for i in 0..10 {
            big.push_str(format!("k{i}"), vec![b'x'; 60_000]);
        }
        let e = encode_packet(&Packet::CmdResponse(big)).unwrap_err();
        assert!(e.to_string().contains("limit is 524288"), "{e}");
    }
}
