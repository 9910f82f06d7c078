//! `server.toml`: the text through `ServerConfig::parse` (serde, then `check`), then what
//! `ServerConfig::prepare` derives without touching files: frame limits, network setup, codec,
//! aggregation, pool spec and decode limits, the merge and the rank planner
//! (`fedpool_fuzz::fuzz_server_config`). Seeds: `seeds/server_config/` (the example and variants).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fedpool_fuzz::fuzz_server_config(data);
});
