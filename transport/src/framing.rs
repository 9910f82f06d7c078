//! Frames over async streams: the async twin of `fedpool_common::frame::read_frame`.
//!
//! The 8-byte header is read first and checked by [`FrameHeader::parse`] against the per-kind
//! caps **before** any of the body is read; the body is then read in chunks of at most
//! [`CHUNK`] bytes as they arrive, into a buffer that grows with the bytes actually received —
//! a header that lies about its length allocates nothing.
//!
//! [`read_body_with_progress`] and [`write_frame_with_progress`] bound a transfer by its progress
//! rather than by one timer: every [`CHUNK`] (or the rest, if less) must arrive, or be accepted
//! by the peer's flow control, within the stall time, so a transfer of any size may take as long
//! as it keeps moving (at least one chunk per stall time), and one that stops is cut short. The
//! caller adds an overall cap with `tokio::time::timeout`.

use std::time::Duration;

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

/// Why a progress-bounded transfer ([`read_body_with_progress`], [`write_frame_with_progress`])
/// stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// The frame itself is bad (truncated) or the stream failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// No chunk moved within the stall time.
    #[error("stalled: {done} of {total} bytes after {stall:?} without a chunk ({chunk} bytes at most) moving")]
    Stalled {
        /// Bytes transferred before the stall.
        done: usize,
        /// Bytes the transfer is of.
        total: usize,
        /// The stall time that passed.
        stall: Duration,
        /// The chunk that did not complete in time.
        chunk: usize,
    },
}

/// [`read_body`], with progress: each chunk of the body ([`CHUNK`] bytes, or the rest if less)
/// must complete within `stall` of the previous one, else [`ProgressError::Stalled`]. A body that
/// keeps arriving at one chunk per `stall` or faster is read to its end however long it takes.
pub async fn read_body_with_progress<R: AsyncRead + Unpin>(
    r: &mut R,
    h: FrameHeader,
    stall: Duration,
) -> Result<Vec<u8>, ProgressError> {
    let want = h.len as usize;
    let mut body = Vec::new();
    let mut chunk = vec![0u8; CHUNK.min(want.max(1))];
    while body.len() < want {
        let n = (want - body.len()).min(chunk.len());
        let done = body.len();
        // Bytes of this chunk so far (read back after a stall, to say how far the body came).
        let mut got = 0;
        let fill = async {
            while got < n {
                let k = r.read(&mut chunk[got..n]).await.map_err(FrameError::Io)?;
                if k == 0 {
                    return Err(FrameError::Truncated { expected: want, got: done + got });
                }
                got += k;
            }
            Ok(())
        };
        match tokio::time::timeout(stall, fill).await {
            Err(_) => return Err(ProgressError::Stalled { done: done + got, total: want, stall, chunk: n }),
            Ok(r) => r?,
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(body)
}

/// Writes a whole frame in chunks of [`CHUNK`] bytes, each of which the writer must accept
/// within `stall` (a peer that stops reading fills its flow-control window and stalls the
/// write), then flushes (also within `stall`).
pub async fn write_frame_with_progress<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &[u8],
    stall: Duration,
) -> Result<(), ProgressError> {
    let mut done = 0;
    for chunk in frame.chunks(CHUNK) {
        match tokio::time::timeout(stall, w.write_all(chunk)).await {
            Err(_) => return Err(ProgressError::Stalled { done, total: frame.len(), stall, chunk: chunk.len() }),
            Ok(r) => r.map_err(FrameError::Io)?,
        }
        done += chunk.len();
    }
    match tokio::time::timeout(stall, w.flush()).await {
        Err(_) => Err(ProgressError::Stalled { done, total: frame.len(), stall, chunk: 0 }),
        Ok(r) => Ok(r.map_err(FrameError::Io)?),
    }
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

    #[tokio::test]
    async fn a_body_that_keeps_arriving_is_read_and_one_that_stops_is_cut_short() {
        let stall = Duration::from_millis(400);
        let h = FrameHeader { kind: MessageKind::Update, len: (2 * CHUNK + 10) as u32 };
        // Chunks 0.25 s apart: slower in total than the stall time, never stalled.
        let (mut tx, mut rx) = tokio::io::duplex(4 * CHUNK);
        let writer = tokio::spawn(async move {
            for n in [CHUNK, CHUNK, 10] {
                tokio::time::sleep(Duration::from_millis(250)).await;
                tx.write_all(&vec![3u8; n]).await.unwrap();
            }
            tx
        });
        let body = read_body_with_progress(&mut rx, h, stall).await.unwrap();
        assert_eq!(body.len(), 2 * CHUNK + 10);
        drop(writer.await.unwrap());
        // Half a chunk, then nothing: stalled after the stall time, naming the bytes that came.
        let (mut tx, mut rx) = tokio::io::duplex(4 * CHUNK);
        tx.write_all(&vec![3u8; CHUNK / 2]).await.unwrap();
        let started = std::time::Instant::now();
        let r = read_body_with_progress(&mut rx, h, stall).await;
        assert!(
            matches!(r, Err(ProgressError::Stalled { done, chunk, .. }) if done == CHUNK / 2 && chunk == CHUNK),
            "{r:?}"
        );
        assert!(started.elapsed() >= stall, "{:?}", started.elapsed());
        // A stream that ends early is truncated, not stalled.
        drop(tx);
        let r = read_body_with_progress(&mut rx, h, stall).await;
        assert!(matches!(r, Err(ProgressError::Frame(FrameError::Truncated { .. }))), "{r:?}");
    }

    #[tokio::test]
    async fn a_write_to_a_reader_that_stops_reading_stalls() {
        let stall = Duration::from_millis(200);
        let (mut tx, rx) = tokio::io::duplex(CHUNK);
        let frame = vec![1u8; 3 * CHUNK];
        let r = write_frame_with_progress(&mut tx, &frame, stall).await;
        assert!(matches!(r, Err(ProgressError::Stalled { done, .. }) if done == CHUNK), "{r:?}");
        drop(rx);
        // A reader that is gone: the write fails at once, as an i/o error.
        let (mut tx, rx) = tokio::io::duplex(CHUNK);
        drop(rx);
        assert!(matches!(
            write_frame_with_progress(&mut tx, &frame, stall).await,
            Err(ProgressError::Frame(FrameError::Io(_)))
        ));
    }
}
