//! The proxy core: the one owner of the desired routing state.
//!
//! Every change (reconfigure, remove, reload, restore) goes through one queue and is applied by
//! one task, so changes never interleave. For each change the order is:
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
//! 6. **commit** the candidate as the current state and answer the caller.
//!
//! On start the core restores every spec stored under the prefix. A stored spec that no longer
//! parses or validates is skipped with a loud error; if the registry cannot be read the restore is
//! retried with backoff while HAProxy keeps serving its last good configuration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::haproxy::{Haproxy, HaproxyError};
use crate::registry::{ConsulClient, RegistryError};
use crate::render::{RenderError, RenderSettings, Renderer, ServiceRoute};
use crate::spec::{Instance, ServiceName, ServiceSpec};

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
        let core = Core {
            state: RoutingState::new(),
            registry: parts.registry,
            renderer: parts.renderer,
            render_settings: parts.render_settings,
            haproxy: parts.haproxy,
            services_prefix: format!("{}/services/", parts.kv_prefix.trim_end_matches('/')),
            published,
        };
        let mut core = core;
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
    /// Applies queued changes one at a time; while `restore_backoff` is set, retries the restore.
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
                    let Some(Pending { change, reply }) = pending else { break };
                    let result = self.apply_change(change).await;
                    let _ = reply.send(result);
                }
            }
        }
    }

    async fn apply_change(&mut self, change: Change) -> Result<Option<ServiceSpec>, ProxyError> {
        match change {
            Change::Reconfigure(spec) => {
                let instances = self
                    .registry
                    .healthy_instances(&spec.consul_service_name())
                    .await?;
                let name = spec.service_name().clone();
                let mut candidate = self.state.clone();
                candidate.insert(
                    name.clone(),
                    Routed {
                        spec: spec.clone(),
                        instances,
                    },
                );
                let config = self.render(&candidate)?;
                self.haproxy
                    .validate(&config)
                    .await
                    .map_err(|error| rejected(error, true))?;
                let previous = self.state.get(&name).map(|routed| &routed.spec);
                self.persist(&name, Some(&spec)).await?;
                if let Err(error) = self.haproxy.apply().await {
                    self.roll_back(&name, previous.cloned()).await;
                    return Err(ProxyError::Haproxy(error));
                }
                tracing::info!(service = %name, "service reconfigured");
                self.commit(candidate);
                Ok(Some(spec))
            }
            Change::Remove(name) => {
                let mut candidate = self.state.clone();
                let removed = candidate
                    .remove(&name)
                    .ok_or_else(|| ProxyError::UnknownService(name.clone()))?;
                let config = self.render(&candidate)?;
                self.haproxy
                    .validate(&config)
                    .await
                    .map_err(|error| rejected(error, false))?;
                self.persist(&name, None).await?;
                if let Err(error) = self.haproxy.apply().await {
                    self.roll_back(&name, Some(removed.spec.clone())).await;
                    return Err(ProxyError::Haproxy(error));
                }
                tracing::info!(service = %name, "service removed");
                self.commit(candidate);
                Ok(Some(removed.spec))
            }
            Change::Reload => {
                let mut candidate = self.state.clone();
                for routed in candidate.values_mut() {
                    routed.instances = self
                        .registry
                        .healthy_instances(&routed.spec.consul_service_name())
                        .await?;
                }
                self.validate_and_apply(candidate).await?;
                Ok(None)
            }
        }
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
        self.haproxy.apply().await.map_err(ProxyError::Haproxy)?;
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

    /// Puts back the live file and the stored spec after a reload failed.
    async fn roll_back(&self, name: &ServiceName, previous: Option<ServiceSpec>) {
        let config = match self.render(&self.state) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, "rolling back: rendering the previous state failed");
                return;
            }
        };
        if let Err(error) = self.haproxy.restore_live_config(&config).await {
            tracing::error!(%error, "rolling back: restoring the previous haproxy.cfg failed");
        }
        if let Err(error) = self.persist(name, previous.as_ref()).await {
            tracing::error!(service = %name, %error, "rolling back: restoring the stored spec failed");
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
