//! The one module that knows the byte format: bincode 2 (serde) with decode limits, and the
//! length-prefixed frames that messages travel in. Swapping bincode (for postcard, say) touches
//! only this file.
//!
//! A frame is an 8-byte header — magic `FP`, message kind, a reserved zero byte, body length as
//! `u32` little-endian — followed by the body. The header is checked against the per-kind size cap
//! **before** any of the body is read, and the body is read as it arrives, never into a buffer of
//! the claimed size.

use std::io::Read;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"FP";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 8;

/// The kinds of message a frame can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// Client → server: join the federation.
    Enroll = 1,
    /// Server → client: enrollment accepted.
    Welcome = 2,
    /// Server → client: a round task with the global pool.
    Task = 3,
    /// Client → server: a trained update.
    Update = 4,
    /// Server → client: an update was accepted.
    Ack = 5,
    /// Either way: a request or update was refused, with the reason.
    Reject = 6,
    /// Either way: liveness.
    Heartbeat = 7,
    /// Server → client: evaluate a committed global pool on the held-out data.
    EvalTask = 8,
    /// Client → server: the metrics of an evaluation.
    EvalReport = 9,
    /// Simulation coordinator → worker: work for the worker's virtual clients
    /// (`fedpool-sim`'s distributed mode; never sent to or by a daemon).
    SimRequest = 10,
    /// Simulation worker → coordinator: what its virtual clients produced.
    SimReply = 11,
}

impl MessageKind {
    /// The kind for a header byte, if it names one.
    pub fn from_byte(b: u8) -> Option<Self> {
        use MessageKind::*;
        [Enroll, Welcome, Task, Update, Ack, Reject, Heartbeat, EvalTask, EvalReport, SimRequest, SimReply]
            .into_iter()
            .find(|k| *k as u8 == b)
    }

    /// True for the kinds that carry a pool or a delta.
    pub fn is_bulk(self) -> bool {
        matches!(
            self,
            MessageKind::Task
                | MessageKind::Update
                | MessageKind::EvalTask
                | MessageKind::SimRequest
                | MessageKind::SimReply
        )
    }
}

/// Size caps per message kind, in bytes of body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Cap for control messages (enroll, welcome, ack, reject, heartbeat).
    pub control: u32,
    /// Cap for tasks and updates (they carry a pool or a delta).
    pub bulk: u32,
}

impl FrameLimits {
    /// The cap for `kind`.
    pub fn cap(&self, kind: MessageKind) -> u32 {
        if kind.is_bulk() {
            self.bulk
        } else {
            self.control
        }
    }
}

impl Default for FrameLimits {
    /// 64 KiB for control messages, 256 MiB for pools and deltas (an uncompressed SSF pool of
    /// 25 slots over MiniLM is ~5 MiB; LoRA on a 7B model at rank 64 is ~150 MiB).
    fn default() -> Self {
        Self { control: 64 << 10, bulk: 256 << 20 }
    }
}

/// Why bytes could not be framed, read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame does not start with `FP`.
    #[error("not a fedpool frame (bad magic {0:02x?})")]
    BadMagic([u8; 2]),
    /// The header names no known message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The reserved header byte is not zero.
    #[error("reserved header byte is {0}, expected 0")]
    Reserved(u8),
    /// The body is larger than the cap for its kind; nothing of it was read.
    #[error("{kind:?} frame of {len} bytes exceeds the {cap}-byte cap")]
    TooLarge {
        /// The message kind.
        kind: MessageKind,
        /// The length the header claims.
        len: u32,
        /// The cap for that kind.
        cap: u32,
    },
    /// The stream ended before the header or body was complete.
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the header (or the header itself) promised.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// A frame of a kind that is not valid here.
    #[error("unexpected {0:?} message")]
    UnexpectedKind(MessageKind),
    /// The body did not decode.
    #[error("malformed body: {0}")]
    Decode(String),
    /// A value could not be encoded (or exceeds the frame format's 4 GiB).
    #[error("cannot encode: {0}")]
    Encode(String),
    /// Reading from the stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the body holds.
    pub kind: MessageKind,
    /// Body length in bytes (already checked against the cap).
    pub len: u32,
}

impl FrameHeader {
    /// Parses and checks a header: magic, kind, reserved byte, and the size cap for the kind.
    pub fn parse(bytes: &[u8; HEADER_LEN], limits: &FrameLimits) -> Result<Self, FrameError> {
        if bytes[..2] != MAGIC {
            return Err(FrameError::BadMagic([bytes[0], bytes[1]]));
        }
        let kind = MessageKind::from_byte(bytes[2]).ok_or(FrameError::UnknownKind(bytes[2]))?;
        if bytes[3] != 0 {
            return Err(FrameError::Reserved(bytes[3]));
        }
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let cap = limits.cap(kind);
        if len > cap {
            return Err(FrameError::TooLarge { kind, len, cap });
        }
        Ok(Self { kind, len })
    }

    /// The header's eight bytes.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let l = self.len.to_le_bytes();
        [MAGIC[0], MAGIC[1], self.kind as u8, 0, l[0], l[1], l[2], l[3]]
    }
}

/// A whole frame: header followed by `body`.
pub fn frame(kind: MessageKind, body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len =
        u32::try_from(body.len()).map_err(|_| FrameError::Encode(format!("{} bytes exceed a frame", body.len())))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&FrameHeader { kind, len }.to_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Reads one frame from a blocking reader: the header, its checks, then the body as it arrives
/// (the buffer grows with the bytes actually received, so a lying length allocates nothing).
pub fn read_frame(r: &mut impl Read, limits: &FrameLimits) -> Result<(MessageKind, Vec<u8>), FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header)?;
    if got < HEADER_LEN {
        return Err(FrameError::Truncated { expected: HEADER_LEN, got });
    }
    let h = FrameHeader::parse(&header, limits)?;
    let mut body = Vec::new();
    r.take(u64::from(h.len)).read_to_end(&mut body)?;
    if body.len() != h.len as usize {
        return Err(FrameError::Truncated { expected: h.len as usize, got: body.len() });
    }
    Ok((h.kind, body))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a value with bincode 2 (standard configuration).
pub fn to_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, FrameError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| FrameError::Encode(e.to_string()))
}

/// The exact number of bytes [`to_bytes`] would produce, without producing them.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, FrameError> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    bincode::serde::encode_into_std_write(value, &mut c, config()).map_err(|e| FrameError::Encode(e.to_string()))?;
    Ok(c.0)
}

/// Decodes a value from `bytes`, refusing trailing bytes, with bincode's allocation limit set to
/// the smallest power of two ≥ 2 × `bytes.len()` (at least 4 KiB): a length field inside the
/// body can never make the decoder reserve much more memory than the body itself occupies.
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    from_bytes_within(bytes, bytes.len().saturating_mul(2))
}

/// [`from_bytes`] with bincode's allocation limit set to the smallest power of two ≥
/// `max_alloc` (at least 4 KiB), for messages whose values take more memory than wire bytes —
/// many small structs of varint fields, each 5–10× its encoding in memory.
pub fn from_bytes_within<T: DeserializeOwned>(bytes: &[u8], max_alloc: usize) -> Result<T, FrameError> {
    let want = max_alloc.max(4096);
    macro_rules! with_limit {
        ($($bits:literal)*) => {
            $( if want <= (1usize << $bits) {
                return finish(bincode::serde::decode_from_slice(bytes, config().with_limit::<{ 1usize << $bits }>()), bytes.len());
            } )*
        };
    }
    with_limit!(12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35);
    Err(FrameError::Decode(format!("body of {} bytes is too large to decode", bytes.len())))
}

fn finish<T>(r: Result<(T, usize), bincode::error::DecodeError>, len: usize) -> Result<T, FrameError> {
    let (value, used) = r.map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != len {
        return Err(FrameError::Decode(format!("{} trailing bytes after the message", len - used)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_caps() {
        let limits = FrameLimits { control: 100, bulk: 1000 };
        let h = FrameHeader { kind: MessageKind::Update, len: 1000 };
        assert_eq!(FrameHeader::parse(&h.to_bytes(), &limits).unwrap(), h);
        let too_big = FrameHeader { kind: MessageKind::Heartbeat, len: 101 };
        assert!(matches!(
            FrameHeader::parse(&too_big.to_bytes(), &limits),
            Err(FrameError::TooLarge { kind: MessageKind::Heartbeat, len: 101, cap: 100 })
        ));
        let mut bad = h.to_bytes();
        bad[2] = 99;
        assert!(matches!(FrameHeader::parse(&bad, &limits), Err(FrameError::UnknownKind(99))));
        bad = h.to_bytes();
        bad[0] = b'X';
        assert!(matches!(FrameHeader::parse(&bad, &limits), Err(FrameError::BadMagic(_))));
    }

    #[test]
    fn read_frame_refuses_truncation() {
        let f = frame(MessageKind::Ack, b"hello").unwrap();
        let limits = FrameLimits::default();
        let (kind, body) = read_frame(&mut &f[..], &limits).unwrap();
        assert_eq!((kind, body.as_slice()), (MessageKind::Ack, &b"hello"[..]));
        assert!(matches!(read_frame(&mut &f[..10], &limits), Err(FrameError::Truncated { expected: 5, got: 2 })));
        assert!(matches!(read_frame(&mut &f[..3], &limits), Err(FrameError::Truncated { expected: 8, got: 3 })));
    }

    #[test]
    fn values_round_trip_and_trailing_bytes_are_refused() {
        let v = (7u64, String::from("seven"), vec![1.5f32, 2.5]);
        let mut bytes = to_bytes(&v).unwrap();
        assert_eq!(encoded_len(&v).unwrap(), bytes.len());
        assert_eq!(from_bytes::<(u64, String, Vec<f32>)>(&bytes).unwrap(), v);
        bytes.push(0);
        assert!(matches!(from_bytes::<(u64, String, Vec<f32>)>(&bytes), Err(FrameError::Decode(_))));
    }

    #[test]
    fn a_lying_length_inside_a_body_is_refused_by_the_limit() {
        // A byte vector claiming 2^40 bytes, followed by nothing.
        let mut bytes = vec![253u8]; // bincode varint marker for a u64
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let r = from_bytes::<serde_bytes::ByteBuf>(&bytes);
        assert!(matches!(r, Err(FrameError::Decode(_))), "{r:?}");
    }
}
