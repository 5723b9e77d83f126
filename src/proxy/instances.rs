//! Live instances: one blocking query on `/v1/health/service/<name>?passing` (with `&tag=…` for a
//! service routed with `serviceTag`) per distinct [`InstanceQuery`] of the routed services,
//! handing every changed list of healthy instances to the core. The core says which
//! services to follow after each change of the routed state; `--watch-instances=false` turns the
//! watches off, and instances are then read only on reconfigure and reload.
//!
//! A service whose every destination has an `outboundHostname` forwards to fixed hosts: its
//! instances are neither read nor watched ([`instances_for`]).
//!
//! Each watch holds a socket, so the open-files limit caps how many run (see
//! [`crate::limits`]): past that budget the services after the first ones (by name) are not
//! watched, with an error in the log, so that the API, the KV watch and `haproxy -c` keep the
//! descriptors they need.

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::mpsc::WeakSender;
use tokio::task::JoinHandle;

use super::{submit_internal, Change, Pending};
use crate::observe::{Observer, WatchKind};
use crate::registry::watch::{Watch, WatchIndex};
use crate::registry::{ConsulClient, InstanceQuery, RegistryError};
use crate::spec::{Instance, ServiceSpec};

/// The healthy instances of `spec`'s Consul service (carrying its `serviceTag`s), read now;
/// none, without asking the registry, when every destination forwards to its
/// `outboundHostname`.
pub(super) async fn instances_for(
    registry: &ConsulClient,
    spec: &ServiceSpec,
) -> Result<Vec<Instance>, RegistryError> {
    if !spec.uses_registry() {
        return Ok(Vec::new());
    }
    registry.healthy_instances(&instance_query(spec)).await
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

/// The running instance watches, one per instance query (Consul service and tags). Dropping it
/// stops them.
pub(super) struct InstanceWatches {
    enabled: bool,
    registry: ConsulClient,
    core: WeakSender<Pending>,
    running: BTreeMap<InstanceQuery, JoinHandle<()>>,
    /// Most watches running at once.
    budget: usize,
    /// How many services were left unwatched by the last `follow`, to log changes only.
    unwatched: usize,
    observer: Observer,
}

impl InstanceWatches {
    pub fn new(
        enabled: bool,
        budget: usize,
        registry: ConsulClient,
        core: WeakSender<Pending>,
        observer: Observer,
    ) -> Self {
        InstanceWatches {
            enabled,
            registry,
            core,
            running: BTreeMap::new(),
            budget,
            unwatched: 0,
            observer,
        }
    }

    /// Watches exactly these instance queries (the first ones by service name, up to the
    /// budget): starts the missing watches, stops the others.
    pub fn follow(&mut self, mut services: BTreeSet<InstanceQuery>) {
        if !self.enabled {
            return;
        }
        let unwatched = services.len().saturating_sub(self.budget);
        if unwatched > 0 {
            let kept: BTreeSet<InstanceQuery> = services.into_iter().take(self.budget).collect();
            services = kept;
        }
        if unwatched != self.unwatched {
            if unwatched > 0 {
                tracing::error!(
                    budget = self.budget,
                    unwatched,
                    "more routed services than the open files limit allows instance watches \
                     for: the instances of {unwatched} services are read only on reconfigure and \
                     reload; raise the hard open files limit (ulimit -Hn, LimitNOFILE)"
                );
            } else {
                tracing::info!("every routed service's instances are watched again");
            }
            self.unwatched = unwatched;
        }
        self.running.retain(|service, task| {
            let keep = services.contains(service);
            if !keep {
                task.abort();
                tracing::debug!(%service, "stopped watching instances");
            }
            keep
        });
        for service in services {
            if !self.running.contains_key(&service) {
                tracing::debug!(%service, "watching instances");
                let task = tokio::spawn(watch_instances(
                    self.registry.clone(),
                    service.clone(),
                    self.core.clone(),
                    self.observer.clone(),
                ));
                self.running.insert(service, task);
            }
        }
    }
}

impl Drop for InstanceWatches {
    fn drop(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}

/// Follows one query's healthy instances until aborted or the core stops.
async fn watch_instances(
    registry: ConsulClient,
    service: InstanceQuery,
    core: WeakSender<Pending>,
    observer: Observer,
) {
    let mut watch = Watch::new(
        format!("the instances of `{service}`"),
        WatchIndex::default(),
    )
    .observed(observer.clone(), WatchKind::Instances);
    let mut handed_over = None;
    loop {
        let update = watch
            .next(|blocking| registry.watch_healthy_instances(&service, blocking))
            .await;
        let read_at = std::time::Instant::now();
        let mut instances = update.value;
        instances.sort();
        instances.dedup();
        if handed_over.as_ref() == Some(&instances) {
            continue;
        }
        if handed_over.is_some() {
            tracing::info!(
                %service,
                healthy = instances.len(),
                "healthy instances changed in Consul"
            );
        }
        let change = Change::Instances {
            consul_service: service.clone(),
            instances: instances.clone(),
        };
        match submit_internal(&core, change).await {
            None => return,
            Some(Ok(_)) => {
                observer.record_watch_lag(WatchKind::Instances, read_at.elapsed());
                handed_over = Some(instances);
                watch.taken();
            }
            Some(Err(error)) => watch.retry_later(error).await,
        }
    }
}
