//! Checkpoint files: the bytes through `checkpoint::tensors_from_bytes` and
//! `checkpoint::pool_from_bytes` (what `read_tensors` / `read_pool` do after reading the file), as
//! they are and resealed with a correct data digest and spec hash so the checks behind the digest
//! are reached (`fedpool_fuzz::fuzz_checkpoint`). Seeds: `seeds/checkpoint/` (real pool files).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fedpool_fuzz::fuzz_checkpoint(data);
});
