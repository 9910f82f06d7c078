//! The revocation list, `revoked.txt` in the certificate folder: which client certificates the
//! server refuses, at the handshake and on live connections.
//!
//! Format, one entry a line; `#` starts a comment (to the end of the line), blank lines are
//! ignored:
//! - `serial:HEX` revokes the one certificate with that serial (hexadecimal, case and `:`
//!   separators ignored, leading zeros ignored). `certs revoke` writes these, with a comment
//!   naming the client: `serial:5f0c…  # hospital-a, revoked 2025-12-02T10:00:00Z`.
//! - a bare `NAME` (the list's older format, still honoured) revokes every certificate whose
//!   subject CN is `NAME`, whatever its serial — including any issued later, so `certs issue`
//!   refuses such a name. `certs` never writes these any more.
//!
//! [`RevocationFile`] keeps the last list read and reloads it when the file's modification time,
//! size or inode change: the server polls it and closes live connections that become revoked. A
//! list that cannot be read or has a bad `serial:` line is an error as a whole: the server then
//! refuses new connections (fail closed) and keeps the last good list for live ones.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{issued, rfc3339, serial_of_file, validate_client_name, write_public, CertError, CLIENTS_DIR, REVOKED};

/// A certificate serial number: big-endian bytes without leading zero bytes. Written as lowercase
/// hexadecimal without separators.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Serial(Vec<u8>);

impl Serial {
    /// The serial of big-endian `bytes` (leading zero bytes dropped).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(fedpool_transport::tls::strip_leading_zeros(bytes))
    }

    /// The big-endian bytes, without leading zeros.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for Serial {
    type Err = CertError;

    /// Hexadecimal, optionally `0x`-prefixed, `:` separators and case ignored.
    fn from_str(text: &str) -> Result<Self, CertError> {
        let bad = |why| CertError::BadSerial { text: text.to_string(), why };
        let t = text.trim();
        let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
        let digits: Vec<u8> = t.bytes().filter(|b| *b != b':').collect();
        if digits.is_empty() {
            return Err(bad("it is empty"));
        }
        if digits.len() > 42 {
            return Err(bad("it is longer than 20 bytes (RFC 5280)"));
        }
        let nibble = |d: u8| (d as char).to_digit(16).map(|v| v as u8).ok_or(bad("it is not hexadecimal"));
        let mut bytes = Vec::with_capacity(digits.len().div_ceil(2));
        // An odd count: the first digit is a byte of its own.
        let (head, rest) = digits.split_at(digits.len() % 2);
        if let Some(d) = head.first() {
            bytes.push(nibble(*d)?);
        }
        for pair in rest.chunks(2) {
            bytes.push(nibble(pair[0])? << 4 | nibble(pair[1])?);
        }
        Ok(Self::from_bytes(&bytes))
    }
}

impl TryFrom<String> for Serial {
    type Error = CertError;
    fn try_from(s: String) -> Result<Self, CertError> {
        s.parse()
    }
}

impl From<Serial> for String {
    fn from(s: Serial) -> String {
        s.to_string()
    }
}

/// Why a certificate is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokedBy {
    /// Its serial is listed.
    Serial,
    /// Its subject name is listed (the older format).
    Name,
}

/// The revoked serials and (older format) names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    serials: BTreeSet<Serial>,
    names: BTreeSet<String>,
}

impl RevocationList {
    /// Parses the file format (module doc); a bad `serial:` line is an error naming `path` and
    /// the line.
    pub fn parse(text: &str, path: &Path) -> Result<Self, CertError> {
        let mut list = Self::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            match line.strip_prefix("serial:") {
                Some(hex) => {
                    let serial = hex.parse::<Serial>().map_err(|e| CertError::RevocationLine {
                        path: path.to_path_buf(),
                        line: i + 1,
                        source: Box::new(e),
                    })?;
                    list.serials.insert(serial);
                }
                None => {
                    list.names.insert(line.to_string());
                }
            }
        }
        Ok(list)
    }

    /// Reads the list at `path`; a missing file is an empty list, any other read error is an
    /// error (the caller should refuse connections rather than ignore revocations).
    pub fn load(path: &Path) -> Result<Self, CertError> {
        match fs::read_to_string(path) {
            Ok(s) => Self::parse(&s, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(CertError::Io { path: path.to_path_buf(), source: e }),
        }
    }

    /// True when `name` is revoked by name (every certificate of it).
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// True when the certificate with `serial` is revoked.
    pub fn contains_serial(&self, serial: &Serial) -> bool {
        self.serials.contains(serial)
    }

    /// Whether the certificate of subject `name` and `serial` is revoked, and how.
    pub fn revokes(&self, name: &str, serial: &Serial) -> Option<RevokedBy> {
        if self.contains_serial(serial) {
            Some(RevokedBy::Serial)
        } else if self.contains(name) {
            Some(RevokedBy::Name)
        } else {
            None
        }
    }

    /// Number of entries (serials and names).
    pub fn len(&self) -> usize {
        self.serials.len() + self.names.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty() && self.names.is_empty()
    }
}

/// What identifies one version of the file: modification time, size and inode (a rename onto it
/// — how `certs` writes — always changes the inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    Missing,
    File { modified: SystemTime, len: u64, inode: u64 },
}

/// A file modified this recently may change again within its timestamp's granularity unseen: its
/// stamp is not trusted, the file is read again at the next refresh.
const SETTLED: Duration = Duration::from_secs(1);

/// The revocation list file and the last list read from it, reloaded when the file changes.
#[derive(Debug)]
pub struct RevocationFile {
    path: PathBuf,
    /// The stamp of the version `current` was read from, if it can be trusted.
    stamp: Option<Stamp>,
    current: Arc<RevocationList>,
    /// The last refresh failed (the next one reads the file whatever its stamp).
    failing: bool,
}

impl RevocationFile {
    /// The list at `path`, not read yet (the first [`refresh`](Self::refresh) reads it).
    pub fn new(path: PathBuf) -> Self {
        Self { path, stamp: None, current: Arc::new(RevocationList::default()), failing: false }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last list read successfully (empty before the first).
    pub fn current(&self) -> Arc<RevocationList> {
        self.current.clone()
    }

    /// Reads the file again if it changed since the last read (or the last refresh failed).
    /// Returns whether the list changed. On an error the last good list stays
    /// [`current`](Self::current).
    pub fn refresh(&mut self) -> Result<bool, CertError> {
        let stamp = self.stamp_now()?;
        if !self.failing && self.stamp.is_some() && self.stamp == Some(stamp) {
            return Ok(false);
        }
        let loaded = match stamp {
            Stamp::Missing => Ok(RevocationList::default()),
            Stamp::File { .. } => RevocationList::load(&self.path),
        };
        match loaded {
            Ok(list) => {
                let changed = *self.current != list;
                if changed {
                    self.current = Arc::new(list);
                }
                self.failing = false;
                self.stamp = Self::settled(stamp).then_some(stamp);
                Ok(changed)
            }
            Err(e) => {
                self.failing = true;
                Err(e)
            }
        }
    }

    fn stamp_now(&mut self) -> Result<Stamp, CertError> {
        match fs::metadata(&self.path) {
            Ok(m) => {
                #[cfg(unix)]
                let inode = std::os::unix::fs::MetadataExt::ino(&m);
                #[cfg(not(unix))]
                let inode = 0;
                let modified = m.modified().map_err(|e| self.failed(e))?;
                Ok(Stamp::File { modified, len: m.len(), inode })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Stamp::Missing),
            Err(e) => Err(self.failed(e)),
        }
    }

    fn failed(&mut self, source: std::io::Error) -> CertError {
        self.failing = true;
        CertError::Io { path: self.path.clone(), source }
    }

    fn settled(stamp: Stamp) -> bool {
        match stamp {
            Stamp::Missing => true,
            Stamp::File { modified, .. } => SystemTime::now().duration_since(modified).is_ok_and(|age| age >= SETTLED),
        }
    }
}

/// What [`revoke`] and [`revoke_serial`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The revocation list file.
    pub path: PathBuf,
    /// False when every serial concerned was already listed.
    pub newly_added: bool,
    /// False when no certificate of that name or serial is recorded in the folder.
    pub was_issued: bool,
    /// The serials added to the list by this call.
    pub serials: Vec<Serial>,
    /// The serials concerned that were listed already.
    pub already: Vec<Serial>,
}

/// Revokes every certificate issued to `name` from the folder `dir` (the serials recorded in
/// `issued.jsonl`, and the one in `clients/NAME.pem`): adds them to `dir/revoked.txt`
/// atomically. A running server closes the live connections of those certificates within its
/// poll interval and refuses them from then on. Revoking twice is not an error; a name with no
/// certificate recorded is ([`CertError::NotIssued`]).
pub fn revoke(dir: &Path, name: &str) -> Result<Revoked, CertError> {
    validate_client_name(name)?;
    if !dir.is_dir() {
        return Err(CertError::NoCa { dir: dir.to_path_buf() });
    }
    let r = revoke_name(dir, name, "revoked")?;
    if !r.was_issued {
        return Err(CertError::NotIssued { name: name.to_string(), dir: dir.to_path_buf() });
    }
    Ok(r)
}

/// Revokes the certificate with `serial`, whether or not it is recorded in the folder (the
/// comment names the client when it is).
pub fn revoke_serial(dir: &Path, serial: &Serial) -> Result<Revoked, CertError> {
    if !dir.is_dir() {
        return Err(CertError::NoCa { dir: dir.to_path_buf() });
    }
    let name = issued::name_of(dir, serial)?;
    let mut r = add(dir, std::slice::from_ref(serial), name.as_deref().unwrap_or("unrecorded certificate"), "revoked")?;
    r.was_issued = name.is_some();
    Ok(r)
}

/// Revokes every known serial of `name` (nothing when none is known); `why` goes in the comment.
pub(super) fn revoke_name(dir: &Path, name: &str, why: &str) -> Result<Revoked, CertError> {
    let mut serials = issued::serials_of(dir, name)?;
    let file = dir.join(CLIENTS_DIR).join(format!("{name}.pem"));
    if let Some(s) = serial_of_file(&file, name)? {
        if !serials.contains(&s) {
            serials.push(s);
        }
    }
    let mut r = add(dir, &serials, name, why)?;
    r.was_issued = !serials.is_empty();
    Ok(r)
}

/// Appends the serials not listed yet to `dir/revoked.txt` (written atomically; created with a
/// header when missing). A list with a bad line is not touched: the error names the line.
fn add(dir: &Path, serials: &[Serial], name: &str, why: &str) -> Result<Revoked, CertError> {
    let path = dir.join(REVOKED);
    let existing = match fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(CertError::Io { path, source: e }),
    };
    let list = RevocationList::parse(&existing, &path)?;
    let (already, new): (Vec<Serial>, Vec<Serial>) = serials.iter().cloned().partition(|s| list.contains_serial(s));
    // `was_issued` is the caller's to say.
    let r = Revoked { path, newly_added: !new.is_empty(), was_issued: true, serials: new, already };
    if r.serials.is_empty() {
        return Ok(r);
    }
    let mut text = existing;
    if text.is_empty() {
        text.push_str(
            "# Revoked fedpool client certificates. `serial:HEX` revokes one certificate (written by\n\
             # `fedpool-server certs revoke`); a bare NAME, the older format, every certificate of that name.\n",
        );
    } else if !text.ends_with('\n') {
        text.push('\n');
    }
    let when = rfc3339(time::OffsetDateTime::now_utc());
    for s in &r.serials {
        text.push_str(&format!("serial:{s}  # {name}, {why} {when}\n"));
    }
    write_public(&r.path, text.as_bytes())?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_reads_serials_and_older_bare_names_and_ignores_comments() {
        let p = Path::new("revoked.txt");
        let l = RevocationList::parse("# header\n\n  alice \nbob  # why\n#carol\nserial:0A:bc  # dave\n", p)
            .expect("parse");
        assert!(l.contains("alice") && l.contains("bob") && !l.contains("carol"));
        let s: Serial = "abc".parse().expect("hex");
        assert!(l.contains_serial(&s));
        assert_eq!(l.revokes("zed", &s), Some(RevokedBy::Serial));
        assert_eq!(l.revokes("bob", &Serial::from_bytes(&[1])), Some(RevokedBy::Name));
        assert_eq!(l.revokes("zed", &Serial::from_bytes(&[1])), None);
        assert_eq!(l.len(), 3);
        let e = RevocationList::parse("ok\nserial:xyz\n", p).unwrap_err();
        assert!(e.to_string().contains("revoked.txt line 2") && e.to_string().contains("not hexadecimal"), "{e}");
    }

    #[test]
    fn serials_print_and_parse_as_the_same_bytes() {
        let s = Serial::from_bytes(&[0, 0, 0x4f, 0x01, 0xa0]);
        assert_eq!(s.to_string(), "4f01a0");
        for text in ["4f01a0", "0x4F01A0", "4f:01:a0", "004f01a0", "0:4f:01:a0"] {
            assert_eq!(text.parse::<Serial>().expect(text), s, "{text}");
        }
        for bad in ["", "0x", "g1", &"1".repeat(43)] {
            assert!(matches!(bad.parse::<Serial>(), Err(CertError::BadSerial { .. })), "{bad:?}");
        }
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(json, "\"4f01a0\"");
        assert_eq!(serde_json::from_str::<Serial>(&json).expect("back"), s);
    }

    #[test]
    fn a_refresh_keeps_the_last_good_list_when_the_file_turns_unreadable() {
        let dir = tempfile::tempdir().expect("temp");
        let path = dir.path().join("revoked.txt");
        let mut f = RevocationFile::new(path.clone());
        assert!(!f.refresh().expect("missing is empty"));
        std::fs::write(&path, "serial:01\n").expect("write");
        assert!(f.refresh().expect("read"));
        assert!(f.current().contains_serial(&Serial::from_bytes(&[1])));
        // A directory in its place cannot be read: an error, and the last good list stays.
        std::fs::remove_file(&path).expect("rm");
        std::fs::create_dir(&path).expect("dir");
        assert!(f.refresh().is_err());
        assert!(f.current().contains_serial(&Serial::from_bytes(&[1])));
        assert!(f.refresh().is_err(), "still failing: read again, not trusted from the stamp");
        std::fs::remove_dir(&path).expect("rmdir");
        std::fs::write(&path, "serial:02\n").expect("write");
        assert!(f.refresh().expect("read again"));
        assert!(!f.current().contains_serial(&Serial::from_bytes(&[1])));
    }
}
