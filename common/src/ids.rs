//! Identifiers with meaning: round numbers, task ids, nonces, and the digests that name a pool
//! layout or a frozen backbone.

use std::fmt;
use std::io::Read;
use std::path::Path;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

/// A federated round number; round 1 is the first one trained, round 0 the initial pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Round(pub u64);

impl fmt::Display for Round {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A task the server handed to one client in one round (unique per server run and round attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A fresh random value per task; an update must echo it, so an update replayed from another
/// task or round is refused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Nonce(pub [u8; 16]);

impl Nonce {
    /// A nonce from the operating system's secure random source.
    pub fn random() -> Self {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 16];
        // The system RNG only fails when the OS has no entropy source at all; nothing sensible
        // can run then.
        ring::rand::SystemRandom::new().fill(&mut bytes).expect("the operating system's random source failed");
        Self(bytes)
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", hex(&self.0))
    }
}

/// A SHA-256 digest, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_ring(ring::digest::digest(&SHA256, bytes))
    }

    /// The digest of the concatenation of `parts`.
    pub fn of_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut ctx = Context::new(&SHA256);
        for p in parts {
            ctx.update(p);
        }
        Self::from_ring(ctx.finish())
    }

    fn from_ring(d: ring::digest::Digest) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Names a pool layout: the SHA-256 of its `PoolSpec`. Pools, deltas and checkpoints carry it so
/// that tensors of one layout are never mixed with another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SpecHash(pub Sha256);

impl fmt::Display for SpecHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Names a frozen backbone: the SHA-256 of its `config.json` followed by its weights file. A
/// client on another model is refused at enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackboneFingerprint(pub Sha256);

impl BackboneFingerprint {
    /// The fingerprint of a HF model folder (`config.json` + `model.safetensors`), read in
    /// streaming fashion (the weights are not held in memory).
    pub fn of_model_dir(dir: &Path) -> std::io::Result<Self> {
        Self::of_files(&[dir.join("config.json"), dir.join("model.safetensors")])
    }

    /// The fingerprint of a model path: a single file (a GGUF, which holds the configuration,
    /// weights and tokenizer) by its bytes, or an HF folder by [`of_model_dir`](Self::of_model_dir).
    pub fn of_model_path(path: &Path) -> std::io::Result<Self> {
        if path.is_file() {
            Self::of_files(&[path.to_path_buf()])
        } else {
            Self::of_model_dir(path)
        }
    }

    /// SHA-256 of the files' bytes, one after another, read in streaming fashion.
    fn of_files(paths: &[std::path::PathBuf]) -> std::io::Result<Self> {
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; 1 << 20];
        for path in paths {
            let mut file = std::fs::File::open(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
            }
        }
        Ok(Self(Sha256::from_ring(ctx.finish())))
    }
}

impl fmt::Display for BackboneFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_round_trip() {
        let d = Sha256::of(b"abc");
        assert_eq!(d.to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(Sha256::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Sha256::from_hex("zz"), None);
        assert_eq!(Sha256::of_parts([b"a".as_slice(), b"bc".as_slice()]), d);
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(Nonce::random(), Nonce::random());
    }

    #[test]
    fn fingerprint_changes_with_weights() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"weights-a").unwrap();
        let a = BackboneFingerprint::of_model_dir(dir.path()).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"weights-b").unwrap();
        let b = BackboneFingerprint::of_model_dir(dir.path()).unwrap();
        assert_ne!(a, b);
        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, b"gguf-a").unwrap();
        let c = BackboneFingerprint::of_model_path(&gguf).unwrap();
        std::fs::write(&gguf, b"gguf-b").unwrap();
        assert_ne!(c, BackboneFingerprint::of_model_path(&gguf).unwrap());
        assert_eq!(BackboneFingerprint::of_model_path(dir.path()).unwrap(), b);
        let err = BackboneFingerprint::of_model_dir(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
