//! The certificate files HAProxy reads: one PEM file per certificate and the crt-list naming
//! them, under `<data-dir>/certs/`.
//!
//! Every file is named by its content (`<name>-<fingerprint>.pem`, `crt-list-<digest>`), so
//! writing the files of a candidate configuration never changes a file the running HAProxy (or
//! one the supervisor restarts from the live haproxy.cfg) reads: a rejected candidate leaves
//! only unreferenced files behind, removed by the next [`Haproxy::prune_certificates`].
//! Certificate files hold private keys: the directory is 0700 and every file 0600.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{io_error, Haproxy, HaproxyError};
use crate::certs::Certificate;

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
    pub async fn write_certificates(
        &self,
        certificates: &[&Certificate],
    ) -> Result<Option<PathBuf>, HaproxyError> {
        if certificates.is_empty() {
            return Ok(None);
        }
        let directory = self.certs_dir();
        let files: Vec<(String, String)> = certificates
            .iter()
            .map(|certificate| (file_name(certificate), certificate.pem().to_string()))
            .collect();
        tokio::task::spawn_blocking(move || write_all(&directory, &files))
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

fn write_all(directory: &Path, files: &[(String, String)]) -> Result<PathBuf, HaproxyError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(directory)
        .map_err(io_error(format!("creating {}", directory.display())))?;
    let mut list = String::new();
    for (name, pem) in files {
        write_private(&directory.join(name), pem.as_bytes())?;
        list.push_str(&format!("{CERTS_DIR}/{name}\n"));
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
        for line in std::fs::read_to_string(&list_path)?.lines() {
            if let Some(name) = Path::new(line.trim()).file_name() {
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
