//! The registry's state: KV entries and their tombstones, agent-registered services and their
//! checks, the one raft-like index counter and the per-endpoint indexes derived from it. Every
//! write goes through [`Store::write`], which bumps the counter, persists the whole state
//! atomically (temp file + rename) and wakes blocking queries, in that order.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::EmbeddedError;

/// Check status values, as Consul spells them.
pub(crate) const PASSING: &str = "passing";
pub(crate) const WARNING: &str = "warning";
pub(crate) const CRITICAL: &str = "critical";

/// A write could not be made durable.
#[derive(Debug, thiserror::Error)]
#[error("persisting registry state to {path}: {source}")]
pub(crate) struct PersistError {
    path: String,
    source: std::io::Error,
}

/// One KV entry. The value is kept as bytes and persisted as base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct KvEntry {
    pub key: String,
    pub flags: u64,
    #[serde(with = "base64_bytes")]
    pub value: Vec<u8>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// An agent-registered service instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Service {
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    pub address: String,
    /// `None` when the registration carried no `Meta` (health shows `null`, catalog `{}`).
    pub meta: Option<BTreeMap<String, String>>,
    pub port: i64,
    /// Tagged addresses given explicitly at registration.
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub kind: String,
    pub create_index: u64,
    pub modify_index: u64,
}

/// An address/port pair from `TaggedAddresses`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct TaggedAddress {
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Port")]
    pub port: i64,
}

/// DNS weights of an instance; Consul defaults both to 1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Weights {
    #[serde(rename = "Passing")]
    pub passing: i64,
    #[serde(rename = "Warning")]
    pub warning: i64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// What a check probes; drives the runner in `checks.rs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) enum CheckKind {
    Http {
        url: String,
        method: String,
        header: BTreeMap<String, Vec<String>>,
        body: String,
    },
    Tcp {
        address: String,
    },
    Ttl,
    /// Registered and shown, but never probed (gRPC, alias): stays at its initial status.
    Unprobed {
        type_name: String,
    },
}

impl CheckKind {
    /// The `Type` field of the check as Consul reports it.
    pub fn type_name(&self) -> &str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Ttl => "ttl",
            CheckKind::Unprobed { type_name } => type_name,
        }
    }
}

/// How a check runs: kind plus timing, all durations in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct CheckDefinition {
    pub kind: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub ttl_ms: u64,
    /// `DeregisterCriticalServiceAfter`, 0 when not set.
    pub deregister_after_ms: u64,
}

/// A service check registered through the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Check {
    pub check_id: String,
    pub name: String,
    pub status: String,
    pub notes: String,
    pub output: String,
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    pub definition: CheckDefinition,
    pub create_index: u64,
    pub modify_index: u64,
    /// When the check last went critical; drives `DeregisterCriticalServiceAfter`. Not persisted:
    /// after a restart the clock starts again.
    #[serde(skip)]
    pub critical_since: Option<Instant>,
}

/// A check as handed to [`State::register_service`] (indexes are filled in there).
#[derive(Debug, Clone)]
pub(crate) struct NewCheck {
    pub check_id: String,
    pub name: String,
    pub notes: String,
    pub initial_status: String,
    pub definition: CheckDefinition,
}

/// The whole persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    pub node_id: String,
    /// The global raft-like index: the index of the last write.
    pub index: u64,
    /// Index at which the node and its `serfHealth` check were created.
    pub node_index: u64,
    pub kv: BTreeMap<String, KvEntry>,
    /// Deleted keys and the index of their deletion, so a delete raises a prefix's index.
    pub tombstones: BTreeMap<String, u64>,
    /// Max index of any KV write, tombstones included.
    pub kv_index: u64,
    pub services: BTreeMap<String, Service>,
    pub checks: BTreeMap<String, Check>,
    /// Index of the last change to the set of services (`/v1/catalog/services`).
    pub services_index: u64,
    /// Per-service-name index: last change to any instance of that name or its checks.
    pub service_indexes: BTreeMap<String, u64>,
    /// Index at which the last service name disappeared (used for unknown services).
    pub extinction_index: u64,
}

/// What a registration changed, so the check runner can start and stop probes.
#[derive(Debug, Default)]
pub(crate) struct RegisterOutcome {
    /// Checks that are new or whose definition changed: (re)start their runner.
    pub started: Vec<(String, CheckDefinition)>,
    /// Checks that went away: stop their runner.
    pub removed: Vec<String>,
}

impl State {
    fn fresh() -> State {
        State {
            node_id: random_uuid(),
            index: 1,
            node_index: 1,
            kv: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            kv_index: 0,
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            services_index: 0,
            service_indexes: BTreeMap::new(),
            extinction_index: 0,
        }
    }

    // ---- KV ----------------------------------------------------------------------------

    /// Index for a single-key read: the entry's ModifyIndex, else the table index.
    pub fn kv_key_index(&self, key: &str) -> u64 {
        match self.kv.get(key) {
            Some(entry) => entry.modify_index,
            None => self.kv_index,
        }
        .max(1)
    }

    /// Index for a prefix read: max ModifyIndex under the prefix counting tombstones; the table
    /// index when that is 0.
    pub fn kv_prefix_index(&self, prefix: &str) -> u64 {
        let live = self
            .kv_under(prefix)
            .map(|entry| entry.modify_index)
            .max()
            .unwrap_or(0);
        let dead = self
            .tombstones
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, index)| *index)
            .max()
            .unwrap_or(0);
        let index = live.max(dead);
        if index == 0 { self.kv_index } else { index }.max(1)
    }

    /// Entries whose key starts with `prefix`, sorted by key.
    pub fn kv_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KvEntry> + 'a {
        self.kv
            .range(prefix.to_string()..)
            .take_while(move |(key, _)| key.starts_with(prefix))
            .map(|(_, entry)| entry)
    }

    /// PUT semantics: `cas` None always writes; `Some(0)` only creates; `Some(n)` only when
    /// ModifyIndex == n. Returns whether the write happened.
    pub fn kv_put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
        index: u64,
    ) -> bool {
        let existing = self.kv.get(key);
        match (cas, existing) {
            (Some(0), Some(_)) => return false,
            (Some(n), Some(entry)) if n != 0 && entry.modify_index != n => return false,
            (Some(n), None) if n != 0 => return false,
            _ => {}
        }
        let create_index = existing.map_or(index, |entry| entry.create_index);
        self.kv.insert(
            key.to_string(),
            KvEntry {
                key: key.to_string(),
                flags,
                value,
                create_index,
                modify_index: index,
            },
        );
        self.tombstones.remove(key);
        self.kv_index = index;
        true
    }

    /// DELETE semantics. Returns (answer, whether anything changed).
    pub fn kv_delete(
        &mut self,
        key: &str,
        recurse: bool,
        cas: Option<u64>,
        index: u64,
    ) -> (bool, bool) {
        if recurse {
            let doomed: Vec<String> = self.kv_under(key).map(|e| e.key.clone()).collect();
            for key in &doomed {
                self.kv.remove(key);
                self.tombstones.insert(key.clone(), index);
            }
            if !doomed.is_empty() {
                self.kv_index = index;
            }
            return (true, !doomed.is_empty());
        }
        match (cas, self.kv.get(key)) {
            (Some(0), _) => return (false, false),
            (Some(n), Some(entry)) if entry.modify_index != n => return (false, false),
            _ => {}
        }
        if self.kv.remove(key).is_some() {
            self.tombstones.insert(key.to_string(), index);
            self.kv_index = index;
            (true, true)
        } else {
            (true, false)
        }
    }

    // ---- services and checks ------------------------------------------------------------

    /// Index for `/v1/catalog/service/:name` and `/v1/health/service/:name`.
    pub fn service_index(&self, name: &str) -> u64 {
        self.service_indexes
            .get(name)
            .copied()
            .unwrap_or(self.extinction_index)
            .max(1)
    }

    /// Index for `/v1/catalog/services`.
    pub fn services_table_index(&self) -> u64 {
        self.services_index.max(self.node_index).max(1)
    }

    /// Instances of a service name, sorted by ID.
    pub fn instances<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Service> + 'a {
        self.services.values().filter(move |s| s.name == name)
    }

    /// Checks of one instance, sorted by check ID.
    pub fn checks_of<'a>(&'a self, service_id: &'a str) -> impl Iterator<Item = &'a Check> + 'a {
        self.checks
            .values()
            .filter(move |c| c.service_id == service_id)
    }

    fn touch_service(&mut self, name: &str, index: u64) {
        self.service_indexes.insert(name.to_string(), index);
    }

    fn forget_name_if_extinct(&mut self, name: &str, index: u64) {
        if !self.services.values().any(|s| s.name == name) {
            self.service_indexes.remove(name);
            self.extinction_index = index;
        }
    }

    /// Registers or updates a service in place. Existing checks keep their status and output;
    /// with `replace_checks`, checks not in the new registration are removed. Returns `None` when
    /// nothing changed (an identical re-registration).
    pub fn register_service(
        &mut self,
        mut service: Service,
        checks: Vec<NewCheck>,
        replace_checks: bool,
        index: u64,
    ) -> Option<RegisterOutcome> {
        let mut changed = false;
        let previous = self.services.get(&service.id).cloned();
        match &previous {
            Some(old) => {
                service.create_index = old.create_index;
                service.modify_index = old.modify_index;
                if *old != service {
                    service.modify_index = index;
                    changed = true;
                }
            }
            None => {
                service.create_index = index;
                service.modify_index = index;
                changed = true;
            }
        }

        let mut outcome = RegisterOutcome::default();
        let new_ids: BTreeSet<String> = checks.iter().map(|c| c.check_id.clone()).collect();
        if replace_checks {
            let stale: Vec<String> = self
                .checks_of(&service.id)
                .filter(|c| !new_ids.contains(&c.check_id))
                .map(|c| c.check_id.clone())
                .collect();
            for id in stale {
                self.checks.remove(&id);
                outcome.removed.push(id);
                changed = true;
            }
        }
        // Existing checks of this instance follow the service's name and tags.
        for check in self.checks.values_mut() {
            if check.service_id == service.id
                && (check.service_name != service.name || check.service_tags != service.tags)
            {
                check.service_name = service.name.clone();
                check.service_tags = service.tags.clone();
                check.modify_index = index;
                changed = true;
            }
        }
        for new in checks {
            let existing = self.checks.get(&new.check_id).cloned();
            let mut check = Check {
                check_id: new.check_id.clone(),
                name: new.name,
                status: new.initial_status,
                notes: new.notes,
                output: String::new(),
                service_id: service.id.clone(),
                service_name: service.name.clone(),
                service_tags: service.tags.clone(),
                definition: new.definition,
                create_index: index,
                modify_index: index,
                critical_since: None,
            };
            if let Some(old) = &existing {
                check.status = old.status.clone();
                check.output = old.output.clone();
                check.create_index = old.create_index;
                check.modify_index = old.modify_index;
                check.critical_since = old.critical_since;
                if old.service_id != check.service_id {
                    // The check ID moves to this service: its old service changes too.
                    self.touch_service(&old.service_name, index);
                }
                let mut probe = old.clone();
                probe.modify_index = check.modify_index;
                if probe == check {
                    continue;
                }
                check.modify_index = index;
            }
            if check.status == CRITICAL && check.critical_since.is_none() {
                check.critical_since = Some(Instant::now());
            }
            if existing.as_ref().map(|o| &o.definition) != Some(&check.definition) {
                outcome
                    .started
                    .push((check.check_id.clone(), check.definition.clone()));
            }
            self.checks.insert(check.check_id.clone(), check);
            changed = true;
        }
        if !changed {
            return None;
        }
        let name = service.name.clone();
        self.services.insert(service.id.clone(), service);
        self.touch_service(&name, index);
        self.services_index = index;
        if let Some(old) = previous {
            if old.name != name {
                self.forget_name_if_extinct(&old.name, index);
            }
        }
        Some(outcome)
    }

    /// Removes a service and its checks. Returns the removed check IDs, or `None` when the ID
    /// is unknown.
    pub fn deregister_service(&mut self, service_id: &str, index: u64) -> Option<Vec<String>> {
        let service = self.services.remove(service_id)?;
        let removed: Vec<String> = self
            .checks_of(service_id)
            .map(|c| c.check_id.clone())
            .collect();
        for id in &removed {
            self.checks.remove(id);
        }
        self.services_index = index;
        self.touch_service(&service.name, index);
        self.forget_name_if_extinct(&service.name, index);
        Some(removed)
    }

    /// Sets a check's status and output. Only a status change counts as a write (it bumps the
    /// index); output-only changes are applied silently, like Consul's deferred output sync.
    /// Returns whether the status changed, or `None` for an unknown check.
    pub fn update_check(
        &mut self,
        check_id: &str,
        status: &str,
        output: String,
        index: u64,
    ) -> Option<bool> {
        let check = self.checks.get_mut(check_id)?;
        check.output = output;
        if check.status == status {
            return Some(false);
        }
        check.status = status.to_string();
        check.modify_index = index;
        check.critical_since = (status == CRITICAL).then(Instant::now);
        let name = check.service_name.clone();
        self.touch_service(&name, index);
        Some(true)
    }
}

/// Where the state lives, how writers reach it and how blocking queries learn about writes.
pub(crate) struct Store {
    state: Mutex<State>,
    file: PathBuf,
    changes: watch::Sender<u64>,
}

impl Store {
    /// Loads `<dir>/state.json` or starts a fresh state (with a new node ID) and persists it.
    pub fn open(dir: &Path) -> Result<Store, EmbeddedError> {
        let state_error = |message: String| EmbeddedError::State {
            path: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| state_error(e.to_string()))?;
        let file = dir.join("state.json");
        let state = match std::fs::read(&file) {
            Ok(bytes) => {
                let mut state: State =
                    serde_json::from_slice(&bytes).map_err(|e| EmbeddedError::State {
                        path: file.display().to_string(),
                        message: e.to_string(),
                    })?;
                let now = Instant::now();
                for check in state.checks.values_mut() {
                    if check.status == CRITICAL {
                        check.critical_since = Some(now);
                    }
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::fresh(),
            Err(e) => {
                return Err(EmbeddedError::State {
                    path: file.display().to_string(),
                    message: e.to_string(),
                })
            }
        };
        let (changes, _) = watch::channel(state.index);
        let store = Store {
            state: Mutex::new(state),
            file,
            changes,
        };
        {
            let guard = store.lock();
            store
                .persist(&guard)
                .map_err(|e| state_error(e.to_string()))?;
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that sees the global index after every write.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Runs `f` on a consistent snapshot.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock())
    }

    /// Runs a write. `f` gets the state and the index this write will carry, and returns its
    /// answer plus whether it changed anything. A change bumps the global index, is persisted
    /// before this returns, and wakes blocking queries.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut State, u64) -> (T, bool),
    ) -> Result<T, PersistError> {
        let mut state = self.lock();
        let index = state.index + 1;
        let (answer, changed) = f(&mut state, index);
        if changed {
            state.index = index;
            self.persist(&state)?;
            self.changes.send_replace(index);
        }
        Ok(answer)
    }

    /// Writes the state again (used at shutdown to keep the latest check output).
    pub fn flush(&self) -> Result<(), PersistError> {
        let state = self.lock();
        self.persist(&state)
    }

    fn persist(&self, state: &State) -> Result<(), PersistError> {
        let error = |source| PersistError {
            path: self.file.display().to_string(),
            source,
        };
        let bytes = serde_json::to_vec(state).map_err(|e| error(e.into()))?;
        let temp = self.file.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temp).map_err(error)?;
        file.write_all(&bytes).map_err(error)?;
        file.sync_all().map_err(error)?;
        drop(file);
        std::fs::rename(&temp, &self.file).map_err(error)
    }
}

/// A random version-4 UUID, formatted like Consul's node IDs.
fn random_uuid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Serde adapter: bytes as standard base64 in the state file.
mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_zero_creates_only_and_stale_cas_fails() {
        let mut state = State::fresh();
        assert!(state.kv_put("a", b"1".to_vec(), 0, Some(0), 2));
        assert!(!state.kv_put("a", b"2".to_vec(), 0, Some(0), 3));
        assert!(!state.kv_put("a", b"2".to_vec(), 0, Some(1), 3));
        assert!(state.kv_put("a", b"2".to_vec(), 0, Some(2), 3));
        assert_eq!(state.kv["a"].create_index, 2);
        assert_eq!(state.kv["a"].modify_index, 3);
    }

    #[test]
    fn tombstones_raise_prefix_index() {
        let mut state = State::fresh();
        state.kv_put("p/a", vec![], 0, None, 2);
        state.kv_put("p/b", vec![], 0, None, 3);
        state.kv_put("q", vec![], 0, None, 4);
        assert_eq!(state.kv_prefix_index("p/"), 3);
        state.kv_delete("p/b", false, None, 5);
        assert_eq!(state.kv_prefix_index("p/"), 5);
        assert_eq!(state.kv_key_index("p/a"), 2);
    }

    #[test]
    fn uuid_is_version_4() {
        let id = random_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }
}
