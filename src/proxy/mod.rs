//! The proxy core: the one owner of the desired routing state.
//!
//! Every change (reconfigure, remove, reload, restore) goes through one queue and is applied by
//! one task, so changes never interleave. Changes that queue up while one is being applied are
//! applied together, with one validation and one reload (a burst of N deployments costs one
//! reload, not N); if anything in such a batch fails, none of it stays applied and its changes are
//! applied one at a time, so each caller gets its own answer. For each step the order is:
//!
//! 1. **resolve**: read the healthy instances of the services it touches from the registry.
//!    Registry unreachable → the caller gets the error, nothing changed.
//! 2. **render** the complete configuration of the candidate state (never a patch of the old file).
//! 3. **validate** it with `haproxy -c` as a candidate file. Rejected → the caller gets HAProxy's
//!    own lines; the live file, the running HAProxy and the stored specs are untouched.
//! 4. **persist** the spec in Consul KV (`<kv-prefix>/services/<serviceName>`), or delete it.
//!    Failure → the caller gets the error; the live file and HAProxy are untouched.
//! 5. **apply**: swap the candidate in as the live file and reload HAProxy; the call returns once
//!    the new process serves. Failure (e.g. a port HAProxy cannot bind) → the previous live file
//!    and the previous KV value are put back; the old HAProxy process never stopped serving.
//! 6. **commit** the candidate as the current state and answer the callers.
//!
//! On start the core restores every spec stored under the prefix. A stored spec that no longer
//! parses or validates is skipped with a loud error; if the registry cannot be read the restore is
//! retried with backoff while HAProxy keeps serving its last good configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::haproxy::{Haproxy, HaproxyError};
use crate::registry::{ConsulClient, RegistryError};
use crate::render::{RenderError, RenderSettings, Renderer, ServiceRoute};
use crate::spec::{Instance, ServiceName, ServiceSpec};

/// Most changes applied with one validation and one reload.
const MAX_BATCH: usize = 64;

/// First and longest pause between two attempts to restore the stored specs.
const RESTORE_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Why a change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Reading instances or writing KV failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The templates could not produce a configuration (e.g. two services want one port).
    #[error(transparent)]
    Render(#[from] RenderError),
    /// `haproxy -c` rejected the configuration a reconfigure request would produce.
    #[error("HAProxy rejected the configuration this request produces:\n{0}")]
    RejectedRequest(String),
    /// `haproxy -c` rejected a configuration flow-proxy produced on its own (reload, restore).
    #[error("HAProxy rejected the configuration:\n{0}")]
    Rejected(String),
    /// HAProxy could not be reloaded; the previous process keeps serving.
    #[error(transparent)]
    Haproxy(HaproxyError),
    /// `/remove` named a service that is not routed.
    #[error("service `{0}` is not configured")]
    UnknownService(ServiceName),
    /// The core has stopped (flow-proxy is shutting down).
    #[error("flow-proxy is shutting down")]
    Stopped,
}

/// One service as it is routed now: its spec and the instances its backends hold.
#[derive(Debug, Clone)]
struct Routed {
    spec: ServiceSpec,
    instances: Vec<Instance>,
}

/// The complete desired routing state, ordered by service name.
type RoutingState = BTreeMap<ServiceName, Routed>;

enum Change {
    Reconfigure(ServiceSpec),
    Remove(ServiceName),
    Reload,
}

struct Pending {
    change: Change,
    reply: oneshot::Sender<Result<Option<ServiceSpec>, ProxyError>>,
}

/// The handle the API uses to submit changes and read the routed specs.
#[derive(Clone)]
pub struct Proxy {
    changes: mpsc::Sender<Pending>,
    services: watch::Receiver<Arc<Vec<ServiceSpec>>>,
    haproxy: Haproxy,
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
}

impl Proxy {
    /// Restores the specs stored in KV (one attempt; on failure the core retries in the
    /// background), then starts the core task.
    pub async fn start(parts: ProxyParts) -> Proxy {
        let (changes, queue) = mpsc::channel(256);
        let (published, services) = watch::channel(Arc::new(Vec::new()));
        let haproxy = parts.haproxy.clone();
        let mut core = Core {
            state: RoutingState::new(),
            registry: parts.registry,
            renderer: parts.renderer,
            render_settings: parts.render_settings,
            haproxy: parts.haproxy,
            services_prefix: format!("{}/services/", parts.kv_prefix.trim_end_matches('/')),
            published,
        };
        let restore_backoff = match core.restore().await {
            Ok(()) => None,
            Err(error) => {
                tracing::error!(%error, retry_in = ?RESTORE_BACKOFF.0, "restoring the stored services failed");
                Some(RESTORE_BACKOFF.0)
            }
        };
        tokio::spawn(core.run(queue, restore_backoff));
        Proxy {
            changes,
            services,
            haproxy,
        }
    }

    /// Routes a service as `spec` describes (adds it or replaces its previous spec).
    pub async fn reconfigure(&self, spec: ServiceSpec) -> Result<ServiceSpec, ProxyError> {
        self.submit(Change::Reconfigure(spec))
            .await?
            .ok_or(ProxyError::Stopped)
    }

    /// Stops routing a service; returns the spec it had.
    pub async fn remove(&self, name: ServiceName) -> Result<ServiceSpec, ProxyError> {
        self.submit(Change::Remove(name))
            .await?
            .ok_or(ProxyError::Stopped)
    }

    /// Re-reads every service's instances, re-renders and reloads HAProxy.
    pub async fn reload(&self) -> Result<(), ProxyError> {
        self.submit(Change::Reload).await.map(|_| ())
    }

    /// The specs routed now, ordered by service name.
    pub fn services(&self) -> Arc<Vec<ServiceSpec>> {
        Arc::clone(&self.services.borrow())
    }

    /// The haproxy.cfg HAProxy runs now.
    pub async fn live_config(&self) -> Result<String, ProxyError> {
        self.haproxy
            .live_config()
            .await
            .map_err(ProxyError::Haproxy)
    }

    async fn submit(&self, change: Change) -> Result<Option<ServiceSpec>, ProxyError> {
        let (reply, answer) = oneshot::channel();
        self.changes
            .send(Pending { change, reply })
            .await
            .map_err(|_| ProxyError::Stopped)?;
        answer.await.map_err(|_| ProxyError::Stopped)?
    }
}

struct Core {
    state: RoutingState,
    registry: ConsulClient,
    renderer: Renderer,
    render_settings: RenderSettings,
    haproxy: Haproxy,
    services_prefix: String,
    published: watch::Sender<Arc<Vec<ServiceSpec>>>,
}

impl Core {
    /// Applies queued changes in batches; while `restore_backoff` is set, retries the restore.
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<Pending>,
        mut restore_backoff: Option<Duration>,
    ) {
        let mut next_restore = tokio::time::Instant::now() + restore_backoff.unwrap_or_default();
        loop {
            let restore_due = async {
                match restore_backoff {
                    Some(_) => tokio::time::sleep_until(next_restore).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = restore_due => match self.restore().await {
                    Ok(()) => restore_backoff = None,
                    Err(error) => {
                        let pause = restore_backoff.unwrap_or(RESTORE_BACKOFF.0);
                        tracing::error!(%error, retry_in = ?pause, "restoring the stored services failed");
                        next_restore = tokio::time::Instant::now() + pause;
                        restore_backoff = Some((pause * 2).min(RESTORE_BACKOFF.1));
                    }
                },
                pending = queue.recv() => {
                    let Some(first) = pending else { break };
                    // Everything queued meanwhile goes into the same validation and reload.
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match queue.try_recv() {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    self.apply_batch(batch).await;
                }
            }
        }
    }

    /// Applies a batch of queued changes with one validation and one reload. If anything in the
    /// batch fails, nothing of it stays applied and the changes are applied one at a time, so
    /// each caller gets the answer its own change deserves.
    async fn apply_batch(&mut self, batch: Vec<Pending>) {
        if batch.len() > 1 {
            let changes: Vec<&Change> = batch.iter().map(|pending| &pending.change).collect();
            match self.apply_changes(&changes).await {
                Ok(outcomes) => {
                    tracing::info!(changes = batch.len(), "applied a batch with one reload");
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
            let result = self
                .apply_changes(&[&pending.change])
                .await
                .map(|mut outcomes| outcomes.pop().flatten());
            let _ = pending.reply.send(result);
        }
    }

    /// Applies `changes` in order as one step (see the module doc for the order of operations).
    /// On error the state, the live file and the stored specs are as they were.
    async fn apply_changes(
        &mut self,
        changes: &[&Change],
    ) -> Result<Vec<Option<ServiceSpec>>, ProxyError> {
        let mut candidate = self.state.clone();
        let mut outcomes = Vec::with_capacity(changes.len());
        let mut touched = BTreeSet::new();
        for change in changes {
            match change {
                Change::Reconfigure(spec) => {
                    let instances = self
                        .registry
                        .healthy_instances(&spec.consul_service_name())
                        .await?;
                    let name = spec.service_name().clone();
                    let routed = Routed {
                        spec: spec.clone(),
                        instances,
                    };
                    candidate.insert(name.clone(), routed);
                    touched.insert(name);
                    outcomes.push(Some(spec.clone()));
                }
                Change::Remove(name) => {
                    let removed = candidate
                        .remove(name)
                        .ok_or_else(|| ProxyError::UnknownService(name.clone()))?;
                    touched.insert(name.clone());
                    outcomes.push(Some(removed.spec));
                }
                Change::Reload => {
                    for routed in candidate.values_mut() {
                        routed.instances = self
                            .registry
                            .healthy_instances(&routed.spec.consul_service_name())
                            .await?;
                    }
                    outcomes.push(None);
                }
            }
        }
        let config = self.render(&candidate)?;
        let caused_by_request = changes
            .iter()
            .any(|change| matches!(change, Change::Reconfigure(_)));
        self.haproxy
            .validate(&config)
            .await
            .map_err(|error| rejected(error, caused_by_request))?;
        let mut persisted = Vec::with_capacity(touched.len());
        for name in touched {
            let spec = candidate.get(&name).map(|routed| &routed.spec);
            if let Err(error) = self.persist(&name, spec).await {
                self.put_back_stored_specs(&persisted).await;
                return Err(error);
            }
            persisted.push(name);
        }
        if let Err(error) = self.haproxy.apply().await {
            self.put_back_live_config().await;
            self.put_back_stored_specs(&persisted).await;
            return Err(ProxyError::Haproxy(error));
        }
        for name in &persisted {
            match candidate.get(name) {
                Some(_) => tracing::info!(service = %name, "service reconfigured"),
                None => tracing::info!(service = %name, "service removed"),
            }
        }
        self.commit(candidate);
        Ok(outcomes)
    }

    /// Reads every stored spec and routes the ones not routed yet.
    async fn restore(&mut self) -> Result<(), ProxyError> {
        let entries = self.registry.kv_list(&self.services_prefix).await?;
        let mut restored = Vec::new();
        for entry in entries {
            let stored_name = entry.key.strip_prefix(&self.services_prefix).unwrap_or("");
            let spec = match serde_json::from_slice::<ServiceSpec>(&entry.value) {
                Ok(spec) if spec.service_name().as_str() == stored_name => spec,
                Ok(spec) => {
                    tracing::error!(key = %entry.key, service = %spec.service_name(), "skipping a stored spec filed under another name");
                    continue;
                }
                Err(error) => {
                    tracing::error!(key = %entry.key, %error, "skipping a stored spec that does not validate");
                    continue;
                }
            };
            if self.state.contains_key(spec.service_name()) {
                continue;
            }
            let instances = self
                .registry
                .healthy_instances(&spec.consul_service_name())
                .await?;
            restored.push(Routed { spec, instances });
        }
        if restored.is_empty() {
            return Ok(());
        }
        let mut candidate = self.state.clone();
        for routed in &restored {
            candidate.insert(routed.spec.service_name().clone(), routed.clone());
        }
        if let Err(error) = self.validate_and_apply(candidate).await {
            tracing::error!(%error, "the stored services together do not apply; restoring them one by one");
            for routed in restored {
                let name = routed.spec.service_name().clone();
                let mut candidate = self.state.clone();
                candidate.insert(name.clone(), routed);
                if let Err(error) = self.validate_and_apply(candidate).await {
                    tracing::error!(service = %name, %error, "skipping a stored service HAProxy does not accept");
                }
            }
        }
        tracing::info!(services = self.state.len(), "stored services restored");
        Ok(())
    }

    async fn validate_and_apply(&mut self, candidate: RoutingState) -> Result<(), ProxyError> {
        let config = self.render(&candidate)?;
        self.haproxy
            .validate(&config)
            .await
            .map_err(|error| rejected(error, false))?;
        if let Err(error) = self.haproxy.apply().await {
            self.put_back_live_config().await;
            return Err(ProxyError::Haproxy(error));
        }
        self.commit(candidate);
        Ok(())
    }

    fn render(&self, state: &RoutingState) -> Result<String, RenderError> {
        let routes: Vec<ServiceRoute<'_>> = state
            .values()
            .map(|routed| ServiceRoute {
                spec: &routed.spec,
                instances: &routed.instances,
            })
            .collect();
        self.renderer.render(&self.render_settings, &routes)
    }

    async fn persist(
        &self,
        name: &ServiceName,
        spec: Option<&ServiceSpec>,
    ) -> Result<(), ProxyError> {
        let key = format!("{}{}", self.services_prefix, name);
        match spec {
            Some(spec) => {
                let document = serde_json::to_vec(spec).map_err(|error| {
                    ProxyError::Registry(RegistryError::Decode {
                        request: format!("PUT /v1/kv/{key}"),
                        message: error.to_string(),
                    })
                })?;
                self.registry.kv_put(&key, document).await?;
            }
            None => self.registry.kv_delete(&key).await?,
        }
        Ok(())
    }

    /// Writes the current state's configuration back as the live file after a failed reload,
    /// so the file matches the HAProxy process that kept serving.
    async fn put_back_live_config(&self) {
        match self.render(&self.state) {
            Ok(config) => {
                if let Err(error) = self.haproxy.restore_live_config(&config).await {
                    tracing::error!(%error, "putting back the previous haproxy.cfg failed");
                }
            }
            Err(error) => tracing::error!(%error, "rendering the previous state failed"),
        }
    }

    /// Writes the current state's specs of `names` back to KV (deleting those not routed).
    async fn put_back_stored_specs(&self, names: &[ServiceName]) {
        for name in names {
            let spec = self.state.get(name).map(|routed| &routed.spec);
            if let Err(error) = self.persist(name, spec).await {
                tracing::error!(service = %name, %error, "putting back the stored spec failed");
            }
        }
    }

    fn commit(&mut self, state: RoutingState) {
        self.state = state;
        let specs = self
            .state
            .values()
            .map(|routed| routed.spec.clone())
            .collect();
        self.published.send_replace(Arc::new(specs));
    }
}

fn rejected(error: HaproxyError, caused_by_request: bool) -> ProxyError {
    match error {
        HaproxyError::Rejected(output) if caused_by_request => ProxyError::RejectedRequest(output),
        HaproxyError::Rejected(output) => ProxyError::Rejected(output),
        other => ProxyError::Haproxy(other),
    }
}
