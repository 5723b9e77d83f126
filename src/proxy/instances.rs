//! Live instances, followed at a cost that grows with the changes in Consul, not with the number
//! of routed services. The core says which [`InstanceQuery`]s it routes (and the instances it
//! holds for each) after every change of the routed state; `--watch-instances=false` turns the
//! following off, and instances are then read only on reconfigure and reload.
//!
//! Two change detectors, each one blocking query with the rules of [`Watch`], tell which Consul
//! services may have changed:
//! - `/v1/health/state/any`, every check with its service and `ModifyIndex`: a check added,
//!   removed, or changed names its service;
//! - `/v1/catalog/services`, every service name with the union of its instances' tags: a service
//!   appearing, disappearing or changing its tags names that service.
//!
//! On each wake the follower first lets the API changes in flight be answered (at most
//! [`CALLERS_FIRST`], see [`super::callers`]), then reads only the queries of the named
//! services that are routed (`/v1/health/service/<name>?passing[&tag=…]`, at most
//! [`READS_IN_FLIGHT`] at once) and hands the lists that differ from what the core holds to
//! the core ([`Change::Instances`]).
//!
//! An instance registered or deregistered without checks, under tags its service already has
//! (Registrator's default), moves the catalog's index without changing either answer. So every
//! move of the catalog's index must be attributed. It is explained when every index it spans is
//! a write to the checks table the checks' diff has seen (an instance that came or went with its
//! checks, in one write; a check's status): no other write can hide there. One read of the checks
//! settles it when the checks detector has not woken yet. It is also explained when every index
//! it spans is a check write or a write recorded in [`ServiceWrites`] (an instance read that saw
//! it, or this proxy's spec write) and no node changed: the services those writes concern are
//! read. Otherwise the follower lists every node's instances (`/v1/catalog/nodes`, then
//! `/v1/catalog/node/<node>` for each) before reading anything, and compares them with the
//! previous listings: the services with an instance added, changed or removed are the ones
//! read. When there are about as many nodes as
//! routed queries, when a listing fails or when there is no earlier listing, it reads every
//! routed query instead ("a sweep"), as it does on a node check's change, on the detectors'
//! first answers and after an index went backwards; either way it hands over only the lists
//! that changed.
//!
//! A read Consul says its ACLs filtered (`X-Consul-Results-Filtered-By-ACLs: true`, sent by
//! Consul 1.11 and later to a token that lost `service:read` or `node:read`) is not the truth
//! about a service's instances: the core keeps the ones it routes, a WARN line names the
//! services, the registry error counter counts it, and the read is retried (with the failed
//! reads' backoff) until Consul answers it whole. A truly empty answer still empties the
//! service. Consul before 1.11, and any Consul for the anonymous token, filters without saying
//! so: there a filtered answer cannot be told from an empty one.
//!
//! A service whose every destination has an `outboundHostname` forwards to fixed hosts: its
//! instances are neither read nor followed ([`instances_for`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use imbl::ordmap::DiffItem;
use tokio::sync::mpsc::{self, WeakSender};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::callers::CallersInFlight;
use super::{submit_internal, Change, Pending};
use crate::observe::{Observer, WatchKind};
use crate::registry::watch::{Backoff, Update, Watch, WatchIndex, WATCH_BACKOFF};
use crate::registry::{
    ConsulClient, HealthCheck, Indexed, InstanceQuery, NodeInstance, RegistryError,
};
use crate::spec::{Instance, ServiceSpec};

/// Instance reads in flight at once; with the two detectors and the KV watch, the connections
/// to Consul stay at five or fewer (see [`crate::registry::IDLE_CONNECTIONS_PER_ADDRESS`]).
pub const READS_IN_FLIGHT: usize = 2;

/// The longest a wake of the follower waits for the API changes in flight before it reads
/// anything (see [`super::callers`]).
const CALLERS_FIRST: std::time::Duration = std::time::Duration::from_millis(100);

/// Check-write indexes remembered above the catalog's index; past it the oldest are forgotten
/// (at worst a catalog move they would have explained costs a sweep).
const REMEMBERED_CHECK_WRITES: usize = 1_024;

/// Service writes remembered (see [`ServiceWrites`]); past it the oldest are forgotten.
const REMEMBERED_SERVICE_WRITES: usize = 1_024;

/// The Consul writes known to concern one service's instances, by index: a read of
/// `/v1/health/service/<name>` that lists instances answers that service's own index, the
/// index of the last write to its instances or their checks. Both the core (whose reconfigure
/// reads the instances of the service it routes) and the follower record what they read, and
/// an unexplained catalog move whose every index is a check write or a recorded service write
/// names those services without listing every node's instances (Registrator registers, then
/// the deployment calls reconfigure: the listing would tell what the reconfigure already read).
/// An empty answer records nothing: for a service without instances Consul answers the index
/// at which the last service disappeared, which may be another one's.
///
/// The core also records the index of each spec it wrote (a KV write concerns no instance), so
/// that a new service's registration followed by its reconfigure, whose spec write lands
/// between two catalog moves, is explained too.
#[derive(Debug, Clone, Default)]
pub(super) struct ServiceWrites(Arc<std::sync::Mutex<BTreeMap<u64, Option<String>>>>);

impl ServiceWrites {
    /// Records a read of `query` that answered `instances` at `index`.
    pub fn record(&self, query: &InstanceQuery, index: u64, instances: &[Instance]) {
        if instances.is_empty() || index == 0 {
            return;
        }
        self.remember(index, Some(query.service().to_string()));
    }

    /// Records a KV write of this proxy at `index`.
    pub fn record_kv(&self, index: u64) {
        self.remember(index, None);
    }

    fn remember(&self, index: u64, service: Option<String>) {
        let mut writes = self.0.lock().unwrap_or_else(|error| error.into_inner());
        writes.insert(index, service);
        while writes.len() > REMEMBERED_SERVICE_WRITES {
            writes.pop_first();
        }
    }

    /// The services the writes in `from + 1 ..= to` concern, each of them a check write of
    /// `check_writes` or a recorded write; `None` when one is neither.
    fn explain(
        &self,
        from: u64,
        to: u64,
        check_writes: &BTreeSet<u64>,
    ) -> Option<BTreeSet<String>> {
        if to.saturating_sub(from) > REMEMBERED_SERVICE_WRITES as u64 {
            return None;
        }
        let writes = self.0.lock().unwrap_or_else(|error| error.into_inner());
        let mut services = BTreeSet::new();
        for index in from.saturating_add(1)..=to {
            if check_writes.contains(&index) {
                continue;
            }
            if let Some(service) = writes.get(&index)? {
                services.insert(service.clone());
            }
        }
        Some(services)
    }
}

/// The healthy instances of `spec`'s Consul service (carrying its `serviceTag`s), read now;
/// none, without asking the registry, when every destination forwards to its
/// `outboundHostname`. The read is recorded in `writes`.
pub(super) async fn instances_for(
    registry: &ConsulClient,
    writes: &ServiceWrites,
    spec: &ServiceSpec,
) -> Result<Vec<Instance>, RegistryError> {
    if !spec.uses_registry() {
        return Ok(Vec::new());
    }
    let query = instance_query(spec);
    let read = registry.watch_healthy_instances(&query, None).await?;
    writes.record(&query, read.index, &read.value);
    Ok(read.value)
}

/// The instances `spec` routes to: its Consul service's passing instances carrying every tag of
/// its `serviceTag`.
pub(super) fn instance_query(spec: &ServiceSpec) -> InstanceQuery {
    InstanceQuery::new(
        spec.consul_service_name(),
        spec.service_tag()
            .iter()
            .map(|tag| tag.as_str().to_string()),
    )
}

/// The queries the core routes, each with the instances it holds for it (`None` when routed
/// services reading the same query hold different lists, so the next read is handed over). The
/// lists are the routed services' own, shared.
pub(super) type Followed = imbl::OrdMap<InstanceQuery, Option<Arc<[Instance]>>>;

/// The instance follower: started with the first routed query, stopped (closing its blocking
/// queries) when nothing is routed. Dropping it stops it.
pub(super) struct InstanceWatches {
    enabled: bool,
    registry: ConsulClient,
    core: WeakSender<Pending>,
    observer: Observer,
    callers: CallersInFlight,
    writes: ServiceWrites,
    followed: watch::Sender<Arc<Followed>>,
    task: Option<JoinHandle<()>>,
}

impl InstanceWatches {
    pub fn new(
        enabled: bool,
        registry: ConsulClient,
        core: WeakSender<Pending>,
        observer: Observer,
        callers: CallersInFlight,
        writes: ServiceWrites,
    ) -> Self {
        InstanceWatches {
            enabled,
            registry,
            core,
            observer,
            callers,
            writes,
            followed: watch::channel(Arc::new(Followed::new())).0,
            task: None,
        }
    }

    /// Follows exactly these queries from now on.
    pub fn follow(&mut self, followed: Followed) {
        if !self.enabled {
            return;
        }
        if followed.is_empty() {
            if let Some(task) = self.task.take() {
                task.abort();
                tracing::debug!("no routed service reads Consul: stopped following instances");
            }
            self.followed.send_replace(Arc::new(followed));
            return;
        }
        self.followed.send_replace(Arc::new(followed));
        if self.task.as_ref().is_none_or(JoinHandle::is_finished) {
            let follower = Follower::new(
                self.registry.clone(),
                self.core.clone(),
                self.observer.clone(),
                self.callers.clone(),
                self.writes.clone(),
            );
            self.task = Some(tokio::spawn(follower.run(self.followed.subscribe())));
        }
    }
}

impl Drop for InstanceWatches {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// One query's read: its passing instances with the service's own index, or why it failed.
type InstanceRead = (InstanceQuery, Result<Indexed<Vec<Instance>>, RegistryError>);

/// Every check by node and check ID.
type CheckSnapshot = BTreeMap<(String, String), HealthCheck>;

/// Every Consul service with the union of its instances' tags.
type ServiceTags = BTreeMap<String, BTreeSet<String>>;

/// Every node's instances, by node name and instance ID.
type NodeSnapshot = BTreeMap<String, BTreeMap<String, NodeInstance>>;

/// What one of the detectors read.
enum Detected {
    Checks(Update<Vec<HealthCheck>>),
    Catalog(Update<ServiceTags>),
}

/// What changed between two answers of `/v1/health/state/any`.
#[derive(Debug, Default, PartialEq, Eq)]
struct ChecksDiff {
    /// The Consul services with a check added, removed or changed.
    services: BTreeSet<String>,
    /// A node check (no service) was added, removed or changed: every instance on that node may
    /// have changed, and which ones the checks cannot tell.
    node_checks: bool,
    /// The `ModifyIndex` of every added or changed check: indexes at which the checks table was
    /// written.
    write_indexes: BTreeSet<u64>,
}

fn diff_checks(before: &CheckSnapshot, after: &CheckSnapshot) -> ChecksDiff {
    let mut diff = ChecksDiff::default();
    let concerns = |check: &HealthCheck, diff: &mut ChecksDiff| {
        if check.service_id.is_empty() {
            diff.node_checks = true;
        } else {
            diff.services.insert(check.service_name.clone());
        }
    };
    for (key, check) in after {
        match before.get(key) {
            Some(old)
                if old.status == check.status
                    && old.modify_index == check.modify_index
                    && old.service_name == check.service_name => {}
            Some(old) => {
                concerns(old, &mut diff);
                concerns(check, &mut diff);
                diff.write_indexes.insert(check.modify_index);
            }
            None => {
                concerns(check, &mut diff);
                diff.write_indexes.insert(check.modify_index);
            }
        }
    }
    for (key, check) in before {
        if !after.contains_key(key) {
            concerns(check, &mut diff);
        }
    }
    diff
}

/// The services that appeared, disappeared or whose tags changed between two answers of
/// `/v1/catalog/services`.
fn diff_catalog(before: &ServiceTags, after: &ServiceTags) -> BTreeSet<String> {
    let mut changed: BTreeSet<String> = after
        .iter()
        .filter(|(name, tags)| before.get(*name) != Some(tags))
        .map(|(name, _)| name.clone())
        .collect();
    changed.extend(
        before
            .keys()
            .filter(|name| !after.contains_key(*name))
            .cloned(),
    );
    changed
}

/// Whether a move of the catalog's index from `from` to `to` is explained: every index in
/// between, `to` included, is a write to the checks table that the checks' diff has seen (an
/// instance that came or went with its checks, in one write; a check's status), so no other
/// write can hide there. A range longer than the indexes remembered is not explained.
fn all_explained(moved: Option<(u64, u64)>, check_writes: &BTreeSet<u64>) -> bool {
    let Some((from, to)) = moved else {
        return true;
    };
    to.saturating_sub(from) <= REMEMBERED_CHECK_WRITES as u64
        && (from.saturating_add(1)..=to).all(|index| check_writes.contains(&index))
}

/// The services with an instance added, changed or removed between two node listings (walked
/// in place: at thousands of instances a listing is large, and nothing of it is copied).
fn diff_nodes(before: &NodeSnapshot, after: &NodeSnapshot) -> BTreeSet<String> {
    let none = BTreeMap::new();
    let mut changed = BTreeSet::new();
    let mut concerns = |instance: &NodeInstance| {
        if !changed.contains(&instance.service) {
            changed.insert(instance.service.clone());
        }
    };
    for (node, instances) in after {
        let old = before.get(node).unwrap_or(&none);
        for (id, instance) in instances {
            match old.get(id) {
                Some(old) if old == instance => {}
                Some(old) => {
                    concerns(old);
                    concerns(instance);
                }
                None => concerns(instance),
            }
        }
        old.iter()
            .filter(|(id, _)| !instances.contains_key(*id))
            .for_each(|(_, gone)| concerns(gone));
    }
    before
        .iter()
        .filter(|(node, _)| !after.contains_key(*node))
        .flat_map(|(_, instances)| instances.values())
        .for_each(&mut concerns);
    changed
}

/// What one wake of the follower must read.
#[derive(Debug, Default)]
struct Round {
    /// Consul services that may have changed.
    services: BTreeSet<String>,
    /// Queries to read whatever the detectors say (newly routed, or to retry).
    queries: BTreeSet<InstanceQuery>,
    /// Read every routed query.
    sweep: bool,
    /// The catalog's index before this round and the last one it reached, when it moved.
    catalog_moved: Option<(u64, u64)>,
    /// When the first event of the round arrived, for the watch lag.
    woke_at: Option<Instant>,
}

impl Round {
    fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.queries.is_empty()
            && !self.sweep
            && self.catalog_moved.is_none()
    }
}

/// Aborts the detectors when the follower stops.
struct Detectors(Vec<JoinHandle<()>>);

impl Drop for Detectors {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The follower's state: the detectors' last answers and what the core holds.
struct Follower {
    registry: ConsulClient,
    core: WeakSender<Pending>,
    observer: Observer,
    callers: CallersInFlight,
    writes: ServiceWrites,
    checks: Option<CheckSnapshot>,
    checks_index: u64,
    /// Indexes at which the checks table was seen written, above the catalog's index.
    check_writes: BTreeSet<u64>,
    catalog: Option<ServiceTags>,
    catalog_index: u64,
    /// The last node listings, to tell which services an unexplained catalog move concerns.
    nodes: Option<NodeSnapshot>,
    followed: Arc<Followed>,
    /// Per followed query, the instances the core holds, sorted and without repeats (`None`:
    /// unknown); shared with the core when its list already is.
    known: BTreeMap<InstanceQuery, Option<Arc<[Instance]>>>,
    /// Queries whose read or hand-over failed, read again after a pause.
    retry: BTreeSet<InstanceQuery>,
    retry_at: Option<Instant>,
    backoff: Backoff,
}

impl Follower {
    fn new(
        registry: ConsulClient,
        core: WeakSender<Pending>,
        observer: Observer,
        callers: CallersInFlight,
        writes: ServiceWrites,
    ) -> Follower {
        Follower {
            registry,
            core,
            observer,
            callers,
            writes,
            checks: None,
            checks_index: 0,
            check_writes: BTreeSet::new(),
            catalog: None,
            catalog_index: 0,
            nodes: None,
            followed: Arc::new(Followed::new()),
            known: BTreeMap::new(),
            retry: BTreeSet::new(),
            retry_at: None,
            backoff: Backoff::new(WATCH_BACKOFF.0, WATCH_BACKOFF.1),
        }
    }

    /// Follows until the core stops (or the task is aborted).
    async fn run(mut self, mut followed: watch::Receiver<Arc<Followed>>) {
        let (events_sender, mut events) = mpsc::channel(16);
        let _detectors = Detectors(vec![
            tokio::spawn(detect_checks(
                self.registry.clone(),
                events_sender.clone(),
                self.observer.clone(),
            )),
            tokio::spawn(detect_catalog(
                self.registry.clone(),
                events_sender,
                self.observer.clone(),
            )),
        ]);
        let mut round = Round::default();
        let first = followed.borrow_and_update().clone();
        self.take_followed(first, &mut round);
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { return };
                    round.woke_at.get_or_insert_with(Instant::now);
                    self.take(event, &mut round);
                    while let Ok(event) = events.try_recv() {
                        self.take(event, &mut round);
                    }
                }
                changed = followed.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now_followed = followed.borrow_and_update().clone();
                    self.take_followed(now_followed, &mut round);
                }
                () = sleep_until_some(retry_at) => {
                    self.retry_at = None;
                    round.queries.append(&mut self.retry);
                    round.woke_at.get_or_insert_with(Instant::now);
                }
            }
            // Nothing can be attributed before both detectors have answered once (their first
            // answers start a sweep, which reads what was routed meanwhile).
            if self.checks.is_none() || self.catalog.is_none() || round.is_empty() {
                continue;
            }
            // A caller's change goes first; what the detectors said meanwhile joins this round.
            self.callers.wait_until_idle(CALLERS_FIRST).await;
            while let Ok(event) = events.try_recv() {
                self.take(event, &mut round);
            }
            if !self.resolve(std::mem::take(&mut round)).await {
                return;
            }
        }
    }

    /// Takes in what the core routes now: a newly routed query is read once. Only the queries
    /// whose entry changed since the last hand-over are visited.
    fn take_followed(&mut self, followed: Arc<Followed>, round: &mut Round) {
        let previous = std::mem::replace(&mut self.followed, followed);
        for item in previous.diff(&self.followed) {
            let (query, instances) = match item {
                DiffItem::Remove(query, _) => {
                    self.known.remove(query);
                    continue;
                }
                DiffItem::Add(query, instances)
                | DiffItem::Update {
                    new: (query, instances),
                    ..
                } => (query, instances),
            };
            if !self.known.contains_key(query) || instances.is_none() {
                round.queries.insert(query.clone());
            }
            let held = instances.as_ref().map(|held| {
                if held.windows(2).all(|pair| pair[0] < pair[1]) {
                    Arc::clone(held)
                } else {
                    let mut sorted = held.to_vec();
                    sorted.sort();
                    sorted.dedup();
                    Arc::from(sorted)
                }
            });
            self.known.insert(query.clone(), held);
        }
    }

    /// Takes in one detector answer: which services it names, and whether a sweep is needed.
    fn take(&mut self, event: Detected, round: &mut Round) {
        match event {
            Detected::Checks(update) => {
                let snapshot: CheckSnapshot = update
                    .value
                    .into_iter()
                    .map(|check| ((check.node.clone(), check.check_id.clone()), check))
                    .collect();
                match &self.checks {
                    Some(before) if !update.after_reset => {
                        let diff = diff_checks(before, &snapshot);
                        round.services.extend(diff.services);
                        round.sweep |= diff.node_checks;
                        self.check_writes.extend(diff.write_indexes);
                    }
                    _ => round.sweep = true,
                }
                self.check_writes.insert(update.index);
                self.checks = Some(snapshot);
                self.checks_index = update.index;
            }
            Detected::Catalog(update) => {
                match &self.catalog {
                    Some(before) if !update.after_reset => {
                        round.services.extend(diff_catalog(before, &update.value));
                        let from = round
                            .catalog_moved
                            .map_or(self.catalog_index, |(from, _)| from);
                        round.catalog_moved = Some((from, update.index));
                    }
                    _ => round.sweep = true,
                }
                self.catalog = Some(update.value);
                self.catalog_index = update.index;
            }
        }
    }

    /// Reads what `round` names (all routed queries for a sweep or an unexplained catalog move)
    /// and hands the changed lists to the core. `false` once the core has stopped.
    async fn resolve(&mut self, mut round: Round) -> bool {
        if !round.sweep
            && !all_explained(round.catalog_moved, &self.check_writes)
            && round
                .catalog_moved
                .is_some_and(|(_, moved_to)| self.checks_index < moved_to)
        {
            // The checks detector may not have woken yet for the write that moved the catalog:
            // one read of the checks tells whether that write touched any.
            match self.registry.watch_checks(None).await {
                Ok(Indexed { value, index }) if index >= self.checks_index => self.take(
                    Detected::Checks(Update {
                        value,
                        index,
                        after_reset: false,
                    }),
                    &mut round,
                ),
                Ok(_) => round.sweep = true,
                Err(error) => {
                    self.observer.record_registry_error();
                    tracing::warn!(%error, "reading the health checks failed; reading every routed service instead");
                    round.sweep = true;
                }
            }
        }
        // The node listings are read before any instance, so that whatever changes after them
        // shows in the next listing or moves the catalog again.
        if round.sweep {
            self.nodes = self.list_nodes().await;
        } else if !all_explained(round.catalog_moved, &self.check_writes) {
            let read = match self.read_service_writes(round.catalog_moved).await {
                Some(services) => Some(services),
                None => self.changed_on_nodes().await,
            };
            match read {
                Some(changed) => round.services.extend(changed),
                None => {
                    tracing::debug!(
                        moved = ?round.catalog_moved,
                        "an instance came, went or changed without checks: reading every routed service"
                    );
                    round.sweep = true;
                }
            }
        }
        let reads: BTreeSet<InstanceQuery> = if round.sweep {
            self.followed.keys().cloned().collect()
        } else {
            let mut reads = round.queries.clone();
            reads.extend(
                self.followed
                    .keys()
                    .filter(|query| round.services.contains(query.service()))
                    .cloned(),
            );
            reads
        };
        let results = self.read(reads).await;
        let catalog_index = self.catalog_index;
        self.check_writes.retain(|index| *index > catalog_index);
        while self.check_writes.len() > REMEMBERED_CHECK_WRITES {
            self.check_writes.pop_first();
        }
        self.hand_over(results, round.woke_at).await
    }

    /// Every instance of every node, when listing them costs fewer requests than reading every
    /// routed query; `None` otherwise or when a listing fails.
    async fn list_nodes(&self) -> Option<NodeSnapshot> {
        let names = match self.registry.node_names().await {
            Ok(names) => names.value,
            Err(error @ RegistryError::FilteredByAcls { .. }) => {
                // Changes on the nodes left out could not be told: read every routed query
                // (each read is checked for filtering itself).
                tracing::debug!(%error, "the node listing is filtered by ACLs");
                return None;
            }
            Err(error) => {
                self.observer.record_registry_error();
                tracing::warn!(%error, "listing the nodes failed");
                return None;
            }
        };
        // No node at all (e.g. a token without `node:read`, whose listing Consul filters to
        // nothing) would make every later listing look unchanged.
        if names.is_empty() || names.len() + 1 >= self.followed.len() {
            return None;
        }
        let mut snapshot = NodeSnapshot::new();
        for node in names {
            match self.registry.node_instances(&node).await {
                Ok(instances) => {
                    snapshot.insert(node, instances);
                }
                Err(error @ RegistryError::FilteredByAcls { .. }) => {
                    tracing::debug!(%error, node, "the node's instances are filtered by ACLs");
                    return None;
                }
                Err(error) => {
                    self.observer.record_registry_error();
                    tracing::warn!(%error, node, "listing the instances of a node failed");
                    return None;
                }
            }
        }
        Some(snapshot)
    }

    /// The services the catalog's move from `moved.0` to `moved.1` concerns, when each write in
    /// between is a check write or a recorded service write (see [`ServiceWrites`]) and no
    /// node changed meanwhile (a node's change concerns each of its services, which a read of
    /// one of them does not tell); `None` otherwise.
    async fn read_service_writes(&self, moved: Option<(u64, u64)>) -> Option<BTreeSet<String>> {
        let (from, to) = moved?;
        let services = self.writes.explain(from, to, &self.check_writes)?;
        match self.registry.node_names().await {
            Ok(nodes) if nodes.index <= from => Some(services),
            Ok(_) => None,
            Err(error) => {
                tracing::debug!(%error, "listing the nodes failed");
                None
            }
        }
    }

    /// The services with an instance registered, changed or deregistered since the last node
    /// listings; `None` when they cannot tell (no earlier listing, or listing fails or costs
    /// more than reading every routed query).
    async fn changed_on_nodes(&mut self) -> Option<BTreeSet<String>> {
        let listed = self.list_nodes().await;
        let before = std::mem::replace(&mut self.nodes, listed);
        Some(diff_nodes(&before?, self.nodes.as_ref()?))
    }

    /// Reads `queries` (those still followed), [`READS_IN_FLIGHT`] at a time.
    async fn read(&self, queries: BTreeSet<InstanceQuery>) -> Vec<InstanceRead> {
        let mut pending = queries
            .into_iter()
            .filter(|query| self.followed.contains_key(query));
        let mut running = JoinSet::new();
        let mut results = Vec::new();
        loop {
            while running.len() < READS_IN_FLIGHT {
                let Some(query) = pending.next() else { break };
                let registry = self.registry.clone();
                running.spawn(async move {
                    let read = registry.watch_healthy_instances(&query, None).await;
                    (query, read)
                });
            }
            match running.join_next().await {
                Some(Ok(result)) => results.push(result),
                Some(Err(error)) => tracing::error!(%error, "an instance read did not finish"),
                None => return results,
            }
        }
    }

    /// Hands every list that differs from what the core holds to the core, all at once (the
    /// core applies those waiting together in one step); failed reads and hand-overs are
    /// retried after a pause. A read Consul's ACLs filtered is a failed read: the core keeps the
    /// instances it routes, and the read is retried until Consul answers it whole. `false` once
    /// the core has stopped.
    async fn hand_over(&mut self, results: Vec<InstanceRead>, woke_at: Option<Instant>) -> bool {
        let mut failed_reads = Vec::new();
        let mut filtered_reads = Vec::new();
        let mut submits = JoinSet::new();
        for (query, result) in results {
            let mut instances = match result {
                Ok(read) => {
                    self.writes.record(&query, read.index, &read.value);
                    read.value
                }
                Err(RegistryError::FilteredByAcls { .. }) => {
                    self.observer.record_registry_error();
                    filtered_reads.push(query);
                    continue;
                }
                Err(error) => {
                    self.observer.record_registry_error();
                    failed_reads.push((query, error));
                    continue;
                }
            };
            instances.sort();
            instances.dedup();
            match self.known.get(&query) {
                None => continue,
                Some(Some(known)) if known[..] == instances[..] => continue,
                Some(_) => {}
            }
            tracing::info!(
                service = %query,
                healthy = instances.len(),
                "healthy instances changed in Consul"
            );
            let core = self.core.clone();
            submits.spawn(async move {
                let change = Change::Instances {
                    consul_service: query.clone(),
                    instances: instances.clone(),
                };
                let outcome = submit_internal(&core, change).await;
                (query, instances, outcome)
            });
        }
        if let Some((query, error)) = failed_reads.first() {
            tracing::warn!(
                %error,
                failed = failed_reads.len(),
                "reading the instances of `{query}` failed; retrying"
            );
        }
        if !filtered_reads.is_empty() {
            tracing::warn!(
                services = %named(&filtered_reads),
                filtered = filtered_reads.len(),
                "Consul's ACLs filtered the instances of these services \
                 (X-Consul-Results-Filtered-By-ACLs): keeping the instances they route; retrying. \
                 Check that flow-proxy's token grants service:read and node:read"
            );
        }
        self.retry
            .extend(failed_reads.into_iter().map(|(query, _)| query));
        self.retry.extend(filtered_reads);
        let mut accepted = false;
        while let Some(joined) = submits.join_next().await {
            let Ok((query, instances, outcome)) = joined else {
                continue;
            };
            match outcome {
                None => return false,
                Some(Ok(_)) => {
                    accepted = true;
                    if let Some(known) = self.known.get_mut(&query) {
                        *known = Some(Arc::from(instances));
                    }
                }
                Some(Err(error)) => {
                    tracing::error!(%error, service = %query, "using the instances read failed; retrying");
                    self.retry.insert(query);
                }
            }
        }
        if accepted {
            if let Some(woke_at) = woke_at {
                self.observer
                    .record_watch_lag(WatchKind::Instances, woke_at.elapsed());
            }
        }
        if self.retry.is_empty() {
            self.backoff.reset();
        } else if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + self.backoff.next_pause());
        }
        true
    }
}

/// Most queries a log line names; past it the line says how many more.
const NAMED_IN_LOG: usize = 5;

/// `queries` for a log line: the first [`NAMED_IN_LOG`], then how many more.
fn named(queries: &[InstanceQuery]) -> String {
    let mut text = queries
        .iter()
        .take(NAMED_IN_LOG)
        .map(|query| format!("`{query}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if queries.len() > NAMED_IN_LOG {
        text.push_str(&format!(" and {} more", queries.len() - NAMED_IN_LOG));
    }
    text
}

/// Sleeps until `at`, forever when there is none.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Blocks on `/v1/health/state/any` and passes every answer whose index moved to the follower.
async fn detect_checks(registry: ConsulClient, events: mpsc::Sender<Detected>, observer: Observer) {
    let mut watch = Watch::new("the health checks".into(), WatchIndex::default())
        .observed(observer, WatchKind::Instances);
    loop {
        let update = watch.next(|blocking| registry.watch_checks(blocking)).await;
        if events.send(Detected::Checks(update)).await.is_err() {
            return;
        }
        watch.taken();
    }
}

/// Blocks on `/v1/catalog/services` and passes every answer whose index moved to the follower.
async fn detect_catalog(
    registry: ConsulClient,
    events: mpsc::Sender<Detected>,
    observer: Observer,
) {
    let mut watch = Watch::new("the catalog of services".into(), WatchIndex::default())
        .observed(observer, WatchKind::Instances);
    loop {
        let update = watch
            .next(|blocking| registry.watch_service_tags(blocking))
            .await;
        if events.send(Detected::Catalog(update)).await.is_err() {
            return;
        }
        watch.taken();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(node: &str, id: &str, service: &str, status: &str, index: u64) -> HealthCheck {
        HealthCheck {
            node: node.into(),
            check_id: id.into(),
            service_id: if service.is_empty() {
                String::new()
            } else {
                format!("{service}-1")
            },
            service_name: service.into(),
            status: status.into(),
            modify_index: index,
        }
    }

    fn snapshot(checks: &[HealthCheck]) -> CheckSnapshot {
        checks
            .iter()
            .map(|check| ((check.node.clone(), check.check_id.clone()), check.clone()))
            .collect()
    }

    fn names(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn a_check_added_removed_or_changed_names_its_service_and_the_write_index() {
        let serf = check("n1", "serfHealth", "", "passing", 1);
        let before = snapshot(&[
            serf.clone(),
            check("n1", "c-web", "web", "passing", 10),
            check("n1", "c-api", "api", "passing", 11),
            check("n1", "c-db", "db", "critical", 12),
            check("n1", "c-quiet", "quiet", "passing", 13),
        ]);
        let after = snapshot(&[
            serf,
            check("n1", "c-web", "web", "critical", 20),
            check("n1", "c-db", "db", "critical", 21),
            check("n1", "c-new", "new", "critical", 22),
            check("n1", "c-quiet", "quiet", "passing", 13),
        ]);
        let diff = diff_checks(&before, &after);
        assert_eq!(
            diff.services,
            names(&["api", "db", "new", "web"]),
            "web's status, db's output (ModifyIndex), api removed, new added; quiet unchanged"
        );
        assert!(!diff.node_checks);
        assert_eq!(diff.write_indexes, BTreeSet::from([20, 21, 22]));
        assert_eq!(diff_checks(&after, &after), ChecksDiff::default());
    }

    #[test]
    fn a_node_check_change_cannot_be_attributed_to_services() {
        let before = snapshot(&[check("n1", "serfHealth", "", "passing", 1)]);
        let after = snapshot(&[check("n1", "serfHealth", "", "critical", 5)]);
        let diff = diff_checks(&before, &after);
        assert!(diff.node_checks);
        assert!(diff.services.is_empty());
        let gone = diff_checks(&before, &CheckSnapshot::new());
        assert!(gone.node_checks, "a node that left");
    }

    #[test]
    fn checks_are_told_apart_by_node_and_id() {
        let before = snapshot(&[check("n1", "c", "web", "passing", 3)]);
        let after = snapshot(&[
            check("n1", "c", "web", "passing", 3),
            check("n2", "c", "api", "passing", 4),
        ]);
        assert_eq!(diff_checks(&before, &after).services, names(&["api"]));
    }

    #[test]
    fn the_catalog_names_services_that_appear_disappear_or_change_tags() {
        let tags = |list: &[&str]| names(list);
        let before = ServiceTags::from([
            ("web".to_string(), tags(&["a", "b"])),
            ("api".to_string(), tags(&[])),
            ("gone".to_string(), tags(&["x"])),
        ]);
        let after = ServiceTags::from([
            ("web".to_string(), tags(&["b", "a"])),
            ("api".to_string(), tags(&["v2"])),
            ("new".to_string(), tags(&[])),
        ]);
        assert_eq!(
            diff_catalog(&before, &after),
            names(&["api", "gone", "new"]),
            "web's tags are the same set in another order"
        );
        assert!(diff_catalog(&after, &after).is_empty());
    }

    #[test]
    fn a_catalog_move_is_explained_only_when_every_index_it_spans_is_a_seen_check_write() {
        assert!(all_explained(Some((28, 30)), &BTreeSet::from([29, 30])));
        assert!(
            !all_explained(Some((28, 30)), &BTreeSet::from([30])),
            "29 could be an instance written without checks"
        );
        assert!(
            !all_explained(Some((29, 30)), &BTreeSet::from([29, 31])),
            "writes at 29 and 31 say nothing of 30"
        );
        assert!(
            all_explained(None, &BTreeSet::new()),
            "the catalog did not move"
        );
        let many: BTreeSet<u64> = (1..=5_000).collect();
        assert!(
            !all_explained(Some((0, 5_000)), &many),
            "longer than the indexes remembered"
        );
    }

    fn instance(service: &str, index: u64) -> NodeInstance {
        NodeInstance {
            service: service.into(),
            modify_index: index,
        }
    }

    #[test]
    fn node_listings_name_the_services_whose_instances_came_went_or_changed() {
        let node = |instances: &[(&str, NodeInstance)]| -> BTreeMap<String, NodeInstance> {
            instances
                .iter()
                .map(|(id, instance)| (id.to_string(), instance.clone()))
                .collect()
        };
        let before = NodeSnapshot::from([
            (
                "n1".to_string(),
                node(&[
                    ("web-1", instance("web", 5)),
                    ("api-1", instance("api", 6)),
                    ("db-1", instance("db", 7)),
                ]),
            ),
            ("n2".to_string(), node(&[("gone-1", instance("gone", 8))])),
        ]);
        let after = NodeSnapshot::from([(
            "n1".to_string(),
            node(&[
                ("web-1", instance("web", 5)),
                ("web-2", instance("web", 9)),
                ("api-1", instance("api", 10)),
            ]),
        )]);
        assert_eq!(
            diff_nodes(&before, &after),
            names(&["api", "db", "gone", "web"]),
            "web added an instance, api moved, db's left, node n2 left with gone's"
        );
        assert!(diff_nodes(&after, &after).is_empty());
    }

    #[test]
    fn a_catalog_move_is_explained_by_the_service_reads_and_check_writes_within_it() {
        let writes = ServiceWrites::default();
        let web = InstanceQuery::new("web", std::iter::empty());
        let api = InstanceQuery::new("api", ["v2".to_string()]);
        let one = [Instance::new("127.0.0.1", 8080).expect("an instance")];
        writes.record(&web, 11, &one);
        writes.record(&api, 13, &one);
        // An empty answer carries the index of whichever service disappeared last.
        writes.record(&web, 14, &[]);
        let check_writes = BTreeSet::from([12]);
        assert_eq!(
            writes.explain(10, 13, &check_writes),
            Some(names(&["api", "web"]))
        );
        assert_eq!(
            writes.explain(12, 13, &BTreeSet::new()),
            Some(names(&["api"]))
        );
        assert_eq!(
            writes.explain(10, 13, &BTreeSet::new()),
            None,
            "index 12 is neither a recorded read nor a check write"
        );
        assert_eq!(writes.explain(13, 14, &check_writes), None);
        // This proxy's spec write concerns no instance.
        writes.record_kv(14);
        assert_eq!(writes.explain(12, 14, &check_writes), Some(names(&["api"])));
    }
}
