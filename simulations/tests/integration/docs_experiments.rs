//! Every experiment file the README's studies run (docs/*/*.toml) parses and validates, its
//! codecs and rank policy included: a study found broken after its first hour is a lost hour.

use std::path::Path;

use fedpool_common::adapter::{HeadSpec, TargetSpec};
use fedpool_common::PoolSpec;
use fedpool_sim::experiment::Experiment;

#[test]
fn every_study_experiment_in_docs_parses_with_its_codecs_and_rank_policy() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut checked = 0;
    for folder in std::fs::read_dir(&docs).expect("docs/") {
        let folder = folder.expect("entry").path();
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for file in entries {
            let path = file.expect("entry").path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let exp = Experiment::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            exp.upload_codec.to_schedule().unwrap_or_else(|e| panic!("{}: upload_codec: {e}", path.display()));
            exp.download_codec.to_codec().unwrap_or_else(|e| panic!("{}: download_codec: {e}", path.display()));
            if exp.budget.policy != "none" {
                // MiniLM's q and v targets at the experiment's rank: the planner takes the policy.
                let targets = (0..6)
                    .flat_map(|l| ["query", "value"].map(|m| format!("bert.encoder.layer.{l}.attention.self.{m}")))
                    .map(|name| TargetSpec { name, dim_in: 384, dim_out: 384 })
                    .collect();
                let spec = PoolSpec::adalora(targets, exp.adapter.rank, 16.0, Some(HeadSpec::new(384, 2)));
                exp.budget
                    .planner(&spec, exp.deadline(), exp.federation.rounds)
                    .unwrap_or_else(|e| panic!("{}: budget: {e}", path.display()));
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} experiment files found under {}", docs.display());
}
