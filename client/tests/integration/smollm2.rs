//! SmolLM2-135M-Instruct (the fetched Q4_1 GGUF) against transformers' and PEFT's own outputs
//! (tests/fixtures/smollm2, `make_smollm2_fixtures.py`: the GGUF dequantized to f32): token ids
//! exact; logits (to 2e-3; 3e-5 seen), losses and all greedy tokens of the dequantized model and
//! of the 4-bit one; the PEFT LoRA adapter imported gives PEFT's logits.

use std::path::PathBuf;

use candle_core::Device;
use fedpool_client::model::{mean_nll, GgufFile, GgufWeights, Hooks, LlamaModel};
use fedpool_client::peft;
use fedpool_client::train::AdapterTensors;
use fedpool_common::AdapterKind;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    base: Vec<Prompt>,
    with_lora: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    prompt: String,
    ids: Vec<u32>,
    last_logits_first64: Vec<f32>,
    last_argmax: u32,
    mean_nll: f32,
    greedy16: Vec<u32>,
}

/// `$FEDPOOL_ASSETS/smollm2/…gguf`, else `<workspace>/assets/…`; fails (never skips) when absent.
pub fn smollm2_gguf() -> PathBuf {
    let dir = match std::env::var_os("FEDPOOL_ASSETS") {
        Some(assets) => PathBuf::from(assets).join("smollm2"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/smollm2"),
    };
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "SmolLM2 is not at {}: run scripts/fetch-assets.sh first", path.display());
    path
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2").join(name)
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

/// What fedpool computes for one prompt: the last position's first 64 logits, its arg-max, the
/// mean NLL of the prompt, and 16 greedy tokens.
struct Output {
    first64: Vec<f32>,
    argmax: u32,
    nll: f32,
    greedy: Vec<u32>,
}

fn run(model: &LlamaModel, ids: &[u32], hooks: &Hooks) -> Output {
    let rows = vec![ids.to_vec()];
    let (x, _) = model.hidden(&rows, hooks).unwrap();
    let logits = model.logits(&x.narrow(0, ids.len() - 1, 1).unwrap()).unwrap().squeeze(0).unwrap();
    let all = logits.to_vec1::<f32>().unwrap();
    let argmax = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    let nll = mean_nll(model, &rows, hooks).unwrap()[0];
    let greedy = model.generate(&rows, hooks, 16, &[2]).unwrap().remove(0);
    Output { first64: all[..64].to_vec(), argmax, nll, greedy }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Checks `model` with `hooks` against `want`: logits within `logit_tol`, the arg-max, the loss
/// and every greedy token. Returns the largest logit difference.
fn check(what: &str, model: &LlamaModel, hooks: &Hooks, want: &[Prompt], logit_tol: f32) -> f32 {
    let mut worst = 0.0f32;
    for p in want {
        let got = run(model, &p.ids, hooks);
        let d = max_diff(&got.first64, &p.last_logits_first64);
        worst = worst.max(d);
        assert!(d < logit_tol, "{what} {:?}: logits differ by {d}", p.prompt);
        assert_eq!(got.argmax, p.last_argmax, "{what} {:?}", p.prompt);
        assert!(
            (got.nll - p.mean_nll).abs() < logit_tol / 10.0,
            "{what} {:?}: nll {} vs {}",
            p.prompt,
            got.nll,
            p.mean_nll
        );
        assert_eq!(got.greedy, p.greedy16, "{what} {:?}", p.prompt);
    }
    worst
}

#[test]
fn smollm2_tokenizer_reproduces_transformers_ids() {
    let tokenizer = GgufFile::open(smollm2_gguf()).unwrap().tokenizer().unwrap();
    for p in reference().base {
        let ids = tokenizer.encode(p.prompt.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(ids, p.ids, "{:?}", p.prompt);
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), p.prompt);
    }
}

#[test]
fn smollm2_dequantized_and_4bit_reproduce_transformers_and_peft() {
    let reference = reference();
    let path = smollm2_gguf();
    let (lora_spec, lora_pool) = {
        let model = LlamaModel::load(&path, &Device::Cpu).unwrap();
        peft::import(&fixture("lora"), model.config()).unwrap()
    };
    assert_eq!(lora_spec.kind, AdapterKind::Lora);
    assert_eq!((lora_spec.max_rank, lora_spec.lora_alpha, lora_spec.targets.len()), (8, 16.0, 60));
    assert!(lora_spec.head.is_none());
    let adapters = AdapterTensors::from_pool(&lora_spec, &lora_pool, false, &Device::Cpu).unwrap();
    let one_slot = fedpool_client::select::Selection { batch: 1, k: 1, slots: vec![0] };
    let lora = adapters.hooks(&one_slot).unwrap();

    // The GGUF dequantized to f32, as transformers loads it: the same model up to f32 rounding.
    let f32_model = LlamaModel::load_gguf(&path, GgufWeights::Dequantized, &Device::Cpu).unwrap();
    let base = check("f32 base", &f32_model, &Hooks::new(), &reference.base, 2e-3);
    let peft = check("f32 + PEFT LoRA", &f32_model, &lora, &reference.with_lora, 2e-3);
    eprintln!("dequantized: max |Δlogit| base {base:.2e}, with the PEFT LoRA {peft:.2e}");
    let f32_bytes = f32_model.weight_bytes();
    drop(f32_model);

    // The 4-bit base as stored: each product dequantizes its weight band by band, so the numbers
    // are the same f32 products of the same stored values.
    let q = LlamaModel::load(&path, &Device::Cpu).unwrap();
    assert!(q.weight_bytes() * 5 < f32_bytes, "{} vs {f32_bytes}", q.weight_bytes());
    let base = check("4-bit base", &q, &Hooks::new(), &reference.base, 2e-3);
    let peft = check("4-bit + PEFT LoRA", &q, &lora, &reference.with_lora, 2e-3);
    eprintln!("4-bit: max |Δlogit| base {base:.2e}, with the PEFT LoRA {peft:.2e}");

    // The LoRA moves the logits (the check above is not the base's logits twice).
    let moved = max_diff(&reference.base[0].last_logits_first64, &reference.with_lora[0].last_logits_first64);
    assert!(moved > 0.05, "{moved}");
}

#[test]
fn smollm2_peft_adapter_exports_with_the_fixtures_names_shapes_and_keys() {
    let config = fedpool_client::model::LlamaConfig::from_gguf(&GgufFile::open(smollm2_gguf()).unwrap()).unwrap();
    let (spec, pool) = peft::import(&fixture("lora"), &config).unwrap();
    let out = tempfile::tempdir().unwrap();
    peft::export(out.path(), &spec, &pool, "SmolLM2-135M-Instruct.Q4_1.gguf").unwrap();
    let (spec2, pool2) = peft::import(out.path(), &config).unwrap();
    assert_eq!(spec2, spec);
    assert_eq!(pool2.tensors, pool.tensors, "re-imported bitwise");

    let shapes = |dir: &std::path::Path| {
        let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        t.into_iter().map(|(k, v)| (k, v.dims().to_vec())).collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(shapes(out.path()), shapes(&fixture("lora")));
    let read = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
    };
    let (ours, theirs) = (read(out.path()), read(&fixture("lora")));
    for (key, value) in ours.as_object().unwrap() {
        assert!(theirs.get(key).is_some(), "PEFT has no config key {key}");
        if ["peft_type", "task_type", "r", "lora_alpha", "bias", "fan_in_fan_out", "modules_to_save"]
            .contains(&key.as_str())
        {
            assert_eq!(value, &theirs[key], "{key}");
        }
    }
    let modules = |v: &serde_json::Value| {
        let mut m: Vec<String> =
            v["target_modules"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().into()).collect();
        m.sort();
        m
    };
    assert_eq!(modules(&ours), modules(&theirs));
}
