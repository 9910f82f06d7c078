//! The usage-weighted merge of SSF pools (FedIns with per-instance selection): each carried slot
//! row counts with the number of the client's examples that selected it.

use std::collections::BTreeMap;

use fedpool_common::adapter::KEYS;
use fedpool_common::{AdapterPool, HostTensor, PoolDelta, PoolSpec, SlotUsage, TargetSpec};
use fedpool_server::aggregate::{AggregateConfig, Aggregator, Merge};

const SCALE: &str = "t.ssf_scale";
const SHIFT: &str = "t.ssf_shift";

/// One SSF target of width 2, a pool of P = 4 slots with keys of width 1, top-2 selection.
fn spec() -> PoolSpec {
    PoolSpec::ssf_pool(vec![TargetSpec { name: "t".into(), dim_in: 2, dim_out: 2 }], 1, 4, 2, None)
}

/// Global: scale 1, shift 0, keys 0.
fn global(spec: &PoolSpec) -> AdapterPool {
    let mut g = AdapterPool::zeros(spec);
    g.tensors.get_mut(SCALE).unwrap().data_mut().fill(1.0);
    g
}

/// One carried slot of an update: (slot, usage count, scale row, shift row, key).
type Row = (u32, u64, [f32; 2], [f32; 2], f32);

/// A client's update carrying these slot rows.
fn update(spec: &PoolSpec, rows: &[Row]) -> PoolDelta {
    let n = rows.len();
    let scale = rows.iter().flat_map(|r| r.2).collect();
    let shift = rows.iter().flat_map(|r| r.3).collect();
    let keys = rows.iter().map(|r| r.4).collect();
    let tensors = BTreeMap::from([
        (SCALE.to_string(), HostTensor::new(vec![n, 2], scale).unwrap()),
        (SHIFT.to_string(), HostTensor::new(vec![n, 2], shift).unwrap()),
        (KEYS.to_string(), HostTensor::new(vec![n, 1], keys).unwrap()),
    ]);
    let usage = SlotUsage { slots: rows.iter().map(|r| r.0).collect(), counts: rows.iter().map(|r| r.1).collect() };
    let d = PoolDelta { spec_hash: spec.hash(), slots: Some(usage), tensors };
    d.validate(spec).unwrap();
    d
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-6, "{what}[{i}] = {g}, expected {w} (all: {got:?})");
    }
}

#[test]
fn usage_weighted_merge_matches_a_hand_computed_example() {
    let spec = spec();
    let g = global(&spec);
    // Client A, 3 examples: slot 0 used by 3, slot 1 by 1.
    let a = update(&spec, &[(0, 3, [0.3, 0.6], [1.0, 0.0], 0.0), (1, 1, [1.0, -1.0], [0.0, 0.0], 0.0)]);
    // Client B, 2 examples: slot 0 used by 1, slot 2 by 2.
    let b = update(&spec, &[(0, 1, [0.7, -0.2], [-1.0, 2.0], 0.0), (2, 2, [0.5, -0.25], [0.0, 0.0], 0.0)]);
    // Client C, 3 examples: only slot 1, used by all 3. Nobody used slot 3.
    let c = update(&spec, &[(1, 3, [0.2, 0.2], [4.0, -4.0], 8.0)]);

    let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    agg.begin(&g).unwrap();
    agg.fold(&a, 3).unwrap();
    agg.fold(&b, 2).unwrap();
    agg.fold(&c, 3).unwrap();
    let out = agg.finish(&g).unwrap();
    out.validate(&spec).unwrap();

    // By hand, new_row = global_row + Σ c Δ / Σ c per slot:
    // slot 0 (A:3, B:1): 1 + (3·0.3 + 1·0.7)/4 = 1.4,  1 + (3·0.6 − 1·0.2)/4 = 1.4
    // slot 1 (A:1, C:3): 1 + (1·1.0 + 3·0.2)/4 = 1.4,  1 + (−1·1.0 + 3·0.2)/4 = 0.9
    // slot 2 (B:2 only): 1 + 0.5 = 1.5,                1 − 0.25 = 0.75
    // slot 3 (nobody):   unchanged, 1 and 1.
    assert_close(out.tensors[SCALE].data(), &[1.4, 1.4, 1.4, 0.9, 1.5, 0.75, 1.0, 1.0], SCALE);
    // slot 0: (3·1 − 1·1)/4 = 0.5, (0 + 1·2)/4 = 0.5; slot 1: (0 + 3·4)/4 = 3, (0 − 3·4)/4 = −3.
    assert_close(out.tensors[SHIFT].data(), &[0.5, 0.5, 3.0, -3.0, 0.0, 0.0, 0.0, 0.0], SHIFT);
    // Keys: only C moved slot 1's key, by 8 with weight 3 of 4.
    assert_close(out.tensors[KEYS].data(), &[0.0, 6.0, 0.0, 0.0], KEYS);
}

#[test]
fn with_one_slot_the_pool_merge_is_weighted_fedavg() {
    let spec = PoolSpec::ssf(vec![TargetSpec { name: "t".into(), dim_in: 2, dim_out: 2 }], None);
    let mut g = AdapterPool::zeros(&spec);
    g.tensors.get_mut(SCALE).unwrap().data_mut().fill(1.0);
    let one = |scale: [f32; 2], examples: u64| {
        let tensors = BTreeMap::from([
            (SCALE.to_string(), HostTensor::new(vec![1, 2], scale.to_vec()).unwrap()),
            (SHIFT.to_string(), HostTensor::zeros(&[1, 2])),
        ]);
        // P = 1: every example selects the only slot, so its count is the example count.
        PoolDelta { spec_hash: spec.hash(), slots: Some(SlotUsage { slots: vec![0], counts: vec![examples] }), tensors }
    };
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    agg.begin(&g).unwrap();
    agg.fold(&one([1.0, 0.0], 1), 1).unwrap();
    agg.fold(&one([0.0, 2.0], 3), 3).unwrap();
    let out = agg.finish(&g).unwrap();
    // FedAvg with weights 1 and 3: 1 + (1·1 + 3·0)/4, 1 + (0 + 3·2)/4.
    assert_close(out.tensors[SCALE].data(), &[1.25, 2.5], SCALE);
}

#[test]
fn usage_counts_beyond_the_examples_are_refused() {
    let spec = spec();
    let g = global(&spec);
    let mut agg = Aggregator::new(spec.clone(), AggregateConfig::default()).unwrap();
    agg.begin(&g).unwrap();
    // 2 examples cannot select one slot 3 times.
    let d = update(&spec, &[(0, 3, [0.0; 2], [0.0; 2], 0.0)]);
    let e = agg.fold(&d, 2).unwrap_err().to_string();
    assert!(e.contains("slot 0") && e.contains("usage count 3"), "{e}");
    // 2 examples with top-2 make 4 selections, not 2 + 2 + 1.
    let d = update(
        &spec,
        &[(0, 2, [0.0; 2], [0.0; 2], 0.0), (1, 2, [0.0; 2], [0.0; 2], 0.0), (3, 1, [0.0; 2], [0.0; 2], 0.0)],
    );
    let e = agg.fold(&d, 2).unwrap_err().to_string();
    assert!(e.contains("sum to 5"), "{e}");
    assert_eq!(agg.updates_folded(), 0);
}
