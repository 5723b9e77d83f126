//! The registry's files under `<data_dir>/registry/`: a snapshot of the whole state
//! (`state.json`, the format every earlier version wrote, so it loads unchanged) and an
//! append-only log of changes (`state.log`, one JSON object per line, each synced before the
//! write it records is acknowledged). A write costs one appended line whatever the size of the
//! state; the log is folded into a new snapshot (temp file + rename, then the log is emptied)
//! once it outgrows the snapshot.
//!
//! Crash safety: a record is acknowledged only after `write` + `fdatasync`, so a SIGKILL at any
//! point leaves every acknowledged record complete. A record cut short by a crash has no
//! trailing newline; loading ignores it (it was never acknowledged). Records at or below the
//! snapshot's index are skipped, so a crash between renaming a snapshot and emptying the log
//! replays nothing twice.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The log is folded into a snapshot once it is larger than this and larger than the snapshot,
/// so compaction's cost per write stays constant.
const COMPACT_AFTER_BYTES: u64 = 4 * 1024 * 1024;

/// A file operation failed; names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub(crate) struct FileError {
    pub path: PathBuf,
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError {
        path: path.to_path_buf(),
        source,
    }
}

/// What loading found on disk.
pub(crate) struct Loaded {
    /// The snapshot's bytes, `None` when there is no snapshot yet.
    pub snapshot: Option<Vec<u8>>,
    /// Complete log lines (without their newline), oldest first.
    pub records: Vec<Vec<u8>>,
    /// Bytes of a last record cut short by a crash, ignored.
    pub torn_bytes: usize,
}

/// The snapshot and log files, and what is known about the log's state.
pub(crate) struct Files {
    dir: PathBuf,
    snapshot: PathBuf,
    log: PathBuf,
    /// Length of the log up to its last complete, acknowledged record.
    log_bytes: u64,
    snapshot_bytes: u64,
    /// An append failed and the log could not be cut back: it may end in a partial or
    /// unacknowledged record, so nothing may be appended before the next compaction.
    needs_compaction: bool,
}

impl Files {
    /// The files in `dir` (created if missing); nothing is read yet.
    pub fn new(dir: &Path) -> io::Result<Files> {
        std::fs::create_dir_all(dir)?;
        Ok(Files {
            dir: dir.to_path_buf(),
            snapshot: dir.join("state.json"),
            log: dir.join("state.log"),
            log_bytes: 0,
            snapshot_bytes: 0,
            needs_compaction: true,
        })
    }

    /// The snapshot path, for error messages.
    pub fn snapshot_path(&self) -> &Path {
        &self.snapshot
    }

    /// The log path, for error messages.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Reads the snapshot and the log's complete records.
    pub fn load(&self) -> io::Result<Loaded> {
        let snapshot = read_if_present(&self.snapshot)?;
        let log = read_if_present(&self.log)?.unwrap_or_default();
        let complete = log.iter().rposition(|b| *b == b'\n').map_or(0, |at| at + 1);
        let records = log[..complete]
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        Ok(Loaded {
            snapshot,
            records,
            torn_bytes: log.len() - complete,
        })
    }

    /// Whether the next append must wait for a compaction (after a failed append, and before
    /// the first one).
    pub fn needs_compaction(&self) -> bool {
        self.needs_compaction
    }

    /// Whether the log has grown enough to be folded into a snapshot.
    pub fn wants_compaction(&self) -> bool {
        self.log_bytes > COMPACT_AFTER_BYTES.max(self.snapshot_bytes)
    }

    /// Appends one record (a newline is added) and syncs it. On failure the log is cut back to
    /// its last acknowledged record; if even that fails, appends stop until a compaction.
    pub fn append(&mut self, record: &[u8]) -> Result<(), FileError> {
        if self.needs_compaction {
            return Err(at(&self.log)(io::Error::other(
                "the change log needs a compaction before it takes more writes",
            )));
        }
        let mut line = Vec::with_capacity(record.len() + 1);
        line.extend_from_slice(record);
        line.push(b'\n');
        let result = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .and_then(|mut file| {
                file.write_all(&line)?;
                file.sync_data()
            });
        match result {
            Ok(()) => {
                self.log_bytes += line.len() as u64;
                Ok(())
            }
            Err(error) => {
                if self.cut_back().is_err() {
                    self.needs_compaction = true;
                }
                Err(at(&self.log)(error))
            }
        }
    }

    /// Truncates the log to its last acknowledged record.
    fn cut_back(&self) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(&self.log)?;
        file.set_len(self.log_bytes)?;
        file.sync_all()
    }

    /// Replaces the snapshot with `snapshot` (temp file, sync, rename, sync the directory) and
    /// then empties the log.
    pub fn compact(&mut self, snapshot: &[u8]) -> Result<(), FileError> {
        let temp = self.snapshot.with_extension("json.tmp");
        let mut file = File::create(&temp).map_err(at(&temp))?;
        file.write_all(snapshot).map_err(at(&temp))?;
        file.sync_all().map_err(at(&temp))?;
        drop(file);
        std::fs::rename(&temp, &self.snapshot).map_err(at(&self.snapshot))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(at(&self.dir))?;
        self.snapshot_bytes = snapshot.len() as u64;
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.log)
            .and_then(|log| {
                log.set_len(0)?;
                log.sync_all()
            })
            .map_err(at(&self.log))?;
        self.log_bytes = 0;
        self.needs_compaction = false;
        Ok(())
    }
}

fn read_if_present(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_record_is_set_apart_from_complete_ones() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path()).unwrap();
        std::fs::write(
            dir.path().join("state.log"),
            b"{\"a\":1}\n{\"b\":2}\n{\"c\":",
        )
        .unwrap();
        let loaded = files.load().unwrap();
        assert_eq!(loaded.snapshot, None);
        assert_eq!(
            loaded.records,
            vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]
        );
        assert_eq!(loaded.torn_bytes, 5);
    }

    #[test]
    fn compaction_replaces_the_snapshot_and_empties_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Files::new(dir.path()).unwrap();
        assert!(
            files.append(b"x").is_err(),
            "no append before the first compaction"
        );
        files.compact(b"{}").unwrap();
        files.append(b"{\"a\":1}").unwrap();
        assert_eq!(files.load().unwrap().records.len(), 1);
        files.compact(b"{\"all\":true}").unwrap();
        let loaded = files.load().unwrap();
        assert_eq!(loaded.snapshot.as_deref(), Some(&b"{\"all\":true}"[..]));
        assert!(loaded.records.is_empty());
    }
}
