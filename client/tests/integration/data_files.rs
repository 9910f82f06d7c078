//! Data files (CSV, TSV, JSONL) from fixtures in tests/fixtures/data, their errors, data SPECs,
//! and the train/test split on synthetic data.

use std::path::PathBuf;

use fedpool_client::data::{load_file, parse_spec, DataError, DataOptions, DataSpec, Dataset, Example, VaderDomain};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
}

fn with_group(group: &str) -> DataOptions {
    DataOptions { group_column: Some(group.to_owned()), ..DataOptions::default() }
}

fn texts(data: &Dataset) -> Vec<&str> {
    data.examples.iter().map(|e| e.text.as_str()).collect()
}

#[test]
fn quoted_multiline_csv_fields_parse() {
    let data = load_file(&fixture("multiline.csv"), &with_group("domain")).expect("loads");
    assert_eq!(texts(&data), ["first line\r\nsecond line, with a comma", "She said \"hi\"", "plain text"]);
    assert_eq!(data.label_names, ["negative", "positive"]);
    assert_eq!(data.examples.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 0, 1]);
    assert_eq!(data.group_names, ["mail", "web"]);
    assert_eq!(data.examples.iter().map(|e| e.group).collect::<Vec<_>>(), [Some(1), Some(0), None]);
    assert_eq!(data.examples.iter().map(|e| e.id).collect::<Vec<_>>(), [0, 1, 2]);
}

#[test]
fn tsv_with_string_labels_and_groups_takes_quotes_literally() {
    let options = DataOptions { group_column: Some("user".to_owned()), ..DataOptions::default() };
    let data = load_file(&fixture("reviews.tsv"), &options).expect("loads");
    assert_eq!(texts(&data), ["I \"loved it", "meh, really", "great", "ok"]);
    assert_eq!(data.label_names, ["bad", "good", "neutral"]);
    assert_eq!(data.label_counts(), [1, 2, 1]);
    assert_eq!(data.group_names, ["alice", "bob", "carol"]);
    assert_eq!(data.group_counts(), [2, 1, 1]);
    assert_eq!(data.label_counts_by_group(), [vec![0, 2, 0], vec![1, 0, 0], vec![0, 0, 1]]);
}

#[test]
fn jsonl_with_string_labels_skips_blank_lines_and_allows_null_groups() {
    let data = load_file(&fixture("reviews.jsonl"), &with_group("user")).expect("loads");
    assert_eq!(texts(&data), ["great phone", "awful battery", "fine, I guess", "broke in a week"]);
    assert_eq!(data.label_names, ["neg", "pos"]);
    assert_eq!(data.examples.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 0, 1, 0]);
    assert_eq!(data.group_names, ["amy", "bo"]);
    assert_eq!(data.examples.iter().map(|e| e.group).collect::<Vec<_>>(), [Some(0), None, Some(1), Some(0)]);
    let summary = data.summary();
    assert_eq!(summary.ungrouped, 1);
    assert_eq!(
        summary.to_string(),
        format!("{}: 4 examples; labels: neg 2, pos 2; groups: amy 2, bo 1, (none) 1", data.source)
    );
}

#[test]
fn integer_labels_sort_numerically_and_match_their_string_form() {
    let data = load_file(&fixture("int_labels.jsonl"), &DataOptions::default()).expect("loads");
    assert_eq!(data.label_names, ["1", "2", "10"]);
    assert_eq!(data.examples.iter().map(|e| e.label).collect::<Vec<_>>(), [2, 1, 0, 1]);
}

#[test]
fn a_given_label_list_fixes_the_indices() {
    let options =
        DataOptions { labels: Some(vec!["pos".into(), "neg".into(), "mixed".into()]), ..DataOptions::default() };
    let data = load_file(&fixture("reviews.jsonl"), &options).expect("loads");
    assert_eq!(data.label_names, ["pos", "neg", "mixed"]);
    assert_eq!(data.label_counts(), [2, 2, 0]);
}

#[test]
fn unknown_label_with_a_given_list_names_file_and_line() {
    let options = DataOptions { labels: Some(vec!["good".into(), "bad".into()]), ..DataOptions::default() };
    let err = load_file(&fixture("reviews.tsv"), &options).unwrap_err();
    assert!(matches!(&err, DataError::UnknownLabel { line: 5, label, .. } if label == "neutral"), "{err:?}");
    let message = err.to_string();
    let expected = format!("unknown label 'neutral' in {}:5, known: 'good', 'bad'", fixture("reviews.tsv").display());
    assert_eq!(message, expected);
}

#[test]
fn missing_column_lists_the_columns_found() {
    let err = load_file(&fixture("missing_column.csv"), &DataOptions::default()).unwrap_err();
    assert!(
        matches!(&err, DataError::MissingColumn { column, found, .. } if column == "text" && found == &["sentence", "label"])
    );
    assert!(err.to_string().contains("no column 'text' (columns found: 'sentence', 'label')"), "{err}");

    let err = load_file(&fixture("reviews.jsonl"), &with_group("country")).unwrap_err();
    assert!(matches!(&err, DataError::MissingColumn { line: Some(1), .. }), "{err:?}");
    assert!(
        err.to_string().contains("reviews.jsonl:1: no column 'country' (columns found: 'label', 'text', 'user')"),
        "{err}"
    );
}

#[test]
fn empty_files_are_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, contents) in
        [("empty.csv", ""), ("header_only.csv", "text,label\n"), ("blank.jsonl", "\n  \n"), ("empty.tsv", "")]
    {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write");
        let err = load_file(&path, &DataOptions::default()).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{name}: {err:?}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn a_utf8_byte_order_mark_is_ignored() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, contents) in
        [("bom.csv", "\u{feff}text,label\nhi,pos\n"), ("bom.jsonl", "\u{feff}{\"text\": \"hi\", \"label\": \"pos\"}\n")]
    {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write");
        let data = load_file(&path, &DataOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((texts(&data), &data.label_names[..]), (vec!["hi"], &["pos".to_owned()][..]), "{name}");
    }
}

#[test]
fn malformed_records_name_their_line() {
    let err = load_file(&fixture("bad_json.jsonl"), &DataOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::Malformed { line: Some(2), .. }), "{err:?}");
    assert!(err.to_string().contains("bad_json.jsonl:2: invalid JSON"), "{err}");

    let err = load_file(&fixture("ragged.csv"), &DataOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::Malformed { line: Some(3), .. }), "{err:?}");
    assert!(err.to_string().contains("ragged.csv:3: record has 3 field(s), the header has 2"), "{err}");
}

#[test]
fn missing_file_and_unknown_format_are_errors() {
    let err = load_file(&fixture("nope.csv"), &DataOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::FileNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.csv not found"), "{err}");

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("data.txt");
    std::fs::write(&path, "text,label\nhi,1\n").expect("write");
    assert!(matches!(load_file(&path, &DataOptions::default()), Err(DataError::UnknownFormat { .. })));
    let options = DataOptions { format: Some(fedpool_client::data::FileFormat::Csv), ..DataOptions::default() };
    assert_eq!(load_file(&path, &options).expect("loads with the format given").len(), 1);
}

#[test]
fn specs_tell_files_from_built_ins() {
    assert_eq!(parse_spec("vader").unwrap(), DataSpec::Vader(VaderDomain::ALL.to_vec()));
    assert_eq!(
        parse_spec("vader:amazonReviewSnippets,tweets,tweets").unwrap(),
        DataSpec::Vader(vec![VaderDomain::Tweets, VaderDomain::AmazonReviewSnippets])
    );
    assert_eq!(
        parse_spec("vader:tweets,amazonReviewSnippets").unwrap().to_string(),
        "vader:tweets,amazonReviewSnippets"
    );
    assert_eq!(parse_spec("trec").unwrap(), DataSpec::Trec);
    assert_eq!(parse_spec("trec-fine").unwrap(), DataSpec::TrecFine);
    assert_eq!(parse_spec("sms").unwrap(), DataSpec::Sms);
    let path = fixture("reviews.tsv");
    assert_eq!(parse_spec(path.to_str().unwrap()).unwrap(), DataSpec::File(path));

    let err = parse_spec("imdb").unwrap_err();
    assert!(matches!(err, DataError::UnknownSpec { .. }));
    assert!(err.to_string().contains("built-ins: vader, vader:DOMAIN[,DOMAIN...], trec, trec-fine, sms"), "{err}");
    assert!(matches!(parse_spec("data/missing.jsonl"), Err(DataError::FileNotFound { .. })));
}

#[test]
fn an_existing_file_wins_over_a_built_in_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sms");
    std::fs::write(&path, "text,label\nhi,1\n").expect("write");
    assert_eq!(parse_spec(path.to_str().unwrap()).unwrap(), DataSpec::File(path));
}

#[test]
fn bad_vader_domain_lists_the_valid_ones() {
    let err = parse_spec("vader:tweets,imdb").unwrap_err();
    assert!(matches!(&err, DataError::UnknownDomain { domain, .. } if domain == "imdb"), "{err:?}");
    assert_eq!(
        err.to_string(),
        "unknown VADER domain 'imdb' (valid domains: 'tweets', 'movieReviewSnippets', 'amazonReviewSnippets', \
         'nytEditorialSnippets')"
    );
    assert!(matches!(parse_spec("vader:"), Err(DataError::UnknownDomain { .. })));
}

/// 3 labels of 50, 7 and 2 examples, 2 groups; ids 100.. so they differ from indices.
fn synthetic() -> Dataset {
    let mut examples = Vec::new();
    for (label, count) in [(0usize, 50usize), (1, 7), (2, 2)] {
        for i in 0..count {
            let id = 100 + examples.len() as u64;
            examples.push(Example { id, text: format!("label {label} #{i}"), label, group: Some(i % 2) });
        }
    }
    Dataset {
        examples,
        label_names: vec!["a".into(), "b".into(), "c".into()],
        group_names: vec!["g0".into(), "g1".into()],
        source: "synthetic".into(),
    }
}

fn ids(data: &Dataset) -> Vec<u64> {
    data.examples.iter().map(|e| e.id).collect()
}

#[test]
fn split_is_deterministic_disjoint_complete_and_stratified() {
    let data = synthetic();
    let (train, test) = data.split(0.2, 7);
    assert_eq!((train.clone(), test.clone()), data.split(0.2, 7), "same seed, same split");
    assert_ne!(ids(&test), ids(&data.split(0.2, 8).1), "another seed, another split");
    assert_eq!(train.len() + test.len(), data.len());
    let mut all: Vec<u64> = ids(&train).into_iter().chain(ids(&test)).collect();
    all.sort_unstable();
    assert_eq!(all, ids(&data), "disjoint and complete");
    assert_eq!(test.label_counts(), [10, 1, 1], "round(n*0.2), at least one of each label with >= 2 examples");
    assert_eq!(train.label_counts(), [40, 6, 1]);
    assert_eq!(
        (train.label_names.clone(), train.group_names.clone()),
        (data.label_names.clone(), data.group_names.clone())
    );
    for part in [&train, &test] {
        assert!(ids(part).windows(2).all(|w| w[0] < w[1]), "parts keep the dataset's order");
    }
}

#[test]
fn split_edges() {
    let data = synthetic();
    let (train, test) = data.split(0.0, 1);
    assert_eq!((train.len(), test.len()), (data.len(), 0));
    let (train, test) = data.split(1.0, 1);
    assert_eq!((train.len(), test.len()), (0, data.len()));
    let (train, test) = data.split(0.99, 1);
    assert_eq!(train.label_counts(), [1, 1, 1], "every label keeps a training example");
    assert_eq!(test.len(), data.len() - 3);
}

#[test]
#[should_panic(expected = "test_fraction must be within 0..=1")]
fn split_rejects_a_bad_fraction() {
    let _ = synthetic().split(1.5, 0);
}

#[test]
fn subset_keeps_dataset_order_and_rejects_unknown_ids() {
    let data = synthetic();
    let subset = data.subset(&[105, 101, 105, 150]).expect("known ids");
    assert_eq!(ids(&subset), [101, 105, 150]);
    assert_eq!(subset.label_counts(), [2, 1, 0]);
    let err = data.subset(&[101, 7, 8]).unwrap_err();
    assert!(matches!(err, DataError::UnknownIds { count: 2, first: 7, .. }), "{err:?}");
}
