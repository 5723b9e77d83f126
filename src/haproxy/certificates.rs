//! The certificate files HAProxy reads: one PEM file per certificate and the crt-list naming
//! them, under `<data-dir>/certs/`.
//!
//! Every file is named by its content (`<name>-<fingerprint>.pem`, `crt-list-<digest>`), so
//! writing the files of a candidate configuration never changes a file the running HAProxy (or
//! one the supervisor restarts from the live haproxy.cfg) reads: a rejected candidate leaves
//! only unreferenced files behind, removed by the next [`Haproxy::prune_certificates`].
//! Certificate files hold private keys: the directory is 0700 and every file 0600.
//!
//! Mutual TLS (`verifyClientSsl`) is per crt-list line: for each domain of such a service the
//! list starts with `<cert> [verify required ca-file certs/ca-<digest>.pem] <domain>`, so HAProxy
//! asks for a client certificate only when the client names that domain by SNI (HAProxy takes
//! the first entry for a name, and these lines come first); every other name keeps the plain
//! lines, whose clients are never asked for a certificate. The `--ca-file` is copied here under
//! a content-addressed name like the certificates, so haproxy.cfg never names a path outside the
//! data directory.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{io_error, Haproxy, HaproxyError};
use crate::certs::Certificate;

/// The CA of `--ca-file`: the certificates (PEM) client certificates must be signed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCa {
    pem: String,
}

/// Why `--ca-file` was refused.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// The file could not be read.
    #[error("--ca-file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file holds no PEM certificate (or something else besides certificates).
    #[error("--ca-file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl ClientCa {
    /// Reads `path`: one or more PEM certificates and nothing else.
    pub fn read(path: &Path) -> Result<ClientCa, CaFileError> {
        let bytes = std::fs::read(path).map_err(|source| CaFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ClientCa::parse(&bytes).map_err(|reason| CaFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Checks that `bytes` are PEM certificates only, each one a parsable X.509 certificate.
    pub fn parse(bytes: &[u8]) -> Result<ClientCa, String> {
        let blocks = pem::parse_many(bytes).map_err(|error| format!("not PEM: {error}"))?;
        if blocks.is_empty() {
            return Err("no PEM certificate in it".into());
        }
        for block in &blocks {
            if block.tag() != "CERTIFICATE" {
                return Err(format!(
                    "holds a {} block; a CA file holds certificates only",
                    block.tag()
                ));
            }
            x509_parser::parse_x509_certificate(block.contents())
                .map_err(|error| format!("a certificate does not parse: {error}"))?;
        }
        Ok(ClientCa {
            pem: pem::encode_many(&blocks),
        })
    }

    /// `ca-<first 16 hex digits of the SHA-256 of the PEM>.pem`.
    fn file_name(&self) -> String {
        format!(
            "ca-{}.pem",
            hex_prefix(&Sha256::digest(self.pem.as_bytes()))
        )
    }
}

/// The crt-list lines of the domains whose clients must present a certificate signed by `ca`.
#[derive(Debug, Clone)]
pub struct ClientAuth<'a> {
    /// The CA client certificates are checked against.
    pub ca: &'a ClientCa,
    /// Each SNI filter (an exact domain or `*.domain`) with the certificate served for it.
    pub domains: Vec<(String, &'a Certificate)>,
}

/// The certificate to serve for `domain` (an SNI filter) of service `service`: one whose names
/// cover it (the service's own first), else the service's own, else the default (the first).
pub fn certificate_for<'a>(
    certificates: &[&'a Certificate],
    service: &str,
    domain: &str,
) -> Option<&'a Certificate> {
    let covers = |certificate: &&&Certificate| {
        certificate
            .info()
            .dns_names
            .iter()
            .any(|name| name_covers(name, domain))
    };
    let own = |certificate: &&&Certificate| certificate.name().as_str() == service;
    certificates
        .iter()
        .filter(covers)
        .find(own)
        .or_else(|| certificates.iter().find(covers))
        .or_else(|| certificates.iter().find(own))
        .or_else(|| certificates.first())
        .copied()
}

/// Whether certificate name `name` (possibly `*.x`) is valid for `domain` (possibly `*.x`).
fn name_covers(name: &str, domain: &str) -> bool {
    let name = name.to_ascii_lowercase();
    if name == domain {
        return true;
    }
    match (name.strip_prefix("*."), domain.split_once('.')) {
        (Some(parent), Some((label, rest))) => label != "*" && rest == parent,
        _ => false,
    }
}

/// The directory, relative to the data directory (where HAProxy runs).
pub const CERTS_DIR: &str = "certs";

impl Haproxy {
    fn certs_dir(&self) -> PathBuf {
        self.paths
            .config
            .parent()
            .unwrap_or(Path::new("."))
            .join(CERTS_DIR)
    }

    /// Writes the files of `certificates` (sorted by name; the first is the default certificate
    /// for clients without SNI) and their crt-list where missing; returns the crt-list's path
    /// relative to the data directory, `None` when there is no certificate.
    ///
    /// The domains of `client_auth` come first in the list, each asking for a client certificate.
    pub async fn write_certificates(
        &self,
        certificates: &[&Certificate],
        client_auth: Option<&ClientAuth<'_>>,
    ) -> Result<Option<PathBuf>, HaproxyError> {
        if certificates.is_empty() {
            return Ok(None);
        }
        let directory = self.certs_dir();
        let mut files: Vec<(String, String)> = Vec::new();
        let mut list = String::new();
        if let Some(auth) = client_auth.filter(|auth| !auth.domains.is_empty()) {
            let ca_name = auth.ca.file_name();
            files.push((ca_name.clone(), auth.ca.pem.clone()));
            for (domain, certificate) in &auth.domains {
                let name = file_name(certificate);
                list.push_str(&format!(
                    "{CERTS_DIR}/{name} [verify required ca-file {CERTS_DIR}/{ca_name}] {domain}\n"
                ));
                files.push((name, certificate.pem().to_string()));
            }
        }
        for certificate in certificates {
            let name = file_name(certificate);
            list.push_str(&format!("{CERTS_DIR}/{name}\n"));
            files.push((name, certificate.pem().to_string()));
        }
        tokio::task::spawn_blocking(move || write_all(&directory, &files, &list))
            .await
            .map_err(|error| HaproxyError::Io {
                context: "writing the certificate files".into(),
                source: std::io::Error::other(error),
            })?
            .map(Some)
    }

    /// Removes the files under `certs/` that `keep` (the live crt-list) does not name.
    pub async fn prune_certificates(&self, keep: Option<&Path>) {
        let directory = self.certs_dir();
        let keep = keep.map(Path::to_path_buf);
        let pruned = tokio::task::spawn_blocking(move || prune(&directory, keep.as_deref())).await;
        if let Ok(Err(error)) = pruned {
            tracing::warn!(%error, "removing unused certificate files failed");
        }
    }
}

/// `<name>-<first 16 hex digits of the fingerprint>.pem`.
fn file_name(certificate: &Certificate) -> String {
    let fingerprint = &certificate.info().fingerprint;
    format!(
        "{}-{}.pem",
        certificate.name(),
        &fingerprint[..fingerprint.len().min(16)]
    )
}

fn write_all(
    directory: &Path,
    files: &[(String, String)],
    list: &str,
) -> Result<PathBuf, HaproxyError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(directory)
        .map_err(io_error(format!("creating {}", directory.display())))?;
    for (name, pem) in files {
        write_private(&directory.join(name), pem.as_bytes())?;
    }
    let digest = hex_prefix(&Sha256::digest(list.as_bytes()));
    let list_name = format!("crt-list-{digest}");
    write_private(&directory.join(&list_name), list.as_bytes())?;
    Ok(Path::new(CERTS_DIR).join(list_name))
}

/// Writes `contents` to `path` with mode 0600 unless it exists already (names are content
/// addressed), through a temporary file and a rename so a reader never sees half a file.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), HaproxyError> {
    if path.exists() {
        return Ok(());
    }
    let staging = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staging)
        .map_err(io_error(format!("writing {}", staging.display())))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_error(format!("writing {}", staging.display())))?;
    std::fs::rename(&staging, path)
        .map_err(io_error(format!("moving {} into place", path.display())))
}

fn prune(directory: &Path, keep: Option<&Path>) -> std::io::Result<()> {
    let mut kept = BTreeSet::new();
    if let Some(list) = keep {
        let list_path = directory.join(list.file_name().unwrap_or_default());
        kept.insert(list_path.clone());
        // Every word naming a file under certs/: the certificate, and a line's `ca-file`.
        let listed = std::fs::read_to_string(&list_path)?;
        let words = listed
            .split_whitespace()
            .map(|word| word.trim_matches(|c| c == '[' || c == ']'));
        for word in words.filter(|word| word.starts_with(&format!("{CERTS_DIR}/"))) {
            if let Some(name) = Path::new(word).file_name() {
                kept.insert(directory.join(name));
            }
        }
    }
    let entries = match std::fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let path = entry?.path();
        if !kept.contains(&path) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_cover_exact_and_one_label_wildcards() {
        assert!(name_covers("a.example.com", "a.example.com"));
        assert!(name_covers("*.example.com", "a.example.com"));
        assert!(name_covers("*.example.com", "*.example.com"));
        assert!(name_covers("A.Example.com", "a.example.com"));
        assert!(!name_covers("*.example.com", "b.a.example.com"));
        assert!(!name_covers("*.example.com", "example.com"));
        assert!(!name_covers("a.example.com", "b.example.com"));
    }

    #[test]
    fn a_ca_file_holds_certificates_only() {
        let key = rcgen::KeyPair::generate()
            .map_err(|e| e.to_string())
            .unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let parsed = ClientCa::parse(ca.pem().as_bytes()).unwrap();
        assert!(parsed.file_name().starts_with("ca-"));
        assert_eq!(parsed, ClientCa::parse(ca.pem().as_bytes()).unwrap());
        assert!(ClientCa::parse(b"").unwrap_err().contains("no PEM"));
        let with_key = format!("{}{}", ca.pem(), key.serialize_pem());
        assert!(ClientCa::parse(with_key.as_bytes())
            .unwrap_err()
            .contains("PRIVATE KEY"));
    }
}
