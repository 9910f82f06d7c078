//! `codec::decode` of an `EncodedDelta` built from the bytes (flags, block size, top-k, zstd
//! level and length, payload: `fedpool_fuzz::codec_input`) and sealed, under
//! `fedpool_fuzz::CODEC_LIMITS`; a decoded delta re-encodes and decodes to the same layout
//! (`fedpool_fuzz::fuzz_codec`). Seeds: `seeds/codec_decode/` (fp32, int8, int4, top-k, zstd).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fedpool_fuzz::fuzz_codec(data);
});
