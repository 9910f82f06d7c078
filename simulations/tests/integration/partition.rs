//! Client data partitions: every scheme is a disjoint cover of real items, deterministic in its
//! seed, and shows the skew it promises; split files are honoured exactly.

use std::collections::{BTreeSet, HashSet};

use fedpool_sim::partition::{
    default_client_names, dirichlet, from_split_file, groups, iid, to_split_file, NamedPartition, Partition,
    PartitionError,
};
use proptest::prelude::*;

/// `n` items with ids `1000 + 7i` (not 0..n, so ids and indices cannot be confused), labels
/// `i % num_labels` and groups `(i / 3) % num_groups`.
fn items(n: usize, num_labels: usize, num_groups: usize) -> Vec<fedpool_sim::partition::Item> {
    (0..n)
        .map(|i| fedpool_sim::partition::Item {
            id: 1000 + 7 * i as u64,
            label: i % num_labels,
            group: Some((i / 3) % num_groups),
        })
        .collect()
}

/// Sizes add up, no id twice, every id real, each client's ids sorted.
fn assert_disjoint_cover(p: &Partition, items: &[fedpool_sim::partition::Item]) {
    assert_eq!(p.sizes().iter().sum::<usize>(), items.len(), "sizes add up to the item count");
    let real: HashSet<u64> = items.iter().map(|it| it.id).collect();
    let mut seen = HashSet::new();
    for ids in &p.clients {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "client ids sorted");
        for id in ids {
            assert!(real.contains(id), "id {id} is a real item");
            assert!(seen.insert(*id), "id {id} held by one client only");
        }
    }
    p.validate(items).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn iid_is_a_balanced_disjoint_cover(n in 0usize..400, clients in 1usize..20, seed: u64) {
        let its = items(n, 3, 4);
        let p = iid(&its, clients, seed).unwrap();
        prop_assert_eq!(p.num_clients(), clients);
        assert_disjoint_cover(&p, &its);
        let sizes = p.sizes();
        prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
    }

    #[test]
    fn dirichlet_is_a_disjoint_cover_with_min_size(
        n in 40usize..400,
        labels in 1usize..6,
        clients in 1usize..8,
        alpha in prop::sample::select(vec![0.1, 0.5, 1.0, 10.0, 1000.0]),
        seed: u64,
    ) {
        let its = items(n, labels, 4);
        // No minimum: always a partition.
        let p = dirichlet(&its, clients, alpha, seed, 0).unwrap();
        prop_assert_eq!(p.num_clients(), clients);
        assert_disjoint_cover(&p, &its);
        // A minimum of 2: either honoured, or (small α, few labels: every redraw leaves some
        // client short) refused with MinSizeNotReached — never a partition that breaks it.
        match dirichlet(&its, clients, alpha, seed, 2) {
            Ok(p) => {
                assert_disjoint_cover(&p, &its);
                prop_assert!(p.sizes().iter().all(|&s| s >= 2));
            }
            Err(e) => prop_assert!(matches!(e, PartitionError::MinSizeNotReached { .. }), "{}", e),
        }
    }

    #[test]
    fn groups_is_a_disjoint_cover(
        n in 0usize..400,
        num_groups in 1usize..7,
        clients in 1usize..10,
        per_client in 1usize..4,
        seed: u64,
    ) {
        let its = items(n, 3, num_groups);
        let present = its.iter().filter_map(|it| it.group).collect::<BTreeSet<_>>().len();
        match groups(&its, clients, per_client, seed) {
            Ok(p) => {
                prop_assert_eq!(p.num_clients(), clients);
                assert_disjoint_cover(&p, &its);
            }
            Err(PartitionError::GroupsPerClient { .. }) => prop_assert!(per_client > present),
            Err(PartitionError::UnassignedGroup { .. }) => prop_assert!(clients * per_client < present),
            Err(e) => prop_assert!(false, "unexpected error: {e}"),
        }
    }

    #[test]
    fn split_file_round_trips_any_partition(n in 0usize..200, clients in 1usize..12, seed: u64) {
        let its = items(n, 3, 4);
        let partition = iid(&its, clients, seed).unwrap();
        let split = NamedPartition { names: default_client_names(clients), partition, tests: None };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("split.json");
        to_split_file(&path, &split).unwrap();
        let back = from_split_file(&path, &its).unwrap();
        prop_assert_eq!(back, split);
    }
}

#[test]
fn same_seed_gives_same_partition_and_another_seed_another() {
    let its = items(500, 4, 4);
    assert_eq!(iid(&its, 7, 1).unwrap(), iid(&its, 7, 1).unwrap());
    assert_ne!(iid(&its, 7, 1).unwrap(), iid(&its, 7, 2).unwrap());
    assert_eq!(dirichlet(&its, 7, 0.5, 1, 5).unwrap(), dirichlet(&its, 7, 0.5, 1, 5).unwrap());
    assert_ne!(dirichlet(&its, 7, 0.5, 1, 5).unwrap(), dirichlet(&its, 7, 0.5, 2, 5).unwrap());
    assert_eq!(groups(&its, 8, 2, 1).unwrap(), groups(&its, 8, 2, 1).unwrap());
}

#[test]
fn dirichlet_skew_grows_as_alpha_falls() {
    let its = items(3000, 4, 4);
    let mean_skew = |alpha: f64| {
        let seeds = 0..5u64;
        let n = seeds.clone().count() as f64;
        seeds.map(|s| dirichlet(&its, 10, alpha, s, 1).unwrap().label_skew(&its, 4).unwrap()).sum::<f64>() / n
    };
    let (low, mid, high) = (mean_skew(0.1), mean_skew(1.0), mean_skew(100.0));
    eprintln!("mean TV skew: alpha 0.1 -> {low:.3}, alpha 1 -> {mid:.3}, alpha 100 -> {high:.3}");
    assert!(low > mid && mid > high, "skew {low} (0.1) > {mid} (1) > {high} (100)");
    assert!(high < 0.1, "alpha 100 is nearly IID: {high}");
    let iid_skew = iid(&its, 10, 0).unwrap().label_skew(&its, 4).unwrap();
    assert!(iid_skew < 0.05, "iid skew {iid_skew}");
}

#[test]
fn dirichlet_gives_up_with_a_clear_error_when_min_size_is_unreachable() {
    let its = items(100, 2, 1);
    let err = dirichlet(&its, 10, 0.01, 3, 10).unwrap_err();
    assert!(matches!(err, PartitionError::MinSizeNotReached { .. }), "{err}");
    assert!(err.to_string().contains("min_size 10"), "{err}");
    let err = dirichlet(&its, 10, 1.0, 3, 11).unwrap_err();
    assert!(matches!(err, PartitionError::TooFewItems { .. }), "{err}");
    assert!(matches!(dirichlet(&its, 10, 0.0, 3, 1), Err(PartitionError::InvalidAlpha { .. })));
}

#[test]
fn each_client_holds_exactly_its_two_groups_and_each_group_spans_four_clients() {
    let its = items(2000, 3, 4);
    let p = groups(&its, 8, 2, 42).unwrap();
    assert_disjoint_cover(&p, &its);
    let group_of = |id: u64| its.iter().find(|it| it.id == id).unwrap().group.unwrap();
    // counts[g][c]: how many of group g's examples client c holds.
    let mut counts = vec![vec![0usize; 8]; 4];
    for (c, ids) in p.clients.iter().enumerate() {
        ids.iter().for_each(|&id| counts[group_of(id)][c] += 1);
        let held: Vec<usize> = (0..4).filter(|&g| counts[g][c] > 0).collect();
        assert_eq!(held.len(), 2, "client {c} holds groups {held:?}");
    }
    for (g, per_client) in counts.iter().enumerate() {
        let holders: Vec<usize> = per_client.iter().copied().filter(|&k| k > 0).collect();
        assert_eq!(holders.len(), 4, "group {g} is spread as {per_client:?}");
        let (lo, hi) = (holders.iter().min().unwrap(), holders.iter().max().unwrap());
        assert!(hi - lo <= 1, "group {g} is split evenly: {per_client:?}");
    }
}

#[test]
fn groups_refuses_an_item_without_a_group() {
    let mut its = items(20, 2, 2);
    its[5].group = None;
    let err = groups(&its, 2, 1, 0).unwrap_err();
    assert!(err.to_string().contains(&its[5].id.to_string()), "{err}");
}

#[test]
fn split_file_is_honoured_exactly_in_file_order() {
    let its = items(10, 2, 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("split.json");
    std::fs::write(&path, r#"{"zeta": [1021, 1000], "alpha": [1007], "mid": []}"#).unwrap();
    let split = from_split_file(&path, &its).unwrap();
    assert_eq!(split.names, ["zeta", "alpha", "mid"]);
    assert_eq!(split.partition.clients, vec![vec![1000, 1021], vec![1007], vec![]]);

    let out = dir.path().join("out.json");
    to_split_file(&out, &split).unwrap();
    assert_eq!(from_split_file(&out, &its).unwrap(), split);
}

#[test]
fn split_file_may_give_each_clients_training_and_held_out_ids() {
    let its = items(10, 2, 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("split.json");
    std::fs::write(
        &path,
        r#"{"b": {"train": [1021, 1000], "test": [1007]}, "a": {"train": [1014], "test": [1028, 1035]}}"#,
    )
    .unwrap();
    let split = from_split_file(&path, &its).unwrap();
    assert_eq!(split.names, ["b", "a"]);
    assert_eq!(split.partition.clients, vec![vec![1000, 1021], vec![1014]]);
    assert_eq!(split.tests, Some(vec![vec![1007], vec![1028, 1035]]));
    let out = dir.path().join("out.json");
    to_split_file(&out, &split).unwrap();
    assert_eq!(from_split_file(&out, &its).unwrap(), split, "the explicit form round-trips");

    // An id in a client's training and held-out lists, and mixed forms, are refused by name.
    std::fs::write(&path, r#"{"a": {"train": [1000], "test": [1000]}}"#).unwrap();
    let msg = from_split_file(&path, &its).unwrap_err().to_string();
    assert!(msg.contains("1000") && msg.contains("a (train)") && msg.contains("a (test)"), "{msg}");
    std::fs::write(&path, r#"{"a": {"train": [1000], "test": [1007]}, "b": [1014]}"#).unwrap();
    let msg = from_split_file(&path, &its).unwrap_err().to_string();
    assert!(msg.contains("one form"), "{msg}");
}

#[test]
fn split_file_with_unknown_or_duplicated_id_is_refused_naming_the_id() {
    let its = items(10, 2, 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("split.json");

    std::fs::write(&path, r#"{"a": [1000], "b": [999999]}"#).unwrap();
    let err = from_split_file(&path, &its).unwrap_err();
    assert!(matches!(err, PartitionError::UnknownId { id: 999999, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("999999") && msg.contains("\"b\""), "{msg}");

    std::fs::write(&path, r#"{"a": [1000, 1007], "b": [1014, 1007]}"#).unwrap();
    let err = from_split_file(&path, &its).unwrap_err();
    assert!(matches!(err, PartitionError::DuplicateId { id: 1007, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("1007") && msg.contains("\"a\"") && msg.contains("\"b\""), "{msg}");

    std::fs::write(&path, r#"{"a": [1000], "a": [1007]}"#).unwrap();
    let err = from_split_file(&path, &its).unwrap_err();
    assert!(matches!(err, PartitionError::DuplicateClient { .. }), "{err}");

    std::fs::write(&path, r#"["not", "an", "object"]"#).unwrap();
    assert!(matches!(from_split_file(&path, &its), Err(PartitionError::Json { .. })));
}

#[test]
fn label_histogram_counts_each_clients_labels() {
    let its = items(12, 3, 2);
    let p = Partition { clients: vec![vec![1000, 1007, 1014], vec![1021]] };
    assert_eq!(p.label_histogram(&its, 3).unwrap(), vec![vec![1, 1, 1], vec![1, 0, 0]]);
    assert!(matches!(p.label_histogram(&its, 2), Err(PartitionError::LabelOutOfRange { .. })));
}
