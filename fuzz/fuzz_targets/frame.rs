//! Frames as they arrive from a peer: `read_frame`, then the header parsed from the first 8 bytes
//! under the default `FrameLimits` and the body decoded with its kind as a `ClientMessage` and as
//! a `ServerMessage`; a decoded message re-encodes to itself; an `Update` goes through
//! `Update::validate` and a task's global pool through the participant's decode
//! (`fedpool_fuzz::fuzz_frame`). Seeds: `seeds/frame/` (an Enroll, an Update, a Task, ...).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fedpool_fuzz::fuzz_frame(data);
});
