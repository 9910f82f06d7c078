//! The bodies of fedpool's fuzz targets, and what their seeds are made of.
//!
//! Each `fuzz_targets/*.rs` is one line calling a `fuzz` function here, so the same code runs under
//! libFuzzer and under `cargo test --no-default-features` (the tests feed it the seeds and the
//! regression inputs). A target panics only when fedpool's code does, or when one of the
//! invariants it checks after a successful decode fails.
//!
//! | target          | feeds                                                                          |
//! |-----------------|--------------------------------------------------------------------------------|
//! | `frame`         | bytes as a frame: `read_frame`, `FrameHeader::parse`, `ClientMessage::decode` and `ServerMessage::decode`, then `Update::validate` / the global's decode |
//! | `codec_decode`  | an `EncodedDelta` built from the bytes ([`codec_input`]), sealed, through `codec::decode` |
//! | `checkpoint`    | bytes as a safetensors file: `tensors_from_bytes`, `pool_from_bytes`, raw and resealed ([`reseal_checkpoint`]) |
//! | `server_config` | UTF-8 text as `server.toml`: `ServerConfig::parse` and what `prepare` derives without files |
//! | `client_config` | UTF-8 text as `client.toml`: `DaemonConfig::parse` and its derived settings    |

use std::collections::BTreeMap;
use std::path::Path;

use fedpool_common::adapter::{AdapterPool, HeadSpec, PoolSpec, TargetSpec};
use fedpool_common::checkpoint::{self, META_DATA_SHA256};
use fedpool_common::codec::{self, CodecConfig, CodecError, DecodeLimits, EncodedDelta, Quantization};
use fedpool_common::frame::{self, FrameHeader, FrameLimits, HEADER_LEN};
use fedpool_common::wire::{ClientMessage, ExpectedTask, ServerMessage, Update};
use fedpool_common::{PoolDelta, Sha256};

/// The pool specs the targets validate decoded deltas and pools against (the seeds are made for
/// them): a FedIns SSF pool of 5 slots with a head, and a standard LoRA of rank 4 on two targets.
pub fn specs() -> [PoolSpec; 2] {
    let targets = |d_out: usize| {
        (0..2).map(|i| TargetSpec { name: format!("layer.{i}.query"), dim_in: 8, dim_out: d_out }).collect::<Vec<_>>()
    };
    [
        PoolSpec::ssf_pool(targets(8), 8, 5, 2, Some(HeadSpec::new(8, 2))),
        PoolSpec::lora(targets(6), 4, 8.0, Some(HeadSpec::new(8, 2))),
    ]
}

/// Limits of the `codec_decode` target: below `DecodeLimits::default()` (1 GiB), so that one
/// input never spends seconds allocating, above anything the seeds need.
pub const CODEC_LIMITS: DecodeLimits = DecodeLimits { max_values: 1 << 20, max_raw_bytes: 16 << 20 };

/// Most values a decoded delta may have for the targets to re-encode it (keeps exec/s high).
const REENCODE_MAX_VALUES: usize = 1 << 14;

// ---------------------------------------------------------------------------------------------
// frame

/// The `frame` target: `data` is what arrived on a stream. Returns true when a message decoded
/// and its delta or global pool passed every check (the seeds do).
pub fn fuzz_frame(data: &[u8]) -> bool {
    let limits = FrameLimits::default();
    // The blocking reader: header checks first, then the body as it arrives.
    let read = frame::read_frame(&mut &data[..], &limits);
    let Some(header) = data.first_chunk::<HEADER_LEN>() else {
        assert!(read.is_err(), "read_frame accepted {} bytes, less than a header", data.len());
        return false;
    };
    let Ok(h) = FrameHeader::parse(header, &limits) else {
        assert!(read.is_err(), "read_frame accepted a header that FrameHeader::parse refuses");
        return false;
    };
    let rest = &data[HEADER_LEN..];
    let body = &rest[..rest.len().min(h.len as usize)];
    match &read {
        Ok((kind, b)) => assert!(*kind == h.kind && b.as_slice() == body, "read_frame disagrees with the header"),
        Err(_) => assert!(body.len() < h.len as usize, "read_frame refused a complete frame"),
    }
    let mut deep = false;
    if let Ok(m) = ClientMessage::decode(h.kind, body) {
        let again = m.to_frame().expect("a decoded message encodes");
        let (k, b) = frame::read_frame(&mut &again[..], &limits).expect("an encoded message reads back");
        let m2 = ClientMessage::decode(k, &b).expect("an encoded message decodes");
        assert_eq!(m2.to_frame().unwrap(), again, "decode ∘ encode is not the identity on encodings");
        deep |= check_client(&m);
    }
    if let Ok(m) = ServerMessage::decode(h.kind, body) {
        let again = m.to_frame().expect("a decoded message encodes");
        let (k, b) = frame::read_frame(&mut &again[..], &limits).expect("an encoded message reads back");
        let m2 = ServerMessage::decode(k, &b).expect("an encoded message decodes");
        assert_eq!(m2.to_frame().unwrap(), again, "decode ∘ encode is not the identity on encodings");
        deep |= check_server(&m);
    }
    deep
}

/// What the server does with a client's message once decoded.
fn check_client(m: &ClientMessage) -> bool {
    match m {
        ClientMessage::Update(u) => {
            // As the engine validates it, against the task it names (so the checks after round,
            // task and nonce are reached), as received and with its digest recomputed (so a
            // mutated payload gets past the digest check).
            let mut resealed = u.clone();
            resealed.delta = reseal(&u.delta);
            let mut ok = false;
            for spec in specs() {
                let limits = DecodeLimits::for_spec(&spec);
                let expected = ExpectedTask { round: u.round, task_id: u.task_id, nonce: u.nonce };
                ok |= validate_update(u, &expected, &spec, &limits);
                validate_update(&resealed, &expected, &spec, &limits);
            }
            ok
        }
        ClientMessage::EvalReport(r) => r.metrics.validate().is_ok(),
        ClientMessage::Enroll(_) | ClientMessage::Heartbeat(_) => false,
    }
}

fn validate_update(u: &Update, expected: &ExpectedTask, spec: &PoolSpec, limits: &DecodeLimits) -> bool {
    match u.validate(expected, spec, limits) {
        Ok(delta) => {
            assert!(delta.validate(spec).is_ok(), "a validated update's delta does not fit the spec");
            true
        }
        Err(_) => false,
    }
}

/// What the client daemon does with a server's message once decoded.
fn check_server(m: &ServerMessage) -> bool {
    let global = match m {
        ServerMessage::Task(t) => {
            let _ = t.granted_ranks();
            &t.global
        }
        ServerMessage::EvalTask(t) => &t.global,
        _ => return false,
    };
    let mut ok = false;
    for enc in [global.clone(), reseal(global)] {
        for spec in specs() {
            // As `Participant::decode_global`.
            if let Ok(delta) = codec::decode(&enc, &DecodeLimits::for_spec(&spec)) {
                ok |= AdapterPool::from_transfer(&delta, &spec).is_ok();
            }
        }
    }
    ok
}

/// `enc` with its digest recomputed over its (possibly mutated) config, length and payload.
fn reseal(enc: &EncodedDelta) -> EncodedDelta {
    EncodedDelta::seal(enc.config, enc.raw_len, enc.payload.to_vec()).expect("sealing a payload cannot fail")
}

// ---------------------------------------------------------------------------------------------
// codec

/// The byte layout the `codec_decode` target reads an [`EncodedDelta`] from (and [`codec_seed`]
/// writes): a flags byte (bits 0–1 quantization: 0 fp32, 1 int8, 2 int4, 3 fp32; bit 2 a top-k
/// fraction follows; bit 3 zstd), the block size (`u32` LE), then the top-k fraction (`f32` LE) if
/// flagged, then with zstd its level (`i8`) and the decompressed length (`u64` LE), then the
/// payload. Without zstd the length is the payload's (the decoder refuses any other at once).
/// The result is sealed: its digest is right, so the decoder's later checks are reached.
pub fn codec_input(data: &[u8]) -> Option<EncodedDelta> {
    let (&flags, mut rest) = data.split_first()?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let quantization = match flags & 3 {
        1 => Quantization::Int8,
        2 => Quantization::Int4,
        _ => Quantization::F32,
    };
    let block_size = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let top_k = if flags & 4 != 0 { Some(f32::from_le_bytes(take(4)?.try_into().ok()?)) } else { None };
    let (zstd_level, raw_len) = if flags & 8 != 0 {
        let level = i32::from(take(1)?[0] as i8);
        (Some(level), Some(u64::from_le_bytes(take(8)?.try_into().ok()?)))
    } else {
        (None, None)
    };
    let payload = rest.to_vec();
    let raw_len = raw_len.unwrap_or(payload.len() as u64);
    let config = CodecConfig { top_k, quantization, block_size, zstd_level, ..CodecConfig::default() };
    EncodedDelta::seal(config, raw_len, payload).ok()
}

/// The bytes [`codec_input`] reads `enc` back from (its digest aside): the seeds' form.
pub fn codec_seed(enc: &EncodedDelta) -> Vec<u8> {
    let c = &enc.config;
    let q = match c.quantization {
        Quantization::F32 => 0,
        Quantization::Int8 => 1,
        Quantization::Int4 => 2,
    };
    let flags = q | if c.top_k.is_some() { 4 } else { 0 } | if c.zstd_level.is_some() { 8 } else { 0 };
    let mut out = vec![flags];
    out.extend_from_slice(&c.block_size.to_le_bytes());
    if let Some(k) = c.top_k {
        out.extend_from_slice(&k.to_le_bytes());
    }
    if let Some(level) = c.zstd_level {
        out.push(level as i8 as u8);
        out.extend_from_slice(&enc.raw_len.to_le_bytes());
    }
    out.extend_from_slice(&enc.payload);
    out
}

/// The `codec_decode` target. Returns true when the delta decoded and fits one of [`specs`].
pub fn fuzz_codec(data: &[u8]) -> bool {
    let Some(enc) = codec_input(data) else { return false };
    let mut tampered = enc.clone();
    tampered.digest.0[0] ^= 1;
    assert!(
        matches!(codec::decode(&tampered, &CODEC_LIMITS), Err(CodecError::DigestMismatch)),
        "a wrong digest must be the first thing refused"
    );
    let Ok(delta) = codec::decode(&enc, &CODEC_LIMITS) else { return false };
    let values: usize = delta.tensors.values().map(|t| t.numel()).sum();
    assert!(values as u64 <= CODEC_LIMITS.max_values, "{values} values decoded past the limit");
    if values <= REENCODE_MAX_VALUES {
        check_reencode(&delta, &enc.config);
    }
    specs().iter().any(|spec| delta.validate(spec).is_ok())
}

/// Re-encodes a decoded delta (whatever its values: NaN, infinities, subnormals) with `config`
/// and decodes it again: the same names, shapes and slots; with a lossless dense config the same
/// bits.
fn check_reencode(delta: &PoolDelta, config: &CodecConfig) {
    // zstd's high levels take long on nothing of interest here: the level does not change what
    // decodes.
    let config = CodecConfig { zstd_level: config.zstd_level.map(|_| 1), ..*config };
    let enc = codec::encode(delta, &config, None, 7).expect("a decoded delta re-encodes with its own config");
    let back = codec::decode(&enc, &DecodeLimits::default()).expect("a re-encoded delta decodes");
    assert_eq!(back.spec_hash, delta.spec_hash);
    assert_eq!(back.slots, delta.slots);
    assert!(back.tensors.keys().eq(delta.tensors.keys()), "tensor names changed");
    for (name, t) in &delta.tensors {
        let b = &back.tensors[name];
        assert_eq!(b.shape(), t.shape(), "{name}: shape changed");
        if config.quantization == Quantization::F32 && config.top_k.is_none() {
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(b.data()), bits(t.data()), "{name}: lossless round trip changed values");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// checkpoint

/// The `checkpoint` target: `data` as a checkpoint file's bytes, read as named tensors and as a
/// pool, then resealed ([`reseal_checkpoint`]) and read again. Returns true when a pool read and
/// verified (the seeds do).
pub fn fuzz_checkpoint(data: &[u8]) -> bool {
    let mut ok = read_checkpoint(data);
    if let Some(sealed) = reseal_checkpoint(data) {
        ok |= read_checkpoint(&sealed);
    }
    ok
}

fn read_checkpoint(bytes: &[u8]) -> bool {
    let path = Path::new("fuzz.safetensors");
    let tensors = checkpoint::tensors_from_bytes(path, bytes);
    match checkpoint::pool_from_bytes(path, bytes) {
        Ok((pool, meta)) => {
            assert!(tensors.is_ok(), "a pool read from bytes that do not read as tensors");
            assert_eq!(pool.spec_hash, meta.spec.hash(), "a pool read under another spec's hash");
            assert!(pool.validate(&meta.spec).is_ok());
            true
        }
        Err(_) => false,
    }
}

/// `bytes` re-serialised with the checks a mutation breaks made right again: the data digest
/// (`fedpool.data_sha256`, computed as `checkpoint` does: per tensor in name order, its name, its
/// shape as `u64` LE, its little-endian bytes) and, when `fedpool.spec` parses, `fedpool.spec_hash`.
/// So the fuzzer reaches the metadata, spec and shape checks behind the digest. None when the
/// bytes are not safetensors.
pub fn reseal_checkpoint(bytes: &[u8]) -> Option<Vec<u8>> {
    let st = safetensors::SafeTensors::deserialize(bytes).ok()?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let mut meta = header.metadata().clone().unwrap_or_default();
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let mut parts: Vec<Vec<u8>> = Vec::with_capacity(views.len() * 3);
    for (name, view) in &views {
        parts.push(name.as_bytes().to_vec());
        parts.push(view.shape().iter().flat_map(|&d| (d as u64).to_le_bytes()).collect());
        parts.push(view.data().to_vec());
    }
    meta.insert(META_DATA_SHA256.into(), Sha256::of_parts(parts.iter().map(Vec::as_slice)).to_hex());
    if let Some(spec) = meta.get("fedpool.spec").and_then(|s| serde_json::from_str::<PoolSpec>(s).ok()) {
        meta.insert("fedpool.spec_hash".into(), spec.hash().0.to_hex());
    }
    safetensors::serialize(views, Some(meta)).ok()
}

/// A checkpoint's bytes for `pool` of `spec`, as the server writes them (for seeds and tests).
pub fn checkpoint_bytes(pool: &AdapterPool, spec: &PoolSpec, round: u64) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("fedpool-fuzz-{}-{round}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    let path = dir.join("round.safetensors");
    let meta = checkpoint::CheckpointMeta {
        round: fedpool_common::Round(round),
        spec: spec.clone(),
        backbone: fedpool_common::BackboneFingerprint(Sha256::of(b"fuzz backbone")),
        created_at: "2026-01-01T00:00:00Z".into(),
    };
    checkpoint::write_pool(&path, pool, &meta).expect("the pool fits its spec");
    let bytes = std::fs::read(&path).expect("the checkpoint just written");
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

// ---------------------------------------------------------------------------------------------
// configs

/// The folder relative paths of a fuzzed config are resolved against (it does not exist).
#[cfg(feature = "config")]
const CONFIG_BASE: &str = "/nonexistent/fedpool-fuzz";

/// Most values of a spec for which the `server_config` target builds the merge and the rank
/// planner (they allocate per value).
#[cfg(feature = "config")]
const CONFIG_MAX_VALUES: usize = 1 << 16;

/// The `server_config` target: `data` as `server.toml`. Returns true when it parsed and checked.
#[cfg(feature = "config")]
pub fn fuzz_server_config(data: &[u8]) -> bool {
    use fedpool_server::config::ServerConfig;
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(c) = ServerConfig::parse(text, Path::new(CONFIG_BASE)) else { return false };
    // What `check` accepted, `prepare` derives without failing.
    let _ = c.frame_limits();
    let _ = c.net_setup();
    let _ = c.revocation_list_path();
    c.download_codec.to_codec().expect("checked by parse");
    let aggregate = c.aggregate.to_config().expect("checked by parse");
    if c.backbone_fingerprint.is_some() {
        let _ = c.backbone(); // backbone_dir would hash files: not fuzzed
    }
    if c.pool.is_none() {
        return true; // spec_file would read a file: not fuzzed
    }
    let Ok(spec) = c.pool_spec() else { return true };
    let Some(values) = checked_num_params(&spec) else { return true };
    let limits = DecodeLimits::for_spec(&spec);
    assert_eq!(limits.max_values, values as u64);
    if values <= CONFIG_MAX_VALUES {
        let _ = c.budget.merge(&spec, aggregate);
        let _ = c.budget.planner(&spec, c.deadline, c.rounds);
    }
    true
}

/// The spec's value count, None when it overflows a `usize`.
#[cfg(feature = "config")]
fn checked_num_params(spec: &PoolSpec) -> Option<usize> {
    spec.layout()
        .iter()
        .try_fold(0usize, |sum, l| sum.checked_add(l.shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d))?))
}

/// The `client_config` target: `data` as `client.toml`. Returns true when it parsed and checked.
#[cfg(feature = "config")]
pub fn fuzz_client_config(data: &[u8]) -> bool {
    use fedpool_client::session::DaemonConfig;
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(c) = DaemonConfig::parse(text, Path::new(CONFIG_BASE)) else { return false };
    // What `validate` accepted, the daemon derives without failing.
    c.shard().expect("checked by parse");
    c.device_choice().expect("checked by parse");
    let options = c.adapter_options().expect("checked by parse");
    c.upload_codec().expect("checked by parse");
    let _ = c.train.round_config(options.choice, c.seed);
    if c.server.is_some() {
        c.server_addr().expect("an address given inline");
    }
    true
}

/// Every file of a seed folder, by name (for tests).
pub fn read_seeds(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let entry = entry.unwrap();
        out.insert(entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap());
    }
    out
}
