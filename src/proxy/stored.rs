//! The specs and certificates stored in Consul KV under `<kv-prefix>/services/` and
//! `<kv-prefix>/certs/`: writing them with check-and-set, reading them back, and the one
//! blocking-query watch on `<kv-prefix>/` that tells the core whenever another proxy (or anyone)
//! changed them. The one-time import of Docker Flow Proxy's layout happens on the
//! watch's first successful read.

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::mpsc::WeakSender;

use super::proxy_settings::{KvSettings, SETTINGS_FOLDER};
use super::{submit_internal, Change, Pending, ProxyError};
use crate::certs::Certificate;
use crate::observe::{Observer, WatchKind};
use crate::registry::watch::{Watch, WatchIndex};
use crate::registry::{Blocking, ConsulClient, Indexed, KvEntry, RegistryError};
use crate::spec::{services_from_docker_flow, ServiceName, ServiceSpec, DOCKER_FLOW_PREFIX};

/// How many times a write that lost a check-and-set race is tried again before the caller gets
/// a conflict.
const CAS_ATTEMPTS: usize = 5;

/// The stored specs as one read of the prefix found them.
#[derive(Debug)]
pub(super) struct StoredSpecs {
    /// The specs that validate, by service name.
    pub specs: BTreeMap<ServiceName, ServiceSpec>,
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
    /// caller gets [`ProxyError::Conflict`]. Returns the KV index after the write: any read of the
    /// prefix with a lower index predates it.
    pub async fn store(
        &self,
        name: &ServiceName,
        spec: Option<&ServiceSpec>,
    ) -> Result<u64, ProxyError> {
        let key = self.key(name);
        let document = spec.map(serde_json::to_vec).transpose().map_err(|error| {
            ProxyError::Registry(RegistryError::Decode {
                request: format!("PUT /v1/kv/{key}"),
                message: error.to_string(),
            })
        })?;
        self.store_document(name, key, document).await
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
        self.store_document(name, key, document).await
    }

    /// Check-and-set write (or delete, for `None`) of one document; see [`SpecStore::store`].
    async fn store_document(
        &self,
        name: &ServiceName,
        key: String,
        document: Option<Vec<u8>>,
    ) -> Result<u64, ProxyError> {
        for attempt in 1..=CAS_ATTEMPTS {
            let current = self.registry.kv_get(&key).await?.value;
            let stored = match (&document, current) {
                (Some(document), Some(entry)) if entry.value == *document => true,
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
                return Ok(self.registry.kv_get(&key).await?.index);
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
    ) -> Result<Indexed<Vec<KvEntry>>, RegistryError> {
        self.registry.watch_kv_list(&self.root, blocking).await
    }

    /// Whether a read holds no stored spec (certificates and markers do not count).
    fn holds_no_spec(&self, entries: &[KvEntry]) -> bool {
        !entries
            .iter()
            .any(|entry| entry.key.starts_with(&self.prefix))
    }

    /// Parses what a read returned. Documents that do not validate are logged once per version.
    fn parse(
        &self,
        entries: Vec<KvEntry>,
        index: u64,
        after_reset: bool,
        reported: &mut BTreeSet<(String, u64)>,
    ) -> StoredSpecs {
        let mut snapshot = StoredSpecs {
            specs: BTreeMap::new(),
            unreadable: BTreeSet::new(),
            certs: BTreeMap::new(),
            unreadable_certs: BTreeSet::new(),
            index,
            after_reset,
            settings: KvSettings::default(),
        };
        for entry in entries {
            if let Some(relative) = entry.key.strip_prefix(&self.settings_prefix) {
                snapshot.settings.read_entry(relative, &entry, reported);
                continue;
            }
            if let Some(cert_name) = entry.key.strip_prefix(&self.certs_prefix) {
                match Certificate::parse(cert_name, &entry.value) {
                    Ok(certificate) => {
                        snapshot
                            .certs
                            .insert(certificate.name().clone(), certificate);
                    }
                    Err(error) => {
                        if reported.insert((entry.key.clone(), entry.modify_index)) {
                            tracing::error!(key = %entry.key, %error, "ignoring a stored certificate that does not validate");
                        }
                        snapshot.unreadable_certs.insert(cert_name.to_string());
                    }
                }
                continue;
            }
            let Some(stored_name) = entry.key.strip_prefix(&self.prefix) else {
                continue;
            };
            let problem = match serde_json::from_slice::<ServiceSpec>(&entry.value) {
                Ok(spec) if spec.service_name().as_str() == stored_name => {
                    snapshot.specs.insert(spec.service_name().clone(), spec);
                    continue;
                }
                Ok(spec) => format!(
                    "it is filed under another name than `{}`",
                    spec.service_name()
                ),
                Err(error) => error.to_string(),
            };
            if reported.insert((entry.key.clone(), entry.modify_index)) {
                tracing::error!(key = %entry.key, %problem, "ignoring a stored spec that does not validate");
            }
            snapshot.unreadable.insert(stored_name.to_string());
        }
        snapshot
    }
}

/// Reads the stored specs once, without blocking, for the restore at start. When the prefix is
/// empty, Docker Flow Proxy's layout is imported first (see [`import_docker_flow`]).
pub(super) async fn first_read(
    store: &SpecStore,
    index: &mut WatchIndex,
) -> Result<StoredSpecs, RegistryError> {
    let mut read = store.read(None).await?;
    if store.holds_no_spec(&read.value) && import_docker_flow(store).await? > 0 {
        read = store.read(None).await?;
    }
    index.observe(read.index);
    Ok(store.parse(read.value, read.index, false, &mut BTreeSet::new()))
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

/// Watches the prefix with blocking queries and hands every new version to the core, until the
/// core stops. Read errors (Consul down, no leader, ACL refusals) are retried with capped,
/// jittered exponential backoff while HAProxy keeps serving; a version the core could not apply
/// is read and handed over again after a pause. When `import_pending` (the first read at start
/// failed), the first read that succeeds imports Docker Flow Proxy's layout into an empty prefix.
pub(super) async fn watch_stored_specs(
    store: SpecStore,
    index: WatchIndex,
    mut import_pending: bool,
    core: WeakSender<Pending>,
    observer: Observer,
) {
    let mut watch = Watch::new("the stored specs".into(), index)
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
