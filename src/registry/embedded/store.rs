//! The registry's state: KV entries and their tombstones, agent-registered services and their
//! checks, the one raft-like index counter and the per-endpoint indexes derived from it. Every
//! write goes through [`Store::write`]: it applies the change in memory while remembering what
//! each touched entry was, appends the touched entries' new values to the change log (see
//! [`super::persist`]) and only then bumps the counter and wakes blocking queries. When the
//! append fails, the remembered values are put back, so a write that is not durable changes
//! nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::persist::{FileError, Files};
use super::EmbeddedError;

/// Check status values, as Consul spells them.
pub(crate) const PASSING: &str = "passing";
pub(crate) const WARNING: &str = "warning";
pub(crate) const CRITICAL: &str = "critical";

/// A write could not be made durable (nothing was changed).
#[derive(Debug, thiserror::Error)]
#[error("persisting registry state: {0}")]
pub(crate) struct PersistError(#[from] FileError);

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

/// The whole persisted state (the snapshot's format). Its tables change only through its own
/// methods, which record what they touch in [`Touched`] so a write can be logged and undone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    pub node_id: String,
    /// The global raft-like index: the index of the last write.
    pub index: u64,
    /// Index at which the node and its `serfHealth` check were created.
    pub node_index: u64,
    /// The tables hold shared values: a read takes what it lists under the lock and builds its
    /// answer after releasing it.
    pub kv: BTreeMap<String, Arc<KvEntry>>,
    /// Deleted keys and the index of their deletion, so a delete raises a prefix's index.
    pub tombstones: BTreeMap<String, u64>,
    /// Max index of any KV write, tombstones included.
    pub kv_index: u64,
    pub services: BTreeMap<String, Arc<Service>>,
    /// The IDs of the instances of each service name, kept with `services` (a service's read
    /// visits its own instances, not every one). Never persisted: made again at load.
    #[serde(skip)]
    service_ids: BTreeMap<String, BTreeSet<String>>,
    pub checks: BTreeMap<String, Arc<Check>>,
    /// The IDs of the checks of each instance (service ID; node checks under ""), kept with
    /// `checks`. Never persisted: made again at load.
    #[serde(skip)]
    check_ids: BTreeMap<String, BTreeSet<String>>,
    /// Index of the last change to the set of services (`/v1/catalog/services`).
    pub services_index: u64,
    /// Per-service-name index: last change to any instance of that name or its checks.
    pub service_indexes: BTreeMap<String, u64>,
    /// Index at which the last service name disappeared (used for unknown services).
    pub extinction_index: u64,
    /// Index of the last change to any check (added, changed or removed): Consul's checks-table
    /// index, which `/v1/health/state/<state>` reports. Absent from states written before it
    /// existed (0 then: the node's creation counts).
    #[serde(default)]
    pub checks_index: u64,
    /// What the write in progress touched, with the values before it. Never persisted.
    #[serde(skip)]
    touched: Touched,
}

/// The entries one write touched, each with its value before the write (`None`: absent).
#[derive(Debug, Clone, Default)]
struct Touched {
    kv: BTreeMap<String, Option<Arc<KvEntry>>>,
    tombstones: BTreeMap<String, Option<u64>>,
    services: BTreeMap<String, Option<Arc<Service>>>,
    checks: BTreeMap<String, Option<Arc<Check>>>,
    service_indexes: BTreeMap<String, Option<u64>>,
}

/// The state's counters, which every write may move.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
struct Counters {
    index: u64,
    kv_index: u64,
    services_index: u64,
    extinction_index: u64,
    #[serde(default)]
    checks_index: u64,
}

/// One line of the change log: the counters after a write and the new value of every entry it
/// touched (`null`: removed).
#[derive(Debug, Serialize, Deserialize)]
struct Change {
    #[serde(flatten)]
    counters: Counters,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    kv: BTreeMap<String, Option<Arc<KvEntry>>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    tombstones: BTreeMap<String, Option<u64>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    services: BTreeMap<String, Option<Arc<Service>>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    checks: BTreeMap<String, Option<Arc<Check>>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    service_indexes: BTreeMap<String, Option<u64>>,
}

/// Records `key`'s value before the current write, the first time the write touches it.
fn remember<V: Clone>(
    before: &mut BTreeMap<String, Option<V>>,
    table: &BTreeMap<String, V>,
    key: &str,
) {
    if !before.contains_key(key) {
        before.insert(key.to_string(), table.get(key).cloned());
    }
}

/// Puts `values` into `table` (`None` removes).
fn put_back<V>(table: &mut BTreeMap<String, V>, values: BTreeMap<String, Option<V>>) {
    for (key, value) in values {
        match value {
            Some(value) => table.insert(key, value),
            None => table.remove(&key),
        };
    }
}

/// Puts `value` under `id` in `table` (`None` removes it), keeping `groups` (the IDs of each
/// group, as `group_of` names it) in step; returns what was there.
fn set_grouped<V>(
    table: &mut BTreeMap<String, Arc<V>>,
    groups: &mut BTreeMap<String, BTreeSet<String>>,
    id: &str,
    value: Option<Arc<V>>,
    group_of: impl Fn(&V) -> &String,
) -> Option<Arc<V>> {
    let previous = match value {
        Some(value) => {
            groups
                .entry(group_of(&value).clone())
                .or_default()
                .insert(id.to_string());
            table.insert(id.to_string(), value)
        }
        None => table.remove(id),
    };
    if let Some(previous) = &previous {
        let left = table
            .get(id)
            .is_none_or(|now| group_of(now) != group_of(previous));
        if left {
            if let Some(ids) = groups.get_mut(group_of(previous)) {
                ids.remove(id);
                if ids.is_empty() {
                    groups.remove(group_of(previous));
                }
            }
        }
    }
    previous
}

/// The IDs of `table` by the group `group_of` names.
fn grouped<V>(
    table: &BTreeMap<String, Arc<V>>,
    group_of: impl Fn(&V) -> &String,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, value) in table {
        groups
            .entry(group_of(value).clone())
            .or_default()
            .insert(id.clone());
    }
    groups
}

/// The current values of the touched keys of one table.
fn current<V: Clone>(
    table: &BTreeMap<String, V>,
    touched: &BTreeMap<String, Option<V>>,
) -> BTreeMap<String, Option<V>> {
    touched
        .keys()
        .map(|key| (key.clone(), table.get(key).cloned()))
        .collect()
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
            service_ids: BTreeMap::new(),
            check_ids: BTreeMap::new(),
            checks: BTreeMap::new(),
            services_index: 0,
            service_indexes: BTreeMap::new(),
            extinction_index: 0,
            checks_index: 0,
            touched: Touched::default(),
        }
    }

    fn counters(&self) -> Counters {
        Counters {
            index: self.index,
            kv_index: self.kv_index,
            services_index: self.services_index,
            extinction_index: self.extinction_index,
            checks_index: self.checks_index,
        }
    }

    fn set_counters(&mut self, counters: Counters) {
        self.index = counters.index;
        self.kv_index = counters.kv_index;
        self.services_index = counters.services_index;
        self.extinction_index = counters.extinction_index;
        self.checks_index = counters.checks_index;
    }

    /// The log record of the write just made: counters and the touched entries' new values.
    fn change(&self, touched: &Touched) -> Change {
        Change {
            counters: self.counters(),
            kv: current(&self.kv, &touched.kv),
            tombstones: current(&self.tombstones, &touched.tombstones),
            services: current(&self.services, &touched.services),
            checks: current(&self.checks, &touched.checks),
            service_indexes: current(&self.service_indexes, &touched.service_indexes),
        }
    }

    /// Applies a logged change (replay at load).
    fn apply(&mut self, change: Change) {
        put_back(&mut self.kv, change.kv);
        put_back(&mut self.tombstones, change.tombstones);
        self.put_back_services(change.services);
        self.put_back_checks(change.checks);
        put_back(&mut self.service_indexes, change.service_indexes);
        self.set_counters(change.counters);
    }

    /// Undoes a write that could not be made durable.
    fn undo(&mut self, touched: Touched, counters: Counters) {
        put_back(&mut self.kv, touched.kv);
        put_back(&mut self.tombstones, touched.tombstones);
        self.put_back_services(touched.services);
        self.put_back_checks(touched.checks);
        put_back(&mut self.service_indexes, touched.service_indexes);
        self.set_counters(counters);
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

    /// [`State::kv_under`], the entries shared.
    pub fn kv_under_shared<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a Arc<KvEntry>> + 'a {
        self.kv
            .range(prefix.to_string()..)
            .take_while(move |(key, _)| key.starts_with(prefix))
            .map(|(_, entry)| entry)
    }

    /// Entries whose key starts with `prefix`, sorted by key.
    pub fn kv_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KvEntry> + 'a {
        self.kv
            .range(prefix.to_string()..)
            .take_while(move |(key, _)| key.starts_with(prefix))
            .map(|(_, entry)| &**entry)
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
        remember(&mut self.touched.kv, &self.kv, key);
        remember(&mut self.touched.tombstones, &self.tombstones, key);
        self.kv.insert(
            key.to_string(),
            Arc::new(KvEntry {
                key: key.to_string(),
                flags,
                value,
                create_index,
                modify_index: index,
            }),
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
                remember(&mut self.touched.kv, &self.kv, key);
                remember(&mut self.touched.tombstones, &self.tombstones, key);
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
        if self.kv.contains_key(key) {
            remember(&mut self.touched.kv, &self.kv, key);
            remember(&mut self.touched.tombstones, &self.tombstones, key);
            self.kv.remove(key);
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

    /// Index for `/v1/catalog/services`: moves when an instance is registered, changed or
    /// deregistered, not when only a check changes.
    pub fn services_table_index(&self) -> u64 {
        self.services_index.max(self.node_index).max(1)
    }

    /// Index for `/v1/health/state/<state>`: moves when a check is added, changes or is removed
    /// (the node's `serfHealth` dates from the node's creation), not when only an instance
    /// without checks changes.
    pub fn checks_table_index(&self) -> u64 {
        self.checks_index.max(self.node_index).max(1)
    }

    /// Instances of a service name, sorted by ID.
    pub fn instances<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Service> + 'a {
        self.service_ids
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|id| self.services.get(id))
            .map(|service| &**service)
    }

    /// Puts `service` under `id` (`None` removes it), keeping the IDs by name in step; returns
    /// what was there.
    fn set_service(&mut self, id: &str, service: Option<Arc<Service>>) -> Option<Arc<Service>> {
        set_grouped(
            &mut self.services,
            &mut self.service_ids,
            id,
            service,
            |service| &service.name,
        )
    }

    /// [`put_back`] for the services.
    fn put_back_services(&mut self, values: BTreeMap<String, Option<Arc<Service>>>) {
        for (id, service) in values {
            self.set_service(&id, service);
        }
    }

    /// Makes the instance IDs by name and the check IDs by instance from the tables (after a
    /// load).
    fn index_groups(&mut self) {
        self.service_ids = grouped(&self.services, |service| &service.name);
        self.check_ids = grouped(&self.checks, |check| &check.service_id);
    }

    /// Checks of one instance, sorted by check ID.
    pub fn checks_of<'a>(&'a self, service_id: &'a str) -> impl Iterator<Item = &'a Check> + 'a {
        self.check_ids
            .get(service_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.checks.get(id))
            .map(|check| &**check)
    }

    /// Puts `check` under `id` (`None` removes it), keeping the IDs by instance in step; returns
    /// what was there.
    fn set_check(&mut self, id: &str, check: Option<Arc<Check>>) -> Option<Arc<Check>> {
        set_grouped(&mut self.checks, &mut self.check_ids, id, check, |check| {
            &check.service_id
        })
    }

    /// [`put_back`] for the checks.
    fn put_back_checks(&mut self, values: BTreeMap<String, Option<Arc<Check>>>) {
        for (id, check) in values {
            self.set_check(&id, check);
        }
    }

    fn touch_service(&mut self, name: &str, index: u64) {
        remember(
            &mut self.touched.service_indexes,
            &self.service_indexes,
            name,
        );
        self.service_indexes.insert(name.to_string(), index);
    }

    fn forget_name_if_extinct(&mut self, name: &str, index: u64) {
        if !self.services.values().any(|s| s.name == name) {
            remember(
                &mut self.touched.service_indexes,
                &self.service_indexes,
                name,
            );
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
        let previous = self.services.get(&service.id).cloned();
        let service_changed = match &previous {
            Some(old) => {
                service.create_index = old.create_index;
                service.modify_index = old.modify_index;
                if **old != service {
                    service.modify_index = index;
                    true
                } else {
                    false
                }
            }
            None => {
                service.create_index = index;
                service.modify_index = index;
                true
            }
        };
        // Whether any check of the instance was added, changed or removed.
        let mut checks_changed = false;

        let mut outcome = RegisterOutcome::default();
        let new_ids: BTreeSet<String> = checks.iter().map(|c| c.check_id.clone()).collect();
        if replace_checks {
            let stale: Vec<String> = self
                .checks_of(&service.id)
                .filter(|c| !new_ids.contains(&c.check_id))
                .map(|c| c.check_id.clone())
                .collect();
            for id in stale {
                remember(&mut self.touched.checks, &self.checks, &id);
                self.set_check(&id, None);
                outcome.removed.push(id);
                checks_changed = true;
            }
        }
        // Existing checks of this instance follow the service's name and tags.
        let followers: Vec<String> = self
            .checks_of(&service.id)
            .filter(|c| c.service_name != service.name || c.service_tags != service.tags)
            .map(|c| c.check_id.clone())
            .collect();
        for id in followers {
            remember(&mut self.touched.checks, &self.checks, &id);
            if let Some(check) = self.checks.get_mut(&id).map(Arc::make_mut) {
                check.service_name = service.name.clone();
                check.service_tags = service.tags.clone();
                check.modify_index = index;
                checks_changed = true;
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
                let mut probe = Check::clone(old);
                probe.modify_index = check.modify_index;
                if probe == check {
                    continue;
                }
                check.modify_index = index;
            }
            if check.status == CRITICAL && check.critical_since.is_none() {
                check.critical_since = Some(Instant::now());
            }
            remember(&mut self.touched.checks, &self.checks, &check.check_id);
            if existing.as_ref().map(|o| &o.definition) != Some(&check.definition) {
                outcome
                    .started
                    .push((check.check_id.clone(), check.definition.clone()));
            }
            self.set_check(&check.check_id.clone(), Some(Arc::new(check)));
            checks_changed = true;
        }
        if !service_changed && !checks_changed {
            return None;
        }
        if checks_changed {
            self.checks_index = index;
        }
        let name = service.name.clone();
        remember(&mut self.touched.services, &self.services, &service.id);
        self.set_service(&service.id.clone(), Some(Arc::new(service)));
        self.touch_service(&name, index);
        if service_changed {
            // Like Consul, which skips writing an instance that did not change: only the checks
            // table moves then.
            self.services_index = index;
        }
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
        remember(&mut self.touched.services, &self.services, service_id);
        let service = self.set_service(service_id, None)?;
        let removed: Vec<String> = self
            .checks_of(service_id)
            .map(|c| c.check_id.clone())
            .collect();
        for id in &removed {
            remember(&mut self.touched.checks, &self.checks, id);
            self.set_check(id, None);
        }
        if !removed.is_empty() {
            self.checks_index = index;
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
        remember(&mut self.touched.checks, &self.checks, check_id);
        let check = Arc::make_mut(self.checks.get_mut(check_id)?);
        check.output = output;
        if check.status == status {
            return Some(false);
        }
        check.status = status.to_string();
        check.modify_index = index;
        check.critical_since = (status == CRITICAL).then(Instant::now);
        let name = check.service_name.clone();
        self.checks_index = index;
        self.touch_service(&name, index);
        Some(true)
    }
}

/// The state and the files that make it durable, behind one lock so writes are serialised.
struct Inner {
    state: State,
    files: Files,
}

/// Where the state lives, how writers reach it and how blocking queries learn about writes.
pub(crate) struct Store {
    inner: Mutex<Inner>,
    changes: watch::Sender<u64>,
}

impl Store {
    /// Loads `<dir>/state.json` and replays `<dir>/state.log` over it, or starts a fresh state
    /// (with a new node ID); then folds everything into a new snapshot. A `state.json` written
    /// by an earlier version (which had no log) loads as it is.
    pub fn open(dir: &Path) -> Result<Store, EmbeddedError> {
        let state_error = |path: &Path, message: String| EmbeddedError::State {
            path: path.display().to_string(),
            message,
        };
        let mut files = Files::new(dir).map_err(|e| state_error(dir, e.to_string()))?;
        let loaded = files.load().map_err(|e| state_error(dir, e.to_string()))?;
        let mut state = match &loaded.snapshot {
            Some(bytes) => serde_json::from_slice::<State>(bytes)
                .map_err(|e| state_error(files.snapshot_path(), e.to_string()))?,
            None => State::fresh(),
        };
        state.index_groups();
        for (number, record) in loaded.records.iter().enumerate() {
            let change: Change = serde_json::from_slice(record).map_err(|e| {
                state_error(files.log_path(), format!("record {}: {e}", number + 1))
            })?;
            if change.counters.index > state.index {
                state.apply(change);
            }
        }
        if loaded.torn_bytes > 0 {
            tracing::warn!(
                path = %files.log_path().display(),
                bytes = loaded.torn_bytes,
                "embedded registry: ignoring a change cut short by a crash (it was never acknowledged)"
            );
        }
        let now = Instant::now();
        for check in state.checks.values_mut() {
            if check.status == CRITICAL {
                Arc::make_mut(check).critical_since = Some(now);
            }
        }
        let snapshot = serde_json::to_vec(&state).map_err(|e| state_error(dir, e.to_string()))?;
        files
            .compact(&snapshot)
            .map_err(|e| state_error(&e.path, e.source.to_string()))?;
        let (changes, _) = watch::channel(state.index);
        Ok(Store {
            inner: Mutex::new(Inner { state, files }),
            changes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that sees the global index after every write.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Runs `f` on a consistent snapshot.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock().state)
    }

    /// Runs a write. `f` gets the state and the index this write will carry, and returns its
    /// answer plus whether it changed anything. A change is appended to the log and synced
    /// before it becomes visible: only then is the global index bumped and are blocking queries
    /// woken. If it cannot be made durable, the state is put back as it was and the error is
    /// returned instead of the answer.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut State, u64) -> (T, bool),
    ) -> Result<T, PersistError> {
        let mut guard = self.lock();
        let Inner { state, files } = &mut *guard;
        if files.needs_compaction() {
            compact(state, files)?;
        }
        let before = state.counters();
        let index = state.index + 1;
        let (answer, changed) = f(state, index);
        let touched = std::mem::take(&mut state.touched);
        if !changed {
            // Nothing to log (an output-only check update stays in memory until the next
            // snapshot, like Consul's deferred output sync).
            return Ok(answer);
        }
        state.index = index;
        let logged = match serde_json::to_vec(&state.change(&touched)) {
            Ok(record) => files.append(&record),
            Err(error) => Err(FileError {
                path: files.log_path().to_path_buf(),
                source: error.into(),
            }),
        };
        if let Err(error) = logged {
            state.undo(touched, before);
            return Err(error.into());
        }
        self.changes.send_replace(index);
        if files.wants_compaction() {
            if let Err(error) = compact(state, files) {
                tracing::warn!(%error, "embedded registry: compacting the change log failed; will retry");
            }
        }
        Ok(answer)
    }

    /// Folds the log into a new snapshot (used at shutdown, which also keeps the latest check
    /// output).
    pub fn flush(&self) -> Result<(), PersistError> {
        let mut guard = self.lock();
        let Inner { state, files } = &mut *guard;
        compact(state, files)
    }
}

/// Writes the whole state as the new snapshot and empties the log.
fn compact(state: &State, files: &mut Files) -> Result<(), PersistError> {
    let snapshot = serde_json::to_vec(state).map_err(|error| FileError {
        path: files.snapshot_path().to_path_buf(),
        source: error.into(),
    })?;
    Ok(files.compact(&snapshot)?)
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
    use std::path::PathBuf;

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

    fn put(store: &Store, key: &str, value: &str) -> Result<bool, PersistError> {
        store.write(|s, index| {
            let written = s.kv_put(key, value.as_bytes().to_vec(), 0, None, index);
            (written, written)
        })
    }

    fn value(store: &Store, key: &str) -> Option<String> {
        store.read(|s| {
            s.kv.get(key)
                .map(|e| String::from_utf8_lossy(&e.value).into_owned())
        })
    }

    /// Makes every write to the change log fail as on a full disk (also for root): the log
    /// becomes a symlink to `/dev/full`. Returns where the real log was put aside.
    fn fill_disk(dir: &Path) -> PathBuf {
        let log = dir.join("state.log");
        let aside = dir.join("state.log.aside");
        std::fs::rename(&log, &aside).unwrap();
        std::os::unix::fs::symlink("/dev/full", &log).unwrap();
        aside
    }

    fn free_disk(dir: &Path, aside: &Path) {
        std::fs::remove_file(dir.join("state.log")).unwrap();
        std::fs::rename(aside, dir.join("state.log")).unwrap();
    }

    #[test]
    fn a_write_that_cannot_be_logged_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        put(&store, "kept", "1").unwrap();
        store
            .write(|s, index| {
                let outcome = s.register_service(service("web"), vec![], false, index);
                ((), outcome.is_some())
            })
            .unwrap();
        let index = store.read(|s| s.index);

        let aside = fill_disk(dir.path());
        let error = put(&store, "lost", "2").unwrap_err().to_string();
        assert!(error.contains("state.log"), "{error}");
        assert!(put(&store, "kept", "changed").is_err());
        let deregistered = store.write(|s, index| {
            let removed = s.deregister_service("web", index);
            let changed = removed.is_some();
            (removed, changed)
        });
        assert!(deregistered.is_err());
        assert_eq!(value(&store, "lost"), None);
        assert_eq!(value(&store, "kept").as_deref(), Some("1"));
        assert!(store.read(|s| s.services.contains_key("web")));
        assert_eq!(store.read(|s| s.index), index, "the index did not move");
        assert_eq!(*store.subscribe().borrow(), index, "no watcher was woken");

        free_disk(dir.path(), &aside);
        assert!(put(&store, "after", "3").unwrap());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(value(&store, "lost"), None);
        assert_eq!(value(&store, "kept").as_deref(), Some("1"));
        assert_eq!(value(&store, "after").as_deref(), Some("3"));
        assert!(store.read(|s| s.services.contains_key("web")));
    }

    #[test]
    fn a_crash_mid_append_loses_nothing_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for n in 0..50 {
            put(&store, &format!("k/{n}"), &n.to_string()).unwrap();
        }
        store
            .write(|s, index| s.kv_delete("k/7", false, None, index))
            .unwrap();
        let index = store.read(|s| s.index);
        // A crash: no shutdown flush, and the next record only partly written.
        drop(store);
        let log = dir.path().join("state.log");
        let mut bytes = std::fs::read(&log).unwrap();
        let whole = bytes.len();
        bytes.extend_from_slice(br#"{"index":999,"kv_index":999,"services_index":0,"extinction_index":0,"kv":{"k/torn":{"key":"k/to"#);
        std::fs::write(&log, &bytes).unwrap();
        assert!(whole > 0, "the writes were logged, not snapshotted");

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.read(|s| s.index), index);
        assert_eq!(store.read(|s| s.kv.len()), 49);
        assert_eq!(value(&store, "k/7"), None);
        assert_eq!(
            store.read(|s| s.tombstones.get("k/7").copied()),
            Some(index)
        );
        assert_eq!(value(&store, "k/49").as_deref(), Some("49"));
        assert_eq!(value(&store, "k/torn"), None);
        // The log goes on cleanly after the torn record.
        put(&store, "k/next", "x").unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.read(|s| s.kv.len()), 50);
        assert_eq!(store.read(|s| s.index), index + 1);
    }

    #[test]
    fn replay_skips_records_the_snapshot_already_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        put(&store, "a", "old").unwrap();
        let old_log = std::fs::read(dir.path().join("state.log")).unwrap();
        put(&store, "a", "new").unwrap();
        store.flush().unwrap();
        drop(store);
        // A crash between renaming the snapshot and emptying the log leaves older records.
        std::fs::write(dir.path().join("state.log"), old_log).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(value(&store, "a").as_deref(), Some("new"));
    }

    #[test]
    fn a_state_json_from_before_the_log_loads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("state.json"),
            r#"{"node_id":"0b5c2a1e-6d1f-4c3a-9e8b-2f7d6c5b4a39","index":12,"node_index":1,
            "kv":{"dfp/routes/web":{"key":"dfp/routes/web","flags":0,"value":"c3BlYw==","create_index":3,"modify_index":9}},
            "tombstones":{"gone":10},"kv_index":10,
            "services":{"w1":{"id":"w1","name":"web","tags":[],"address":"","meta":null,"port":8080,
              "tagged_addresses":{},"weights":{"Passing":1,"Warning":1},"enable_tag_override":false,
              "kind":"","create_index":11,"modify_index":12}},
            "checks":{},"services_index":12,"service_indexes":{"web":12},"extinction_index":0}"#,
        )
        .unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(value(&store, "dfp/routes/web").as_deref(), Some("spec"));
        assert_eq!(store.read(|s| s.kv_prefix_index("g")), 10);
        assert_eq!(store.read(|s| s.services["w1"].port), 8080);
        put(&store, "next", "x").unwrap();
        assert_eq!(store.read(|s| s.kv["next"].modify_index), 13);
    }

    fn service(id: &str) -> Service {
        Service {
            id: id.into(),
            name: id.into(),
            tags: vec![],
            address: String::new(),
            meta: None,
            port: 80,
            tagged_addresses: BTreeMap::new(),
            weights: Weights::default(),
            enable_tag_override: false,
            kind: String::new(),
            create_index: 0,
            modify_index: 0,
        }
    }

    fn ttl_check(id: &str) -> NewCheck {
        NewCheck {
            check_id: id.into(),
            name: id.into(),
            notes: String::new(),
            initial_status: CRITICAL.into(),
            definition: CheckDefinition {
                kind: CheckKind::Ttl,
                interval_ms: 0,
                timeout_ms: 0,
                ttl_ms: 60_000,
                deregister_after_ms: 0,
            },
        }
    }

    #[test]
    fn names_list_their_instances_and_instances_their_checks_through_moves_removals_and_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let register = |id: &str, name: &str| {
            let mut registered = service(id);
            registered.name = name.into();
            store
                .write(|s, index| {
                    let changed = s
                        .register_service(registered, vec![], false, index)
                        .is_some();
                    ((), changed)
                })
                .unwrap();
        };
        let ids = |store: &Store, name: &str| -> Vec<String> {
            store.read(|s| s.instances(name).map(|svc| svc.id.clone()).collect())
        };
        register("a", "web");
        register("b", "web");
        register("c", "api");
        assert_eq!(ids(&store, "web"), ["a", "b"]);
        register("b", "api");
        assert_eq!(ids(&store, "web"), ["a"]);
        assert_eq!(ids(&store, "api"), ["b", "c"]);
        store
            .write(|s, index| {
                let removed = s.deregister_service("a", index).is_some();
                ((), removed)
            })
            .unwrap();
        assert!(ids(&store, "web").is_empty());
        // A check follows its instance, and moves with its ID to another one.
        let check = |id: &str, check: &str| {
            let registered = service(id);
            store
                .write(|s, index| {
                    let changed = s
                        .register_service(registered, vec![ttl_check(check)], false, index)
                        .is_some();
                    ((), changed)
                })
                .unwrap();
        };
        let checks = |store: &Store, id: &str| -> Vec<String> {
            store.read(|s| s.checks_of(id).map(|c| c.check_id.clone()).collect())
        };
        check("x", "c1");
        assert_eq!(checks(&store, "x"), ["c1"]);
        check("y", "c1");
        assert!(checks(&store, "x").is_empty());
        assert_eq!(checks(&store, "y"), ["c1"]);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            ids(&store, "api"),
            ["b", "c"],
            "made again from the state on disk"
        );
        assert!(ids(&store, "web").is_empty());
        assert_eq!(checks(&store, "y"), ["c1"]);
        assert!(checks(&store, "x").is_empty());
    }

    #[test]
    fn checks_and_services_tables_have_their_own_index_as_in_consul() {
        let mut state = State::fresh();
        let indexes = |s: &State| (s.services_table_index(), s.checks_table_index());
        assert!(state
            .register_service(service("plain"), vec![], false, 2)
            .is_some());
        assert_eq!(indexes(&state), (2, 1), "no check was written");
        assert!(state
            .register_service(service("checked"), vec![ttl_check("c1")], false, 3)
            .is_some());
        assert_eq!(indexes(&state), (3, 3), "instance and check in one write");
        assert_eq!(
            state.update_check("c1", PASSING, "ok".into(), 4),
            Some(true)
        );
        assert_eq!(
            indexes(&state),
            (3, 4),
            "a status change is a check write only"
        );
        assert_eq!(
            state.update_check("c1", PASSING, "still ok".into(), 5),
            Some(false)
        );
        assert_eq!(indexes(&state), (3, 4), "output alone moves nothing");
        assert!(
            state
                .register_service(service("checked"), vec![ttl_check("c1")], false, 5)
                .is_none(),
            "an identical registration writes nothing"
        );
        let mut second_check = ttl_check("c2");
        second_check.initial_status = PASSING.into();
        assert!(state
            .register_service(
                service("checked"),
                vec![ttl_check("c1"), second_check],
                false,
                6
            )
            .is_some());
        assert_eq!(
            indexes(&state),
            (3, 6),
            "a check added to an unchanged instance leaves the services table"
        );
        assert_eq!(state.service_index("checked"), 6);
        assert!(state.deregister_service("plain", 7).is_some());
        assert_eq!(indexes(&state), (7, 6), "no check went with it");
        assert!(state.deregister_service("checked", 8).is_some());
        assert_eq!(indexes(&state), (8, 8), "its checks went with it");
    }

    #[test]
    fn uuid_is_version_4() {
        let id = random_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }
}
