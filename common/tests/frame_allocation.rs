//! Framing refuses oversized, truncated and garbage frames with a typed error **without
//! allocating the size they claim**. A counting global allocator records the largest single
//! allocation made while each bad frame is read; one test function, so no other test thread
//! allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use fedpool_common::codec::{decode, CodecConfig, DecodeLimits, EncodedDelta};
use fedpool_common::frame::{read_frame, FrameError, FrameHeader, FrameLimits, MessageKind};
use fedpool_common::wire::ClientMessage;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    let out = f();
    (out, LARGEST.load(Ordering::SeqCst))
}

const MIB: usize = 1 << 20;
/// Allocations bounded independently of claimed sizes (serde preallocates at most 1 MiB per
/// sequence) stay under this; the claimed sizes are hundreds of MiB and more.
const BOUND: usize = 2 * MIB;

#[test]
fn bad_frames_are_refused_without_allocating_the_claimed_size() {
    let limits = FrameLimits::default(); // 64 KiB control, 256 MiB bulk

    // Oversized: an Enroll claiming 1 GiB is refused from the header alone.
    let header = FrameHeader { kind: MessageKind::Enroll, len: 1 << 30 }.to_bytes();
    let (r, largest) = largest_alloc(|| read_frame(&mut &header[..], &limits));
    assert!(matches!(r, Err(FrameError::TooLarge { kind: MessageKind::Enroll, .. })), "{r:?}");
    assert!(largest <= BOUND, "allocated {largest} bytes for a refused header");

    // Truncated: an Update claiming 200 MiB (under the bulk cap) that sends 1 KiB and stops.
    let mut frame = FrameHeader { kind: MessageKind::Update, len: 200 * MIB as u32 }.to_bytes().to_vec();
    frame.extend(std::iter::repeat_n(7u8, 1024));
    let (r, largest) = largest_alloc(|| read_frame(&mut &frame[..], &limits));
    assert!(matches!(r, Err(FrameError::Truncated { got: 1024, .. })), "{r:?}");
    assert!(largest <= BOUND, "allocated {largest} bytes for a 1 KiB truncated body");

    // Garbage: not a frame at all.
    let garbage = b"GET / HTTP/1.1\r\n\r\n";
    let (r, largest) = largest_alloc(|| read_frame(&mut &garbage[..], &limits));
    assert!(matches!(r, Err(FrameError::BadMagic(_))), "{r:?}");
    assert!(largest <= BOUND);

    // A well-framed body whose inner length field lies: an Update whose first 24 bytes are valid
    // (round, task, nonce, examples, codec config, raw length) and whose payload claims 2^31 bytes.
    let mut body = vec![0u8; 24];
    body.extend_from_slice(&[252, 0, 0, 0, 128]); // bincode varint u32 = 2^31
    let (r, largest) = largest_alloc(|| ClientMessage::decode(MessageKind::Update, &body));
    assert!(matches!(r, Err(FrameError::Decode(_))), "{r:?}");
    assert!(largest <= BOUND, "allocated {largest} bytes decoding a lying body");

    // A codec payload with a valid digest whose body (spec hash, no slots) claims 2^40 tensors.
    let mut payload = vec![0u8; 33];
    payload.extend_from_slice(&[253, 0, 0, 0, 0, 1, 0, 0, 0]); // varint u64 = 2^40
    let enc = EncodedDelta::seal(CodecConfig::default(), payload.len() as u64, payload).unwrap();
    let (r, largest) = largest_alloc(|| decode(&enc, &DecodeLimits::default()));
    assert!(r.is_err(), "{r:?}");
    assert!(largest <= BOUND, "allocated {largest} bytes decoding a lying payload");
}
