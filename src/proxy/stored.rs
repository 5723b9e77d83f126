//! The specs and certificates stored in Consul KV under `<kv-prefix>/services/` and
//! `<kv-prefix>/certs/`: writing them with check-and-set, reading them back, and the one
//! blocking-query watch on `<kv-prefix>/` that tells the core whenever another proxy (or anyone)
//! changed them. The one-time import of Docker Flow Proxy's layout happens on the
//! watch's first successful read.
//!
//! Every write under the prefix wakes the watch, which then reads the whole prefix: so that such
//! a read costs what changed rather than what is stored, the documents are kept parsed between
//! reads ([`ParsedDocuments`]) and only an entry whose `ModifyIndex` (Consul's own change marker)
//! moved is decoded from base64 and parsed again; the core then compares the specs by pointer
//! ([`StoredDifference`]). The specs reach the core as one persistent map of shared specs, the
//! same `Arc` for as long as their entry does not change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::mpsc::WeakSender;

use super::proxy_settings::{KvSettings, SETTINGS_FOLDER};
use super::{submit_internal, Change, Pending, ProxyError, RoutingState};
use crate::certs::Certificate;
use crate::observe::{Observer, WatchKind};
use crate::registry::watch::{Watch, WatchIndex};
use crate::registry::{Blocking, ConsulClient, Indexed, KvEntry, ListedKvEntry, RegistryError};
use crate::spec::{services_from_docker_flow, ServiceName, ServiceSpec, DOCKER_FLOW_PREFIX};

/// How many times a write that lost a check-and-set race is tried again before the caller gets
/// a conflict.
const CAS_ATTEMPTS: usize = 5;

/// The stored specs as one read of the prefix found them.
#[derive(Debug)]
pub(super) struct StoredSpecs {
    /// The specs that validate, by service name: a spec whose entry did not change since the
    /// previous read is the same `Arc` as then (see [`ParsedDocuments`]).
    pub specs: StoredSpecMap,
    /// Keys (below the prefix) whose document does not validate: such services are left as they
    /// are routed, neither replaced nor removed.
    pub unreadable: BTreeSet<String>,
    /// The certificates that validate, by name.
    pub certs: BTreeMap<ServiceName, Certificate>,
    /// Certificate keys (below `certs/`) whose bundle does not validate: left as they are served.
    pub unreadable_certs: BTreeSet<String>,
    /// The read's `X-Consul-Index`.
    pub index: u64,
    /// The read follows an index that went backwards (e.g. Consul lost or restored its data).
    pub after_reset: bool,
    /// The proxy-wide settings under `<kv-prefix>/settings/` that validate.
    pub settings: KvSettings,
}

/// The stored specs by service name, as a persistent map (a copy costs nothing).
pub(super) type StoredSpecMap = imbl::OrdMap<ServiceName, Arc<ServiceSpec>>;

/// What one entry's document parsed to.
#[derive(Debug, Clone)]
enum ParsedDocument {
    /// A spec that validates (also held in [`ParsedDocuments::specs`]).
    Spec(Arc<ServiceSpec>),
    /// A spec document that does not validate, under this name below `services/`.
    UnreadableSpec(String),
    /// Boxed: a certificate is large, and every stored spec's entry is as large as the largest
    /// variant.
    Cert(Box<Certificate>),
    /// A certificate bundle that does not validate, under this name below `certs/`.
    UnreadableCert(String),
    /// Any other key under the prefix (the import marker).
    Other,
}

/// An entry's parsed document and the `ModifyIndex` it was parsed at.
#[derive(Debug)]
struct ParsedEntry {
    modify_index: u64,
    document: ParsedDocument,
    /// The number of the last read that held the entry: entries a read no longer holds are
    /// forgotten after it.
    seen_in: u64,
}

/// The documents of the last read of the prefix, parsed, by key: a read parses again only the
/// entries whose `ModifyIndex` changed (or that are new), so following thousands of stored specs
/// costs each read what changed. Forgotten when Consul's index goes backwards (its data was lost
/// or restored: a `ModifyIndex` may then name another document).
#[derive(Debug, Default)]
pub(super) struct ParsedDocuments {
    entries: HashMap<String, ParsedEntry>,
    /// The specs that validate, kept in step with `entries`.
    specs: StoredSpecMap,
    /// How many reads went by.
    reads: u64,
    /// How many documents were parsed (specs and certificates), over all reads.
    parsed: u64,
}

impl ParsedDocuments {
    /// Forgets every parsed document.
    fn forget(&mut self) {
        self.entries.clear();
        self.specs = StoredSpecMap::new();
    }

    /// Takes a document parsed anew for a key in place of `previous` (what it parsed to before).
    fn replace_spec(&mut self, previous: Option<&ParsedDocument>, now: &ParsedDocument) {
        if let Some(ParsedDocument::Spec(spec)) = previous {
            self.specs.remove(spec.service_name());
        }
        if let ParsedDocument::Spec(spec) = now {
            self.specs
                .insert(spec.service_name().clone(), Arc::clone(spec));
        }
    }
}

/// How a version of the stored specs differs from the routed state, found in one walk of both
/// (ordered by name) that compares specs by pointer first: a spec the watch did not parse again
/// is the very one routed, and costs no deep compare.
#[derive(Debug, Default)]
pub(super) struct StoredDifference {
    /// Stored specs not routed, or routed with another spec.
    pub changed: Vec<(ServiceName, Arc<ServiceSpec>)>,
    /// Stored specs equal to the routed one but not the same `Arc`.
    pub adopted: Vec<(ServiceName, Arc<ServiceSpec>)>,
    /// Routed services without a stored spec (those whose stored document does not validate,
    /// `unreadable`, are not gone: they stay as routed).
    pub gone: Vec<ServiceName>,
}

impl StoredDifference {
    /// What `stored` changes in `routed`; routed services whose stored document is `unreadable`
    /// are left alone.
    pub fn between(
        stored: &StoredSpecMap,
        routed: &RoutingState,
        unreadable: &BTreeSet<String>,
    ) -> StoredDifference {
        let mut difference = StoredDifference::default();
        let mut stored = stored.iter().peekable();
        let mut routed = routed.iter().peekable();
        loop {
            let order = match (stored.peek(), routed.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((stored_name, _)), Some((routed_name, _))) => stored_name.cmp(routed_name),
            };
            match order {
                std::cmp::Ordering::Less => {
                    if let Some((name, spec)) = stored.next() {
                        difference.changed.push((name.clone(), Arc::clone(spec)));
                    }
                }
                std::cmp::Ordering::Greater => {
                    if let Some((name, _)) = routed.next() {
                        if !unreadable.contains(name.as_str()) {
                            difference.gone.push(name.clone());
                        }
                    }
                }
                std::cmp::Ordering::Equal => {
                    if let (Some((name, spec)), Some((_, now))) = (stored.next(), routed.next()) {
                        if Arc::ptr_eq(spec, &now.spec) {
                            continue;
                        }
                        let entry = (name.clone(), Arc::clone(spec));
                        if **spec == *now.spec {
                            difference.adopted.push(entry);
                        } else {
                            difference.changed.push(entry);
                        }
                    }
                }
            }
        }
        difference
    }
}

/// Reads and writes the specs under `<kv-prefix>/services/`.
#[derive(Debug, Clone)]
pub(super) struct SpecStore {
    registry: ConsulClient,
    /// `<kv-prefix>/`: what the watch reads.
    root: String,
    /// `<kv-prefix>/services/`.
    prefix: String,
    /// `<kv-prefix>/certs/`.
    certs_prefix: String,
    /// Written once Docker Flow Proxy's layout was imported, so it is never imported again
    /// (not even after every imported service was removed).
    import_marker: String,
    /// `<kv-prefix>/settings/`: the proxy-wide settings (see [`super::proxy_settings`]).
    settings_prefix: String,
}

impl SpecStore {
    pub fn new(registry: ConsulClient, kv_prefix: &str) -> SpecStore {
        let kv_prefix = kv_prefix.trim_end_matches('/');
        SpecStore {
            registry,
            root: format!("{kv_prefix}/"),
            prefix: format!("{kv_prefix}/services/"),
            certs_prefix: format!("{kv_prefix}/certs/"),
            import_marker: format!("{kv_prefix}/imported/docker-flow"),
            settings_prefix: format!("{kv_prefix}/{SETTINGS_FOLDER}"),
        }
    }

    fn key(&self, name: &ServiceName) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// Stores `spec` as the service's document (`None` deletes it) with check-and-set on the
    /// `ModifyIndex` just read, so a concurrent write by another proxy is never overwritten
    /// unseen: a lost race is read again and retried, and after [`CAS_ATTEMPTS`] losses the
    /// caller gets [`ProxyError::Conflict`]. [`SpecStore::index_of`] tells the KV index after
    /// the write (any read of the prefix with a lower index predates it).
    /// `read_ahead` is the key's entry when the caller already read it ([`SpecStore::current`]):
    /// the first attempt starts from it instead of reading again (its check-and-set fails, and
    /// the key is read again, if it changed since).
    pub async fn store(
        &self,
        name: &ServiceName,
        spec: Option<&ServiceSpec>,
        read_ahead: Option<Option<KvEntry>>,
    ) -> Result<(), ProxyError> {
        let key = self.key(name);
        let document = spec.map(|spec| self.document(&key, spec)).transpose()?;
        self.store_document(name, key, document, read_ahead, |stored| {
            same_spec(stored, spec)
        })
        .await
    }

    /// The service's stored entry now (`None`: no key), for [`SpecStore::store`]'s `read_ahead`.
    pub async fn current(&self, name: &ServiceName) -> Result<Option<KvEntry>, RegistryError> {
        Ok(self.registry.kv_get(&self.key(name)).await?.value)
    }

    /// [`SpecStore::store`] for a service this proxy does not route yet, whose key is most
    /// likely absent: first written as a creation (`?cas=0`, which Consul refuses when the key
    /// exists), without reading the key first; when that is refused, as [`SpecStore::store`].
    pub async fn store_new(
        &self,
        name: &ServiceName,
        spec: &ServiceSpec,
    ) -> Result<(), ProxyError> {
        let key = self.key(name);
        let document = self.document(&key, spec)?;
        if self.registry.kv_put_cas(&key, document.clone(), 0).await? {
            return Ok(());
        }
        self.store_document(name, key, Some(document), None, |stored| {
            same_spec(stored, Some(spec))
        })
        .await
    }

    /// The KV index of the service's key now: at least that of this proxy's last write of it
    /// (Consul's writes answer no index).
    pub async fn index_of(&self, name: &ServiceName) -> Result<u64, RegistryError> {
        Ok(self.registry.kv_get(&self.key(name)).await?.index)
    }

    /// The JSON document `spec` is stored as under `key`.
    fn document(&self, key: &str, spec: &ServiceSpec) -> Result<Vec<u8>, ProxyError> {
        serde_json::to_vec(spec).map_err(|error| {
            ProxyError::Registry(RegistryError::Decode {
                request: format!("PUT /v1/kv/{key}"),
                message: error.to_string(),
            })
        })
    }

    /// Stores a certificate's bundle under `<kv-prefix>/certs/<name>` (`None` deletes it), as
    /// [`SpecStore::store`] stores specs.
    pub async fn store_cert(
        &self,
        name: &ServiceName,
        certificate: Option<&Certificate>,
    ) -> Result<u64, ProxyError> {
        let key = format!("{}{}", self.certs_prefix, name);
        let document = certificate.map(|certificate| certificate.pem().as_bytes().to_vec());
        self.store_document(name, key.clone(), document, None, |_| false)
            .await?;
        Ok(self.registry.kv_get(&key).await?.index)
    }

    /// Check-and-set write (or delete, for `None`) of one document; see [`SpecStore::store`].
    /// A stored document that is `document` byte for byte, or that `equivalent` accepts, is
    /// left as it is: no write wakes the watches of every proxy for what they already route.
    async fn store_document(
        &self,
        name: &ServiceName,
        key: String,
        document: Option<Vec<u8>>,
        mut read_ahead: Option<Option<KvEntry>>,
        equivalent: impl Fn(&[u8]) -> bool,
    ) -> Result<(), ProxyError> {
        for attempt in 1..=CAS_ATTEMPTS {
            let current = match read_ahead.take() {
                Some(current) => current,
                None => self.registry.kv_get(&key).await?.value,
            };
            let stored = match (&document, current) {
                (Some(document), Some(entry))
                    if entry.value == *document || equivalent(&entry.value) =>
                {
                    true
                }
                (Some(document), current) => {
                    let modify_index = current.map_or(0, |entry| entry.modify_index);
                    self.registry
                        .kv_put_cas(&key, document.clone(), modify_index)
                        .await?
                }
                (None, None) => true,
                (None, Some(entry)) => {
                    self.registry
                        .kv_delete_cas(&key, entry.modify_index)
                        .await?
                }
            };
            if stored {
                return Ok(());
            }
            tracing::info!(%key, attempt, "another writer changed the stored spec meanwhile; reading it again");
        }
        Err(ProxyError::Conflict(name.clone()))
    }

    /// Whether a document is stored for the service (valid or not).
    pub async fn holds(&self, name: &ServiceName) -> Result<bool, RegistryError> {
        Ok(self.registry.kv_get(&self.key(name)).await?.value.is_some())
    }

    /// Reads everything under `<kv-prefix>/`, as a blocking query when `blocking` is given.
    async fn read(
        &self,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Vec<ListedKvEntry>>, RegistryError> {
        self.registry.watch_kv_list(&self.root, blocking).await
    }

    /// Whether a read holds no stored spec (certificates and markers do not count).
    fn holds_no_spec(&self, entries: &[ListedKvEntry]) -> bool {
        !entries
            .iter()
            .any(|entry| entry.key.starts_with(&self.prefix))
    }

    /// Parses what a read returned, reusing the documents of `parsed` whose `ModifyIndex` did not
    /// change. Documents that do not validate are logged once per version (settings: once per
    /// version in `reported`).
    fn parse(
        &self,
        parsed: &mut ParsedDocuments,
        entries: Vec<ListedKvEntry>,
        index: u64,
        after_reset: bool,
        reported: &mut BTreeSet<(String, u64)>,
    ) -> StoredSpecs {
        if after_reset {
            parsed.forget();
        }
        parsed.reads += 1;
        let read = parsed.reads;
        let mut snapshot = StoredSpecs {
            specs: StoredSpecMap::new(),
            unreadable: BTreeSet::new(),
            certs: BTreeMap::new(),
            unreadable_certs: BTreeSet::new(),
            index,
            after_reset,
            settings: KvSettings::default(),
        };
        let mut parsed_now = 0;
        for entry in entries {
            if entry.key.starts_with(&self.settings_prefix) {
                // A few small values: read each time.
                let version = (entry.key.clone(), entry.modify_index);
                match entry.decode() {
                    Ok(entry) => {
                        let relative = &entry.key[self.settings_prefix.len()..];
                        snapshot.settings.read_entry(relative, &entry, reported);
                    }
                    Err(error) => {
                        if reported.insert(version) {
                            tracing::error!(%error, "ignoring a proxy-wide setting whose value does not decode");
                        }
                    }
                }
                continue;
            }
            let document = match parsed.entries.get_mut(&entry.key) {
                Some(known) if known.modify_index == entry.modify_index => {
                    known.seen_in = read;
                    known.document.clone()
                }
                known => {
                    let previous = known.map(|known| known.document.clone());
                    let (key, modify_index) = (entry.key.clone(), entry.modify_index);
                    let document = self.parse_document(entry);
                    parsed_now += 1;
                    parsed.replace_spec(previous.as_ref(), &document);
                    parsed.entries.insert(
                        key,
                        ParsedEntry {
                            modify_index,
                            document: document.clone(),
                            seen_in: read,
                        },
                    );
                    document
                }
            };
            match document {
                ParsedDocument::UnreadableSpec(name) => {
                    snapshot.unreadable.insert(name);
                }
                ParsedDocument::Cert(certificate) => {
                    snapshot
                        .certs
                        .insert(certificate.name().clone(), *certificate);
                }
                ParsedDocument::UnreadableCert(name) => {
                    snapshot.unreadable_certs.insert(name);
                }
                ParsedDocument::Spec(_) | ParsedDocument::Other => {}
            }
        }
        let gone: Vec<ParsedDocument> = parsed
            .entries
            .values()
            .filter(|known| known.seen_in != read)
            .map(|known| known.document.clone())
            .collect();
        if !gone.is_empty() {
            parsed.entries.retain(|_, known| known.seen_in == read);
            for document in &gone {
                parsed.replace_spec(Some(document), &ParsedDocument::Other);
            }
        }
        parsed.parsed += parsed_now;
        tracing::debug!(
            index,
            parsed = parsed_now,
            specs = parsed.specs.len(),
            "read the stored specs"
        );
        snapshot.specs = parsed.specs.clone();
        snapshot
    }

    /// Decodes and parses one entry's document (a spec, a certificate, or another key), logging
    /// one that does not validate.
    fn parse_document(&self, listed: ListedKvEntry) -> ParsedDocument {
        let is_cert = listed.key.starts_with(&self.certs_prefix);
        if !is_cert && !listed.key.starts_with(&self.prefix) {
            return ParsedDocument::Other;
        }
        let key = listed.key.clone();
        let decoded = listed.decode();
        if let Some(cert_name) = key.strip_prefix(&self.certs_prefix) {
            let parsed = decoded
                .map_err(|error| error.to_string())
                .and_then(|entry| {
                    Certificate::parse(cert_name, &entry.value).map_err(|error| error.to_string())
                });
            return match parsed {
                Ok(certificate) => ParsedDocument::Cert(Box::new(certificate)),
                Err(error) => {
                    tracing::error!(%key, %error, "ignoring a stored certificate that does not validate");
                    ParsedDocument::UnreadableCert(cert_name.to_string())
                }
            };
        }
        let Some(stored_name) = key.strip_prefix(&self.prefix) else {
            return ParsedDocument::Other;
        };
        let spec = decoded
            .map_err(|error| error.to_string())
            .and_then(|entry| {
                serde_json::from_slice::<ServiceSpec>(&entry.value)
                    .map_err(|error| error.to_string())
            });
        let problem = match spec {
            Ok(spec) if spec.service_name().as_str() == stored_name => {
                return ParsedDocument::Spec(Arc::new(spec));
            }
            Ok(spec) => format!(
                "it is filed under another name than `{}`",
                spec.service_name()
            ),
            Err(error) => error,
        };
        tracing::error!(%key, %problem, "ignoring a stored spec that does not validate");
        ParsedDocument::UnreadableSpec(stored_name.to_string())
    }
}

/// Whether a stored document reads as `spec` (written by another version or by hand, with
/// fields left to their defaults).
fn same_spec(stored: &[u8], spec: Option<&ServiceSpec>) -> bool {
    spec.is_some_and(|spec| {
        serde_json::from_slice::<ServiceSpec>(stored).is_ok_and(|stored| stored == *spec)
    })
}

/// Reads the stored specs once, without blocking, for the restore at start, keeping the parsed
/// documents in `parsed` for the watch. When the prefix is empty, Docker Flow Proxy's layout is
/// imported first (see [`import_docker_flow`]).
pub(super) async fn first_read(
    store: &SpecStore,
    index: &mut WatchIndex,
    parsed: &mut ParsedDocuments,
) -> Result<StoredSpecs, RegistryError> {
    let mut read = store.read(None).await?;
    if store.holds_no_spec(&read.value) && import_docker_flow(store).await? > 0 {
        read = store.read(None).await?;
    }
    index.observe(read.index);
    Ok(store.parse(parsed, read.value, read.index, false, &mut BTreeSet::new()))
}

/// Imports Docker Flow Proxy's KV layout (`docker-flow/<service>/<field>`) into flow-proxy's, when
/// flow-proxy's own prefix is empty and no import happened before (a marker key under the prefix
/// records it). Each service is written only if its key does not exist yet (`?cas=0`), so proxies
/// starting together import it once. Services whose fields do not validate are logged and left
/// out. Returns how many services were written.
async fn import_docker_flow(store: &SpecStore) -> Result<usize, RegistryError> {
    if store
        .registry
        .kv_get(&store.import_marker)
        .await?
        .value
        .is_some()
    {
        return Ok(0);
    }
    let entries = store.registry.kv_list(DOCKER_FLOW_PREFIX).await?;
    if entries.is_empty() {
        return Ok(0);
    }
    let entries: Vec<(String, Vec<u8>)> = entries
        .into_iter()
        .map(|entry| (entry.key, entry.value))
        .collect();
    let mut imported = 0;
    for found in services_from_docker_flow(&entries) {
        let spec = match found.spec {
            Ok(spec) => spec,
            Err(error) => {
                tracing::error!(service = ?found.service, %error, "not importing a Docker Flow Proxy service");
                continue;
            }
        };
        let key = store.key(spec.service_name());
        let document = serde_json::to_vec(&spec).map_err(|error| RegistryError::Decode {
            request: format!("PUT /v1/kv/{key}"),
            message: error.to_string(),
        })?;
        if store.registry.kv_put_cas(&key, document, 0).await? {
            imported += 1;
            tracing::info!(
                service = %spec.service_name(),
                %key,
                ignored_fields = ?found.ignored_fields,
                "imported a service from Docker Flow Proxy's layout"
            );
        }
    }
    let record = format!("{imported} services imported from {DOCKER_FLOW_PREFIX}");
    store
        .registry
        .kv_put_cas(&store.import_marker, record.into_bytes(), 0)
        .await?;
    tracing::info!(services = imported, from = DOCKER_FLOW_PREFIX, marker = %store.import_marker, "Docker Flow Proxy import done");
    Ok(imported)
}

/// The shortest interval between two reads of the stored specs after a burst of two. Each read
/// lists the whole prefix (Consul lists a prefix whole: 1.5 MB at 1,000 services), and every
/// write (this proxy's own too) wakes it; so a burst of changes costs one listing per interval,
/// not one per change, and a change made through another proxy arrives here at most this much
/// later.
const STORED_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Watches the prefix with blocking queries and hands every new version to the core, until the
/// core stops. Read errors (Consul down, no leader, ACL refusals) are retried with capped,
/// jittered exponential backoff while HAProxy keeps serving; a version the core could not apply
/// is read and handed over again after a pause. When `import_pending` (the first read at start
/// failed), the first read that succeeds imports Docker Flow Proxy's layout into an empty prefix.
/// `parsed` holds the documents parsed so far (by the first read at start).
pub(super) async fn watch_stored_specs(
    store: SpecStore,
    index: WatchIndex,
    mut parsed: ParsedDocuments,
    mut import_pending: bool,
    core: WeakSender<Pending>,
    observer: Observer,
) {
    let mut watch = Watch::new("the stored specs".into(), index)
        .paced(STORED_WATCH_INTERVAL)
        .observed(observer.clone(), WatchKind::StoredSpecs);
    let mut reported = BTreeSet::new();
    loop {
        let update = watch.next(|blocking| store.read(blocking)).await;
        let read_at = std::time::Instant::now();
        if std::mem::take(&mut import_pending) && store.holds_no_spec(&update.value) {
            match import_docker_flow(&store).await {
                Ok(0) => {}
                Ok(_) => {
                    watch.read_again();
                    continue;
                }
                Err(error) => {
                    import_pending = true;
                    watch.retry_later(error).await;
                    continue;
                }
            }
        }
        let snapshot = store.parse(
            &mut parsed,
            update.value,
            update.index,
            update.after_reset,
            &mut reported,
        );
        match submit_internal(&core, Change::Stored(snapshot)).await {
            None => return,
            Some(Ok(_)) => {
                observer.record_watch_lag(WatchKind::StoredSpecs, read_at.elapsed());
                watch.taken();
            }
            Some(Err(error)) => watch.retry_later(error).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::KvEntry;

    fn store() -> SpecStore {
        SpecStore::new(
            ConsulClient::new(&["127.0.0.1:1".to_string()], None),
            "flow-proxy",
        )
    }

    /// The stored entry of a spec routing `path`, as Consul lists it at `modify_index`.
    fn spec_entry(name: &str, path: &str, modify_index: u64) -> KvEntry {
        let pairs = [
            ("serviceName".to_string(), name.to_string()),
            ("servicePath".to_string(), path.to_string()),
        ];
        let spec = ServiceSpec::from_query(&pairs).expect("a valid spec");
        KvEntry {
            key: format!("flow-proxy/services/{name}"),
            value: serde_json::to_vec(&spec).expect("serializes"),
            modify_index,
        }
    }

    fn read(
        store: &SpecStore,
        parsed: &mut ParsedDocuments,
        entries: &[KvEntry],
        after_reset: bool,
    ) -> StoredSpecs {
        let index = entries.iter().map(|entry| entry.modify_index).max();
        store.parse(
            parsed,
            entries.iter().cloned().map(ListedKvEntry::from).collect(),
            index.unwrap_or(1),
            after_reset,
            &mut BTreeSet::new(),
        )
    }

    fn name(name: &str) -> ServiceName {
        ServiceName::parse("serviceName", name).expect("a valid name")
    }

    #[test]
    fn a_read_parses_only_the_entries_whose_modify_index_changed() {
        let store = store();
        let mut parsed = ParsedDocuments::default();
        let mut entries = vec![
            spec_entry("api", "/api", 10),
            spec_entry("db", "/db", 11),
            spec_entry("web", "/web", 12),
        ];
        let first = read(&store, &mut parsed, &entries, false);
        assert_eq!(parsed.parsed, 3, "the first read parses every document");
        assert_eq!(first.specs.len(), 3);

        let again = read(&store, &mut parsed, &entries, false);
        assert_eq!(parsed.parsed, 3, "an unchanged read parses nothing");
        for (service, spec) in &first.specs {
            assert!(
                Arc::ptr_eq(spec, &again.specs[service]),
                "{service} is the very spec of the previous read"
            );
        }

        entries[1] = spec_entry("db", "/database", 20);
        let changed = read(&store, &mut parsed, &entries, false);
        assert_eq!(parsed.parsed, 4, "only the changed entry is parsed again");
        assert_eq!(
            changed.specs[&name("db")].destinations()[0].service_path()[0].as_str(),
            "/database"
        );
        assert!(Arc::ptr_eq(
            &first.specs[&name("api")],
            &changed.specs[&name("api")]
        ));
        assert!(Arc::ptr_eq(
            &first.specs[&name("web")],
            &changed.specs[&name("web")]
        ));
    }

    #[test]
    fn a_removed_entry_leaves_the_specs_and_a_new_one_joins_them() {
        let store = store();
        let mut parsed = ParsedDocuments::default();
        let entries = vec![spec_entry("api", "/api", 10), spec_entry("web", "/web", 12)];
        read(&store, &mut parsed, &entries, false);
        let entries = vec![spec_entry("new", "/new", 30), spec_entry("web", "/web", 12)];
        let next = read(&store, &mut parsed, &entries, false);
        let names: Vec<&str> = next.specs.keys().map(ServiceName::as_str).collect();
        assert_eq!(names, ["new", "web"]);
        assert_eq!(parsed.parsed, 3);
        assert_eq!(parsed.entries.len(), 2, "the removed key is forgotten");
    }

    #[test]
    fn an_unreadable_document_is_reported_each_read_and_parsed_once_per_version() {
        let store = store();
        let mut parsed = ParsedDocuments::default();
        let mut broken = spec_entry("web", "/web", 10);
        broken.value = b"{not json".to_vec();
        let bad_cert = KvEntry {
            key: "flow-proxy/certs/site".to_string(),
            value: b"not a bundle".to_vec(),
            modify_index: 11,
        };
        let mut entries = vec![spec_entry("api", "/api", 9), bad_cert, broken];
        for _ in 0..2 {
            let snapshot = read(&store, &mut parsed, &entries, false);
            assert_eq!(
                snapshot.unreadable,
                BTreeSet::from(["web".to_string()]),
                "left as routed on every read"
            );
            assert_eq!(
                snapshot.unreadable_certs,
                BTreeSet::from(["site".to_string()])
            );
            assert_eq!(snapshot.specs.len(), 1);
        }
        assert_eq!(parsed.parsed, 3);

        // Fixed: the spec joins the others.
        entries[2] = spec_entry("web", "/web", 15);
        let fixed = read(&store, &mut parsed, &entries, false);
        assert!(fixed.unreadable.is_empty());
        assert!(fixed.specs.contains_key(&name("web")));
        // Broken again: it leaves them (and stays as routed).
        entries[2].value = b"[]".to_vec();
        entries[2].modify_index = 16;
        let broken_again = read(&store, &mut parsed, &entries, false);
        assert!(!broken_again.specs.contains_key(&name("web")));
        assert!(broken_again.unreadable.contains("web"));
        assert_eq!(parsed.parsed, 5);
    }

    #[test]
    fn a_read_after_consul_reset_its_index_parses_everything_again() {
        let store = store();
        let mut parsed = ParsedDocuments::default();
        let before = read(&store, &mut parsed, &[spec_entry("web", "/web", 10)], false);
        // Consul lost its data; another document now sits at the same ModifyIndex.
        let after = read(
            &store,
            &mut parsed,
            &[spec_entry("web", "/other", 10)],
            true,
        );
        assert_eq!(parsed.parsed, 2);
        assert!(!Arc::ptr_eq(
            &before.specs[&name("web")],
            &after.specs[&name("web")]
        ));
        assert_eq!(
            after.specs[&name("web")].destinations()[0].service_path()[0].as_str(),
            "/other"
        );
    }

    fn routed(spec: &Arc<ServiceSpec>) -> Arc<super::super::Routed> {
        Arc::new(super::super::Routed::new(
            Arc::clone(spec),
            Vec::new(),
            None,
            "",
        ))
    }

    fn spec(service: &str, path: &str) -> Arc<ServiceSpec> {
        let entry = spec_entry(service, path, 1);
        Arc::new(serde_json::from_slice(&entry.value).expect("parses"))
    }

    #[test]
    fn the_difference_compares_by_pointer_adopts_equal_specs_and_keeps_unreadable_ones() {
        let same = spec("same", "/same");
        let equal = spec("equal", "/equal");
        let stored: StoredSpecMap = [
            (name("changed"), spec("changed", "/new")),
            (name("equal"), spec("equal", "/equal")),
            (name("new"), spec("new", "/new-service")),
            (name("same"), Arc::clone(&same)),
        ]
        .into_iter()
        .collect();
        let routing: RoutingState = [
            (name("broken"), routed(&spec("broken", "/broken"))),
            (name("changed"), routed(&spec("changed", "/old"))),
            (name("equal"), routed(&equal)),
            (name("removed"), routed(&spec("removed", "/removed"))),
            (name("same"), routed(&same)),
        ]
        .into_iter()
        .collect();
        let unreadable = BTreeSet::from(["broken".to_string()]);
        let difference = StoredDifference::between(&stored, &routing, &unreadable);
        let names = |list: &[(ServiceName, Arc<ServiceSpec>)]| -> Vec<String> {
            list.iter().map(|(name, _)| name.to_string()).collect()
        };
        assert_eq!(names(&difference.changed), ["changed", "new"]);
        assert_eq!(names(&difference.adopted), ["equal"]);
        assert!(Arc::ptr_eq(
            &difference.adopted[0].1,
            &stored[&name("equal")]
        ));
        assert_eq!(difference.gone, [name("removed")]);
    }
}
