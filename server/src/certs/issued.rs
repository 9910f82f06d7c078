//! `issued.jsonl`: every client certificate issued from a certificate folder, one JSON object a
//! line (`{"name":"hospital-a","serial":"5f0c…","not_after":"2027-12-02T10:00:00Z",
//! "issued_at":"2025-12-02T10:00:00Z","key":"client"}`), so `certs revoke NAME` finds every
//! serial a name was given and issuing a name again revokes them. Appended atomically (the file
//! rewritten whole: temporary file, fsync, rename).

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{write_public, CertError, Serial, ISSUED};

/// Where an issued certificate's private key was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyOrigin {
    /// By `certs issue`, in the certificate folder.
    Server,
    /// On the client (`fedpool-client keygen`), signed here from its request (`certs sign`).
    Client,
}

/// One issued client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// The client's name (subject CN).
    pub name: String,
    /// The certificate's serial.
    pub serial: Serial,
    /// End of validity (RFC 3339, UTC).
    pub not_after: String,
    /// When it was issued (RFC 3339, UTC).
    pub issued_at: String,
    /// Where its key was made.
    pub key: KeyOrigin,
}

/// Every record of `dir/issued.jsonl` (none when the file is missing); a line that does not parse
/// is an error naming it.
pub fn read(dir: &Path) -> Result<Vec<IssuedRecord>, CertError> {
    let path = dir.join(ISSUED);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CertError::Io { path, source }),
    };
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let record = serde_json::from_str(line).map_err(|source| CertError::IssuedLine {
            path: path.clone(),
            line: i + 1,
            source,
        })?;
        records.push(record);
    }
    Ok(records)
}

/// Appends `record` to `dir/issued.jsonl`.
pub fn append(dir: &Path, record: &IssuedRecord) -> Result<(), CertError> {
    let path = dir.join(ISSUED);
    let mut text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(CertError::Io { path, source }),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&serde_json::to_string(record).map_err(CertError::IssuedEncode)?);
    text.push('\n');
    write_public(&path, text.as_bytes())
}

/// The serials recorded for `name`, oldest first.
pub fn serials_of(dir: &Path, name: &str) -> Result<Vec<Serial>, CertError> {
    Ok(read(dir)?.into_iter().filter(|r| r.name == name).map(|r| r.serial).collect())
}

/// The name a serial was issued to, if recorded.
pub fn name_of(dir: &Path, serial: &Serial) -> Result<Option<String>, CertError> {
    Ok(read(dir)?.into_iter().find(|r| &r.serial == serial).map(|r| r.name))
}
