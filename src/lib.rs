//! flow-proxy: an on-demand control plane for HAProxy, driven by Consul.
//!
//! CI or a deployment script calls `/v1/docker-flow-proxy/reconfigure?serviceName=…&servicePath=…`;
//! flow-proxy reads the service's healthy instances from Consul, renders a complete haproxy.cfg,
//! has a new HAProxy process take over on it (validation and reload in one parse: a config
//! HAProxy refuses never stops the serving process) without dropping a connection, and stores the
//! spec in Consul KV so that any proxy restores every route by itself. HAProxy is the data plane;
//! flow-proxy never proxies traffic itself.
//!
//! # Layout
//!
//! - [`settings`]: every flag, each also read from its environment variable.
//! - [`api`]: the HTTP API (Docker Flow Proxy's endpoints and answers, the certificate
//!   endpoints); who may call it (credentials, loopback only without them, no cross-site
//!   requests); the one place where errors become HTTP status codes.
//! - [`certs`]: TLS certificates as checked values (PEM with a matching key; names, expiry and
//!   fingerprint, never the key).
//! - [`spec`]: service specs and instances as typed, validated values; query parsing. Nothing
//!   reaches haproxy.cfg without passing through these types.
//! - [`spec`]'s `docker_flow`: Docker Flow Proxy's old KV layout → specs, for the one-time import.
//! - [`spec`]'s `proxy_wide`: the proxy-wide values (HAProxy time values, connection mode,
//!   `maxconn`, extra config lines, captured headers) as checked types.
//! - [`proxy`]: the core; owns the routing state and the certificates and applies each change in
//!   order (resolve → render → start the new HAProxy on it → persist → promote → answer) from one
//!   bounded queue, or, when only server slots or map entries change, over HAProxy's Runtime API
//!   without a reload (the instance kept in its slot: `slots`; map entries: `map_changes`),
//!   rendering only the backends such a change touches; the routing state is a persistent map
//!   of shared specs, and what is kept beside it (followed queries, claimed routes) is updated
//!   from the services a change touched only;
//!   restores the stored specs and certificates on start and then follows them, the proxy-wide
//!   settings kept in KV (`<kv-prefix>/settings/`) and the routed services' instances (two
//!   blocking queries that detect changes to checks and to the catalog, then reads of only the
//!   services that changed, after the API changes in flight: `callers`), so every proxy sharing
//!   a Consul converges without calls between proxies, over a few connections to Consul however
//!   many services it routes.
//! - [`render`]: routing state → haproxy.cfg text through the handlebars templates in `templates/`
//!   (and a service's own fragments from `--templates-dir`, read at each render), each frontend
//!   and backend rendered with its own view and cached by it, the server slots of each backend,
//!   and the map files plain path and domain rules are routed through; one service's backends
//!   rendered alone and put in place of their text (`splice`), and where a new plain service's
//!   rules go in the maps of the last complete render (`placement`), so the changes HAProxy takes
//!   at runtime cost no complete render.
//! - [`haproxy`]: validation and seamless reload in one parse, a new process started on the
//!   candidate with `-x`/`-sf` (after checking that the serving process answers and that every
//!   new listening port is free; `haproxy -c` only where nothing serves yet), atomic swaps of the
//!   live file once a change is stored, the map files (changed at runtime too), server slots
//!   changed over the Runtime API (the live files' new text queued to the supervisor, which
//!   writes it before any start from them: `live_files`), the certificate files and crt-list it reads, and supervision
//!   of the HAProxy processes (a dead or hung one is replaced from the last good file; on exit the serving one is left running unless `--stop-haproxy-on-exit`); HAProxy's output
//!   logged at the level it deserves (its lines about flow-proxy's own commands at INFO).
//! - [`limits`]: the open-files limit, raised to the hard limit at start, and the API's answer
//!   when it is reached anyway.
//! - [`memory`]: jemalloc as the process's allocator, and handing freed memory back to the
//!   system after a large render or scrape.
//! - [`registry`]: the Consul client (healthy instances, KV with check-and-set, blocking queries,
//!   ACL token, several addresses; an answer Consul says its ACLs filtered is an error, never the
//!   truth), the rules of blocking-query loops, and the embedded Consul-compatible registry used
//!   when no Consul address is given.
//! - [`observe`]: what flow-proxy has done (each change's outcome, reloads, watches, registry
//!   errors) in one place, read by `GET /metrics`, the structured change log lines and the status
//!   page `GET /`; HAProxy's per-service counters re-exported from `show stat`.
//! - [`acme`]: certificates that get and renew themselves (ACME, HTTP-01 answered through
//!   HAProxy): the account and the challenges in KV, one proxy of the fleet ordering a domain at
//!   a time under a KV lease, the certificates put into the certificate store.
//! - [`cli`]: the command line; the operator subcommands (`render`, `check`, and
//!   `services`/`reconfigure`/`remove` as a client of a running proxy's API). Without a
//!   subcommand the binary runs the proxy.
//!
//! [`FlowProxy::start`] wires them together; [`run`] is what the binary calls.

pub mod acme;
pub mod api;
pub mod certs;
pub mod cli;
pub mod haproxy;
pub mod limits;
pub mod memory;
pub mod observe;
pub mod proxy;
pub mod registry;
pub mod render;
pub mod settings;
pub mod spec;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::haproxy::{Haproxy, HaproxyError, HaproxyPaths, OnExit, STATS_SOCKET_FILE};
use crate::proxy::{Proxy, ProxyParts};
use crate::registry::embedded::{EmbeddedError, EmbeddedRegistry};
use crate::registry::ConsulClient;
use crate::render::{RenderError, RenderSettings, Renderer, StatsSettings, ERROR_PAGE_503};
use crate::settings::Settings;
use crate::spec::{AuthUser, PasswordHash, SpecError, UserName};

/// Directory of HAProxy's error pages in the data directory.
const ERRORS_DIR: &str = "errors";

/// flow-proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be prepared.
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The embedded registry did not start.
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    /// The templates did not load or the empty configuration did not render.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// HAProxy did not start.
    #[error(transparent)]
    Haproxy(#[from] HaproxyError),
    /// `--ca-file` could not be read or holds no certificate.
    #[error(transparent)]
    CaFile(#[from] haproxy::CaFileError),
    /// The API's credentials are unusable.
    #[error(transparent)]
    ApiAccess(#[from] api::AccessError),
    /// The API would listen beyond loopback with nobody asked for credentials.
    #[error(
        "refusing to serve the API on {address} without authentication: anyone who reaches it \
         could change routing. Set --api-token (or --api-token-file) and/or --api-users, listen \
         on a loopback address, or pass --insecure-api to accept the risk"
    )]
    OpenApi { address: SocketAddr },
    /// `--users` or the stats page's settings are unusable (the message never shows a password).
    #[error("{0}")]
    EdgeAuth(#[from] SpecError),
    /// `haproxy -c` refuses the configuration `--extra-global` or `--extra-frontend` make.
    #[error(
        "HAProxy refuses the configuration --extra-global/--extra-frontend (EXTRA_GLOBAL, \
         EXTRA_FRONTEND) produce; fix or remove the line it names:\n{0}"
    )]
    ExtraLines(String),
    /// Only one of `--stats-user` and `--stats-pass` is set.
    #[error("the stats page needs both --stats-user and --stats-pass (or neither, to stay off)")]
    StatsCredentials,
    /// ACME could not start.
    #[error(transparent)]
    Acme(#[from] acme::AcmeError),
    /// The API address could not be bound.
    #[error("API cannot listen on {address}: {source}")]
    ApiBind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// A running flow-proxy: API, proxy core, HAProxy and (optionally) the embedded registry.
pub struct FlowProxy {
    api_address: SocketAddr,
    registry_url: String,
    embedded_registry: Option<EmbeddedRegistry>,
    proxy: Proxy,
    haproxy: Haproxy,
    api_shutdown: oneshot::Sender<()>,
    api_task: JoinHandle<std::io::Result<()>>,
    /// The ACME challenge responder and ordering loop, when `--acme-accept-terms` is given.
    acme: Option<(acme::ChallengeResponder, acme::AcmeManager)>,
}

impl FlowProxy {
    /// Starts everything; returns once HAProxy serves the restored routes and the API listens.
    pub async fn start(settings: Settings) -> Result<FlowProxy, StartError> {
        let (access, api_address) = api_access(&settings)?;
        let render_settings = render_settings(&settings)?;
        let client_ca = settings
            .ca_file
            .as_deref()
            .map(haproxy::ClientCa::read)
            .transpose()?;
        let data_dir = prepare_data_dir(&settings.data_dir).await?;

        let (embedded_registry, consul_addresses) = if settings.consul_address.is_empty() {
            let registry =
                EmbeddedRegistry::start(settings.embedded_registry_address, &data_dir).await?;
            let address = registry.address().to_string();
            tracing::info!(%address, "embedded Consul-compatible registry started");
            (Some(registry), vec![address])
        } else {
            (None, settings.consul_address.clone())
        };
        let registry = ConsulClient::new(
            &consul_addresses,
            settings
                .consul_token
                .as_ref()
                .map(|token| token.expose().to_string()),
        );
        let registry_url = registry.primary_url().to_string();
        let mut render_settings = render_settings;
        let acme_responder = if settings.acme.enabled() {
            settings.acme.check()?;
            let responder =
                acme::ChallengeResponder::start(registry.clone(), &settings.kv_prefix).await?;
            render_settings.acme_challenge = Some(responder.address());
            tracing::info!(directory = settings.acme.directory_url(), responder = %responder.address(), "ACME on");
            Some(responder)
        } else {
            None
        };

        let renderer = Renderer::new(settings.templates_dir.as_deref())?
            .allow_backend_extra(settings.allow_backend_extra);
        let paths = HaproxyPaths::under(&data_dir);
        check_extra_lines(
            &settings.haproxy_binary,
            &paths,
            &renderer,
            &render_settings,
        )
        .await?;
        let on_exit = if settings.stop_haproxy_on_exit {
            OnExit::Stop
        } else {
            OnExit::LeaveRunning
        };
        let haproxy = start_haproxy(
            &settings.haproxy_binary,
            &paths,
            &renderer,
            &render_settings,
            on_exit,
        )
        .await?;

        let proxy = Proxy::start(ProxyParts {
            registry: registry.clone(),
            renderer,
            render_settings,
            haproxy: haproxy.clone(),
            kv_prefix: settings.kv_prefix.clone(),
            watch_instances: settings.watch_instances,
            max_services: settings.max_services,
            change_timeout: std::time::Duration::from_secs(settings.change_timeout.max(1)),
            https: proxy::HttpsOptions {
                port: settings.https_port,
                enable_h2: settings.enable_h2,
            },
            client_ca,
            proxy_wide_flags: settings.proxy_wide.clone(),
            observer: observe::Observer::new(),
        })
        .await;
        let acme = acme_responder.map(|responder| {
            let manager = acme::AcmeManager::start(
                settings.acme.clone(),
                registry,
                proxy.clone(),
                &settings.kv_prefix,
            );
            (responder, manager)
        });

        let listener = tokio::net::TcpListener::bind(api_address)
            .await
            .map_err(|source| StartError::ApiBind {
                address: api_address,
                source,
            })?;
        let api_address = listener
            .local_addr()
            .map_err(|source| StartError::ApiBind {
                address: api_address,
                source,
            })?;
        let (api_shutdown, shutdown_requested) = oneshot::channel::<()>();
        let api_proxy = proxy.clone();
        let authentication = access.describe();
        let api_task = tokio::spawn(async move {
            axum::serve(
                limits::ApiListener::new(listener),
                api::router(api_proxy, access),
            )
            .with_graceful_shutdown(async move {
                let _ = shutdown_requested.await;
            })
            .await
        });
        tracing::info!(%api_address, authentication = %authentication, "flow-proxy API listening");

        Ok(FlowProxy {
            api_address,
            registry_url,
            embedded_registry,
            proxy,
            haproxy,
            api_shutdown,
            api_task,
            acme,
        })
    }

    /// The address the API listens on.
    pub fn api_address(&self) -> SocketAddr {
        self.api_address
    }

    /// The Consul HTTP address flow-proxy uses (the embedded registry's when it runs one).
    pub fn registry_url(&self) -> &str {
        &self.registry_url
    }

    /// Stops the API (letting the calls in flight finish), the proxy core and its watches, the
    /// HAProxy supervisor and the embedded registry, in that order. HAProxy keeps serving unless
    /// `--stop-haproxy-on-exit` was given.
    pub async fn stop(self) {
        let _ = self.api_shutdown.send(());
        match self.api_task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "API server failed"),
            Err(error) => tracing::error!(%error, "API task failed"),
        }
        if let Some((responder, manager)) = self.acme {
            manager.stop().await;
            responder.stop().await;
        }
        self.proxy.stop().await;
        self.haproxy.exit().await;
        if let Some(registry) = self.embedded_registry {
            registry.shutdown().await;
        }
    }
}

/// Everything the templates need besides the services, from the settings (`--users` hashed,
/// the stats page's credentials checked). `flow-proxy render` and `check` use it too, so they
/// render exactly what a running proxy would.
pub fn render_settings(settings: &Settings) -> Result<RenderSettings, StartError> {
    let (users, stats) = edge_auth(settings)?;
    Ok(RenderSettings {
        bind_host: settings.bind_host,
        http_port: settings.http_port,
        // Relative to the data directory, where HAProxy runs: the same routes give the same
        // haproxy.cfg on every machine, wherever its --data-dir is.
        stats_socket: PathBuf::from(STATS_SOCKET_FILE),
        errors_dir: PathBuf::from(ERRORS_DIR),
        https_only: settings.https_only,
        users,
        stats,
        service_domain_algo: settings.service_domain_algo,
        proxy_wide: settings.proxy_wide.proxy_wide(),
        // Set by `FlowProxy::start` once the challenge responder listens.
        acme_challenge: None,
    })
}

/// Every reason these settings would not start, checked without binding or starting anything
/// (for `flow-proxy check`): the API's credentials and address, `--users` and the stats page,
/// `--ca-file`.
pub fn settings_problems(settings: &Settings) -> Vec<StartError> {
    let mut problems = Vec::new();
    if let Err(error) = api_access(settings) {
        problems.push(error);
    }
    if let Err(error) = render_settings(settings) {
        problems.push(error);
    }
    if let Some(path) = settings.ca_file.as_deref() {
        if let Err(error) = haproxy::ClientCa::read(path) {
            problems.push(error.into());
        }
    }
    if let Err(error) = settings.acme.check() {
        problems.push(error.into());
    }
    problems
}

/// Runs flow-proxy until `shutdown` completes, after raising the open-files limit (see
/// [`limits`]).
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    limits::raise_and_log();
    let flow_proxy = FlowProxy::start(settings).await?;
    shutdown.await;
    tracing::info!("shutting down");
    flow_proxy.stop().await;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            () = terminate => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// `--stats-user` or `--stats-pass` with this value turns the stats page off, as in Docker Flow
/// Proxy.
const STATS_OFF: &str = "none";

/// `--users` (hashed now, so no clear password is kept) and the stats page, when both of its
/// credentials are set.
fn edge_auth(settings: &Settings) -> Result<(Vec<AuthUser>, Option<StatsSettings>), StartError> {
    let users = match &settings.users {
        Some(users) if !users.expose().is_empty() => {
            spec::parse_users("--users", users.expose(), settings.users_pass_encrypted)?
        }
        _ => Vec::new(),
    };
    let stats = match (&settings.stats_user, &settings.stats_pass) {
        (None, None) => None,
        // Docker Flow Proxy's way of turning the page off.
        (Some(user), _) if user == STATS_OFF => None,
        (_, Some(pass)) if pass.expose() == STATS_OFF => None,
        (Some(user), Some(pass)) if !user.is_empty() && !pass.expose().is_empty() => {
            Some(StatsSettings {
                port: settings.stats_port.unwrap_or(settings.http_port),
                uri: settings.stats_uri.clone(),
                user: AuthUser::new(
                    UserName::parse("--stats-user", user)?,
                    PasswordHash::of_clear("--stats-pass", pass.expose())?,
                ),
            })
        }
        _ => return Err(StartError::StatsCredentials),
    };
    Ok((users, stats))
}

/// The API's access rules and the address it listens on: `--api-address`, else all addresses
/// when callers must authenticate (or `--insecure-api`), else loopback. Refuses an address beyond
/// loopback that nobody has to authenticate on, unless `--insecure-api`.
fn api_access(settings: &Settings) -> Result<(api::ApiAccess, SocketAddr), StartError> {
    let token = match (&settings.api_token, &settings.api_token_file) {
        (Some(token), _) => Some(token.expose().to_string()),
        (None, Some(path)) => Some(api::ApiAccess::read_token_file(path)?),
        (None, None) => None,
    };
    let access = api::ApiAccess::new(
        token.as_deref(),
        settings.api_users.as_ref().map(|users| users.expose()),
        settings.open_read_endpoints,
        settings.insecure_api,
    )?;
    let open = access.has_credentials() || settings.insecure_api;
    let address = settings.api_address.unwrap_or(if open {
        SocketAddr::from(([0, 0, 0, 0], DEFAULT_API_PORT))
    } else {
        SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT))
    });
    if !open && !address.ip().is_loopback() {
        return Err(StartError::OpenApi { address });
    }
    if !open {
        tracing::warn!(
            "the API has no credentials set (--api-token, --api-users): it listens on {address} \
             and answers only requests to a loopback name"
        );
    } else if !access.has_credentials() {
        tracing::warn!(%address, "--insecure-api: the API has no credentials; anyone who reaches it can change routing");
    }
    Ok((access, address))
}

/// The API's port when `--api-address` is not given (Docker Flow Proxy's).
const DEFAULT_API_PORT: u16 = 8080;

/// Creates the data directory and the error pages HAProxy reads; returns its absolute path.
async fn prepare_data_dir(data_dir: &Path) -> Result<PathBuf, StartError> {
    let data_dir_error = |source| StartError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    };
    tokio::fs::create_dir_all(data_dir.join(ERRORS_DIR))
        .await
        .map_err(data_dir_error)?;
    let data_dir = tokio::fs::canonicalize(data_dir)
        .await
        .map_err(data_dir_error)?;
    tokio::fs::write(data_dir.join(ERRORS_DIR).join("503.http"), ERROR_PAGE_503)
        .await
        .map_err(|source| StartError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
    Ok(data_dir)
}

/// Checks the operator's `--extra-global` and `--extra-frontend` lines with `haproxy -c` (on the
/// empty configuration, which has every section they go into) before anything runs, so a line
/// HAProxy refuses stops flow-proxy with HAProxy's message instead of every later change.
async fn check_extra_lines(
    binary: &Path,
    paths: &HaproxyPaths,
    renderer: &Renderer,
    render_settings: &RenderSettings,
) -> Result<(), StartError> {
    let proxy_wide = &render_settings.proxy_wide;
    if proxy_wide.extra_global.is_empty() && proxy_wide.extra_frontend.is_empty() {
        return Ok(());
    }
    let empty = renderer.render(render_settings, &[])?;
    match haproxy::check_config(binary, paths, &empty).await {
        Ok(()) => Ok(()),
        Err(HaproxyError::Rejected(message)) => Err(StartError::ExtraLines(message)),
        Err(other) => Err(StartError::Haproxy(other)),
    }
}

/// Starts HAProxy with the last good haproxy.cfg when one is on disk (so a restarted flow-proxy
/// keeps serving the routes it had while it restores), else with the empty configuration.
async fn start_haproxy(
    binary: &Path,
    paths: &HaproxyPaths,
    renderer: &Renderer,
    render_settings: &RenderSettings,
    on_exit: OnExit,
) -> Result<Haproxy, StartError> {
    if let Ok(last_good) = tokio::fs::read_to_string(&paths.config).await {
        match Haproxy::start(binary.to_path_buf(), paths.clone(), &last_good, on_exit).await {
            Ok(haproxy) => return Ok(haproxy),
            Err(error) => {
                tracing::warn!(%error, "the last haproxy.cfg does not start; starting empty")
            }
        }
    }
    let empty = renderer.render(render_settings, &[])?;
    Ok(Haproxy::start(binary.to_path_buf(), paths.clone(), &empty, on_exit).await?)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn settings(args: &[&str]) -> Settings {
        Settings::try_parse_from(std::iter::once("flow-proxy").chain(args.iter().copied()))
            .expect("valid flags")
    }

    #[test]
    fn the_api_listens_on_loopback_unless_callers_must_authenticate_or_it_is_told_otherwise() {
        let address = |args: &[&str]| api_access(&settings(args)).map(|(_, address)| address);
        assert_eq!(
            address(&[]).expect("starts"),
            SocketAddr::from(([127, 0, 0, 1], 8080))
        );
        assert_eq!(
            address(&["--api-token", "t"]).expect("starts"),
            SocketAddr::from(([0, 0, 0, 0], 8080))
        );
        assert_eq!(
            address(&["--api-users", "alice:secret"]).expect("starts"),
            SocketAddr::from(([0, 0, 0, 0], 8080))
        );
        assert_eq!(
            address(&["--insecure-api"]).expect("starts"),
            SocketAddr::from(([0, 0, 0, 0], 8080))
        );
        assert_eq!(
            address(&["--api-address", "[::1]:9000"]).expect("starts"),
            "[::1]:9000".parse().expect("address")
        );
        assert!(matches!(
            address(&["--api-address", "0.0.0.0:8080"]),
            Err(StartError::OpenApi { .. })
        ));
        assert!(matches!(
            address(&[
                "--api-address",
                "10.0.0.1:8080",
                "--api-token-file",
                "/nonexistent/token"
            ]),
            Err(StartError::ApiAccess(_))
        ));
    }

    #[test]
    fn the_stats_page_needs_both_credentials_and_none_turns_it_off() {
        let stats = |args: &[&str]| edge_auth(&settings(args)).map(|(_, stats)| stats);
        assert!(stats(&[]).expect("starts").is_none());
        assert!(matches!(
            stats(&["--stats-user", "admin"]),
            Err(StartError::StatsCredentials)
        ));
        assert!(matches!(
            stats(&["--stats-pass", "p"]),
            Err(StartError::StatsCredentials)
        ));
        assert!(stats(&["--stats-user", "none", "--stats-pass", "none"])
            .expect("starts")
            .is_none());
        let on = stats(&[
            "--stats-user",
            "admin",
            "--stats-pass",
            "hunter2",
            "--http-port",
            "81",
        ])
        .expect("starts")
        .expect("on");
        assert_eq!((on.port, on.uri.as_str()), (81, "/admin?stats"));
        assert_eq!(on.user.name().as_str(), "admin");
        assert!(on.user.password().matches("hunter2"));
        assert!(!on.user.password().as_str().contains("hunter2"));
    }

    #[test]
    fn users_flag_is_hashed_and_a_bad_one_is_named_without_its_password() {
        let users = |args: &[&str]| edge_auth(&settings(args)).map(|(users, _)| users);
        let parsed = users(&["--users", "ops:opspass,dev:devpass"]).expect("starts");
        assert_eq!(parsed.len(), 2);
        assert!(parsed[0].password().matches("opspass"));
        let error = users(&["--users", "ops:opspass,dev"]).expect_err("refused");
        let message = error.to_string();
        assert!(
            message.contains("--users") && message.contains("item 2"),
            "{message}"
        );
        assert!(!message.contains("opspass"), "{message}");
    }
}
