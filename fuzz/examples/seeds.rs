//! Writes the fuzz targets' seed corpora into `fuzz/seeds/<target>/`: real frames (every message
//! kind, an SSF and a LoRA update, tasks with encoded global pools), encoded deltas in every codec
//! scheme, real checkpoint files, and the example configs with variants.
//!
//! `cd fuzz && cargo run --no-default-features --example seeds` (deterministic: the same bytes
//! every run; `tests/seeds.rs` checks every seed is accepted all the way by its target).

use std::collections::BTreeMap;
use std::path::Path;

use fedpool_common::adapter::{AdapterPool, PoolSpec, SlotUsage};
use fedpool_common::codec::{encode, CodecConfig, EncodedDelta, Quantization};
use fedpool_common::wire::*;
use fedpool_common::{checkpoint, BackboneFingerprint, HostTensor, Nonce, PoolDelta, Round, Sha256, TaskId};
use fedpool_fuzz::{checkpoint_bytes, codec_seed, specs};

const SERVER_EXAMPLE: &str = include_str!("../../server/server.example.toml");
const CLIENT_EXAMPLE: &str = include_str!("../../client/client.example.toml");

/// A server.toml for a standard LoRA pool under importance budgets and FedAdam: the sections the
/// example leaves commented out.
const SERVER_LORA: &str = r#"listen = "127.0.0.1:0"
state_dir = "state"
ca_cert = "certs/ca.pem"
server_cert = "certs/server.pem"
server_key = "certs/server.key"
metrics_listen = "127.0.0.1:9464"
backbone_fingerprint = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
rounds = 10
clients_per_round = 4
quorum = 3
over_selection = 1.5
min_clients_to_start = 3
deadline = "30s"
eval_deadline = "10s"
local_steps = 20
keep_alive = "5s"
max_frame_bytes = 1048576

[download_codec]
quantization = "int8"
top_k = 0.5
zstd_level = 3

[aggregate]
strategy = "fedadam"
clip_norm = 10.0
lora_merge = "exact"

[budget]
policy = "importance"
merge = "exact"
init_rank = 4
target_rank = 2
expected_compute_s = 5

[budget.upload_codec]
quantization = "int4"

[pool]
kind = "AdaLora"
pool_size = 1
top_k = 1
key_dim = 0
max_rank = 4
lora_alpha = 8.0

[[pool.targets]]
name = "layer.0.query"
dim_in = 8
dim_out = 6

[[pool.targets]]
name = "layer.1.query"
dim_in = 8
dim_out = 6

[pool.head]
dim_in = 8
num_labels = 2
"#;

/// A server.toml with the trimmed mean, rank classes and a spec file.
const SERVER_CLASSES: &str = r#"state_dir = "/var/lib/fedpool"
ca_cert = "/etc/fedpool/ca.pem"
server_cert = "/etc/fedpool/server.pem"
server_key = "/etc/fedpool/server.key"
revocation_list = "revoked.txt"
backbone_fingerprint = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"
spec_file = "spec.json"
rounds = 3
clients_per_round = 2
quorum = 1
deadline = "2m"
local_steps = 5
evaluate = false
heartbeat = "1s"
idle_timeout = "3s"

[aggregate]
strategy = "trimmed-mean"
trim_fraction = 0.2
max_updates = 16

[budget]
policy = "classes"
merge = "zero-pad"
classes = [{ min_upload_bps = 2e6, rank = 8 }, { min_upload_bps = 0, rank = 2 }]
"#;

/// A client.toml for LoRA with a server address file and a lossless zstd upload.
const CLIENT_LORA: &str = r#"server_addr_file = "../server/state/listen.addr"
ca_cert = "certs/ca.pem"
cert = "certs/clients/b.pem"
key = "certs/clients/b.key"
model = "model.gguf"
data = "trec"
max_examples = 1000
labels = ["neg", "pos"]
state_dir = "state"
device = "cpu"
seed = 7
declared_upload_bps = 1000000
declared_download_bps = 5000000
idle_timeout = "10s"
reconnect_initial = "100ms"
reconnect_max = "5s"

[adapter]
kind = "lora"
rank = 4
alpha = 8.0

[train]
batch_size = 4
max_len = 32
lora_variant = "ffa"

[upload_codec]
quantization = "fp32"
zstd_level = 19
"#;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let [ssf, lora] = specs();
    let (ssf_delta, lora_delta) = (ssf_update_delta(&ssf), lora_update_delta(&lora));
    let int8_top = CodecConfig { top_k: Some(0.5), quantization: Quantization::Int8, ..Default::default() };
    let int4 = CodecConfig { quantization: Quantization::Int4, block_size: 16, ..Default::default() };
    let zstd = CodecConfig { zstd_level: Some(3), ..Default::default() };

    // frame: one of each message kind, as on the wire.
    let t = ExpectedTask { round: Round(3), task_id: TaskId(11), nonce: Nonce([7; 16]) };
    let update = |delta: &PoolDelta, cfg: &CodecConfig, importance| Update {
        round: t.round,
        task_id: t.task_id,
        nonce: t.nonce,
        examples: 40,
        delta: encode(delta, cfg, None, 1).unwrap(),
        metrics: TrainMetrics { loss: 0.5, accuracy: 0.75, steps: 20, seconds: 1.5 },
        importance,
    };
    let global = |spec: &PoolSpec, cfg: &CodecConfig| -> EncodedDelta {
        encode(&AdapterPool::init(spec, 2).unwrap().to_transfer(spec).unwrap(), cfg, None, 0).unwrap()
    };
    let lora_importance = vec![TripletImportance { target: "layer.0.query".into(), scores: vec![0.4, 0.3, 0.2, 0.1] }];
    let client = [
        (
            "enroll",
            ClientMessage::Enroll(Enroll {
                protocol_version: PROTOCOL_VERSION,
                backbone: BackboneFingerprint(Sha256::of(b"fuzz backbone")),
                spec_hash: ssf.hash(),
                declared_upload_bps: Some(10_000_000),
                declared_download_bps: None,
                examples: 120,
                software: "fedpool-client 0.1.0".into(),
            }),
        ),
        ("update-ssf-top50-int8", ClientMessage::Update(update(&ssf_delta, &int8_top, vec![]))),
        ("update-lora-fp32", ClientMessage::Update(update(&lora_delta, &CodecConfig::default(), lora_importance))),
        ("heartbeat-client", ClientMessage::Heartbeat(Heartbeat { seq: 9 })),
        (
            "eval-report",
            ClientMessage::EvalReport(EvalReport {
                round: Round(3),
                task_id: TaskId(12),
                metrics: EvalMetrics { accuracy: 0.8, macro_f1: 0.7, loss: 0.45, examples: 50 },
            }),
        ),
    ];
    let server = [
        (
            "welcome",
            ServerMessage::Welcome(Welcome { client_name: "hospital-a".into(), round: Round(2), heartbeat_secs: 10 }),
        ),
        (
            "task-ssf-fp32",
            ServerMessage::Task(Box::new(RoundTask {
                round: t.round,
                task_id: t.task_id,
                nonce: t.nonce,
                global: global(&ssf, &CodecConfig::default()),
                rank_budget: vec![],
                local_steps: 20,
                deadline_ms: 300_000,
            })),
        ),
        (
            "task-lora-budget-zstd",
            ServerMessage::Task(Box::new(RoundTask {
                round: t.round,
                task_id: TaskId(13),
                nonce: Nonce([9; 16]),
                global: encode(
                    &AdapterPool::init(&lora, 3)
                        .unwrap()
                        .to_transfer(&lora)
                        .unwrap()
                        .truncate_lora(&lora, &BTreeMap::from([("layer.0.query".to_string(), 2)]))
                        .unwrap(),
                    &zstd,
                    None,
                    0,
                )
                .unwrap(),
                rank_budget: vec![TargetBudget { target: "layer.0.query".into(), rank: 2 }],
                local_steps: 20,
                deadline_ms: 300_000,
            })),
        ),
        (
            "eval-task-int8",
            ServerMessage::EvalTask(Box::new(EvalTask {
                round: Round(3),
                task_id: TaskId(12),
                global: global(&ssf, &int8_top),
                deadline_ms: 60_000,
            })),
        ),
        ("ack", ServerMessage::Ack(Ack { round: Round(3), task_id: TaskId(11) })),
        (
            "reject",
            ServerMessage::Reject(Reject {
                round: Some(Round(3)),
                task_id: Some(TaskId(11)),
                reason: RejectReason::WrongNonce,
                detail: "nonce does not match the task's".into(),
            }),
        ),
    ];
    let dir = reset(&root, "frame");
    for (name, m) in &client {
        write(&dir, &format!("{name}.bin"), &m.to_frame().unwrap());
    }
    for (name, m) in &server {
        write(&dir, &format!("{name}.bin"), &m.to_frame().unwrap());
    }

    // codec_decode: every scheme, SSF (with slots) and LoRA deltas.
    let dir = reset(&root, "codec_decode");
    let top10_int4_zstd = CodecConfig { top_k: Some(0.1), zstd_level: Some(1), ..int4 };
    for (name, delta, cfg) in [
        ("ssf-fp32", &ssf_delta, CodecConfig::default()),
        ("ssf-top50-int8", &ssf_delta, int8_top),
        ("lora-int4-block16", &lora_delta, int4),
        ("lora-fp32-zstd3", &lora_delta, zstd),
        ("lora-top10-int4-zstd1", &lora_delta, top10_int4_zstd),
    ] {
        write(&dir, &format!("{name}.bin"), &codec_seed(&encode(delta, &cfg, None, 5).unwrap()));
    }

    // checkpoint: pool checkpoints of both specs and a plain tensor file (a client's residual).
    let dir = reset(&root, "checkpoint");
    write(&dir, "round-ssf.safetensors", &checkpoint_bytes(&AdapterPool::init(&ssf, 1).unwrap(), &ssf, 4));
    write(&dir, "round-lora.safetensors", &checkpoint_bytes(&AdapterPool::init(&lora, 1).unwrap(), &lora, 0));
    let tmp = std::env::temp_dir().join(format!("fedpool-fuzz-residual-{}.safetensors", std::process::id()));
    let residual =
        BTreeMap::from([("layer.0.query.ssf_scale#3".to_string(), HostTensor::new(vec![8], vec![0.25; 8]).unwrap())]);
    checkpoint::write_tensors(&tmp, &residual, BTreeMap::new()).unwrap();
    write(&dir, "residual.safetensors", &std::fs::read(&tmp).unwrap());
    std::fs::remove_file(&tmp).unwrap();

    // configs: the examples as shipped, and variants that reach the other sections.
    let dir = reset(&root, "server_config");
    write(&dir, "server.example.toml", SERVER_EXAMPLE.as_bytes());
    write(&dir, "server-adalora-importance.toml", SERVER_LORA.as_bytes());
    write(&dir, "server-classes-spec-file.toml", SERVER_CLASSES.as_bytes());
    let dir = reset(&root, "client_config");
    write(&dir, "client.example.toml", CLIENT_EXAMPLE.as_bytes());
    write(&dir, "client-lora.toml", CLIENT_LORA.as_bytes());
}

/// An SSF-pool update: every value moved a little, slots 0 and 3 used.
fn ssf_update_delta(spec: &PoolSpec) -> PoolDelta {
    let start = AdapterPool::init(spec, 1).unwrap();
    let mut trained = start.clone();
    for t in trained.tensors.values_mut() {
        t.data_mut().iter_mut().enumerate().for_each(|(i, v)| *v += 0.01 * ((i % 7) as f32 - 3.0));
    }
    trained.delta_from(&start).unwrap().restrict_to_slots(SlotUsage { slots: vec![0, 3], counts: vec![5, 2] }).unwrap()
}

/// A LoRA update: the whole pool's change from its start.
fn lora_update_delta(spec: &PoolSpec) -> PoolDelta {
    let start = AdapterPool::init(spec, 1).unwrap();
    let mut trained = start.clone();
    for t in trained.tensors.values_mut() {
        t.data_mut().iter_mut().enumerate().for_each(|(i, v)| *v += 0.02 * ((i % 5) as f32 - 2.0));
    }
    trained.delta_from(&start).unwrap()
}

fn reset(root: &Path, target: &str) -> std::path::PathBuf {
    let dir = root.join(target);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
    println!("{:>8} bytes  {}", bytes.len(), dir.join(name).display());
}
