//! What flow-proxy has done, in one place: every change's outcome (service, what changed in its
//! routes and instances, validate and reload time, result, error), reloads, changes applied
//! without a reload, validation failures, watch restarts and lag, registry errors, and the routed
//! services and certificates now. `GET /metrics` ([`Observer::metrics_text`]), the structured
//! log line of each change ([`Observer::record_change`]) and the status page `GET /`
//! ([`status`]) all read from here; HAProxy's own counters are read from its stats socket at
//! each scrape ([`haproxy_stats`]).

pub mod haproxy_stats;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::certs::CertInfo;
use crate::spec::{Instance, ServiceSpec};

/// How many recent changes the status page lists.
const RECENT_CHANGES: usize = 20;

/// What a change asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// `/reconfigure`.
    Reconfigure,
    /// `/remove`.
    Remove,
    /// `/reload`.
    Reload,
    /// A certificate stored (`PUT /cert`).
    PutCert,
    /// A certificate deleted (`DELETE /cert`).
    DeleteCert,
    /// New healthy instances seen by the instance follower.
    Instances,
    /// A new version of the stored specs seen by the KV watch (a change made through another
    /// proxy, or a restore).
    Stored,
}

impl ChangeKind {
    /// The name in metrics labels and log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Reconfigure => "reconfigure",
            ChangeKind::Remove => "remove",
            ChangeKind::Reload => "reload",
            ChangeKind::PutCert => "put_cert",
            ChangeKind::DeleteCert => "delete_cert",
            ChangeKind::Instances => "instances",
            ChangeKind::Stored => "stored",
        }
    }
}

/// How a change ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// Applied; HAProxy was reloaded.
    Reloaded,
    /// Applied without a reload: the configuration HAProxy runs did not change, or only which
    /// instances its server slots hold did (applied over the Runtime API).
    WithoutReload,
    /// `haproxy -c` rejected the configuration; nothing changed.
    Rejected(String),
    /// Refused or failed for another reason; nothing changed.
    Failed(String),
}

impl ChangeOutcome {
    /// The name in metrics labels and log lines.
    pub fn as_str(&self) -> &'static str {
        match self {
            ChangeOutcome::Reloaded => "reloaded",
            ChangeOutcome::WithoutReload => "applied_without_reload",
            ChangeOutcome::Rejected(_) => "rejected",
            ChangeOutcome::Failed(_) => "failed",
        }
    }

    /// The error, when it did not apply.
    pub fn error(&self) -> Option<&str> {
        match self {
            ChangeOutcome::Rejected(error) | ChangeOutcome::Failed(error) => Some(error),
            _ => None,
        }
    }
}

/// The routes (paths and domains) and instances of one service, as shown in log lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSet {
    /// `path:/demo`, `domain:example.com`, one per destination's path and domain.
    pub routes: BTreeSet<String>,
    /// `address:port`.
    pub instances: BTreeSet<String>,
}

impl RouteSet {
    /// The routes and instances of a routed service.
    pub fn of(spec: &ServiceSpec, instances: &[Instance]) -> RouteSet {
        let mut routes = BTreeSet::new();
        for destination in spec.destinations() {
            for path in destination.service_path() {
                routes.insert(format!("path:{}", path.as_str()));
            }
            for domain in destination.service_domain() {
                routes.insert(format!("domain:{domain}"));
            }
        }
        RouteSet {
            routes,
            instances: instances.iter().map(instance_address).collect(),
        }
    }
}

/// `address:port` (IPv6 in brackets).
pub fn instance_address(instance: &Instance) -> String {
    if instance.is_ipv6() {
        format!("[{}]:{}", instance.address(), instance.port())
    } else {
        format!("{}:{}", instance.address(), instance.port())
    }
}

/// One change, as it is counted, logged and shown.
#[derive(Debug, Clone)]
pub struct ChangeRecord {
    /// What was asked.
    pub kind: ChangeKind,
    /// The service (or certificate) it concerns; `None` for a reload of everything.
    pub service: Option<String>,
    /// The service's routes and instances before the change (empty when it was not routed).
    pub before: RouteSet,
    /// After the change (empty when it is not routed any more, or the change failed).
    pub after: RouteSet,
    /// How long `haproxy -c` took, when it ran.
    pub validate: Option<Duration>,
    /// How long the reload took, when there was one.
    pub reload: Option<Duration>,
    /// From the core taking the change to its outcome.
    pub total: Duration,
    /// How it ended.
    pub outcome: ChangeOutcome,
}

/// The last reload, for the status page.
#[derive(Debug, Clone)]
pub struct ReloadRecord {
    /// When it ended.
    pub at: SystemTime,
    /// How long it took.
    pub duration: Duration,
    /// `None` when it succeeded, else why not.
    pub error: Option<String>,
}

/// The last error, for the status page.
#[derive(Debug, Clone)]
pub struct ErrorRecord {
    /// When it happened.
    pub at: SystemTime,
    /// What it concerned (a service, a certificate, a watch).
    pub subject: String,
    /// The message.
    pub message: String,
}

/// One routed service, as the status page shows it.
#[derive(Debug, Clone)]
pub struct RoutedService {
    /// Its spec.
    pub spec: std::sync::Arc<ServiceSpec>,
    /// The instances its backends hold.
    pub instances: std::sync::Arc<[Instance]>,
    /// The pool backend each destination sits in, by destination index, when it does (a new
    /// service served without reload; see `render::BackendPool`); the others are
    /// `<serviceName>-be<index>`.
    pub pool_backends: BTreeMap<u16, String>,
}

/// The routed services a commit published, listed when the status page or a scrape reads them
/// (the core publishes at every change; listing 10,000 services each time would cost it
/// milliseconds).
pub trait RoutedServices: std::fmt::Debug + Send + Sync {
    /// Every routed service, ordered by name.
    fn list(&self) -> Vec<RoutedService>;
}

/// A fixed list, for tests.
#[cfg(test)]
impl RoutedServices for Vec<RoutedService> {
    fn list(&self) -> Vec<RoutedService> {
        self.clone()
    }
}

/// How many services, destinations and instances are routed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceTotals {
    /// Routed services.
    pub services: usize,
    /// Their destinations (`servicePath.1`, … count one each).
    pub destinations: usize,
    /// The instances their backends hold.
    pub instances: usize,
}

impl RoutedService {
    /// The name HAProxy knows `destination`'s backend by.
    pub fn backend_name(&self, destination: &crate::spec::Destination) -> String {
        match self.pool_backends.get(&destination.index()) {
            Some(pool_backend) => pool_backend.clone(),
            None => format!("{}-be{}", self.spec.service_name(), destination.index()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ChangeLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WatchLabels {
    watch: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CertificateLabels {
    certificate: String,
}

/// Which watch a restart or lag belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// The KV watch of the stored specs.
    StoredSpecs,
    /// The instance follower: its change detectors (every check, the catalog's services) and
    /// its reads of the services that changed.
    Instances,
}

impl WatchKind {
    fn as_str(self) -> &'static str {
        match self {
            WatchKind::StoredSpecs => "stored_specs",
            WatchKind::Instances => "instances",
        }
    }
}

/// flow-proxy's own metrics (HAProxy's are read at each scrape).
#[derive(Clone)]
struct Metrics {
    changes: Family<ChangeLabels, Counter>,
    change_duration: Family<ChangeLabels, Histogram>,
    reloads: Family<ResultLabels, Counter>,
    reload_duration: Histogram,
    changes_without_reload: Counter,
    validation_failures: Counter,
    validate_duration: Histogram,
    services: Gauge,
    destinations: Gauge,
    instances: Gauge,
    registry_errors: Counter,
    watch_restarts: Family<WatchLabels, Counter>,
    watch_lag: Family<WatchLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    certificate_expiry: Family<CertificateLabels, Gauge>,
    /// ACME certificate orders, by result (`ok`, `error`).
    acme_orders: Family<ResultLabels, Counter>,
}

fn seconds_histogram() -> Histogram {
    // 1 ms … ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            changes: Family::default(),
            change_duration: Family::new_with_constructor(seconds_histogram),
            reloads: Family::default(),
            reload_duration: seconds_histogram(),
            changes_without_reload: Counter::default(),
            validation_failures: Counter::default(),
            validate_duration: seconds_histogram(),
            services: Gauge::default(),
            destinations: Gauge::default(),
            instances: Gauge::default(),
            registry_errors: Counter::default(),
            watch_restarts: Family::default(),
            watch_lag: Family::default(),
            certificate_expiry: Family::default(),
            acme_orders: Family::default(),
        }
    }

    /// Registers (clones of) every metric; the clones share their values.
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "changes",
            "Changes applied or refused, by kind and outcome",
            self.changes.clone(),
        );
        registry.register_with_unit(
            "change_duration",
            "Time from the core taking a change to its outcome, by kind and outcome",
            Unit::Seconds,
            self.change_duration.clone(),
        );
        registry.register(
            "haproxy_reloads",
            "HAProxy reloads, by result (ok, failed)",
            self.reloads.clone(),
        );
        registry.register_with_unit(
            "haproxy_reload_duration",
            "Time a reload took until the new HAProxy process served",
            Unit::Seconds,
            self.reload_duration.clone(),
        );
        registry.register(
            "changes_without_reload",
            "Changes applied without a reload: the configuration HAProxy runs stayed the same, or only the instances its server slots hold changed (Runtime API)",
            self.changes_without_reload.clone(),
        );
        registry.register(
            "validation_failures",
            "Candidate configurations haproxy -c rejected",
            self.validation_failures.clone(),
        );
        registry.register_with_unit(
            "validate_duration",
            "Time haproxy -c took on a candidate configuration",
            Unit::Seconds,
            self.validate_duration.clone(),
        );
        registry.register("services", "Services routed", self.services.clone());
        registry.register(
            "destinations",
            "Destinations (backends) of the routed services",
            self.destinations.clone(),
        );
        registry.register(
            "instances",
            "Instances in the routed services' backends",
            self.instances.clone(),
        );
        registry.register(
            "registry_errors",
            "Failed queries to Consul (or the embedded registry): by the watches, and by changes that failed on the registry",
            self.registry_errors.clone(),
        );
        registry.register(
            "watch_restarts",
            "Times a watch read everything again (after its owner could not use an update, or Consul's index went backwards)",
            self.watch_restarts.clone(),
        );
        registry.register_with_unit(
            "watch_lag",
            "For the last update of each kind of watch: time from reading it in Consul to routing it",
            Unit::Seconds,
            self.watch_lag.clone(),
        );
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "End of validity of each stored certificate, seconds since the epoch",
            Unit::Seconds,
            self.certificate_expiry.clone(),
        );
        registry.register(
            "acme_orders",
            "ACME certificate orders this proxy made (issuance and renewal), by result",
            self.acme_orders.clone(),
        );
    }
}

/// What the status page shows besides HAProxy's live state.
#[derive(Debug, Default)]
struct StatusState {
    services: Option<Arc<dyn RoutedServices>>,
    certificates: Vec<CertInfo>,
    last_reload: Option<ReloadRecord>,
    last_error: Option<ErrorRecord>,
    /// Newest last.
    recent: Vec<(SystemTime, ChangeRecord)>,
}

struct Inner {
    metrics: Metrics,
    status: Mutex<StatusState>,
}

/// The shared record of what flow-proxy has done; cheap to clone.
#[derive(Clone)]
pub struct Observer(Arc<Inner>);

impl Default for Observer {
    fn default() -> Observer {
        Observer::new()
    }
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Observer").finish_non_exhaustive()
    }
}

impl Observer {
    /// An empty record.
    pub fn new() -> Observer {
        Observer(Arc::new(Inner {
            metrics: Metrics::new(),
            status: Mutex::new(StatusState::default()),
        }))
    }

    fn status(&self) -> MutexGuard<'_, StatusState> {
        // A panic while holding the lock leaves plain data behind: still readable.
        self.0
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts, logs (one structured line) and keeps a change's outcome.
    pub fn record_change(&self, record: ChangeRecord) {
        let metrics = &self.0.metrics;
        let labels = ChangeLabels {
            kind: record.kind.as_str(),
            outcome: record.outcome.as_str(),
        };
        metrics.changes.get_or_create(&labels).inc();
        metrics
            .change_duration
            .get_or_create(&labels)
            .observe(record.total.as_secs_f64());
        if record.outcome == ChangeOutcome::WithoutReload {
            metrics.changes_without_reload.inc();
        }
        log_change(&record);
        let now = SystemTime::now();
        let mut status = self.status();
        if let Some(error) = record.outcome.error() {
            status.last_error = Some(ErrorRecord {
                at: now,
                subject: record
                    .service
                    .clone()
                    .unwrap_or_else(|| record.kind.as_str().to_string()),
                message: error.to_string(),
            });
        }
        status.recent.push((now, record));
        let excess = status.recent.len().saturating_sub(RECENT_CHANGES);
        status.recent.drain(..excess);
    }

    /// Counts a run of `haproxy -c`.
    pub fn record_validation(&self, duration: Duration, accepted: bool) {
        let metrics = &self.0.metrics;
        metrics.validate_duration.observe(duration.as_secs_f64());
        if !accepted {
            metrics.validation_failures.inc();
        }
    }

    /// Counts and keeps a reload.
    pub fn record_reload(&self, duration: Duration, error: Option<String>) {
        let metrics = &self.0.metrics;
        let result = if error.is_some() { "failed" } else { "ok" };
        metrics
            .reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        metrics.reload_duration.observe(duration.as_secs_f64());
        let at = SystemTime::now();
        let mut status = self.status();
        if let Some(message) = &error {
            status.last_error = Some(ErrorRecord {
                at,
                subject: "reload".into(),
                message: message.clone(),
            });
        }
        status.last_reload = Some(ReloadRecord {
            at,
            duration,
            error,
        });
    }

    /// Keeps an error that is no change's outcome (e.g. a stored spec HAProxy refused).
    pub fn record_error(&self, subject: &str, message: String) {
        self.status().last_error = Some(ErrorRecord {
            at: SystemTime::now(),
            subject: subject.to_string(),
            message,
        });
    }

    /// Counts a failed query to the registry.
    pub fn record_registry_error(&self) {
        self.0.metrics.registry_errors.inc();
    }

    /// Counts a watch reading everything again.
    pub fn record_watch_restart(&self, watch: WatchKind) {
        self.0
            .metrics
            .watch_restarts
            .get_or_create(&WatchLabels {
                watch: watch.as_str(),
            })
            .inc();
    }

    /// Sets how long the last update of a watch took from being read to being routed.
    pub fn record_watch_lag(&self, watch: WatchKind, lag: Duration) {
        self.0
            .metrics
            .watch_lag
            .get_or_create(&WatchLabels {
                watch: watch.as_str(),
            })
            .set(lag.as_secs_f64());
    }

    /// The services routed now.
    pub fn publish_services(&self, services: Arc<dyn RoutedServices>, totals: ServiceTotals) {
        let metrics = &self.0.metrics;
        metrics.services.set(gauge_value(totals.services));
        metrics.destinations.set(gauge_value(totals.destinations));
        metrics.instances.set(gauge_value(totals.instances));
        self.status().services = Some(services);
    }

    /// The routed services last published.
    fn routed_services(&self) -> Vec<RoutedService> {
        let published = self.status().services.clone();
        published
            .map(|services| services.list())
            .unwrap_or_default()
    }

    /// Counts one ACME order (issuance or renewal) by its result.
    pub fn record_acme_order(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.0
            .metrics
            .acme_orders
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The certificates served now.
    pub fn publish_certificates(&self, certificates: Vec<CertInfo>) {
        let expiry = &self.0.metrics.certificate_expiry;
        expiry.clear();
        for certificate in &certificates {
            expiry
                .get_or_create(&CertificateLabels {
                    certificate: certificate.name.clone(),
                })
                .set(certificate.not_after_unix);
        }
        self.status().certificates = certificates;
    }

    /// The Prometheus text exposition (OpenMetrics) of flow-proxy's metrics, the number of
    /// HAProxy processes alive, and HAProxy's counters of the routed services' backends and
    /// servers from `show stat` (`None` when the stats socket did not answer).
    pub fn metrics_text(
        &self,
        haproxy_processes: usize,
        stats: Option<&[haproxy_stats::StatRow]>,
    ) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::with_prefix("flow_proxy");
        self.0.metrics.register(&mut registry);
        let processes: Gauge = Gauge::default();
        processes.set(gauge_value(haproxy_processes));
        registry.register(
            "haproxy_processes",
            "HAProxy processes alive (more than one while an old one finishes its connections)",
            processes,
        );
        let stats_up: Gauge = Gauge::default();
        stats_up.set(i64::from(stats.is_some()));
        registry.register(
            "haproxy_stats_up",
            "Whether HAProxy's stats socket answered show stat for this scrape",
            stats_up,
        );
        if let Some(rows) = stats {
            let services = self.routed_services();
            haproxy_stats::register(&mut registry, rows, &services);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    }
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Joins a set for a log field.
fn joined(items: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    items
        .into_iter()
        .map(|item| item.as_ref().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The one structured line of a change (`--log-format json` makes each field a JSON key).
fn log_change(record: &ChangeRecord) {
    let routes_added = joined(record.after.routes.difference(&record.before.routes));
    let routes_removed = joined(record.before.routes.difference(&record.after.routes));
    let instances_added = joined(record.after.instances.difference(&record.before.instances));
    let instances_removed = joined(record.before.instances.difference(&record.after.instances));
    let milliseconds = |duration: Option<Duration>| duration.map(|d| d.as_secs_f64() * 1000.0);
    let service = record.service.as_deref().unwrap_or("");
    let error = record.outcome.error().unwrap_or("");
    let outcome = record.outcome.as_str();
    let kind = record.kind.as_str();
    let total_ms = record.total.as_secs_f64() * 1000.0;
    let validate_ms = milliseconds(record.validate);
    let reload_ms = milliseconds(record.reload);
    if error.is_empty() {
        tracing::info!(
            target: "flow_proxy::change",
            service,
            change = kind,
            outcome,
            routes_added,
            routes_removed,
            instances_added,
            instances_removed,
            validate_ms,
            reload_ms,
            total_ms,
            "change applied"
        );
    } else {
        tracing::warn!(
            target: "flow_proxy::change",
            service,
            change = kind,
            outcome,
            error,
            validate_ms,
            reload_ms,
            total_ms,
            "change not applied"
        );
    }
}

#[cfg(test)]
mod tests;
