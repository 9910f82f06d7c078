//! The built-in datasets on the real assets. The expected numbers were counted independently
//! with Python's csv module and plain string splitting (see each test), not with this crate.
//! These tests fail, never skip, when the assets are absent: run scripts/fetch-assets.sh first.

use std::collections::HashSet;
use std::path::PathBuf;

use fedpool_client::data::{load, load_file, parse_spec, DataError, DataOptions, Dataset};

/// `$FEDPOOL_ASSETS`, else `<workspace>/assets`; fails (never skips) when the data is absent.
fn assets() -> PathBuf {
    let dir = match std::env::var_os("FEDPOOL_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets"),
    };
    for file in ["vader/tweets_GroundTruth.txt", "trec/question_labels.txt", "sms/sms-spam.csv"] {
        assert!(
            dir.join(file).is_file(),
            "the datasets are not in {} ({file} missing): run scripts/fetch-assets.sh first \
             (or point FEDPOOL_ASSETS at the assets folder)",
            dir.display()
        );
    }
    dir
}

fn builtin(spec: &str) -> Dataset {
    let spec = parse_spec(spec).expect("a built-in spec");
    load(&spec, &assets(), &DataOptions::default()).unwrap_or_else(|e| panic!("{spec} loads: {e}"))
}

fn named_counts(data: &Dataset) -> Vec<(String, usize)> {
    data.summary().labels
}

fn assert_unique_ids(data: &Dataset) {
    let ids: HashSet<u64> = data.examples.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), data.len(), "{}: ids are unique", data.source);
}

/// Python: rows = file.split("\r\n")[1:]; score = float(row.split("\t")[1]); keep score != 0.
#[test]
fn vader_loads_four_domains_without_zero_scores() {
    let data = builtin("vader");
    assert_eq!(data.source, "vader");
    assert_eq!(data.group_names, ["tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets"]);
    assert_eq!(data.label_names, ["negative", "positive"]);
    // Kept rows per domain (file rows 4,200 / 10,605 / 3,708 / 5,190; score 0: 4 / 37 / 98 / 244).
    assert_eq!(data.group_counts(), [4196, 10568, 3610, 4946]);
    assert_eq!(data.label_counts_by_group(), [vec![1299, 2897], vec![5326, 5242], vec![1482, 2128], vec![2742, 2204]]);
    assert_eq!(data.len(), 23320);
    assert_eq!(data.label_counts(), [10849, 12471]);
    assert_unique_ids(&data);
    assert!(data.examples.iter().all(|e| e.group.is_some()));
    // A row with double quotes in its text is taken literally (tweets, id 3 in the file).
    let third = data.examples.iter().find(|e| e.id == 2).expect("the third tweet");
    assert!(third.text.starts_with("We were 17 deep last night &amp; the love"), "{}", third.text);
    assert_eq!(third.label, 1);
}

#[test]
fn vader_subset_loads_only_its_domains_with_the_same_ids() {
    let all = builtin("vader");
    let tweets = builtin("vader:tweets");
    assert_eq!(tweets.source, "vader:tweets");
    assert_eq!(tweets.group_names, ["tweets"]);
    assert_eq!(tweets.len(), 4196);
    assert_eq!(tweets.label_counts(), [1299, 2897]);

    let two = builtin("vader:amazonReviewSnippets,tweets");
    assert_eq!(two.source, "vader:tweets,amazonReviewSnippets");
    assert_eq!(two.group_names, ["tweets", "amazonReviewSnippets"]);
    assert_eq!(two.group_counts(), [4196, 3610]);
    // The same example has the same id and text whether loaded alone or with all domains.
    let amazon_in_all: Vec<(u64, &str)> =
        all.examples.iter().filter(|e| e.group == Some(2)).map(|e| (e.id, e.text.as_str())).collect();
    let amazon_in_two: Vec<(u64, &str)> =
        two.examples.iter().filter(|e| e.group == Some(1)).map(|e| (e.id, e.text.as_str())).collect();
    assert_eq!(amazon_in_all, amazon_in_two);
}

#[test]
fn vader_bad_domain_error_lists_the_valid_domains() {
    let err = parse_spec("vader:tweets,imdbReviews").unwrap_err();
    assert!(matches!(err, DataError::UnknownDomain { .. }));
    let message = err.to_string();
    for domain in ["tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets"] {
        assert!(message.contains(domain), "{message}");
    }
}

/// Python: distinct (label, question) pairs of question_labels.txt, label = the part before ':'
/// (coarse) or the whole `COARSE:fine` (fine). The file has 15,452 lines: the five nested TREC
/// training sets concatenated; 5,382 distinct lines.
#[test]
fn trec_has_6_coarse_labels_without_repeated_questions() {
    let data = builtin("trec");
    assert_eq!(data.label_names, ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]);
    assert_eq!(data.len(), 5381);
    assert_eq!(data.label_counts(), [86, 1153, 1245, 1215, 824, 858]);
    assert!(data.group_names.is_empty());
    assert_unique_ids(&data);
    let first = &data.examples[0];
    assert_eq!((first.id, first.text.as_str()), (0, "How did serfdom develop in and then leave Russia ?"));
    let texts: HashSet<(usize, &str)> = data.examples.iter().map(|e| (e.label, e.text.as_str())).collect();
    assert_eq!(texts.len(), data.len(), "no (label, question) pair twice");
}

#[test]
fn trec_fine_has_50_labels() {
    let data = builtin("trec-fine");
    assert_eq!(data.num_labels(), 50);
    assert_eq!(data.len(), 5382);
    let counts = named_counts(&data);
    assert_eq!(counts.first(), Some(&("ABBR:abb".to_owned(), 16)));
    assert_eq!(counts.last(), Some(&("NUM:weight".to_owned(), 11)));
    let count = |name: &str| counts.iter().find(|(n, _)| n == name).map(|(_, c)| *c);
    assert_eq!(count("HUM:ind"), Some(956));
    assert_eq!(count("NUM:ord"), Some(3));
    assert_eq!(count("ENTY:currency"), Some(4));
    assert_unique_ids(&data);
}

/// Python: `list(csv.reader(open("sms/sms-spam.csv", newline="")))[1:]` has 4,837 records
/// (ham 4,199, spam 638); 8 of their texts hold 737 more lines `ham<TAB>...` / `spam<TAB>...`;
/// splitting those out gives 5,574 messages, ham 4,827, spam 747 (the SMS Spam Collection's
/// published numbers).
#[test]
fn sms_loads_every_message_with_ham_and_spam_counts() {
    let data = builtin("sms");
    assert_eq!(data.label_names, ["ham", "spam"]);
    assert_eq!(data.len(), 5574);
    assert_eq!(data.label_counts(), [4827, 747]);
    assert_unique_ids(&data);
    assert!(data.examples.iter().all(|e| !e.text.contains("\nham\t") && !e.text.contains("\nspam\t")));
    assert!(data.examples.iter().map(|e| e.text.len()).max() < Some(1000), "no merged records left");
    assert_eq!(data.examples[2].label, 1);
    assert!(data.examples[2].text.starts_with("Free entry in 2 a wkly comp"));
}

#[test]
fn sms_csv_read_as_a_plain_file_has_the_csv_module_record_count() {
    let options = DataOptions { label_column: "spam".to_owned(), ..DataOptions::default() };
    let data = load_file(&assets().join("sms/sms-spam.csv"), &options).expect("loads as CSV");
    assert_eq!(data.len(), 4837, "quoted multi-line fields are single records");
    assert_eq!(data.label_names, ["0", "1"]);
    assert_eq!(data.label_counts(), [4199, 638]);
    assert_eq!(data.examples.iter().filter(|e| e.text.contains('\n')).count(), 8);
}

#[test]
fn splits_of_real_data_keep_every_label_on_both_sides() {
    for spec in ["trec-fine", "sms", "vader"] {
        let data = builtin(spec);
        let (train, test) = data.split(0.1, 42);
        assert_eq!(train.len() + test.len(), data.len());
        for (label, (&tr, &te)) in train.label_counts().iter().zip(&test.label_counts()).enumerate() {
            assert!(tr > 0 && te > 0, "{spec}: label {} has {tr} train / {te} test", data.label_names[label]);
        }
        assert_eq!(data.split(0.1, 42), (train, test), "{spec}: deterministic");
    }
}

#[test]
fn missing_assets_say_how_to_fetch_them() {
    let empty = tempfile::tempdir().expect("temp dir");
    let err = load(&parse_spec("trec").unwrap(), empty.path(), &DataOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::AssetMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("scripts/fetch-assets.sh"), "{err}");
}
