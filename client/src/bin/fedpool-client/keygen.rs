//! `fedpool-client keygen --name NAME --out DIR`: the client's private key and certificate signing
//! request, made on the client so the key never leaves it. `DIR/client.key` (mode 0600, created
//! with that mode) and `DIR/client.csr` (PEM, subject CN = NAME); the coordinator signs the request
//! with `fedpool-server certs sign --dir CERTS --csr client.csr` and sends back the certificate.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fedpool_common::checkpoint::{atomic_write, atomic_write_private};

/// The private key's file name in `--out`.
pub(crate) const KEY_FILE: &str = "client.key";
/// The request's file name in `--out`.
pub(crate) const CSR_FILE: &str = "client.csr";

/// `fedpool-client keygen` options.
#[derive(Debug, Clone, Args)]
pub(crate) struct KeygenArgs {
    /// The client's name: its identity in the federation and its certificate's subject CN
    /// ([A-Za-z0-9._-], at most 64, not starting with '.' or '-').
    #[arg(long)]
    pub(crate) name: String,
    /// Folder for client.key and client.csr (created if missing).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Overwrite an existing client.key / client.csr.
    #[arg(long)]
    pub(crate) force: bool,
}

/// The files [`run_keygen`] wrote.
#[derive(Debug)]
pub(crate) struct Keygen {
    /// The private key (0600).
    pub(crate) key: PathBuf,
    /// The certificate signing request.
    pub(crate) csr: PathBuf,
}

/// Generates the key and the request and writes them (the key first: a request without its key
/// would be useless).
pub(crate) fn run_keygen(args: &KeygenArgs) -> anyhow::Result<Keygen> {
    let request = fedpool_transport::tls::client_key_request(&args.name)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = Keygen { key: args.out.join(KEY_FILE), csr: args.out.join(CSR_FILE) };
    if !args.force {
        for p in [&out.key, &out.csr] {
            anyhow::ensure!(!p.exists(), "{} already exists; pass --force to overwrite it", p.display());
        }
    }
    // The key is created 0600 (never readable by others, not even briefly); the request is public.
    atomic_write_private(&out.key, request.key_pem.as_bytes())
        .with_context(|| format!("cannot write {}", out.key.display()))?;
    atomic_write(&out.csr, request.csr_pem.as_bytes())
        .with_context(|| format!("cannot write {}", out.csr.display()))?;
    Ok(out)
}
