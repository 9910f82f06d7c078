//! Frames over async streams: the async twin of `fedpool_common::frame::read_frame`.
//!
//! The 8-byte header is read first and checked by [`FrameHeader::parse`] against the per-kind
//! caps **before** any of the body is read; the body is then read in chunks of at most
//! [`CHUNK`] bytes as they arrive, into a buffer that grows with the bytes actually received —
//! a header that lies about its length allocates nothing.

use fedpool_common::frame::{FrameError, FrameHeader, FrameLimits, MessageKind, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes read from a stream at a time.
pub const CHUNK: usize = 64 << 10;

/// A frame read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The message kind from the header.
    pub kind: MessageKind,
    /// The body.
    pub body: Vec<u8>,
}

impl RawFrame {
    /// Bytes the frame took on the wire (header + body).
    pub fn wire_len(&self) -> u64 {
        (HEADER_LEN + self.body.len()) as u64
    }
}

/// Reads one frame. `Ok(None)` when the stream ends cleanly before any byte of a header.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, limits: &FrameLimits) -> Result<Option<RawFrame>, FrameError> {
    let Some(h) = read_header(r, limits).await? else { return Ok(None) };
    let body = read_body(r, h).await?;
    Ok(Some(RawFrame { kind: h.kind, body }))
}

/// Reads and checks a frame header (magic, kind, reserved byte, the cap for its kind).
/// `Ok(None)` when the stream ends cleanly before any byte of it.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &FrameLimits,
) -> Result<Option<FrameHeader>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(FrameError::Truncated { expected: HEADER_LEN, got });
    }
    FrameHeader::parse(&header, limits).map(Some)
}

/// Reads the body a checked header announced, in chunks as they arrive: the buffer grows with
/// the bytes received, never to the claimed size up front.
pub async fn read_body<R: AsyncRead + Unpin>(r: &mut R, h: FrameHeader) -> Result<Vec<u8>, FrameError> {
    let want = h.len as usize;
    let mut body = Vec::new();
    let mut chunk = vec![0u8; CHUNK.min(want.max(1))];
    while body.len() < want {
        let n = (want - body.len()).min(chunk.len());
        let k = r.read(&mut chunk[..n]).await?;
        if k == 0 {
            return Err(FrameError::Truncated { expected: want, got: body.len() });
        }
        body.extend_from_slice(&chunk[..k]);
    }
    Ok(body)
}

async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut n = 0;
    while n < buf.len() {
        let k = r.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Writes a whole frame (as made by `ClientMessage::to_frame` / `ServerMessage::to_frame`).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> std::io::Result<()> {
    w.write_all(frame).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedpool_common::frame::frame;

    fn limits() -> FrameLimits {
        FrameLimits { control: 100, bulk: 1000 }
    }

    #[tokio::test]
    async fn reads_frames_back_to_back_and_a_clean_end() {
        let mut bytes = frame(MessageKind::Ack, b"one").unwrap();
        bytes.extend(frame(MessageKind::Update, &[7u8; 900]).unwrap());
        let mut r = &bytes[..];
        let a = read_frame(&mut r, &limits()).await.unwrap().unwrap();
        assert_eq!((a.kind, a.body.as_slice(), a.wire_len()), (MessageKind::Ack, &b"one"[..], 11));
        let b = read_frame(&mut r, &limits()).await.unwrap().unwrap();
        assert_eq!((b.kind, b.body.len()), (MessageKind::Update, 900));
        assert!(read_frame(&mut r, &limits()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_header_is_refused_before_the_body() {
        // A heartbeat claiming 4 GiB, with no body at all: refused by the header alone.
        let h = FrameHeader { kind: MessageKind::Heartbeat, len: u32::MAX }.to_bytes();
        let r = read_frame(&mut &h[..], &limits()).await;
        assert!(matches!(r, Err(FrameError::TooLarge { cap: 100, .. })), "{r:?}");
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_refused() {
        let f = frame(MessageKind::Update, &[1u8; 500]).unwrap();
        let r = read_frame(&mut &f[..300], &limits()).await;
        assert!(matches!(r, Err(FrameError::Truncated { expected: 500, got: 292 })), "{r:?}");
        let r = read_frame(&mut &f[..5], &limits()).await;
        assert!(matches!(r, Err(FrameError::Truncated { expected: 8, got: 5 })), "{r:?}");
        let r = read_frame(&mut &b"GET / HTTP/1.1\r\n"[..], &limits()).await;
        assert!(matches!(r, Err(FrameError::BadMagic(_))), "{r:?}");
    }
}
