//! Writes of the live files (haproxy.cfg and its map files) that a runtime change leads to,
//! queued to the supervisor instead of made while the caller waits.
//!
//! A change HAProxy takes over the Runtime API is live once its commands are answered; the files
//! only matter to a process started from them later. So the core queues the files' new text
//! *before* it sends the commands ([`super::Haproxy::write_live_later`]) and answers without
//! waiting for the disk. The supervisor writes them in the order queued, and always before it
//! starts a process from the live file: it takes queued commands before it notices a dead
//! process, and it writes whatever is still unwritten before a reload from the live file or a
//! replacement. Whoever reads or writes a live file directly (a candidate's start, `/config`, a
//! rollback) first waits until every queued write is done ([`super::Haproxy::flush_live_writes`]).
//!
//! A write that fails (a full disk) stays queued: it is tried again at each later command, and
//! the failure is the answer of the next flush, so the next change that touches the files fails
//! with it rather than building on a file that is not what HAProxy runs.

use std::path::Path;
use std::sync::Arc;

use super::{io_error, HaproxyError, HaproxyPaths};
use crate::render::MapFile;

/// One live file's next contents.
#[derive(Debug, Clone)]
pub enum LiveWrite {
    /// haproxy.cfg.
    Config(Arc<String>),
    /// A map file of the live map directory (its text is made when it is written: the copy
    /// queued costs nothing).
    Map(MapFile),
    /// A map file the configuration no longer names.
    RemoveMap(String),
}

impl LiveWrite {
    /// Whether `self` and `other` write the same file (the later one makes the earlier moot).
    fn same_file(&self, other: &LiveWrite) -> bool {
        match (self, other) {
            (LiveWrite::Config(_), LiveWrite::Config(_)) => true,
            (
                LiveWrite::Map(MapFile { name, .. }) | LiveWrite::RemoveMap(name),
                LiveWrite::Map(MapFile { name: other, .. }) | LiveWrite::RemoveMap(other),
            ) => name == other,
            _ => false,
        }
    }
}

/// Writes not done yet, in order; a later write of a file replaces an earlier one.
#[derive(Debug, Default)]
pub(super) struct Unwritten(Vec<LiveWrite>);

impl Unwritten {
    pub(super) fn push(&mut self, writes: Vec<LiveWrite>) {
        for write in writes {
            self.0.retain(|queued| !queued.same_file(&write));
            self.0.push(write);
        }
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Writes everything queued (on a blocking thread); what failed stays queued, and the first
    /// failure is returned.
    pub(super) async fn write(&mut self, paths: &HaproxyPaths) -> Result<(), HaproxyError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut self.0);
        let paths = paths.clone();
        let written = tokio::task::spawn_blocking(move || write_all(&paths, writes)).await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err((error, left))) => {
                tracing::error!(%error, "writing the live files failed; trying again at the next change");
                self.0 = left;
                Err(error)
            }
            Err(error) => Err(HaproxyError::Io {
                context: "writing the live files".to_string(),
                source: std::io::Error::other(error.to_string()),
            }),
        }
    }
}

/// Writes `writes` in order, each by an atomic rename; on a failure, the error and the writes
/// from the failed one on.
fn write_all(
    paths: &HaproxyPaths,
    writes: Vec<LiveWrite>,
) -> Result<(), (HaproxyError, Vec<LiveWrite>)> {
    let maps_dir = super::maps::live_maps_dir(paths);
    for (done, write) in writes.iter().enumerate() {
        let result = match write {
            LiveWrite::Config(text) => replace_file(&paths.config, text.as_bytes()),
            LiveWrite::Map(map) => std::fs::create_dir_all(&maps_dir)
                .map_err(io_error(format!("creating {}", maps_dir.display())))
                .and_then(|()| replace_file(&maps_dir.join(&map.name), map.text().as_bytes())),
            LiveWrite::RemoveMap(name) => {
                let path = maps_dir.join(name);
                match std::fs::remove_file(&path) {
                    Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                        Err(io_error(format!("removing {}", path.display()))(error))
                    }
                    _ => Ok(()),
                }
            }
        };
        if let Err(error) = result {
            return Err((error, writes.into_iter().skip(done).collect()));
        }
    }
    Ok(())
}

/// Writes `contents` to `path` through a staging file renamed over it.
fn replace_file(path: &Path, contents: &[u8]) -> Result<(), HaproxyError> {
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = path.with_file_name(format!(".{file_name}.queued"));
    std::fs::write(&staging, contents)
        .map_err(io_error(format!("writing {}", staging.display())))?;
    std::fs::rename(&staging, path)
        .map_err(io_error(format!("moving {} into place", staging.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(name: &str, key: &str, backend: &str) -> LiveWrite {
        LiveWrite::Map(MapFile::of(name, &[(key, backend)]))
    }

    #[tokio::test]
    async fn queued_writes_land_in_order_and_a_later_write_of_a_file_wins() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let paths = HaproxyPaths::under(dir.path());
        let mut unwritten = Unwritten::default();
        unwritten.push(vec![
            LiveWrite::Config(Arc::new("first".to_string())),
            map("http-1.map", "/a", "a-be0"),
        ]);
        unwritten.push(vec![
            LiveWrite::Config(Arc::new("second".to_string())),
            LiveWrite::RemoveMap("http-1.map".to_string()),
            map("http-2.map", "/b", "b-be0"),
        ]);
        unwritten.write(&paths).await.expect("written");
        assert!(unwritten.is_empty());
        let read = |path: &Path| std::fs::read_to_string(path).ok();
        assert_eq!(read(&paths.config).as_deref(), Some("second"));
        let maps = dir.path().join(crate::render::MAPS_DIR);
        assert_eq!(read(&maps.join("http-1.map")), None);
        assert_eq!(
            read(&maps.join("http-2.map")).as_deref(),
            Some("/b b-be0\n")
        );
    }

    #[tokio::test]
    async fn a_write_that_fails_stays_queued_until_it_succeeds() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let paths = HaproxyPaths::under(&dir.path().join("not-yet"));
        let mut unwritten = Unwritten::default();
        unwritten.push(vec![LiveWrite::Config(Arc::new("text".to_string()))]);
        let error = unwritten.write(&paths).await.expect_err("no directory");
        assert!(error.to_string().contains("not-yet"), "{error}");
        assert!(!unwritten.is_empty());
        std::fs::create_dir(dir.path().join("not-yet")).expect("directory");
        unwritten.write(&paths).await.expect("written now");
        assert_eq!(
            std::fs::read_to_string(&paths.config).expect("the live file"),
            "text"
        );
    }
}
