//! `client.toml`: the text through `DaemonConfig::parse` (serde, then `validate`), then the
//! settings the daemon derives from it: shard, device, adapter, upload codec, the round's training
//! config, the server address (`fedpool_fuzz::fuzz_client_config`). Seeds: `seeds/client_config/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fedpool_fuzz::fuzz_client_config(data);
});
