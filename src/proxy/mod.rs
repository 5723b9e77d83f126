//! The proxy core: the one owner of the desired routing state.
//!
//! Every change goes through one queue and is applied by one task, so changes never interleave:
//! API calls (reconfigure, remove, reload), new versions of the stored specs seen by the KV watch
//! (see [`stored`]), and new healthy instances seen by the instance follower (see [`instances`]).
//! Changes that queue up while one is being applied are applied together, with one validation
//! and one reload (a burst of N deployments costs one reload, not N); if anything in such a batch
//! fails, none of it stays applied and its changes are applied one at a time, so each caller gets
//! its own answer. For an API change the order is:
//!
//! 1. **resolve**: read the healthy instances of the services it touches from the registry.
//!    Registry unreachable → the caller gets the error, nothing changed.
//! 2. **render** the complete configuration of the candidate state (never a patch of the old file).
//! 3. **preflight**: the serving HAProxy must answer and every address the candidate binds anew
//!    must be free (flow-proxy binds it and lets go: a port held by another program is refused
//!    before a reload could pause every listener).
//! 4. **validate and reload in one parse**: a new HAProxy process starts on the candidate file and
//!    takes the listeners over from the serving one (see [`Haproxy::start_candidate`]). Rejected
//!    → the caller gets HAProxy's own lines (those `haproxy -c` prints); a failed start → the
//!    error; either way the old process never stopped serving and the live file and the stored
//!    specs are untouched.
//! 5. **persist** the spec in Consul KV (`<kv-prefix>/services/<serviceName>`) with check-and-set,
//!    or delete it. Failure or a lost race retried too often → HAProxy is reloaded from the live
//!    file (the previous configuration) and the caller gets the error: HAProxy serves, and KV
//!    holds, what they did before.
//! 6. **promote** the candidate to the live file (what a restart starts from), **commit** it as
//!    the current state and answer the callers.
//!
//! A change whose configuration is byte-identical to the running one does not reload HAProxy
//! (except an explicit reload). A change whose configuration differs from the running one only in
//! which instances the server slots hold (an instance registered or deregistered, a color switch,
//! a reconfigure that changes only instances; see [`slots`]) is not validated nor reloaded: after
//! the persist step, the live file is rewritten (atomic rename) and the serving process gets the
//! slot changes over the Runtime API (`set server … addr … port …`, `enable health`,
//! `set server … state ready|maint`), so a later reload or a replaced HAProxy serves the same
//! instances. If HAProxy does not take a command, the same file is validated and reloaded.
//! (except an explicit reload). When only the entries of its map files differ (a plain service's
//! paths or domains changed), the specs are persisted and the entries are changed over the
//! Runtime API after the live map files are rewritten (see [`map_changes`]): no reload.
//!
//! A new service whose every destination is HTTP on the main frontend first tries free pool
//! backends ([`BackendPool`]): the change is rendered with its destinations in them, and when that
//! file differs from the running one only in server slots (its backend is the default one and its
//! rules join existing maps), it goes the runtime way above: slots filled, map entries added, no
//! reload. Otherwise, and for every change that reloads, the pool is given back (each service is
//! rendered under its own `<service>-be<index>` with the slots it would have without the pool) and
//! the change is validated and reloaded. When fewer than half of the pool backends are free, the
//! core queues a reload of its own (`Change::RefillPool`), applied after the answers; while new
//! services keep coming (refills less than a minute apart), each refill doubles the pool, up to
//! 32 backends, so a wave of new services costs fewer reloads.
//!
//! The stored specs are the shared truth between proxies: on start the core restores them, and
//! afterwards it follows them, so a change made through another proxy reaches this one without any
//! call between proxies. A version of the stored specs older than this proxy's own last write is
//! ignored (a newer one follows). A stored spec that does not validate is logged and left as it is
//! routed; a stored service HAProxy does not accept is skipped with an error, the others apply
//! (a stored change that fails for a passing reason, e.g. no file descriptor for a new HAProxy,
//! is retried instead).
//! If Consul's KV index goes backwards and the prefix comes back empty while services are routed,
//! Consul has lost its data: the routes stay and their specs are written back.
//!
//! The same watch brings the proxy-wide settings kept in KV (`maxconn`, timeouts; see
//! [`proxy_settings`]): after the routes of a read are applied, settings that changed are
//! rendered, validated and applied with one reload; settings HAProxy refuses are logged and left
//! out until they change.

mod callers;
mod instances;
mod map_changes;
pub mod proxy_settings;
mod slots;
mod stored;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::certs::{CertInfo, Certificate};
use crate::haproxy::{
    certificate_for, slot_changes, ClientAuth, ClientCa, Haproxy, HaproxyError, SlotChange,
};
use crate::observe::{
    ChangeKind, ChangeOutcome, ChangeRecord, Observer, RouteSet, RoutedService, RoutedServices,
    ServiceTotals,
};
use crate::registry::watch::WatchIndex;
use crate::registry::{ConsulClient, InstanceQuery, RegistryError};
use crate::render::{
    pool_ceiling, pool_floor, BackendPool, CustomPolicy, MapFile, ProxyWide, RenderError,
    RenderSettings, Rendered, Renderer, RoutingIndex, ServerSlots, ServiceBackends, ServiceRoute,
    SlotsByService, TlsSettings, POOL_SIZE, POOL_SLOTS,
};
use crate::settings::ProxyWideFlags;
use crate::spec::{Instance, ServiceName, ServiceSpec, SpecError};

use callers::CallersInFlight;
use instances::{instance_query, instances_for, InstanceWatches, ServiceWrites};
use proxy_settings::{EffectiveSetting, KvSettings};
use stored::{ParsedDocuments, SpecStore, StoredDifference, StoredSpecs};

/// How long the core waits without a change before it hands the heap memory its changes freed
/// back to the system (the views of a render, a read of thousands of stored specs): glibc would
/// keep it, and the resident memory would stay at the last burst's peak.
const IDLE_BEFORE_TRIM: std::time::Duration = std::time::Duration::from_secs(1);

/// Most changes applied with one validation and one reload: a burst of 1,000 new services costs
/// about ten reloads (1,000 / 128, and one for the first changes, taken before the rest came).
/// Bounded because a batch that fails as a whole is applied again one change at a
/// time, each with its own reload, and the last of them must still be answered within the change
/// timeout.
const MAX_BATCH: usize = 128;

/// Most API changes waiting for the core; an API call beyond that is answered 503 at once. A
/// burst of 1,000 deployments queues whole (they are applied [`MAX_BATCH`] at a time) instead of
/// being paced by `Retry-After`. The watches' changes do not count: a thousand services whose
/// instances change at once must not lock callers out.
pub const QUEUE_CAPACITY: usize = 1_024;

/// Room in the channel to the core: every waiting API change, and room for the watches (a watch
/// waits for room; an API call waits at most its change timeout).
const CHANNEL_CAPACITY: usize = QUEUE_CAPACITY + 256;

/// Why a change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Reading instances or writing KV failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The templates could not produce a configuration (e.g. two services want one port).
    #[error(transparent)]
    Render(#[from] RenderError),
    /// HAProxy rejected the configuration a reconfigure request would produce.
    #[error("HAProxy rejected the configuration this request produces:\n{0}")]
    RejectedRequest(String),
    /// HAProxy rejected a configuration flow-proxy produced on its own (reload, restore).
    #[error("HAProxy rejected the configuration:\n{0}")]
    Rejected(String),
    /// HAProxy could not be reloaded; the previous process keeps serving.
    #[error(transparent)]
    Haproxy(HaproxyError),
    /// A certificate to delete is not stored.
    #[error("certificate `{0}` is not stored")]
    UnknownCertificate(ServiceName),
    /// `/remove` named a service that is not routed.
    #[error("service `{0}` is not configured")]
    UnknownService(ServiceName),
    /// Other writers kept changing the service's stored spec while this change tried to store it.
    #[error(
        "service `{0}` was changed in Consul by another writer each time this request tried to \
         store it; nothing was changed, try again"
    )]
    Conflict(ServiceName),
    /// Another service already routes a request pattern this spec claims.
    #[error(
        "`{route}` is already routed to service `{owner}`; remove it there first, or give this \
         service another path or domain"
    )]
    RouteTaken { route: String, owner: ServiceName },
    /// Another service already takes the requests no rule matched (`isDefaultBackend`).
    #[error(
        "service `{owner}` is already the default backend (isDefaultBackend=true); reconfigure it \
         without isDefaultBackend first, or leave it out here"
    )]
    DefaultBackendTaken { owner: ServiceName },
    /// Routing one more service would pass `--max-services`.
    #[error("{limit} services are routed, the most --max-services allows; remove one first or raise the limit")]
    TooManyServices { limit: usize },
    /// The queue of changes is full: flow-proxy is busy (Consul or HAProxy is slow).
    #[error(
        "flow-proxy is busy: {QUEUE_CAPACITY} changes are waiting to be applied (Consul or \
         HAProxy is slow); nothing was changed, try again shortly"
    )]
    Busy,
    /// The change was not applied within the caller's time.
    #[error(
        "this change was not applied within {seconds} s (Consul or HAProxy is slow); it is \
         dropped unless it had already started: /services shows what is routed"
    )]
    TimedOut { seconds: u64 },
    /// The core has stopped (flow-proxy is shutting down).
    #[error("flow-proxy is shutting down")]
    Stopped,
}

/// One service as it is routed now: its spec and the instances its backends hold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Routed {
    spec: Arc<ServiceSpec>,
    /// The Consul query its instances come from ([`instance_query`] of the spec), kept so that
    /// finding the services a query feeds compares values and builds none.
    query: InstanceQuery,
    /// Shared with what the core publishes (status page, metrics, the instance follower).
    instances: Arc<[Instance]>,
    /// Which instance sits in which server slot of its backends (see [`slots`]).
    slots: ServerSlots,
}

impl Routed {
    /// `spec` routed to `instances`, keeping the instances of `previous` (the service as it was
    /// routed, if it was) in their slots; a service not routed yet takes the slots the applied
    /// configuration (`applied`, the text of the file HAProxy serves) gives it, if any: a
    /// restarted flow-proxy keeps HAProxy's slots.
    fn new(
        spec: Arc<ServiceSpec>,
        instances: Vec<Instance>,
        previous: Option<&Routed>,
        applied: &str,
    ) -> Routed {
        let read_back = previous
            .is_none()
            .then(|| ServerSlots::read_back(applied, &spec, &instances))
            .flatten();
        let previous = previous.map(|routed| &routed.slots).or(read_back.as_ref());
        let slots = slots::reassign(previous, &instances);
        Routed {
            query: instance_query(&spec),
            spec,
            instances: instances.into(),
            slots,
        }
    }

    /// Routes the service to `instances` now, each instance already routed keeping its slot.
    fn set_instances(&mut self, instances: Vec<Instance>) {
        self.slots = slots::reassign(Some(&self.slots), &instances);
        self.instances = instances.into();
    }
}

/// The complete desired routing state, ordered by service name: a persistent map, so the copy a
/// change starts from costs nothing and the services it changed are found without visiting the
/// others ([`imbl::OrdMap::diff`]).
type RoutingState = imbl::OrdMap<ServiceName, Arc<Routed>>;

/// The certificates served, by name.
type Certificates = BTreeMap<ServiceName, Certificate>;

enum Change {
    /// Route a service; with a certificate (`serviceCert`), store it under the service's name in
    /// the same step (both or neither).
    Reconfigure(Box<ServiceSpec>, Option<Box<Certificate>>),
    Remove(ServiceName),
    /// Store (or replace) a certificate and serve it.
    PutCert(Certificate),
    /// Delete a stored certificate.
    DeleteCert(ServiceName),
    Reload,
    /// Reload so that every service has its own backend again and the pool is full (queued by
    /// the core itself when the free pool backends run low; see [`BackendPool`]).
    RefillPool,
    /// A version of the stored specs read by the KV watch.
    Stored(StoredSpecs),
    /// The healthy instances of a Consul service, read by the instance follower.
    Instances {
        consul_service: InstanceQuery,
        instances: Vec<Instance>,
    },
    /// Stop the core and its watches.
    Stop,
}

type Outcome = Result<Option<ServiceSpec>, ProxyError>;

struct Pending {
    change: Change,
    reply: oneshot::Sender<Outcome>,
}

/// Hands a change from a watch to the core and waits for its outcome; `None` once the core has
/// stopped.
async fn submit_internal(core: &mpsc::WeakSender<Pending>, change: Change) -> Option<Outcome> {
    let core = core.upgrade()?;
    let (reply, answer) = oneshot::channel();
    core.send(Pending { change, reply }).await.ok()?;
    drop(core);
    answer.await.ok()
}

/// The handle the API uses to submit changes and read the routed specs.
#[derive(Clone)]
pub struct Proxy {
    changes: mpsc::Sender<Pending>,
    certificates: watch::Receiver<Arc<Vec<CertInfo>>>,
    /// How long an API call waits for its change.
    change_timeout: std::time::Duration,
    /// One permit per API change waiting or being applied ([`QUEUE_CAPACITY`]).
    api_slots: Arc<tokio::sync::Semaphore>,
    /// The same changes, counted for the background readers that let them go first.
    callers: CallersInFlight,
    services: watch::Receiver<RoutingState>,
    haproxy: Haproxy,
    has_client_ca: bool,
    /// What the renderer allows of custom fragments and `backendExtra`.
    custom_policy: CustomPolicy,
    /// The KV-backed proxy-wide settings in force, with their sources.
    proxy_wide: watch::Receiver<Arc<Vec<EffectiveSetting>>>,
    observer: Observer,
    /// The ACME status of each managed domain (empty while ACME is off).
    acme_board: crate::acme::AcmeBoard,
}

/// What the core needs to run.
pub struct ProxyParts {
    /// Client of the Consul cluster (or the embedded registry).
    pub registry: ConsulClient,
    /// The compiled templates.
    pub renderer: Renderer,
    /// Addresses and paths the templates need.
    pub render_settings: RenderSettings,
    /// The running HAProxy.
    pub haproxy: Haproxy,
    /// Prefix of the KV keys; specs live under `<kv_prefix>/services/`.
    pub kv_prefix: String,
    /// Whether to follow the routed services' instances with blocking queries.
    pub watch_instances: bool,
    /// The most services routed at once (`--max-services`).
    pub max_services: usize,
    /// How long an API call waits for its change to be applied (`--change-timeout`).
    pub change_timeout: std::time::Duration,
    /// The HTTPS frontend's port and ALPN, used once a certificate is stored.
    pub https: HttpsOptions,
    /// The CA of `--ca-file`, which `verifyClientSsl` services check client certificates with.
    pub client_ca: Option<ClientCa>,
    /// The proxy-wide flags (`render_settings.proxy_wide` is what they make), which the
    /// settings in Consul KV override key by key.
    pub proxy_wide_flags: ProxyWideFlags,
    /// Where each change's outcome, the reloads and the routed state are recorded.
    pub observer: Observer,
}

/// How the HTTPS frontend listens, once a certificate is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpsOptions {
    /// Port of the HTTPS frontend.
    pub port: u16,
    /// Offer HTTP/2 by ALPN.
    pub enable_h2: bool,
}

impl Proxy {
    /// Restores the specs stored in KV (one attempt; on failure the KV watch retries in the
    /// background while HAProxy serves its last good configuration), then starts the core task,
    /// the KV watch and the instance follower.
    pub async fn start(parts: ProxyParts) -> Proxy {
        let (changes, queue) = mpsc::channel(CHANNEL_CAPACITY);
        let callers = CallersInFlight::new();
        let service_writes = ServiceWrites::default();
        let (published, services) = watch::channel(RoutingState::new());
        let (published_certificates, certificates) = watch::channel(Arc::new(Vec::new()));
        let flag_settings = parts.render_settings.proxy_wide.clone();
        let (published_proxy_wide, proxy_wide) =
            watch::channel(Arc::new(proxy_settings::effective(
                &parts.proxy_wide_flags,
                &flag_settings,
                &KvSettings::default(),
                &parts.kv_prefix,
            )));
        let haproxy = parts.haproxy.clone();
        let custom_policy = parts.renderer.custom_policy();
        let store = SpecStore::new(parts.registry.clone(), &parts.kv_prefix);
        // HAProxy already serves the last good file: a restore that renders it again is no reload.
        let applied_config = parts.haproxy.live_config().await.ok().map(Arc::from);
        let applied_maps = parts.haproxy.live_maps().await.unwrap_or_default();
        let mut core = Core {
            state: RoutingState::new(),
            registry: parts.registry.clone(),
            store: store.clone(),
            renderer: parts.renderer,
            render_settings: parts.render_settings,
            haproxy: parts.haproxy,
            published,
            published_certificates,
            certs: BTreeMap::new(),
            https: parts.https,
            client_ca: parts.client_ca.clone(),
            stored_floor: 0,
            unindexed_writes: BTreeSet::new(),
            applied_config,
            applied_maps,
            applied_checked: None,
            applied_routing: None,
            instance_watches: InstanceWatches::new(
                parts.watch_instances,
                parts.registry,
                changes.downgrade(),
                parts.observer.clone(),
                callers.clone(),
                service_writes.clone(),
            ),
            service_writes,
            callers: callers.clone(),
            stored_read_ahead: None,
            followed: instances::Followed::new(),
            query_users: QueryUsers::new(),
            totals: ServiceTotals::default(),
            claims: std::collections::HashMap::new(),
            stored_watch: None,
            max_services: parts.max_services,
            proxy_wide: ProxyWideState {
                flags: parts.proxy_wide_flags,
                from_flags: flag_settings,
                kv: None,
                refused_kv: None,
                kv_prefix: parts.kv_prefix.clone(),
                published: published_proxy_wide,
            },
            observer: parts.observer.clone(),
            timings: StepTimings::default(),
            pool: BackendPool::with_size(POOL_SIZE),
            refill_queued: false,
            refill_queued_at: None,
            refill_size: POOL_SIZE,
            queue: changes.downgrade(),
            retired: Retired::default(),
        };
        let mut index = WatchIndex::default();
        let mut parsed = ParsedDocuments::default();
        let import_pending = match stored::first_read(&store, &mut index, &mut parsed).await {
            Ok(snapshot) => {
                core.pool = BackendPool::with_size(pool_floor(snapshot.specs.len()));
                if let Err(error) = core.apply_stored(snapshot).await {
                    tracing::error!(%error, "restoring the stored services failed; retrying");
                    index = WatchIndex::default();
                }
                false
            }
            Err(error) => {
                tracing::error!(%error, "reading the stored services failed; HAProxy serves its last good configuration while flow-proxy retries");
                true
            }
        };
        core.stored_watch = Some(tokio::spawn(stored::watch_stored_specs(
            store,
            index,
            parsed,
            import_pending,
            changes.downgrade(),
            parts.observer.clone(),
        )));
        tokio::spawn(core.run(queue));
        Proxy {
            changes,
            certificates,
            change_timeout: parts.change_timeout,
            api_slots: Arc::new(tokio::sync::Semaphore::new(QUEUE_CAPACITY)),
            callers,
            services,
            haproxy,
            has_client_ca: parts.client_ca.is_some(),
            custom_policy,
            proxy_wide,
            observer: parts.observer,
            acme_board: crate::acme::AcmeBoard::default(),
        }
    }

    /// The ACME status of each managed domain, for `GET /certs`.
    pub fn acme_board(&self) -> &crate::acme::AcmeBoard {
        &self.acme_board
    }

    /// Checks a spec's custom fragments (they exist inside `--templates-dir` and parse) and
    /// that its `backendExtra` is allowed, before it is queued; the error names the parameter.
    pub fn check_custom_templates(&self, spec: &ServiceSpec) -> Result<(), SpecError> {
        self.custom_policy.check(spec)
    }

    /// The proxy-wide settings that Consul KV can override (`maxconn`, the timeouts), as
    /// HAProxy runs them now, each with where it came from and its KV key.
    pub fn proxy_wide_settings(&self) -> Arc<Vec<EffectiveSetting>> {
        Arc::clone(&self.proxy_wide.borrow())
    }

    /// The record of what this proxy has done (metrics, status page).
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// The running HAProxy (its stats socket and processes, for metrics).
    pub fn haproxy(&self) -> &Haproxy {
        &self.haproxy
    }

    /// Whether `--ca-file` was given (`verifyClientSsl` needs it).
    pub fn has_client_ca(&self) -> bool {
        self.has_client_ca
    }

    /// Routes a service as `spec` describes (adds it or replaces its previous spec).
    pub async fn reconfigure(&self, spec: ServiceSpec) -> Result<ServiceSpec, ProxyError> {
        self.submit(Change::Reconfigure(Box::new(spec), None))
            .await?
            .ok_or(ProxyError::Stopped)
    }

    /// Routes a service as `spec` describes and stores `certificate` (named after the service)
    /// in the same step: one reload, and both are stored or neither.
    pub async fn reconfigure_with_cert(
        &self,
        spec: ServiceSpec,
        certificate: Certificate,
    ) -> Result<ServiceSpec, ProxyError> {
        self.submit(Change::Reconfigure(
            Box::new(spec),
            Some(Box::new(certificate)),
        ))
        .await?
        .ok_or(ProxyError::Stopped)
    }

    /// Stops routing a service and deletes its stored spec; returns the spec it had. `None`:
    /// the service was not routed, but a stored spec that does not validate was there, and is
    /// deleted.
    pub async fn remove(&self, name: ServiceName) -> Result<Option<ServiceSpec>, ProxyError> {
        self.submit(Change::Remove(name)).await
    }

    /// Stores `certificate` in KV (replacing one of the same name) and serves it.
    pub async fn put_cert(&self, certificate: Certificate) -> Result<(), ProxyError> {
        self.submit(Change::PutCert(certificate)).await.map(|_| ())
    }

    /// Deletes a stored certificate and stops serving it.
    pub async fn delete_cert(&self, name: ServiceName) -> Result<(), ProxyError> {
        self.submit(Change::DeleteCert(name)).await.map(|_| ())
    }

    /// What may be shown of the certificates served now, ordered by name.
    pub fn certificates(&self) -> Arc<Vec<CertInfo>> {
        Arc::clone(&self.certificates.borrow())
    }

    /// Re-reads every service's instances, re-renders and reloads HAProxy.
    pub async fn reload(&self) -> Result<(), ProxyError> {
        self.submit(Change::Reload).await.map(|_| ())
    }

    /// Stops the core and its watches once the changes queued before are applied.
    pub async fn stop(&self) {
        let (reply, answer) = oneshot::channel();
        if self
            .changes
            .send(Pending {
                change: Change::Stop,
                reply,
            })
            .await
            .is_ok()
        {
            let _ = answer.await;
        }
    }

    /// The specs routed now, ordered by service name.
    pub fn services(&self) -> Arc<Vec<Arc<ServiceSpec>>> {
        // The core publishes its persistent state (a copy costs nothing); the list is made here,
        // for the reader, not at every change.
        let state = self.services.borrow().clone();
        Arc::new(
            state
                .values()
                .map(|routed| Arc::clone(&routed.spec))
                .collect(),
        )
    }

    /// The spec routed now under `name`, found without listing the others.
    pub fn service(&self, name: &str) -> Option<Arc<ServiceSpec>> {
        let name = ServiceName::parse("serviceName", name).ok()?;
        self.services
            .borrow()
            .get(&name)
            .map(|routed| Arc::clone(&routed.spec))
    }

    /// The haproxy.cfg HAProxy runs now.
    pub async fn live_config(&self) -> Result<String, ProxyError> {
        self.haproxy
            .live_config()
            .await
            .map_err(ProxyError::Haproxy)
    }

    /// Queues an API change (refused at once when [`QUEUE_CAPACITY`] API changes are already
    /// waiting) and waits for its outcome at most the change timeout; a change whose caller
    /// stopped waiting is dropped by the core unless it had started.
    async fn submit(&self, change: Change) -> Outcome {
        let _slot = self.api_slots.try_acquire().map_err(|_| ProxyError::Busy)?;
        let _in_flight = self.callers.enter();
        let (reply, answer) = oneshot::channel();
        let applied = async {
            self.changes
                .send(Pending { change, reply })
                .await
                .map_err(|_| ProxyError::Stopped)?;
            answer.await.map_err(|_| ProxyError::Stopped)?
        };
        match tokio::time::timeout(self.change_timeout, applied).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ProxyError::TimedOut {
                seconds: self.change_timeout.as_secs(),
            }),
        }
    }
}

struct Core {
    state: RoutingState,
    registry: ConsulClient,
    store: SpecStore,
    renderer: Renderer,
    render_settings: RenderSettings,
    haproxy: Haproxy,
    published: watch::Sender<RoutingState>,
    published_certificates: watch::Sender<Arc<Vec<CertInfo>>>,
    /// The certificates served, by name.
    certs: Certificates,
    https: HttpsOptions,
    /// `--ca-file`, for the `verifyClientSsl` services.
    client_ca: Option<ClientCa>,
    /// The KV index after this proxy's last write: reads of the stored specs older than that are
    /// ignored.
    stored_floor: u64,
    /// Specs written since the floor was last raised (see [`Core::raise_stored_floor`]).
    unindexed_writes: BTreeSet<ServiceName>,
    /// The configuration HAProxy serves, when this core applied it.
    applied_config: Option<Arc<String>>,
    /// The map files HAProxy routes with (see [`map_changes`]).
    applied_maps: Vec<MapFile>,
    /// The health-checked servers of the applied configuration, when this core rendered it
    /// (see [`Core::spliced`]).
    applied_checked: Option<crate::render::CheckedServers>,
    /// Where the applied configuration's main frontend rules went, when this core rendered it
    /// (see [`Core::placed`]).
    applied_routing: Option<Arc<RoutingIndex>>,
    instance_watches: InstanceWatches,
    /// The instance reads' indexes and this proxy's KV writes', shared with the follower (see
    /// [`ServiceWrites`]).
    service_writes: ServiceWrites,
    /// The API changes in flight, which the follower lets go first; the core counts itself in
    /// until it has read the indexes of what a change wrote.
    callers: CallersInFlight,
    /// The stored entry of the one routed service a change reconfigures, read beside its
    /// instances (see [`SpecStore::store`]); taken by its write.
    stored_read_ahead: Option<(ServiceName, Option<crate::registry::KvEntry>)>,
    /// The queries the instance follower follows, kept in line with the state by
    /// [`Core::index_changes`].
    followed: instances::Followed,
    /// The routed services reading each query.
    query_users: QueryUsers,
    /// How many services, destinations and instances are routed (kept from each commit's diff).
    totals: ServiceTotals,
    /// The request patterns each routed service claims, by pattern (see [`Core::admit`]).
    /// (Keyed by [`crate::spec::RouteClaim::key`]: a claim is about 100 bytes, its key a quarter
    /// of that.)
    claims: std::collections::HashMap<Box<str>, ServiceName>,
    stored_watch: Option<JoinHandle<()>>,
    max_services: usize,
    proxy_wide: ProxyWideState,
    observer: Observer,
    /// How long the validation and reload of the change being applied took.
    timings: StepTimings,
    /// The pool backends of the applied configuration and the services that sit in them (see
    /// [`BackendPool`]).
    pool: BackendPool,
    /// Whether a [`Change::RefillPool`] is queued.
    refill_queued: bool,
    /// When the last refill was queued (see [`Core::commit_pool`]).
    refill_queued_at: Option<std::time::Instant>,
    /// How many pool backends the queued refill makes.
    refill_size: usize,
    /// The core's own queue, for the pool refill it queues itself.
    queue: mpsc::WeakSender<Pending>,
    /// What the last change replaced, freed once its callers have their answer.
    retired: Retired,
}

/// Applied values a change replaced, kept until its callers are answered: at 10,000 services,
/// freeing what a new service replaced (the previous configuration text, routing index, map
/// files and state) takes a quarter of a millisecond that no caller needs to wait for.
#[derive(Default)]
struct Retired {
    configs: Vec<Arc<String>>,
    routing: Vec<Arc<RoutingIndex>>,
    maps: Vec<Vec<MapFile>>,
    states: Vec<RoutingState>,
}

/// The proxy-wide settings: the flags, and the settings in Consul KV over them.
struct ProxyWideState {
    flags: ProxyWideFlags,
    /// What the flags make (defaults where unset).
    from_flags: ProxyWide,
    /// The KV settings HAProxy runs with now; `None` until the first read of the stored state,
    /// whose settings are then applied whatever they are (so the flags of this start reach
    /// HAProxy even when it kept serving a file rendered with other ones and nothing is routed).
    kv: Option<KvSettings>,
    /// KV settings whose configuration HAProxy refused, not tried again until they change.
    refused_kv: Option<KvSettings>,
    kv_prefix: String,
    published: watch::Sender<Arc<Vec<EffectiveSetting>>>,
}

/// The timed steps of one application of changes.
#[derive(Debug, Clone, Copy, Default)]
struct StepTimings {
    validate: Option<std::time::Duration>,
    reload: Option<std::time::Duration>,
    /// Servers changed over the Runtime API, without a reload.
    runtime: Option<std::time::Duration>,
}

impl Drop for Core {
    fn drop(&mut self) {
        if let Some(task) = &self.stored_watch {
            task.abort();
        }
    }
}

impl Core {
    /// Applies queued changes in batches until told to stop or every handle is gone.
    async fn run(mut self, mut queue: mpsc::Receiver<Pending>) {
        // Whether memory was freed since it was last handed back (see `IDLE_BEFORE_TRIM`).
        let mut freed = true;
        loop {
            let first = if freed {
                match tokio::time::timeout(IDLE_BEFORE_TRIM, queue.recv()).await {
                    Ok(first) => first,
                    Err(_) => {
                        crate::memory::release_freed_memory();
                        freed = false;
                        continue;
                    }
                }
            } else {
                queue.recv().await
            };
            let Some(first) = first else { break };
            freed = true;
            // Everything queued meanwhile goes into the same validation and reload.
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let mut routine = Vec::with_capacity(batch.len());
            let mut stop = None;
            // A caller that stopped waiting (its change timed out) was told the change is dropped.
            batch.retain(|pending| !pending.reply.is_closed());
            for pending in batch {
                match pending.change {
                    Change::Stop => stop = Some(pending.reply),
                    Change::Stored(snapshot) => {
                        let before = self.state.clone();
                        let started = std::time::Instant::now();
                        let applied_before = self.applied_config.clone();
                        self.timings = StepTimings::default();
                        let result = self.apply_stored(snapshot).await;
                        self.observe_stored(&before, started, &applied_before, &result);
                        let _ = pending.reply.send(result.map(|()| None));
                    }
                    change => routine.push(Pending {
                        change,
                        reply: pending.reply,
                    }),
                }
            }
            // Counted with the callers until the writes' indexes are read (see below).
            let requested = routine
                .iter()
                .any(|pending| is_requested(&pending.change))
                .then(|| self.callers.enter());
            self.apply_batch(routine).await;
            // The callers just answered were woken on this thread, where tokio runs them next
            // and no other thread may take them: let them answer before the next change (a
            // refill may render for a while without giving the thread back).
            tokio::task::yield_now().await;
            self.retired = Retired::default();
            if requested.is_some() && queue.is_empty() {
                // Read now, when no change waits, the indexes of the specs just written: the
                // instance follower then tells this proxy's writes from instance changes.
                if let Err(error) = self.raise_stored_floor().await {
                    tracing::debug!(%error, "reading the index of a written spec failed; read again later");
                }
            }
            drop(requested);
            if let Some(reply) = stop {
                let _ = reply.send(Ok(None));
                break;
            }
        }
        tracing::debug!("proxy core stopped");
    }

    /// Applies a batch of queued changes with one validation and one reload. If anything in the
    /// batch fails, nothing of it stays applied and the changes are applied one at a time, so
    /// each caller gets the answer its own change deserves.
    async fn apply_batch(&mut self, batch: Vec<Pending>) {
        if batch.len() > 1 {
            let changes: Vec<&Change> = batch.iter().map(|pending| &pending.change).collect();
            let before = self.state.clone();
            let started = std::time::Instant::now();
            let applied_before = self.applied_config.clone();
            match self.apply_changes(&changes).await {
                Ok(outcomes) => {
                    tracing::info!(changes = batch.len(), "applied a batch with one reload");
                    let reloaded = self.reloaded_since(&applied_before);
                    for pending in &batch {
                        self.observe_change(&pending.change, &before, started, Ok(reloaded));
                    }
                    for (pending, outcome) in batch.into_iter().zip(outcomes) {
                        let _ = pending.reply.send(Ok(outcome));
                    }
                    return;
                }
                Err(error) => tracing::info!(
                    changes = batch.len(),
                    %error,
                    "a batch failed as a whole; applying its changes one at a time"
                ),
            }
        }
        for pending in batch {
            let before = self.state.clone();
            let started = std::time::Instant::now();
            let applied_before = self.applied_config.clone();
            let result = self
                .apply_changes(&[&pending.change])
                .await
                .map(|mut outcomes| outcomes.pop().flatten());
            let observed = match &result {
                Ok(_) => Ok(self.reloaded_since(&applied_before)
                    || matches!(pending.change, Change::Reload)),
                Err(error) => Err(error),
            };
            self.observe_change(&pending.change, &before, started, observed);
            let _ = pending.reply.send(result);
        }
    }

    /// Records a change's outcome: `Ok(reloaded)` when it applied, with what changed in the
    /// routes and instances of the services it concerns between `before` and now.
    fn observe_change(
        &self,
        change: &Change,
        before: &RoutingState,
        started: std::time::Instant,
        result: Result<bool, &ProxyError>,
    ) {
        let (kind, service) = match change {
            Change::Reconfigure(spec, _) => (
                ChangeKind::Reconfigure,
                Some(spec.service_name().to_string()),
            ),
            Change::Remove(name) => (ChangeKind::Remove, Some(name.to_string())),
            Change::PutCert(certificate) => {
                (ChangeKind::PutCert, Some(certificate.name().to_string()))
            }
            Change::DeleteCert(name) => (ChangeKind::DeleteCert, Some(name.to_string())),
            Change::Reload => (ChangeKind::Reload, None),
            Change::Instances { consul_service, .. } => {
                (ChangeKind::Instances, Some(consul_service.to_string()))
            }
            Change::Stored(_) | Change::Stop | Change::RefillPool => return,
        };
        let named = match change {
            Change::Reconfigure(spec, _) => Some(spec.service_name()),
            Change::Remove(name) => Some(name),
            _ => None,
        };
        // The routed services the change concerns: the named one, or those fed by the Consul
        // service whose instances changed.
        let concerned = |state: &RoutingState| -> RouteSet {
            let mut set = RouteSet::default();
            let mut add = |routed: &Routed| {
                let routes = RouteSet::of(&routed.spec, &routed.instances);
                set.routes.extend(routes.routes);
                set.instances.extend(routes.instances);
            };
            match change {
                // An instance change leaves every service's query as it was: the services
                // that read it now are those that read it before.
                Change::Instances { consul_service, .. } => self
                    .query_users
                    .get(consul_service)
                    .into_iter()
                    .flatten()
                    .filter_map(|name| state.get(name))
                    .filter(|routed| routed.query == *consul_service)
                    .for_each(|routed| add(routed)),
                _ => {
                    if let Some(routed) = named.and_then(|name| state.get(name)) {
                        add(routed);
                    }
                }
            }
            set
        };
        let outcome = match result {
            Ok(true) => ChangeOutcome::Reloaded,
            Ok(false) => ChangeOutcome::WithoutReload,
            Err(error @ (ProxyError::RejectedRequest(_) | ProxyError::Rejected(_))) => {
                ChangeOutcome::Rejected(error.to_string())
            }
            Err(error) => {
                if matches!(error, ProxyError::Registry(_)) {
                    self.observer.record_registry_error();
                }
                ChangeOutcome::Failed(error.to_string())
            }
        };
        let before_set = concerned(before);
        let after = if result.is_ok() {
            concerned(&self.state)
        } else {
            before_set.clone()
        };
        let service = match change {
            // The routed services fed by that Consul service, rather than its Consul name.
            Change::Instances { consul_service, .. } => {
                if result.is_ok() && before_set == after {
                    // The watch read what is already routed: no change to report.
                    return;
                }
                // Found through the query index (an instance change routes the same queries
                // before and after), not by visiting every routed service.
                let routed: Vec<&str> = self
                    .query_users
                    .get(consul_service)
                    .into_iter()
                    .flatten()
                    .filter(|name| {
                        [before, &self.state].iter().any(|state| {
                            state
                                .get(*name)
                                .is_some_and(|routed| routed.query == *consul_service)
                        })
                    })
                    .map(ServiceName::as_str)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                Some(if routed.is_empty() {
                    consul_service.to_string()
                } else {
                    routed.join(",")
                })
            }
            _ => service,
        };
        self.observer.record_change(ChangeRecord {
            kind,
            service,
            before: before_set,
            after,
            validate: self.timings.validate,
            reload: self.timings.reload,
            total: started.elapsed(),
            outcome,
        });
    }

    /// Records what a version of the stored specs changed: a line per service whose routes or
    /// instances it changed, or the error when it did not apply.
    fn observe_stored(
        &self,
        before: &RoutingState,
        started: std::time::Instant,
        applied_before: &Option<Arc<String>>,
        result: &Result<(), ProxyError>,
    ) {
        let reloaded = self.reloaded_since(applied_before);
        // Only the services whose routing changed: the diff skips what both states share.
        for item in before.diff(&self.state) {
            let (name, old, new) = match item {
                imbl::ordmap::DiffItem::Add(name, new) => (name, None, Some(new)),
                imbl::ordmap::DiffItem::Update {
                    old: (name, old),
                    new: (_, new),
                } => (name, Some(old), Some(new)),
                imbl::ordmap::DiffItem::Remove(name, old) => (name, Some(old), None),
            };
            let set_of = |routed: Option<&Arc<Routed>>| {
                routed
                    .map(|routed| RouteSet::of(&routed.spec, &routed.instances))
                    .unwrap_or_default()
            };
            let spec_changed = old.map(|r| &r.spec) != new.map(|r| &r.spec);
            let (old, new) = (set_of(old), set_of(new));
            if old == new && !spec_changed {
                continue;
            }
            self.observer.record_change(ChangeRecord {
                kind: ChangeKind::Stored,
                service: Some(name.to_string()),
                before: old,
                after: new,
                validate: self.timings.validate,
                reload: self.timings.reload,
                total: started.elapsed(),
                outcome: if reloaded {
                    ChangeOutcome::Reloaded
                } else {
                    ChangeOutcome::WithoutReload
                },
            });
        }
        if let Err(error) = result {
            self.observer.record_change(ChangeRecord {
                kind: ChangeKind::Stored,
                service: None,
                before: RouteSet::default(),
                after: RouteSet::default(),
                validate: self.timings.validate,
                reload: self.timings.reload,
                total: started.elapsed(),
                outcome: ChangeOutcome::Failed(error.to_string()),
            });
        }
    }

    /// Whether HAProxy was reloaded since the applied configuration was `applied_before` (in
    /// this application of changes): a new configuration applied over the Runtime API alone is
    /// no reload.
    fn reloaded_since(&self, applied_before: &Option<Arc<String>>) -> bool {
        self.timings.reload.is_some()
            || (self.applied_config != *applied_before && self.timings.runtime.is_none())
    }

    /// The slot changes that bring the serving HAProxy from the applied configuration to
    /// `config` over the Runtime API, when they are all that differs (see [`slot_changes`]);
    /// `None`: only a reload applies `config`.
    fn runtime_changes(&self, config: &str) -> Option<Vec<SlotChange>> {
        let applied = self.applied_text()?;
        slot_changes(applied, config).filter(|changes| !changes.is_empty())
    }

    /// The applied configuration's text, if any.
    fn applied_text(&self) -> Option<&str> {
        self.applied_config.as_deref().map(String::as_str)
    }

    /// Makes `rendered` the applied configuration by `changes` over the Runtime API (the live
    /// file's new text queued first, no validation, no reload), then its map entries if they
    /// changed too.
    /// If HAProxy does not take the server changes (e.g. it is being replaced), starts the new
    /// file as a candidate instead (validation and reload in one); if that fails too, the
    /// previous live file is put back and the error returned.
    async fn apply_slots_or_reload(
        &mut self,
        rendered: Rendered,
        changes: &[SlotChange],
        caused_by_request: bool,
    ) -> Result<(), ProxyError> {
        let config = Arc::new(rendered.config);
        if !self.apply_slots(&config, changes, Vec::new(), &[]).await {
            let rendered = Rendered {
                config: config.to_string(),
                ..rendered
            };
            return self
                .reload_instead(rendered, &config, caused_by_request)
                .await;
        }
        self.applied_config = Some(config);
        self.applied_checked = Some(rendered.checked);
        self.applied_routing = Some(Arc::clone(&rendered.routing));
        if self.applied_maps != rendered.maps {
            self.apply_map_changes(rendered.maps).await?;
        }
        Ok(())
    }

    /// [`Core::apply_slots_or_reload`] for a configuration that differs from the applied one in
    /// server slots only (see [`Core::spliced`]), or also in map entries (see [`Core::placed`]):
    /// the slot and the map commands go in one Runtime API session, after the live file's and
    /// the map files' new text are queued. If HAProxy does not take them, the new files are
    /// started as a candidate instead; if that fails too, the previous files are put back and the
    /// map commands sent are undone.
    async fn apply_spliced(
        &mut self,
        spliced: Spliced,
        caused_by_request: bool,
    ) -> Result<(), ProxyError> {
        let config = Arc::new(spliced.config);
        let (map_writes, map_commands) = match &spliced.maps {
            Some(maps) => (
                crate::haproxy::live_map_writes(&self.applied_maps, maps),
                map_changes::commands(&self.applied_maps, maps),
            ),
            None => (Vec::new(), Vec::new()),
        };
        // Map files whose entries only moved need no command, but are still written.
        let runtime_work =
            !spliced.changes.is_empty() || !map_commands.is_empty() || !map_writes.is_empty();
        if runtime_work
            && !self
                .apply_slots(&config, &spliced.changes, map_writes, &map_commands)
                .await
        {
            let new_maps = spliced.maps.clone();
            let rendered = Rendered {
                config: config.to_string(),
                maps: spliced.maps.unwrap_or_else(|| self.applied_maps.clone()),
                checked: spliced.checked,
                routing: spliced
                    .routing
                    .or_else(|| self.applied_routing.clone())
                    .unwrap_or_default(),
            };
            let reloaded = self
                .reload_instead(rendered, &config, caused_by_request)
                .await;
            if let (Err(_), Some(new_maps)) = (&reloaded, new_maps) {
                let socket = self.haproxy.stats_socket().to_path_buf();
                self.put_back_maps(&self.applied_maps, &new_maps, &socket)
                    .await;
            }
            return reloaded;
        }
        tracing::debug!("only the changed services' backends were rendered");
        let retired = &mut self.retired;
        retired.configs.extend(self.applied_config.replace(config));
        self.applied_checked = Some(spliced.checked);
        if let Some(routing) = spliced.routing {
            retired
                .routing
                .extend(self.applied_routing.replace(routing));
        }
        if let Some(maps) = spliced.maps {
            if !map_commands.is_empty() {
                tracing::info!(
                    commands = map_commands.len(),
                    "route change applied to HAProxy's maps at runtime, without a reload"
                );
            }
            retired
                .maps
                .push(std::mem::replace(&mut self.applied_maps, maps));
        }
        Ok(())
    }

    /// Queues `config` as the live file's text (and `more_writes` with it) and sends `changes`,
    /// then `more_commands`, over the Runtime API; whether HAProxy took them all.
    async fn apply_slots(
        &mut self,
        config: &Arc<String>,
        changes: &[SlotChange],
        more_writes: Vec<crate::haproxy::LiveWrite>,
        more_commands: &[String],
    ) -> bool {
        let started = std::time::Instant::now();
        let applied = self
            .haproxy
            .apply_slot_changes(config, changes, more_writes, more_commands)
            .await;
        match applied {
            Ok(()) => {
                let took = started.elapsed();
                self.timings.runtime = Some(took);
                tracing::info!(
                    slots = changes.len(),
                    took_us = took.as_micros(),
                    "servers changed over the Runtime API, without reload"
                );
                true
            }
            Err(error) => {
                tracing::warn!(%error, "HAProxy did not take the server changes at runtime; reloading instead");
                false
            }
        }
    }

    /// Starts `rendered` as a new process after HAProxy refused its server changes at runtime
    /// (`sent`: the configuration whose slot commands were sent, some of which it may have
    /// taken); if that fails too, the previous live file is put back, the slot commands are
    /// taken back (see [`Core::put_back_slots`]) and the error returned.
    async fn reload_instead(
        &mut self,
        rendered: Rendered,
        sent: &str,
        caused_by_request: bool,
    ) -> Result<(), ProxyError> {
        let previous = self.applied_config.clone();
        let reloaded = async {
            self.haproxy
                .preflight(&rendered.config)
                .await
                .map_err(ProxyError::Haproxy)?;
            self.start_and_promote(rendered, caused_by_request).await
        };
        if let Err(error) = reloaded.await {
            if let Some(previous) = previous {
                if let Err(put_back) = self.haproxy.restore_live_config(&previous).await {
                    tracing::error!(error = %put_back, "putting the previous live file back failed");
                }
                self.put_back_slots(sent, &previous).await;
            }
            return Err(error);
        }
        Ok(())
    }

    /// After a runtime change HAProxy refused and whose reload failed too: the slot commands
    /// that lead from `sent` back to `applied` (the live file again), each sent on its own and
    /// whatever HAProxy answers, so that the slots it took before the refusal hold what the live
    /// file says (best effort, like [`Core::put_back_maps`]: those it never took are refused).
    async fn put_back_slots(&self, sent: &str, applied: &str) {
        let Some(changes) = slot_changes(sent, applied) else {
            return;
        };
        let socket = self.haproxy.stats_socket();
        for command in changes.iter().flat_map(SlotChange::commands) {
            if let Err(error) = crate::haproxy::runtime_command(socket, &command).await {
                tracing::warn!(%error, command, "taking back a server change failed");
            }
        }
    }

    /// The configuration of `candidate` when the services it changes from the routed state
    /// changed only in which instances their slots hold: their backends rendered alone and put in
    /// place of their text in the applied configuration (see the render module's `splice`), with
    /// the slot changes that bring HAProxy there. `None` when anything else changed (a spec, a
    /// slot count, the pool, the `no strict-limits` line, more than [`MAX_SPLICED`] services):
    /// then the complete configuration is rendered.
    fn spliced(
        &self,
        candidate: &RoutingState,
        pool: &BackendPool,
    ) -> Result<Option<Spliced>, ProxyError> {
        let (Some(applied), Some(mut checked)) = (self.applied_text(), self.applied_checked) else {
            return Ok(None);
        };
        if *pool != self.pool {
            return Ok(None);
        }
        let mut config: Option<String> = None;
        let mut changes = Vec::new();
        for (touched, item) in self.state.diff(candidate).enumerate() {
            let imbl::ordmap::DiffItem::Update {
                old: (_, old),
                new: (_, new),
            } = item
            else {
                return Ok(None);
            };
            if touched == MAX_SPLICED
                || old.spec != new.spec
                || old.slots.capacity() != new.slots.capacity()
            {
                return Ok(None);
            }
            let backends = |routed: &Routed| {
                let route = ServiceRoute {
                    spec: &routed.spec,
                    instances: &routed.instances,
                };
                self.renderer
                    .service_backends(&self.render_settings, route, &routed.slots, pool)
            };
            let (Some(before), Some(after)) = (backends(old)?, backends(new)?) else {
                return Ok(None);
            };
            let Some((replaced, swap_changes)) =
                swapped(config.as_deref().unwrap_or(applied), &before, &after)
            else {
                return Ok(None);
            };
            changes.extend(swap_changes);
            checked = checked.replaced(before.checked, after.checked);
            config = Some(replaced);
        }
        if !self.same_strict_limits(checked) {
            return Ok(None);
        }
        Ok(config.map(|config| Spliced {
            config,
            changes,
            checked,
            maps: None,
            routing: None,
        }))
    }

    /// Starts `rendered` as the candidate (validation and reload in one parse), keeps it as the
    /// live file and records it as the applied configuration.
    async fn start_and_promote(
        &mut self,
        rendered: Rendered,
        caused_by_request: bool,
    ) -> Result<(), ProxyError> {
        self.start_candidate_timed(&rendered, caused_by_request)
            .await?;
        self.promote_candidate().await?;
        self.applied_config = Some(Arc::from(rendered.config));
        self.applied_checked = Some(rendered.checked);
        self.applied_routing = Some(Arc::clone(&rendered.routing));
        self.applied_maps = rendered.maps;
        Ok(())
    }

    /// Validates and reloads in one parse: starts a new HAProxy process on `config` (see
    /// [`Haproxy::start_candidate`]), timed and counted. The validation is that start, so both
    /// timings are the time until HAProxy refused the candidate or served it. Afterwards the
    /// change is stored, then [`Core::promote_candidate`] or [`Core::take_back_candidate`].
    async fn start_candidate_timed(
        &mut self,
        rendered: &Rendered,
        caused_by_request: bool,
    ) -> Result<(), ProxyError> {
        let started = std::time::Instant::now();
        let result = self
            .haproxy
            .start_candidate(&rendered.config, &rendered.maps)
            .await;
        let took = started.elapsed();
        self.timings.validate = Some(took);
        let rejected_by_haproxy = matches!(result, Err(HaproxyError::Rejected(_)));
        self.observer.record_validation(took, !rejected_by_haproxy);
        if !rejected_by_haproxy {
            self.timings.reload = Some(took);
            self.observer
                .record_reload(took, result.as_ref().err().map(ToString::to_string));
        }
        result
            .map(|_| ())
            .map_err(|error| rejected(error, caused_by_request))
    }

    /// Reads the first of the keys a change is to write, so that a Consul that is down or has no
    /// leader refuses the change before HAProxy is touched: a KV write that fails once the new
    /// process serves costs a second reload, and the refused configuration is served meanwhile.
    async fn kv_answers(
        &self,
        mut names: impl Iterator<Item = &ServiceName>,
    ) -> Result<(), ProxyError> {
        if let Some(name) = names.next() {
            self.store.holds(name).await?;
        }
        Ok(())
    }

    /// Makes the started candidate the live file; if that fails, goes back to the previous one.
    async fn promote_candidate(&mut self) -> Result<(), ProxyError> {
        if let Err(error) = self.haproxy.promote().await {
            self.take_back_candidate().await;
            return Err(ProxyError::Haproxy(error));
        }
        Ok(())
    }

    /// Reloads HAProxy from the live file, i.e. the configuration before the started candidate,
    /// whose change could not be stored: HAProxy serves again what the state says.
    async fn take_back_candidate(&mut self) {
        let started = std::time::Instant::now();
        if let Err(error) = self.haproxy.write_live_maps(&self.applied_maps).await {
            tracing::error!(%error, "putting back the previous map files failed");
        }
        let result = self.haproxy.reload_live().await;
        let took = started.elapsed();
        self.observer
            .record_reload(took, result.as_ref().err().map(ToString::to_string));
        match result {
            Ok(()) => tracing::info!(?took, "HAProxy serves the previous configuration again"),
            Err(error) => tracing::error!(
                %error,
                "putting the previous configuration back failed; HAProxy serves a change that \
                 was not stored until the next change"
            ),
        }
    }

    /// Applies `changes` in order as one step (see the module doc for the order of operations).
    /// On error the state, the live file and the stored specs are as they were.
    async fn apply_changes(
        &mut self,
        changes: &[&Change],
    ) -> Result<Vec<Option<ServiceSpec>>, ProxyError> {
        self.timings = StepTimings::default();
        self.stored_read_ahead = None;
        let mut candidate = self.state.clone();
        let mut candidate_certs = self.certs.clone();
        let mut outcomes = Vec::with_capacity(changes.len());
        let mut requested = BTreeSet::new();
        let mut requested_certs = BTreeSet::new();
        let mut force_reload = false;
        let mut candidate_pool = self.pool.clone();
        // The slots the services this change puts in a pool backend would have without it.
        let mut slots_outside_pool: Vec<(ServiceName, ServerSlots)> = Vec::new();
        let mut prefetched =
            instances_of_reconfigured(&self.registry, &self.service_writes, changes).await?;
        for change in changes {
            match change {
                Change::Reconfigure(spec, certificate) => {
                    let spec: &ServiceSpec = spec;
                    self.admit(&candidate, spec)?;
                    if let Some(certificate) = certificate {
                        let certificate = Certificate::clone(certificate);
                        requested_certs.insert(certificate.name().clone());
                        candidate_certs.insert(certificate.name().clone(), certificate);
                    }
                    let instances = match prefetched.pop_front() {
                        Some(instances) => instances,
                        None if changes.len() == 1
                            && candidate.contains_key(spec.service_name()) =>
                        {
                            // Its stored spec is read meanwhile, for the write that follows.
                            let (instances, stored) = tokio::join!(
                                instances_for(&self.registry, &self.service_writes, spec),
                                self.store.current(spec.service_name())
                            );
                            self.stored_read_ahead = Some((spec.service_name().clone(), stored?));
                            instances?
                        }
                        None => instances_for(&self.registry, &self.service_writes, spec).await?,
                    };
                    let name = spec.service_name().clone();
                    let previous = candidate.get(&name).map(|routed| &**routed);
                    let mut routed = Routed::new(
                        Arc::new(spec.clone()),
                        instances,
                        previous,
                        self.applied_text().unwrap_or_default(),
                    );
                    if previous.is_none()
                        && may_take_pool_backends(spec)
                        && candidate_pool.assign(spec)
                    {
                        // A free pool backend's spare slots (see `BackendPool`).
                        let spare = ServerSlots::from_slots(vec![None; POOL_SLOTS]);
                        let own = std::mem::replace(
                            &mut routed.slots,
                            slots::reassign(Some(&spare), &routed.instances),
                        );
                        slots_outside_pool.push((name.clone(), own));
                    }
                    candidate.insert(name.clone(), Arc::new(routed));
                    requested.insert(name);
                    outcomes.push(Some(spec.clone()));
                }
                Change::Remove(name) => {
                    candidate_pool.release(name);
                    match candidate.remove(name) {
                        Some(removed) => outcomes.push(Some(ServiceSpec::clone(&removed.spec))),
                        // Not routed because its stored spec does not validate: delete that.
                        None if self.store.holds(name).await? => outcomes.push(None),
                        None => return Err(ProxyError::UnknownService(name.clone())),
                    }
                    requested.insert(name.clone());
                }
                Change::PutCert(certificate) => {
                    candidate_certs.insert(certificate.name().clone(), certificate.clone());
                    requested_certs.insert(certificate.name().clone());
                    outcomes.push(None);
                }
                Change::DeleteCert(name) => {
                    if candidate_certs.remove(name).is_none() {
                        return Err(ProxyError::UnknownCertificate(name.clone()));
                    }
                    requested_certs.insert(name.clone());
                    outcomes.push(None);
                }
                Change::Reload => {
                    let names: Vec<ServiceName> = candidate.keys().cloned().collect();
                    for name in names {
                        if let Some(routed) = candidate.get_mut(&name) {
                            let instances =
                                instances_for(&self.registry, &self.service_writes, &routed.spec)
                                    .await?;
                            Arc::make_mut(routed).set_instances(instances);
                        }
                    }
                    force_reload = true;
                    outcomes.push(None);
                }
                Change::RefillPool => {
                    self.refill_queued = false;
                    candidate_pool.resize(self.refill_size);
                    force_reload = true;
                    outcomes.push(None);
                }
                Change::Instances {
                    consul_service,
                    instances,
                } => {
                    // Those that read it when last committed, and those this batch changed.
                    let fed: BTreeSet<ServiceName> = self
                        .query_users
                        .get(consul_service)
                        .into_iter()
                        .flatten()
                        .chain(&requested)
                        .filter(|name| {
                            candidate
                                .get(*name)
                                .is_some_and(|routed| routed.query == *consul_service)
                        })
                        .cloned()
                        .collect();
                    for name in fed {
                        if let Some(routed) = candidate.get_mut(&name) {
                            Arc::make_mut(routed).set_instances(instances.clone());
                        }
                    }
                    outcomes.push(None);
                }
                Change::Stored(_) | Change::Stop => outcomes.push(None),
            }
        }
        let caused_by_request = changes.iter().any(|change| {
            matches!(
                change,
                Change::Reconfigure(..) | Change::PutCert(_) | Change::DeleteCert(_)
            )
        });
        if !force_reload
            && requested_certs.is_empty()
            && candidate_pool == self.pool
            && self.applied_config.is_some()
            && self.state.diff(&candidate).next().is_none()
        {
            // The same routes and instances (e.g. the instance follower's first read of a service
            // just routed, or a spec sent again): the same configuration. Store the specs asked
            // for, keep everything else.
            #[cfg(debug_assertions)]
            {
                let settings = &self.render_settings;
                let complete = self
                    .render_with(settings, &candidate, &candidate_certs, &candidate_pool)
                    .await?;
                debug_assert_eq!(Some(complete.config.as_str()), self.applied_text());
                debug_assert_eq!(complete.maps, self.applied_maps);
            }
            self.persist_all(&candidate, requested).await?;
            self.commit_pool(candidate_pool);
            self.commit(candidate);
            return Ok(outcomes);
        }
        if !force_reload && requested_certs.is_empty() {
            let spliced = match self.spliced(&candidate, &candidate_pool)? {
                Some(spliced) => Some(spliced),
                None => self.placed(&candidate, &candidate_pool)?,
            };
            if let Some(spliced) = spliced {
                #[cfg(debug_assertions)]
                {
                    // The splice must write exactly what a complete render writes.
                    let settings = &self.render_settings;
                    let complete = self
                        .render_with(settings, &candidate, &candidate_certs, &candidate_pool)
                        .await?;
                    debug_assert_eq!(complete.config, spliced.config);
                    debug_assert_eq!(
                        &complete.maps,
                        spliced.maps.as_ref().unwrap_or(&self.applied_maps)
                    );
                    debug_assert_eq!(complete.checked, spliced.checked);
                    if let Some(routing) = &spliced.routing {
                        debug_assert_eq!(&complete.routing, routing);
                    }
                }
                let persisted = self.persist_all(&candidate, requested).await?;
                if let Err(error) = self.apply_spliced(spliced, caused_by_request).await {
                    self.put_back_stored_specs(&persisted).await;
                    return Err(error);
                }
                self.commit_all(candidate, candidate_pool, candidate_certs)
                    .await;
                return Ok(outcomes);
            }
        }
        let mut rendered = self
            .render_with(
                &self.render_settings,
                &candidate,
                &candidate_certs,
                &candidate_pool,
            )
            .await?;
        let without_reload = !force_reload
            && (self.applied_text() == Some(rendered.config.as_str())
                || (requested_certs.is_empty()
                    && self.runtime_changes(&rendered.config).is_some()));
        if !without_reload && !candidate_pool.is_empty() {
            // A reload gives every service its own backend back and fills the pool again.
            // Each of them gets the slots it would have had without the pool: those it had
            // before this change put it in a pool backend, else its instances packed (what a
            // flow-proxy started on the stored specs renders).
            for ((name, _), _) in candidate_pool.assignments() {
                if let Some(routed) = candidate.get_mut(name) {
                    Arc::make_mut(routed).slots = slots_outside_pool
                        .iter()
                        .find(|(tentative, _)| tentative == name)
                        .map_or_else(
                            || ServerSlots::packed(&routed.instances),
                            |(_, own)| own.clone(),
                        );
                }
            }
            candidate_pool.clear();
            rendered = self
                .render_with(
                    &self.render_settings,
                    &candidate,
                    &candidate_certs,
                    &candidate_pool,
                )
                .await?;
        }
        let config = rendered.config.as_str();
        if !force_reload && self.applied_text() == Some(config) {
            // Nothing HAProxy would notice, or only map entries (changed at runtime): store the
            // specs, keep the process.
            self.applied_checked = Some(rendered.checked);
            self.applied_routing = Some(Arc::clone(&rendered.routing));
            let persisted = self.persist_all(&candidate, requested).await?;
            let persisted_certs = match self.persist_certs(&candidate_certs, requested_certs).await
            {
                Ok(persisted_certs) => persisted_certs,
                Err(error) => {
                    self.put_back_stored_specs(&persisted).await;
                    return Err(error);
                }
            };
            if self.applied_maps != rendered.maps {
                if let Err(error) = self.apply_map_changes(rendered.maps).await {
                    self.put_back_stored_specs(&persisted).await;
                    self.put_back_stored_certs(&persisted_certs).await;
                    return Err(error);
                }
            }
            self.commit_all(candidate, candidate_pool, candidate_certs)
                .await;
            return Ok(outcomes);
        }
        let runtime = self
            .runtime_changes(config)
            .filter(|_| !force_reload && requested_certs.is_empty());
        if let Some(changes) = runtime {
            // Only which instances the servers hold changed: no validation, no reload.
            let persisted = self.persist_all(&candidate, requested).await?;
            if let Err(error) = self
                .apply_slots_or_reload(rendered, &changes, caused_by_request)
                .await
            {
                self.put_back_stored_specs(&persisted).await;
                return Err(error);
            }
            self.commit_all(candidate, candidate_pool, candidate_certs)
                .await;
            return Ok(outcomes);
        }
        self.haproxy
            .preflight(config)
            .await
            .map_err(ProxyError::Haproxy)?;
        self.kv_answers(requested.iter().chain(&requested_certs))
            .await?;
        self.start_candidate_timed(&rendered, caused_by_request)
            .await?;
        let persisted = match self.persist_all(&candidate, requested).await {
            Ok(persisted) => persisted,
            Err(error) => {
                self.take_back_candidate().await;
                return Err(error);
            }
        };
        let persisted_certs = match self.persist_certs(&candidate_certs, requested_certs).await {
            Ok(persisted_certs) => persisted_certs,
            Err(error) => {
                self.take_back_candidate().await;
                self.put_back_stored_specs(&persisted).await;
                return Err(error);
            }
        };
        if let Err(error) = self.promote_candidate().await {
            self.put_back_stored_specs(&persisted).await;
            self.put_back_stored_certs(&persisted_certs).await;
            return Err(error);
        }
        self.applied_config = Some(Arc::from(rendered.config));
        self.applied_checked = Some(rendered.checked);
        self.applied_routing = Some(Arc::clone(&rendered.routing));
        self.applied_maps = rendered.maps;
        for name in &persisted_certs {
            match candidate_certs.get(name) {
                Some(_) => tracing::info!(certificate = %name, "certificate stored"),
                None => tracing::info!(certificate = %name, "certificate removed"),
            }
        }
        for name in &persisted {
            match candidate.get(name) {
                Some(_) => tracing::info!(service = %name, "service reconfigured"),
                None => tracing::info!(service = %name, "service removed"),
            }
        }
        self.commit_all(candidate, candidate_pool, candidate_certs)
            .await;
        Ok(outcomes)
    }

    /// Raises the floor below which reads of the stored specs are stale to the index of each
    /// spec written since it was last raised; a key that cannot be read stays to be read.
    async fn raise_stored_floor(&mut self) -> Result<(), ProxyError> {
        while let Some(name) = self.unindexed_writes.first().cloned() {
            let floor = self.store.index_of(&name).await?;
            self.service_writes.record_kv(floor);
            self.stored_floor = self.stored_floor.max(floor);
            self.unindexed_writes.remove(&name);
        }
        Ok(())
    }

    /// Brings the routed state, then the proxy-wide settings, in line with a version of the
    /// stored state (see [`Core::apply_stored_routes`] and [`Core::follow_kv_settings`]). The
    /// settings come second, so settings HAProxy refuses never hold a route back.
    async fn apply_stored(&mut self, snapshot: StoredSpecs) -> Result<(), ProxyError> {
        if snapshot.after_reset {
            // Consul's indexes started over: the floor from before means nothing any more.
            self.stored_floor = 0;
            self.unindexed_writes.clear();
        }
        self.raise_stored_floor().await?;
        if snapshot.index < self.stored_floor {
            tracing::debug!(
                index = snapshot.index,
                floor = self.stored_floor,
                "ignoring a read of the stored specs older than this proxy's last write"
            );
            return Ok(());
        }
        let settings = snapshot.settings.clone();
        self.apply_stored_routes(snapshot).await?;
        self.follow_kv_settings(&settings).await
    }

    /// Brings the routed state in line with a version of the stored specs: routes the new and
    /// changed specs, drops the services no longer stored. Services HAProxy does not accept are
    /// skipped with an error (the others apply); a registry failure is returned, so the watch
    /// retries.
    async fn apply_stored_routes(&mut self, snapshot: StoredSpecs) -> Result<(), ProxyError> {
        let consul_lost_data = snapshot.after_reset && snapshot.specs.is_empty();
        let StoredDifference {
            changed,
            adopted,
            gone,
        } = StoredDifference::between(&snapshot.specs, &self.state, &snapshot.unreadable);
        // A stored spec equal to the routed one but parsed apart (this proxy's own write read
        // back) replaces it, so the next read finds the very same spec.
        for (name, spec) in adopted {
            if let Some(routed) = self.state.get_mut(&name) {
                Arc::make_mut(routed).spec = spec;
            }
        }
        let specs: Vec<(&ServiceName, &ServiceSpec)> =
            changed.iter().map(|(name, spec)| (name, &**spec)).collect();
        let instances = instances_of_each(&self.registry, &self.service_writes, &specs).await?;
        let mut updates: Vec<(ServiceName, Option<Arc<Routed>>)> = Vec::new();
        for ((name, spec), instances) in changed.into_iter().zip(instances) {
            let routed = Routed::new(
                spec,
                instances,
                self.state.get(&name).map(|routed| &**routed),
                self.applied_text().unwrap_or_default(),
            );
            updates.push((name, Some(Arc::new(routed))));
        }
        if consul_lost_data && !gone.is_empty() {
            tracing::warn!(
                services = gone.len(),
                "Consul came back without the stored specs (its data was lost): keeping the routes and storing them again"
            );
            for name in &gone {
                let spec = self.state.get(name).map(|routed| Arc::clone(&routed.spec));
                self.store.store(name, spec.as_deref(), None).await?;
                self.unindexed_writes.insert(name.clone());
            }
        } else {
            updates.extend(gone.into_iter().map(|name| (name, None)));
        }
        let stored_certs = self
            .stored_certificates(&snapshot, consul_lost_data)
            .await?;
        if updates.is_empty() {
            if let Some(certs) = stored_certs {
                let state = self.state.clone();
                if let Err(error) = self.validate_and_apply(state, certs).await {
                    tracing::error!(%error, "skipping stored certificates HAProxy does not accept");
                }
            }
            return Ok(());
        }
        let certs = stored_certs.unwrap_or_else(|| self.certs.clone());
        let mut candidate = self.state.clone();
        for (name, routed) in &updates {
            match routed {
                Some(routed) => candidate.insert(name.clone(), routed.clone()),
                None => candidate.remove(name),
            };
        }
        if let Err(error) = self.validate_and_apply(candidate, certs).await {
            if is_transient(&error) {
                return Err(error);
            }
            if updates.len() == 1 {
                tracing::error!(%error, "skipping a stored change HAProxy does not accept");
                if let Some((name, _)) = updates.first() {
                    self.observer.record_error(name.as_str(), error.to_string());
                }
                return Ok(());
            }
            tracing::error!(%error, "the stored changes together do not apply; applying them one by one");
            for (name, routed) in updates {
                let mut candidate = self.state.clone();
                match routed {
                    Some(routed) => candidate.insert(name.clone(), routed),
                    None => candidate.remove(&name),
                };
                let certs = self.certs.clone();
                if let Err(error) = self.validate_and_apply(candidate, certs).await {
                    if is_transient(&error) {
                        return Err(error);
                    }
                    tracing::error!(service = %name, %error, "skipping a stored change HAProxy does not accept");
                    self.observer.record_error(name.as_str(), error.to_string());
                }
            }
        }
        tracing::info!(
            services = self.state.len(),
            "routes follow the stored specs"
        );
        Ok(())
    }

    async fn validate_and_apply(
        &mut self,
        candidate: RoutingState,
        certs: Certificates,
    ) -> Result<(), ProxyError> {
        let rendered = self.render(&candidate, &certs).await?;
        let checked = rendered.checked;
        let routing = Arc::clone(&rendered.routing);
        let runtime = self
            .runtime_changes(&rendered.config)
            .filter(|_| certs == self.certs);
        if let Some(changes) = runtime {
            self.apply_slots_or_reload(rendered, &changes, false)
                .await?;
        } else if self.applied_text() != Some(rendered.config.as_str()) {
            self.haproxy
                .preflight(&rendered.config)
                .await
                .map_err(ProxyError::Haproxy)?;
            self.start_and_promote(rendered, false).await?;
        } else if self.applied_maps != rendered.maps {
            self.apply_map_changes(rendered.maps).await?;
        }
        self.applied_checked = Some(checked);
        self.applied_routing = Some(routing);
        self.commit(candidate);
        self.commit_certs(certs).await;
        Ok(())
    }

    /// The certificates a version of the stored state asks for, when they differ from the ones
    /// served (certificates that do not validate stay as they are served). When Consul lost its
    /// data, the served certificates are written back instead.
    async fn stored_certificates(
        &mut self,
        snapshot: &StoredSpecs,
        consul_lost_data: bool,
    ) -> Result<Option<Certificates>, ProxyError> {
        if consul_lost_data && snapshot.certs.is_empty() && !self.certs.is_empty() {
            let served: Vec<Certificate> = self.certs.values().cloned().collect();
            for certificate in served {
                let floor = self
                    .store
                    .store_cert(certificate.name(), Some(&certificate))
                    .await?;
                self.stored_floor = self.stored_floor.max(floor);
            }
            return Ok(None);
        }
        let mut wanted = snapshot.certs.clone();
        for (name, certificate) in &self.certs {
            if snapshot.unreadable_certs.contains(name.as_str()) {
                wanted.insert(name.clone(), certificate.clone());
            }
        }
        Ok((wanted != self.certs).then_some(wanted))
    }

    /// Applies the proxy-wide settings of a read of Consul KV when they differ from the ones in
    /// force (always the first time): render, and when the configuration changes validate and
    /// reload; then publish. Settings HAProxy refuses (e.g. a `maxconn` the open-files
    /// limit cannot hold) are logged and left out until they change; the previous ones stay.
    /// Only a passing failure (see [`is_transient`]) is returned, so the watch retries.
    async fn follow_kv_settings(&mut self, kv: &KvSettings) -> Result<(), ProxyError> {
        if self.proxy_wide.kv.as_ref() == Some(kv)
            || self.proxy_wide.refused_kv.as_ref() == Some(kv)
        {
            return Ok(());
        }
        let candidate = RenderSettings {
            proxy_wide: kv.over(&self.proxy_wide.from_flags),
            ..self.render_settings.clone()
        };
        match self.apply_settings(candidate).await {
            Ok(()) => {
                self.proxy_wide.kv = Some(kv.clone());
                self.proxy_wide.refused_kv = None;
                let effective = proxy_settings::effective(
                    &self.proxy_wide.flags,
                    &self.proxy_wide.from_flags,
                    kv,
                    &self.proxy_wide.kv_prefix,
                );
                tracing::info!(
                    maxconn = self.render_settings.proxy_wide.maxconn,
                    overrides = ?kv,
                    "proxy-wide settings from Consul KV applied"
                );
                self.proxy_wide.published.send_replace(Arc::new(effective));
                Ok(())
            }
            Err(error) if is_transient(&error) => Err(error),
            Err(error) => {
                tracing::error!(%error, overrides = ?kv, "ignoring proxy-wide settings in Consul KV that HAProxy does not accept; the previous ones stay");
                self.proxy_wide.refused_kv = Some(kv.clone());
                Ok(())
            }
        }
    }

    /// Renders the routed state with `settings`, validates it and reloads HAProxy; on success
    /// `settings` are the ones in force. On failure nothing changed (the live file is put back).
    async fn apply_settings(&mut self, settings: RenderSettings) -> Result<(), ProxyError> {
        let rendered = self
            .render_with(&settings, &self.state, &self.certs, &self.pool)
            .await?;
        if self.applied_text() != Some(rendered.config.as_str()) {
            self.haproxy
                .preflight(&rendered.config)
                .await
                .map_err(ProxyError::Haproxy)?;
            self.haproxy
                .start_candidate(&rendered.config, &rendered.maps)
                .await
                .map_err(|error| rejected(error, false))?;
            self.promote_candidate().await?;
            self.applied_config = Some(Arc::from(rendered.config));
            self.applied_maps = rendered.maps;
        }
        self.applied_checked = Some(rendered.checked);
        self.applied_routing = Some(Arc::clone(&rendered.routing));
        self.render_settings = settings;
        Ok(())
    }

    /// Refuses a reconfigure that would pass `--max-services`, or that claims a request pattern
    /// another service routes (a color switch of the same service is no conflict).
    fn admit(&self, candidate: &RoutingState, spec: &ServiceSpec) -> Result<(), ProxyError> {
        let name = spec.service_name();
        if !candidate.contains_key(name) && candidate.len() >= self.max_services {
            return Err(ProxyError::TooManyServices {
                limit: self.max_services,
            });
        }
        if spec.is_default_backend() {
            let other = candidate
                .iter()
                .find(|(owner, routed)| *owner != name && routed.spec.is_default_backend());
            if let Some((owner, _)) = other {
                return Err(ProxyError::DefaultBackendTaken {
                    owner: owner.clone(),
                });
            }
        }
        let main_port = self.render_settings.http_port;
        let claims = spec.route_claims(main_port);
        // The services this batch changed so far: the committed claims of those are not theirs
        // any more; their candidate specs' are.
        let changed: BTreeMap<&ServiceName, Option<&Arc<Routed>>> = self
            .state
            .diff(candidate)
            .map(|item| match item {
                imbl::ordmap::DiffItem::Add(owner, routed)
                | imbl::ordmap::DiffItem::Update {
                    new: (owner, routed),
                    ..
                } => (owner, Some(routed)),
                imbl::ordmap::DiffItem::Remove(owner, _) => (owner, None),
            })
            .collect();
        let committed = claims.iter().find_map(|claim| {
            self.claims
                .get(&claim.key())
                .filter(|owner| *owner != name && !changed.contains_key(owner))
                .map(|owner| (claim, owner))
        });
        let in_batch = || {
            changed
                .iter()
                .filter(|(owner, _)| **owner != name)
                .filter_map(|(owner, routed)| Some((*owner, routed.as_ref()?)))
                .find_map(|(owner, routed)| {
                    routed
                        .spec
                        .route_claims(main_port)
                        .into_iter()
                        .find(|claim| claims.contains(claim))
                        .map(|claim| (claim, owner))
                })
        };
        let taken = committed
            .map(|(claim, owner)| (claim.clone(), owner))
            .or_else(in_batch);
        if let Some((taken, owner)) = taken {
            return Err(ProxyError::RouteTaken {
                route: taken.to_string(),
                owner: owner.clone(),
            });
        }
        Ok(())
    }

    /// Renders the configuration of `state` served with `certs`, writing the certificate files
    /// it names.
    async fn render(
        &self,
        state: &RoutingState,
        certs: &Certificates,
    ) -> Result<Rendered, ProxyError> {
        self.render_with(&self.render_settings, state, certs, &self.pool)
            .await
    }

    /// [`Core::render`] with other settings than the ones in force (a candidate's).
    async fn render_with(
        &self,
        settings: &RenderSettings,
        state: &RoutingState,
        certs: &Certificates,
        pool: &BackendPool,
    ) -> Result<Rendered, ProxyError> {
        let routes: Vec<ServiceRoute<'_>> = state
            .values()
            .map(|routed| ServiceRoute {
                spec: &routed.spec,
                instances: &routed.instances,
            })
            .collect();
        let slots: SlotsByService<'_> = state
            .iter()
            .map(|(name, routed)| (name, &routed.slots))
            .collect();
        let certificates: Vec<&Certificate> = certs.values().collect();
        let client_auth = self.client_auth(state, &certificates);
        let tls = self
            .haproxy
            .write_certificates(&certificates, client_auth.as_ref())
            .await
            .map_err(ProxyError::Haproxy)?
            .map(|crt_list| TlsSettings {
                https_port: self.https.port,
                crt_list,
                enable_h2: self.https.enable_h2,
            });
        Ok(self
            .renderer
            .render_slotted(settings, &routes, tls.as_ref(), &slots, pool)?)
    }

    /// Stores the candidate's specs of `names` (deleting those it does not route). If one fails,
    /// the ones already stored are put back and the error is returned.
    async fn persist_all(
        &mut self,
        candidate: &RoutingState,
        names: BTreeSet<ServiceName>,
    ) -> Result<Vec<ServiceName>, ProxyError> {
        let mut persisted = Vec::with_capacity(names.len());
        for name in names {
            let spec = candidate.get(&name).map(|routed| Arc::clone(&routed.spec));
            if let Err(error) = self.persist(&name, spec.as_deref()).await {
                self.put_back_stored_specs(&persisted).await;
                return Err(error);
            }
            persisted.push(name);
        }
        Ok(persisted)
    }

    /// Stores (or deletes) a service's spec and raises the floor below which reads of the stored
    /// specs are stale.
    async fn persist(
        &mut self,
        name: &ServiceName,
        spec: Option<&ServiceSpec>,
    ) -> Result<(), ProxyError> {
        match spec {
            Some(spec) if !self.state.contains_key(name) => {
                self.store.store_new(name, spec).await?
            }
            spec => {
                let read_ahead = match self.stored_read_ahead.take() {
                    Some((read, entry)) if read == *name => Some(entry),
                    _ => None,
                };
                self.store.store(name, spec, read_ahead).await?
            }
        };
        // The index it was written at is read after the caller's answer (when no change waits)
        // or before the next read of the stored specs is applied, not while the caller waits
        // (see `Core::raise_stored_floor`).
        self.unindexed_writes.insert(name.clone());
        Ok(())
    }

    /// Stores the candidate's certificates of `names` (deleting those it does not hold). If one
    /// fails, the ones already stored are put back and the error is returned.
    async fn persist_certs(
        &mut self,
        candidate: &Certificates,
        names: BTreeSet<ServiceName>,
    ) -> Result<Vec<ServiceName>, ProxyError> {
        let mut persisted = Vec::with_capacity(names.len());
        for name in names {
            match self.store.store_cert(&name, candidate.get(&name)).await {
                Ok(floor) => self.stored_floor = self.stored_floor.max(floor),
                Err(error) => {
                    self.put_back_stored_certs(&persisted).await;
                    return Err(error);
                }
            }
            persisted.push(name);
        }
        Ok(persisted)
    }

    /// Writes the served certificates of `names` back to KV (deleting those not served).
    async fn put_back_stored_certs(&mut self, names: &[ServiceName]) {
        for name in names {
            let certificate = self.certs.get(name).cloned();
            match self.store.store_cert(name, certificate.as_ref()).await {
                Ok(floor) => self.stored_floor = self.stored_floor.max(floor),
                Err(error) => {
                    tracing::error!(certificate = %name, %error, "putting back the stored certificate failed")
                }
            }
        }
    }

    /// The crt-list lines asking for a client certificate: each `serviceDomain` of the
    /// `verifyClientSsl` services of `state`, with the certificate served for it. `None` without
    /// `--ca-file` (such services then only ever answer 403, see the backend's rule).
    fn client_auth<'a>(
        &'a self,
        state: &RoutingState,
        certificates: &[&'a Certificate],
    ) -> Option<ClientAuth<'a>> {
        let ca = self.client_ca.as_ref()?;
        let mut domains: Vec<(String, &Certificate)> = Vec::new();
        for routed in state.values().filter(|r| r.spec.verify_client_ssl()) {
            let service = routed.spec.service_name().as_str();
            for domain in routed.spec.all_service_domains() {
                let filter = domain.to_string();
                if domains.iter().any(|(known, _)| *known == filter) {
                    continue;
                }
                if let Some(certificate) = certificate_for(certificates, service, &filter) {
                    domains.push((filter, certificate));
                }
            }
        }
        Some(ClientAuth { ca, domains })
    }

    /// Makes `certs` the served certificates, publishes what may be shown of them, and removes
    /// the files the configuration of the routed state (committed first) no longer names.
    async fn commit_certs(&mut self, certs: Certificates) {
        if certs != self.certs {
            self.certs = certs;
            let infos: Vec<CertInfo> = self.certs.values().map(|c| c.info().clone()).collect();
            self.published_certificates
                .send_replace(Arc::new(Vec::clone(&infos)));
            self.observer.publish_certificates(infos);
        }
        let certificates: Vec<&Certificate> = self.certs.values().collect();
        let client_auth = self.client_auth(&self.state, &certificates);
        let written = self
            .haproxy
            .write_certificates(&certificates, client_auth.as_ref())
            .await;
        match written {
            Ok(live_list) => self.haproxy.prune_certificates(live_list.as_deref()).await,
            Err(error) => tracing::warn!(%error, "checking the certificate files failed"),
        }
    }

    /// Writes the current state's specs of `names` back to KV (deleting those not routed).
    async fn put_back_stored_specs(&mut self, names: &[ServiceName]) {
        for name in names {
            let spec = self.state.get(name).map(|routed| Arc::clone(&routed.spec));
            if let Err(error) = self.persist(name, spec.as_deref()).await {
                tracing::error!(service = %name, %error, "putting back the stored spec failed");
            }
        }
    }

    /// Makes `pool` the applied pool assignment; when its free backends run low, queues a
    /// [`Change::RefillPool`], applied after the callers of this change have their answer.
    ///
    /// New services in a wave (a refill queued less than [`POOL_WAVE`] after the previous one)
    /// double the pool the refill makes, up to [`pool_ceiling`]; after a quiet spell it is
    /// [`pool_floor`] again.
    fn commit_pool(&mut self, pool: BackendPool) {
        self.pool = pool;
        if self.pool.free() < self.pool.size() / 2 && !self.refill_queued {
            self.refill_queued = true;
            let in_a_wave = self
                .refill_queued_at
                .is_some_and(|at| at.elapsed() < POOL_WAVE);
            let floor = pool_floor(self.state.len());
            self.refill_size = if in_a_wave {
                (self.pool.size() * 2).clamp(floor, pool_ceiling(self.state.len()))
            } else {
                floor
            };
            self.refill_queued_at = Some(std::time::Instant::now());
            let queue = self.queue.clone();
            tracing::info!(
                free = self.pool.free(),
                "the pool of backends runs low; refilling it with a reload"
            );
            tokio::spawn(async move {
                if let Some(Err(error)) = submit_internal(&queue, Change::RefillPool).await {
                    tracing::warn!(%error, "refilling the pool of backends failed");
                }
            });
        }
    }

    /// Makes a change's candidate state, pool and certificates the applied ones.
    async fn commit_all(&mut self, state: RoutingState, pool: BackendPool, certs: Certificates) {
        self.commit_pool(pool);
        self.commit(state);
        self.commit_certs(certs).await;
    }

    /// Makes `state` the routed state and publishes it (to `/services`, the status page and the
    /// metrics, which list it when they read it), with the queries the instance follower follows.
    /// What is kept beside the state is updated for the services that changed only.
    fn commit(&mut self, state: RoutingState) {
        let previous = std::mem::replace(&mut self.state, state);
        self.pool
            .retain_services(|name| self.state.contains_key(name));
        self.published.send_replace(self.state.clone());
        let followed_moved = self.index_changes(&previous);
        self.observer.publish_services(
            Arc::new(PublishedServices {
                state: self.state.clone(),
                pool: self.pool.clone(),
            }),
            self.totals,
        );
        if followed_moved {
            self.instance_watches.follow(self.followed.clone());
        }
        self.retired.states.push(previous);
    }

    /// Brings what is kept beside the routed state (the followed queries, the users of each
    /// query, the claimed request patterns) in line with it after it changed from `previous`,
    /// visiting the services that changed only; whether the followed queries changed.
    fn index_changes(&mut self, previous: &RoutingState) -> bool {
        let mut touched = BTreeSet::new();
        let mut leave = |users: &mut QueryUsers, name: &ServiceName, routed: &Routed| {
            if let Some(names) = users.get_mut(&routed.query) {
                names.retain(|user| user != name);
                if names.is_empty() {
                    users.remove(&routed.query);
                }
            }
            touched.insert(routed.query.clone());
        };
        let mut changed = Vec::new();
        for item in previous.diff(&self.state) {
            match item {
                imbl::ordmap::DiffItem::Add(name, routed) => {
                    changed.push((name, None, Some(routed)))
                }
                imbl::ordmap::DiffItem::Update {
                    old: (name, old),
                    new: (_, new),
                } => changed.push((name, Some(old), Some(new))),
                imbl::ordmap::DiffItem::Remove(name, old) => changed.push((name, Some(old), None)),
            }
        }
        let main_port = self.render_settings.http_port;
        for (_, old, new) in &changed {
            if let Some(old) = old {
                self.totals.services -= 1;
                self.totals.destinations -= old.spec.destinations().len();
                self.totals.instances -= old.instances.len();
            }
            if let Some(new) = new {
                self.totals.services += 1;
                self.totals.destinations += new.spec.destinations().len();
                self.totals.instances += new.instances.len();
            }
        }
        for (name, old, _) in &changed {
            if let Some(old) = old {
                leave(&mut self.query_users, name, old);
                for claim in old.spec.route_claims(main_port) {
                    let key = claim.key();
                    if self.claims.get(&key) == Some(*name) {
                        self.claims.remove(&key);
                    }
                }
            }
        }
        for (name, _, new) in &changed {
            if let Some(new) = new {
                for claim in new.spec.route_claims(main_port) {
                    self.claims.insert(claim.key(), (*name).clone());
                }
            }
        }
        for (name, _, new) in &changed {
            if let Some(new) = new.as_ref().filter(|new| new.spec.uses_registry()) {
                let users = self.query_users.entry(new.query.clone()).or_default();
                if let Err(at) = users.binary_search(name) {
                    users.insert(at, (*name).clone());
                }
                touched.insert(new.query.clone());
            }
        }
        let mut moved = false;
        for query in touched {
            // Absent: no routed service reads it; `None`: they hold different lists.
            let wanted = self.query_users.get(&query).map(|names| {
                let mut lists = names
                    .iter()
                    .filter_map(|name| self.state.get(name))
                    .map(|routed| &routed.instances);
                match lists.next() {
                    Some(first) if lists.all(|other| other == first) => Some(Arc::clone(first)),
                    _ => None,
                }
            });
            if self.followed.get(&query) != wanted.as_ref() {
                moved = true;
                match wanted {
                    Some(held) => self.followed.insert(query, held),
                    None => self.followed.remove(&query),
                };
            }
        }
        moved
    }
}

impl Core {
    /// The configuration of `candidate` when it only adds one new service whose every
    /// destination took a free backend of `pool` and whose rules just join map segments (see the
    /// render module's `placement`): the free pool backends' text replaced by the service's, its
    /// map entries added, and the slot changes that bring HAProxy there. `None` otherwise (the
    /// complete configuration is rendered), e.g. for a service with users of its own (a new
    /// userlist), `isDefaultBackend` or `verifyClientSsl`.
    fn placed(
        &self,
        candidate: &RoutingState,
        pool: &BackendPool,
    ) -> Result<Option<Spliced>, ProxyError> {
        let (Some(applied), Some(checked), Some(routing)) = (
            self.applied_text(),
            self.applied_checked,
            self.applied_routing.as_deref(),
        ) else {
            return Ok(None);
        };
        let mut changed = self.state.diff(candidate);
        let (Some(imbl::ordmap::DiffItem::Add(name, routed)), None) =
            (changed.next(), changed.next())
        else {
            return Ok(None);
        };
        let spec = &*routed.spec;
        let destinations = spec.destinations().len();
        if !spec.users().is_empty()
            || spec.is_default_backend()
            || spec.verify_client_ssl()
            || pool.backends_of(name).len() != destinations
            || pool.free() + destinations != self.pool.free()
        {
            return Ok(None);
        }
        let Some((routing, maps)) = routing.place(spec, pool, &self.applied_maps) else {
            return Ok(None);
        };
        let route = ServiceRoute {
            spec,
            instances: &routed.instances,
        };
        let taken =
            self.renderer
                .pool_backends_taken(&self.render_settings, route, &routed.slots, pool)?;
        let Some((free, own)) = taken else {
            return Ok(None);
        };
        let Some((config, changes)) = swapped(applied, &free, &own) else {
            return Ok(None);
        };
        let now_checked = checked.replaced(free.checked, own.checked);
        if !self.same_strict_limits(now_checked) {
            return Ok(None);
        }
        Ok(Some(Spliced {
            config,
            changes,
            checked: now_checked,
            maps: Some(maps),
            routing: Some(Arc::new(routing)),
        }))
    }
}

impl Core {
    /// Whether a configuration with `checked` servers writes `no strict-limits` as the applied
    /// one does (see [`crate::render::CheckedServers::strict_limits_relaxed`]).
    fn same_strict_limits(&self, checked: crate::render::CheckedServers) -> bool {
        let proxy_wide = &self.render_settings.proxy_wide;
        let applied = self.applied_checked.unwrap_or_default();
        checked.strict_limits_relaxed(proxy_wide) == applied.strict_limits_relaxed(proxy_wide)
    }
}

/// `config` with `before`'s backends replaced by `after`'s, and the slot changes that bring the
/// serving HAProxy from one to the other; `None` when a backend is not in `config` as a whole
/// section or the two differ in more than their slots.
fn swapped(
    config: &str,
    before: &ServiceBackends,
    after: &ServiceBackends,
) -> Option<(String, Vec<SlotChange>)> {
    let replaced = after.replace_in(config, before)?;
    let mut changes = Vec::new();
    for (old_piece, new_piece) in before.pieces().zip(after.pieces()) {
        changes.extend(slot_changes(old_piece, new_piece)?);
    }
    Some((replaced, changes))
}

/// Most services a change may touch and still be applied by [`Core::spliced`]: each costs a
/// copy of the configuration text.
const MAX_SPLICED: usize = 8;

/// A configuration made by [`Core::spliced`] or [`Core::placed`].
struct Spliced {
    config: String,
    /// What the Runtime API is told.
    changes: Vec<SlotChange>,
    checked: crate::render::CheckedServers,
    /// The map files, when they changed.
    maps: Option<Vec<MapFile>>,
    /// Where the main frontends' rules went, when a rule was added.
    routing: Option<Arc<RoutingIndex>>,
}

/// The routed services as the status page and the metrics read them: the state and pool of one
/// commit (copies that cost nothing), listed only when read.
#[derive(Debug)]
struct PublishedServices {
    state: RoutingState,
    pool: BackendPool,
}

impl RoutedServices for PublishedServices {
    fn list(&self) -> Vec<RoutedService> {
        self.state
            .values()
            .map(|routed| RoutedService {
                spec: Arc::clone(&routed.spec),
                instances: Arc::clone(&routed.instances),
                pool_backends: self.pool.backends_of(routed.spec.service_name()),
            })
            .collect()
    }
}

/// The routed services that read each Consul query.
/// (Sorted, without repeats: most queries have one reader, and a one-element `Vec` is a tenth
/// of a `BTreeSet`'s node.)
type QueryUsers = std::collections::HashMap<InstanceQuery, Vec<ServiceName>>;

/// Whether a caller asked for `change` (through the API), rather than a watch or the core.
fn is_requested(change: &Change) -> bool {
    matches!(
        change,
        Change::Reconfigure(..)
            | Change::Remove(_)
            | Change::PutCert(_)
            | Change::DeleteCert(_)
            | Change::Reload
    )
}

/// Whether applying a stored change failed for a reason that passes (a file or process that could
/// not be opened, e.g. out of file descriptors) rather than because HAProxy does not accept it:
/// such a change is retried later instead of skipped.
fn is_transient(error: &ProxyError) -> bool {
    matches!(error, ProxyError::Haproxy(HaproxyError::Io { .. }))
}

fn rejected(error: HaproxyError, caused_by_request: bool) -> ProxyError {
    match error {
        HaproxyError::Rejected(output) if caused_by_request => ProxyError::RejectedRequest(output),
        HaproxyError::Rejected(output) => ProxyError::Rejected(output),
        other => ProxyError::Haproxy(other),
    }
}

/// How many instance reads a restore keeps in flight: thousands of stored specs are read in a
/// fraction of the time one after the other takes, with few connections to the registry.
const RESTORE_READS_IN_FLIGHT: usize = 8;

/// Two pool refills queued less than this apart are a wave of new services (see
/// [`Core::commit_pool`]).
const POOL_WAVE: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a new service may try the pool backends: every destination is HTTP on the main
/// frontend (the pool backends are HTTP backends; a `srcPort` of its own needs a new frontend).
/// Whether it goes live without reload is then decided by comparing the renders.
fn may_take_pool_backends(spec: &ServiceSpec) -> bool {
    spec.destinations().iter().all(|destination| {
        destination.req_mode() == crate::spec::ReqMode::Http
            && destination.src_port().is_none()
            && destination.routing().outbound_hostname.is_none()
    })
}

/// The healthy instances of the services a batch of changes reconfigures, in the order of the
/// changes, [`RESTORE_READS_IN_FLIGHT`] reads at a time: a batch of hundreds of deployments does
/// not wait for its reads one after the other. Empty for a single change, which reads its
/// instances once it is admitted.
async fn instances_of_reconfigured(
    registry: &ConsulClient,
    writes: &ServiceWrites,
    changes: &[&Change],
) -> Result<std::collections::VecDeque<Vec<Instance>>, RegistryError> {
    if changes.len() < 2 {
        return Ok(std::collections::VecDeque::new());
    }
    let specs: Vec<(&ServiceName, &ServiceSpec)> = changes
        .iter()
        .filter_map(|change| match change {
            Change::Reconfigure(spec, _) => Some((spec.service_name(), &**spec)),
            _ => None,
        })
        .collect();
    Ok(instances_of_each(registry, writes, &specs).await?.into())
}

/// The healthy instances of each spec (in order), [`RESTORE_READS_IN_FLIGHT`] reads at a time.
async fn instances_of_each(
    registry: &ConsulClient,
    writes: &ServiceWrites,
    specs: &[(&ServiceName, &ServiceSpec)],
) -> Result<Vec<Vec<Instance>>, RegistryError> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    // The reads made up front (lazy futures): a stream's closure over borrowed specs would not
    // be `Send` for every lifetime the core's task needs.
    let reads: Vec<_> = specs
        .iter()
        .map(|(_, spec)| instances_for(registry, writes, spec))
        .collect();
    stream::iter(reads)
        .buffered(RESTORE_READS_IN_FLIGHT)
        .try_collect()
        .await
}
