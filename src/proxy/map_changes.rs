//! Route changes without a reload: when a candidate configuration is the applied one and only
//! the entries of its map files differ (a plain service gains, loses or changes a path or
//! domain), the core applies the difference over the Runtime API instead of reloading.
//!
//! The order makes every moment consistent with a later reload or restart: the live map files'
//! new text is queued first (the supervisor writes it before any restart of HAProxy or reload
//! from the live files, see `haproxy::live_files`), then each file's difference is sent as
//! `add map`, `set map` and `del map` commands. Within one map file the entries do not depend on
//! their order (see `render::maps`), so an appended entry routes exactly as the file does. If a command fails,
//! HAProxy is reloaded on the live config with the new files; if that fails too, the old files
//! are written back and the commands already sent are undone, and the change fails as a whole.
//!
//! A new plain service placed in a pre-provisioned backend needs its entries and its slots: the
//! same difference gives the entries, sent in the Runtime API session of its slot commands, with
//! the same fallback to a reload (`Core::apply_spliced`).

use std::collections::BTreeMap;

use crate::haproxy::runtime_command;
use crate::render::MapFile;

use super::{Core, ProxyError};

/// Longest command line sent at once (commands joined by `;`), well under HAProxy's buffer.
const MAX_LINE: usize = 8 * 1024;

/// A word of a Runtime API command: `;` (the command separator) and `\` escaped with `\`. Map
/// keys and backend names never hold whitespace (see `render::maps`).
fn escaped(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        if matches!(c, ';' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The Runtime API commands turning the maps `old` into `new` (same files by name; a file only
/// one side has is treated as empty on the other): for each file, `add map` for each new key and
/// `set map` for each key whose backend changed (by key), then `del map` for each key gone.
pub(super) fn commands(old: &[MapFile], new: &[MapFile]) -> Vec<String> {
    let mut names: Vec<&str> = old
        .iter()
        .chain(new.iter())
        .map(|map| map.name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    fn file_of<'a>(maps: &'a [MapFile], name: &str) -> Option<&'a MapFile> {
        maps.iter().find(|map| map.name == name)
    }
    let mut commands = Vec::new();
    for name in names {
        let (old_file, new_file) = (file_of(old, name), file_of(new, name));
        if old_file == new_file {
            continue;
        }
        let (before, after) = differing_entries(old_file, new_file);
        let file = escaped(&format!("{}/{name}", crate::render::MAPS_DIR));
        for (key, backend) in &after {
            match before.get(key) {
                None => commands.push(format!(
                    "add map {file} {} {}",
                    escaped(key),
                    escaped(backend)
                )),
                Some(old_backend) if *old_backend != *backend => commands.push(format!(
                    "set map {file} {} {}",
                    escaped(key),
                    escaped(backend)
                )),
                Some(_) => {}
            }
        }
        for key in before.keys().filter(|key| !after.contains_key(*key)) {
            commands.push(format!("del map {file} {}", escaped(key)));
        }
    }
    commands
}

/// The entries of two versions of a map file (a missing one is empty), by key, without the
/// entries both have in the same place at the start and at the end: keys are unique in a file,
/// so a key among those is in neither of the rest, and a new service's entries placed in a file
/// of 10,000 cost what they add (no map of every entry).
fn differing_entries<'a>(
    old: Option<&'a MapFile>,
    new: Option<&'a MapFile>,
) -> (BTreeMap<&'a str, &'a str>, BTreeMap<&'a str, &'a str>) {
    let entries = |file: Option<&'a MapFile>| file.into_iter().flat_map(|file| file.entries.iter());
    let length = |file: Option<&MapFile>| file.map_or(0, |file| file.entries.len());
    let same_start = entries(old)
        .zip(entries(new))
        .take_while(|(before, after)| before == after)
        .count();
    let same_end = entries(old)
        .rev()
        .zip(entries(new).rev())
        .take(length(old).min(length(new)) - same_start)
        .take_while(|(before, after)| before == after)
        .count();
    let middle = |file: Option<&'a MapFile>| {
        entries(file)
            .skip(same_start)
            .take(length(file) - same_start - same_end)
            .map(|(key, backend)| (key.as_str(), backend.as_str()))
            .collect()
    };
    (middle(old), middle(new))
}

/// Sends `commands` over the stats socket, several per line; every command must answer
/// nothing (HAProxy prints only errors for these).
async fn send(socket: &std::path::Path, commands: &[String]) -> Result<(), String> {
    let mut line = String::new();
    let mut batches = Vec::new();
    for command in commands {
        if !line.is_empty() && line.len() + command.len() + 2 > MAX_LINE {
            batches.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push_str("; ");
        }
        line.push_str(command);
    }
    if !line.is_empty() {
        batches.push(line);
    }
    for batch in batches {
        let answer = runtime_command(socket, &batch)
            .await
            .map_err(|error| format!("the stats socket: {error}"))?;
        if !answer.trim().is_empty() {
            return Err(format!("HAProxy answered `{}`", answer.trim()));
        }
    }
    Ok(())
}

impl Core {
    /// Makes HAProxy route with `maps` (the applied config's own files, new entries) without a
    /// reload when it can, else with one reload of the live config; see the module doc.
    pub(super) async fn apply_map_changes(&mut self, maps: Vec<MapFile>) -> Result<(), ProxyError> {
        let old = std::mem::take(&mut self.applied_maps);
        let written = self.haproxy.update_live_maps(&old, &maps).await;
        if let Err(error) = written {
            self.applied_maps = old;
            return Err(ProxyError::Haproxy(error));
        }
        let changes = commands(&old, &maps);
        let socket = self.haproxy.stats_socket().to_path_buf();
        let Err(why) = send(&socket, &changes).await else {
            tracing::info!(
                commands = changes.len(),
                "route change applied to HAProxy's maps at runtime, without a reload"
            );
            self.applied_maps = maps;
            return Ok(());
        };
        tracing::warn!(%why, "changing HAProxy's maps at runtime failed; reloading with the new map files");
        let started = std::time::Instant::now();
        let reloaded = self.haproxy.reload_live().await;
        let took = started.elapsed();
        self.timings.reload = Some(took);
        self.observer
            .record_reload(took, reloaded.as_ref().err().map(ToString::to_string));
        match reloaded {
            Ok(()) => {
                self.applied_maps = maps;
                Ok(())
            }
            Err(error) => {
                self.put_back_maps(&old, &maps, &socket).await;
                self.applied_maps = old;
                Err(ProxyError::Haproxy(error))
            }
        }
    }

    /// After a failed map change: the old files back, and the commands already sent undone (best
    /// effort: the old process kept serving, with whichever of them it took).
    pub(super) async fn put_back_maps(
        &self,
        old: &[MapFile],
        new: &[MapFile],
        socket: &std::path::Path,
    ) {
        if let Err(error) = self.haproxy.write_live_maps(old).await {
            tracing::error!(%error, "putting back the previous map files failed");
        }
        for command in commands(new, old) {
            let _ = send(socket, std::slice::from_ref(&command)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_difference_adds_and_sets_then_deletes_per_file() {
        let old = vec![
            MapFile::of(
                "http-1.map",
                &[("/a", "a-be0"), ("/b", "b-be0"), ("/c", "c-be0")],
            ),
            MapFile::of("https-1.map", &[("/a", "a-be0")]),
        ];
        let new = vec![
            MapFile::of(
                "http-1.map",
                &[("/d", "d-be0"), ("/a", "a-be0"), ("/b", "c-be0")],
            ),
            MapFile::of("https-1.map", &[("/a", "a-be0")]),
        ];
        assert_eq!(
            commands(&old, &new),
            vec![
                "set map maps/http-1.map /b c-be0",
                "add map maps/http-1.map /d d-be0",
                "del map maps/http-1.map /c",
            ]
        );
        assert!(commands(&new, &new).is_empty());
    }

    #[test]
    fn an_entry_placed_among_thousands_is_the_one_command() {
        let mut old = MapFile::of("http-1.map", &[]);
        for n in 0..2_000 {
            old.entries
                .push_back((format!("/s{n:05}"), format!("s{n:05}-be0")));
        }
        let mut new = old.clone();
        new.entries
            .insert(700, ("/new".to_string(), "new-be0".to_string()));
        assert_eq!(
            commands(std::slice::from_ref(&old), std::slice::from_ref(&new)),
            vec!["add map maps/http-1.map /new new-be0"]
        );
        let mut moved = new.clone();
        let last = moved.entries.pop_back().expect("an entry");
        moved.entries.push_front(last);
        moved.entries.remove(1_000);
        assert_eq!(
            commands(&[new], &[moved]),
            vec!["del map maps/http-1.map /s00998"],
            "an entry that moved is no change; only the one gone is"
        );
    }

    #[test]
    fn a_semicolon_in_a_path_is_escaped_so_it_cannot_start_another_command() {
        let new = vec![MapFile::of("http-1.map", &[("/x;del", "x-be0")])];
        assert_eq!(
            commands(&[], &new),
            vec!["add map maps/http-1.map /x\\;del x-be0"]
        );
    }
}
