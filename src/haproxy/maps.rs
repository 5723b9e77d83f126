//! The map files HAProxy routes plain rules with (see `render::maps`): staged with each
//! candidate, checked by `haproxy -c` with it, promoted with it, and changed at runtime.
//!
//! haproxy.cfg names its maps relative to the data directory (`maps/http-1.map`), where HAProxy
//! runs. So that `haproxy -c` reads the *candidate's* maps and no live one changes before the
//! candidate is accepted, the check runs in `<data>/candidate/`: its `maps/` holds the candidate
//! maps, and every other entry of the data directory (error pages, certificates, the operator's
//! files) appears there as a symbolic link to the real one, so every other relative path
//! resolves as it does for the serving process. Promoting moves the candidate maps over the live
//! ones (each rename atomic) and removes the live maps the candidate no longer has, just before
//! the candidate config replaces the live one.
//!
//! A route change that touches map entries only is applied with `add map`/`set map`/`del map`
//! on the stats socket after the live map files are rewritten to agree (see
//! `proxy::map_changes`), so a reload, an HAProxy restart or a flow-proxy restart reads what runs.

use std::path::{Path, PathBuf};

use super::{io_error, Haproxy, HaproxyError, HaproxyPaths, LiveWrite};
use crate::render::{MapFile, MAPS_DIR};

/// The directory `haproxy -c` runs in, inside the data directory.
const CHECK_DIR: &str = "candidate";

/// The data directory (where HAProxy runs and haproxy.cfg lives).
fn data_dir(paths: &HaproxyPaths) -> PathBuf {
    data_dir_of(&paths.config)
}

/// The directory of a config file (live or candidate): the data directory.
fn data_dir_of(config_file: &Path) -> PathBuf {
    config_file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The directory `haproxy -c` runs in for `paths`' candidates.
fn check_dir(paths: &HaproxyPaths) -> PathBuf {
    data_dir(paths).join(CHECK_DIR)
}

/// The directory `haproxy -c` runs in for the candidate file `candidate` (prepared by
/// [`prepare_check_dir_for`]).
pub(super) fn check_dir_for(candidate: &Path) -> PathBuf {
    data_dir_of(candidate).join(CHECK_DIR)
}

pub(super) fn live_maps_dir(paths: &HaproxyPaths) -> PathBuf {
    data_dir(paths).join(MAPS_DIR)
}

fn candidate_maps_dir(paths: &HaproxyPaths) -> PathBuf {
    check_dir(paths).join(MAPS_DIR)
}

/// Makes the check directory mirror the data directory: a link `candidate/<name>` →
/// `../<name>` for each entry but the live maps and the check directory itself, no link to
/// an entry that is gone, and a `maps/` directory of its own.
pub(super) async fn prepare_check_dir(paths: &HaproxyPaths) -> Result<(), HaproxyError> {
    prepare_check_dir_for(&paths.candidate).await
}

/// [`prepare_check_dir`] for the candidate file `candidate`.
pub(super) async fn prepare_check_dir_for(candidate: &Path) -> Result<(), HaproxyError> {
    let data = data_dir_of(candidate);
    let check = check_dir_for(candidate);
    let candidate_maps = check.join(MAPS_DIR);
    tokio::fs::create_dir_all(&candidate_maps)
        .await
        .map_err(io_error(format!("creating {}", candidate_maps.display())))?;
    let mut wanted = Vec::new();
    let mut entries = tokio::fs::read_dir(&data)
        .await
        .map_err(io_error(format!("reading {}", data.display())))?;
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(io_error(format!("reading {}", data.display())))?
    {
        let name = entry.file_name();
        if name == CHECK_DIR || name == MAPS_DIR {
            continue;
        }
        wanted.push(name);
    }
    for name in &wanted {
        let link = check.join(name);
        if tokio::fs::symlink_metadata(&link).await.is_err() {
            tokio::fs::symlink(Path::new("..").join(name), &link)
                .await
                .map_err(io_error(format!("linking {}", link.display())))?;
        }
    }
    let mut links = tokio::fs::read_dir(&check)
        .await
        .map_err(io_error(format!("reading {}", check.display())))?;
    while let Ok(Some(entry)) = links.next_entry().await {
        let name = entry.file_name();
        if name != MAPS_DIR && !wanted.contains(&name) {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
    Ok(())
}

/// Makes `dir` hold exactly `maps` (each written to a temporary name, then renamed).
async fn write_maps_into(dir: &Path, maps: &[MapFile]) -> Result<(), HaproxyError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io_error(format!("creating {}", dir.display())))?;
    for map in maps {
        write_map(dir, map).await?;
    }
    remove_maps_except(dir, maps).await
}

/// Writes `map` into `dir` by an atomic rename.
async fn write_map(dir: &Path, map: &MapFile) -> Result<(), HaproxyError> {
    let path = dir.join(&map.name);
    let staging = dir.join(format!(".{}.new", map.name));
    tokio::fs::write(&staging, map.text())
        .await
        .map_err(io_error(format!("writing {}", staging.display())))?;
    tokio::fs::rename(&staging, &path)
        .await
        .map_err(io_error(format!("moving {} into place", staging.display())))
}

/// Removes the map files of `dir` that `keep` does not name.
async fn remove_maps_except(dir: &Path, keep: &[MapFile]) -> Result<(), HaproxyError> {
    let mut entries = tokio::fs::read_dir(dir)
        .await
        .map_err(io_error(format!("reading {}", dir.display())))?;
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name();
        if !keep.iter().any(|map| name == map.name.as_str()) {
            tokio::fs::remove_file(entry.path())
                .await
                .map_err(io_error(format!("removing {}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// Copies the live maps to the candidate's, for checking the live config again (at start).
pub(super) async fn stage_live_maps(paths: &HaproxyPaths) -> Result<(), HaproxyError> {
    prepare_check_dir(paths).await?;
    let live = read_maps(&live_maps_dir(paths)).await?;
    write_maps_into(&candidate_maps_dir(paths), &live).await
}

/// Moves the candidate maps over the live ones and removes the live maps the candidate does not
/// have; called just before the candidate config replaces the live one.
pub(super) async fn promote_maps(paths: &HaproxyPaths) -> Result<(), HaproxyError> {
    let candidate = candidate_maps_dir(paths);
    let live = live_maps_dir(paths);
    tokio::fs::create_dir_all(&live)
        .await
        .map_err(io_error(format!("creating {}", live.display())))?;
    let staged = match tokio::fs::metadata(&candidate).await {
        Ok(_) => read_maps(&candidate).await?,
        // Nothing was ever staged (no check directory yet): nothing names a map.
        Err(_) => Vec::new(),
    };
    for map in &staged {
        let from = candidate.join(&map.name);
        let to = live.join(&map.name);
        tokio::fs::rename(&from, &to)
            .await
            .map_err(io_error(format!(
                "moving {} to {}",
                from.display(),
                to.display()
            )))?;
    }
    remove_maps_except(&live, &staged).await
}

/// The map files in `dir`, by name (entries: the first two words of each line).
async fn read_maps(dir: &Path) -> Result<Vec<MapFile>, HaproxyError> {
    let mut maps = Vec::new();
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(maps),
        Err(error) => return Err(io_error(format!("reading {}", dir.display()))(error)),
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !name.ends_with(".map") || name.starts_with('.') {
            continue;
        }
        let text = tokio::fs::read_to_string(entry.path())
            .await
            .map_err(io_error(format!("reading {}", entry.path().display())))?;
        let entries = text
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                Some((words.next()?.to_string(), words.next()?.to_string()))
            })
            .collect();
        maps.push(MapFile { name, entries });
    }
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(maps)
}

impl Haproxy {
    /// The live map files, by name.
    pub async fn live_maps(&self) -> Result<Vec<MapFile>, HaproxyError> {
        self.flush_live_writes().await?;
        read_maps(&live_maps_dir(&self.paths)).await
    }

    /// Rewrites the live map files to hold exactly `maps`, without a reload: used with a runtime
    /// change of the same entries, and to put the files back after a failed change.
    pub async fn write_live_maps(&self, maps: &[MapFile]) -> Result<(), HaproxyError> {
        self.flush_live_writes().await?;
        write_maps_into(&live_maps_dir(&self.paths), maps).await
    }

    /// Makes the live map files `new` when they are `old` now: queues (see
    /// [`Haproxy::write_live_later`]) the files whose entries changed and the removal of those
    /// `new` does not name.
    pub async fn update_live_maps(
        &self,
        old: &[MapFile],
        new: &[MapFile],
    ) -> Result<(), HaproxyError> {
        let writes = live_map_writes(old, new);
        if writes.is_empty() {
            return Ok(());
        }
        self.write_live_later(writes).await
    }

    /// Stages `maps` as the candidate's (in the check directory), as [`Haproxy::promote`] moves
    /// them over the live ones.
    pub(super) async fn stage_candidate_maps(&self, maps: &[MapFile]) -> Result<(), HaproxyError> {
        prepare_check_dir(&self.paths).await?;
        write_maps_into(&candidate_maps_dir(&self.paths), maps).await
    }
}

/// The live writes that make the map files `new` when they are `old` now: the files whose
/// entries changed, and the removal of those `new` does not name.
pub fn live_map_writes(old: &[MapFile], new: &[MapFile]) -> Vec<LiveWrite> {
    let changed = new
        .iter()
        .filter(|map| !old.contains(map))
        .map(|map| LiveWrite::Map(map.clone()));
    let gone = old
        .iter()
        .filter(|map| !new.iter().any(|kept| kept.name == map.name))
        .map(|map| LiveWrite::RemoveMap(map.name.clone()));
    changed.chain(gone).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn candidate_maps_reach_the_live_directory_only_when_promoted() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let paths = HaproxyPaths::under(dir.path());
        std::fs::create_dir(dir.path().join("errors")).expect("errors");
        let old = vec![
            MapFile::of("http-1.map", &[("/a", "a-be0")]),
            MapFile::of("http-2.map", &[]),
        ];
        write_maps_into(&live_maps_dir(&paths), &old)
            .await
            .expect("live maps");

        prepare_check_dir(&paths).await.expect("check dir");
        let new = vec![MapFile::of(
            "http-1.map",
            &[("/b", "b-be0"), ("/a", "a-be0")],
        )];
        write_maps_into(&candidate_maps_dir(&paths), &new)
            .await
            .expect("candidate maps");
        assert_eq!(
            read_maps(&live_maps_dir(&paths)).await.expect("read"),
            old,
            "staging changes no live map"
        );
        assert!(
            std::fs::read_link(check_dir(&paths).join("errors")).is_ok(),
            "the check directory links the data directory's entries"
        );

        promote_maps(&paths).await.expect("promote");
        assert_eq!(read_maps(&live_maps_dir(&paths)).await.expect("read"), new);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("maps/http-1.map")).expect("file"),
            "/b b-be0\n/a a-be0\n"
        );
    }
}
