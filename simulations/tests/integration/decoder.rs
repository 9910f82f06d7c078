//! A federation of a decoder: a tiny random Llama stored as a Q8_0 GGUF (its tokenizer in the
//! metadata), 4 virtual clients over one quantized base, a prompt/response file split by label
//! (non-IID), federated LoRA and a FedIns SSF pool judged by generation.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use fedpool_client::learner::{Examples, Learner};
use fedpool_client::model::{write_random_gguf, LlamaConfig};
use fedpool_sim::driver::{self, Progress};
use fedpool_sim::experiment::Experiment;
use fedpool_sim::population::Population;

struct Quiet;
impl Progress for Quiet {}

/// "the N" → "in", "an N" → "on", as JSONL with prompt and response columns.
fn write_data(path: &Path) {
    let lines: Vec<String> = (0..96u32)
        .map(|i| {
            let the = i.is_multiple_of(2);
            serde_json::json!({"prompt": format!("{} {}", if the { "the" } else { "an" }, i * 7 % 100),
                               "response": if the { "in" } else { "on" }})
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

fn experiment(dir: &Path, adapter: &str) -> Experiment {
    write_random_gguf(
        dir.join("tiny.gguf"),
        &LlamaConfig { vocab_size: 128, ..LlamaConfig::tiny() },
        GgmlDType::Q8_0,
        3,
    )
    .unwrap();
    write_data(&dir.join("pairs.jsonl"));
    let text = format!(
        r#"name = "decoder"
seed = 1
model = "tiny.gguf"
data = "pairs.jsonl"
clients = 4
test_fraction = 0.25
[partition]
scheme = "dirichlet"
alpha = 0.5
[federation]
rounds = 4
local_steps = 10
deadline_s = 600.0
seconds_per_sample = 0.01
[adapter]
{adapter}
[train]
batch_size = 8
max_len = 32
lr = 0.03
"#
    );
    let path = dir.join("exp.toml");
    std::fs::write(&path, text).unwrap();
    Experiment::load(&path).unwrap()
}

#[test]
fn a_federated_decoder_learns_with_lora_and_an_ssf_pool() {
    for adapter in ["kind = \"lora\"\nrank = 4", "kind = \"ssf-pool\"\npool_size = 4\ntop_k = 2"] {
        let dir = tempfile::tempdir().unwrap();
        let exp = experiment(dir.path(), adapter);
        let pop = Population::load(&exp).unwrap();
        assert!(matches!(pop.learner, Learner::Decoder(_)));
        assert!(pop.spec.head.is_none());
        assert!(matches!(pop.clients[0].train, Examples::Lm(_)));
        let out = driver::run(&exp, &pop, &mut Quiet).unwrap();
        assert_eq!(out.rows.len(), 4, "{adapter}");
        let first = out.rows[0].accuracy.unwrap();
        let last = out.rows[3].accuracy.unwrap();
        eprintln!("{adapter:?}: exact match by round {:?}", out.rows.iter().map(|r| r.accuracy).collect::<Vec<_>>());
        assert!(last >= 0.9 && last >= first, "{adapter}: {first} → {last}");
        assert!(out.rows.iter().all(|r| r.bytes_up > 0 && r.bytes_down > 0));
        assert!(out.rows[3].loss.unwrap() < out.rows[0].loss.unwrap() + 1e-9);
    }
}
