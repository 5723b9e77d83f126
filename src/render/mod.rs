//! Rendering: the complete routing state becomes haproxy.cfg text through the handlebars templates.
//!
//! Rust decides *what* goes in (the `view` module: names, order, validated values); the templates in
//! `templates/` decide *how it looks*. The output is a pure function of the settings, the specs
//! and the instances: the same state in any input order gives byte-identical text, so a diff
//! between two versions shows only what changed.
//!
//! # Names
//! - Frontends: `http` (main, on `http_port`), `https` (the main frontend's rules behind TLS on
//!   `https_port`, when certificates exist), `http_<srcPort>` (HTTP destinations with their own
//!   `srcPort`), `tcp_<srcPort>` (`reqMode=tcp`), `sni_<srcPort>` (`reqMode=sni`, shared by every
//!   sni destination on that port).
//! - Backends: `<serviceName>-be<index>`, one per destination, even without instances (then
//!   HAProxy answers 503 with the clean error page).
//! - Pool backends: `pool-1` … `pool-<n>` after every service's HTTP backend, when the caller
//!   keeps a pool ([`BackendPool`]; the proxy core keeps [`pool_floor`] or more): empty backends a new
//!   default plain service takes without a reload (see the `pool` module).
//! - Acls: `path_<backend>`, `domain_<backend>`, `sni_<backend>`, `exclude_<backend>`, `header_<backend>_<n>`,
//!   `agent_<backend>`.
//! - Servers: slots `s1`, `s2`, … (see the `servers` module): a backend fed by instances has
//!   `capacity_for` its instances (the next power of two at or above twice their number, at
//!   least 2) server lines, the spare ones `server s<n> 127.0.0.1:1 [check] disabled`. Which
//!   instance sits in which slot is the caller's choice ([`Renderer::render_slotted`]; the core
//!   keeps an instance in its slot while it lives, so an instance change is a change of slot
//!   contents that the Runtime API applies); otherwise the instances fill the first slots sorted
//!   by (address, port). With `sessionType=sticky-server` the cookie value is the slot name. A
//!   service's `templateBePath` fragment and a `backend.hbs` of `--templates-dir` get the
//!   occupied slots only (they may not write `disabled`). An `outboundHostname` destination has
//!   one server `<host>_<port>`, no slots.
//!
//! # Order of rules in an HTTP frontend
//! HAProxy takes the first `use_backend` that matches, so rules are sorted, most specific first:
//! 1. rules with a `/.well-known…` path (`path`, `path_beg`, `path_dir`), so ACME challenges and
//!    the like are never swallowed by a catch-all;
//! 2. rules with a domain (domain+path before domain only);
//! 3. path-only rules;
//! 4. path-only rules whose only path is `/` (`path_beg`): the catch-alls, last.
//!
//! Within a group: longer paths first (a destination counts by its longest path; `/` counts as
//! 0), then rules that also need request headers or a user agent (`serviceHeader`, `userAgent`)
//! before the same path without them, the most conditions first (each header counts one, the
//! user-agent list one), then exactly matched domains before wildcard ones and those matched by `hdr_beg`, `hdr_end`
//! or `hdr_dom` (`serviceDomainAlgo`), then by `aclName` (default: the service name), then
//! service name, then destination index. A destination with several paths is one rule, placed
//! by its longest path; give paths that need different places their own destination index.
//!
//! *Plain* rules (`path_beg` paths and/or exactly matched domains, nothing else) are routed
//! through map files (`maps/<frontend>-<n>.map`, one map line per run of consecutive plain rules
//! of one kind, at the run's place in the order above; see the `maps` module), so a route change
//! of a plain service is a change of map entries, which HAProxy takes at runtime. The others
//! keep their acls:
//!
//! A rule's `use_backend` needs all of its acls: path, `!exclude_<backend>`
//! (`servicePathExclude`, matched with the rule's path type), domain, `header_<backend>_<n>`
//! (`req.hdr(<name>) -m str <value>`, each required) and `agent_<backend>`
//! (`req.hdr(User-Agent) -m sub -i <agents…>`, any one). An excluded request falls through to the
//! later rules. After every `use_backend`, the main HTTP and HTTPS frontends end with
//! `default_backend` when a service has `isDefaultBackend` (its first HTTP destination without a
//! `srcPort` of its own): the requests no rule matched go there instead of the 503 page.
//!
//! # Outbound destinations
//! A destination with `outboundHostname` has one server, `<host>_<port>` at `<host>:<port>` (its
//! `port`), whatever the Consul instances; HAProxy resolves the name when it loads the config
//! (`init-addr last,libc,none`: a name that does not resolve leaves the server down, answered
//! with 503, until a later reload resolves it).
//!
//! # Edge rules
//! Redirects are `http-request redirect` lines in a frontend, placed before every `use_backend`
//! (a rule with redirects declares its acls there, in rule order; the others keep theirs next
//! to their `use_backend`, so configs without edge rules look as before):
//! - main `http` frontend: `redirectFromDomain` (301 to the first `serviceDomain`, to `https://`
//!   when the destination is HTTPS-only), then the HTTPS redirect of `httpsOnly`, `--https-only`
//!   or `redirectWhenHttpProto` (`scheme https code <httpsRedirectCode, default 302>`, on
//!   `!{ ssl_fc }`, or on `X-Forwarded-Proto: http` with `redirectWhenHttpProto`);
//! - `https` frontend: `redirectFromDomain` only (to `https://`);
//! - `http_<srcPort>` frontends: `redirectFromDomain` only, to `http://<domain>:<srcPort>` (no
//!   HTTPS frontend serves those ports, so `httpsOnly` is refused with `srcPort` and
//!   `--https-only` leaves them alone).
//!
//! Method rules, `denyHttp` and header rules are `http-request`/`http-response` lines in the
//! destination's backend, so they hold on HTTP and HTTPS alike, in this order: `allowedMethods`
//! and `deniedMethods` (`deny deny_status 405`), `denyHttp` (`deny deny_status 403 if !{ ssl_fc }`,
//! 403 as Docker Flow Proxy answered), then request header rules (add, set, del) and response
//! header rules (add, set, del). Header values are written double-quoted.
//!
//! Path rewrites come last among a backend's `http-request` lines (after basic auth, the access
//! rules and the header rules, none of which look at the path), as `http-request replace-path
//! '<regex>' '<format>'` lines, single-quoted: first `stripPath` (one regex over the
//! destination's paths, longest first), then each `reqPathSearchReplace` pair in order. The
//! frontend's rules matched the path the client sent; the instance gets the rewritten one, with
//! the query string kept.
//! # Inside a backend
//! `mode`, `balance`, the backend tuning block (timeouts, `connectionMode`, compression, the
//! stickiness cookie, health checks: its order is in `backend.rs`), basic auth, the edge rules
//! above, then the servers.
//!
//! # Basic auth and the stats page
//! - Userlists: `users` (`--users`), `users_<serviceName>` (a service's own `users`),
//!   `stats_users` (the stats page's one user). They hold crypt(3) hashes only; `/config` shows
//!   them masked ([`masked_config`]).
//! - An HTTP destination's backend asks for credentials (`http-request auth realm <serviceName>
//!   unless { http_auth(<userlist>) }`) from its service's own users, else from `--users`, unless
//!   it has `ignoreAuthorization`; the checked `Authorization` header is then deleted, so the
//!   backend never sees it. Being in the backend, it applies on HTTP and HTTPS alike. TCP
//!   destinations are never under basic auth.
//! - The stats page is the backend `stats` (`stats uri`, `stats http-request auth`). The
//!   frontend whose port is the stats port routes the stats URI to it before any service rule
//!   (`url_beg`); on any other port it gets a frontend `stats` of its own. A TCP `srcPort` equal to
//!   the stats port is a [`RenderError::PortConflict`].
//!
//! # Custom fragments and `backendExtra`
//! A service's `templateFePath` fragment is written instead of each of its HTTP rules' acls and
//! `use_backend` (at the rule's place in the order above; the acls of a rule with redirects
//! stay with its redirects), its `templateBePath` fragment instead of each of its backends.
//! Fragments are read from `--templates-dir` at each render and rendered with the view the
//! shipped fragment gets (see the `custom` module). `backendExtra` lines end each of the
//! service's backends, after its servers.
//!
//! # Proxy-wide settings
//! `maxconn`, the request log (`log stdout format raw local0`) and `--extra-global` lines in
//! `global`; the timeouts, `option <connection mode>` (unless `http-keep-alive`, HAProxy's own
//! default) and `log global` + `option httplog` in the HTTP `defaults`; the timeouts that apply to
//! TCP (connect, client, server, queue) and `option tcplog` in the TCP `defaults`; header
//! captures then `--extra-frontend` lines right after `bind` in the main frontends (`http`,
//! `https`), never in `srcPort` or TCP frontends. See [`ProxyWide`].
//!
//! # Ports
//! A TCP `srcPort` belongs to one destination only; it may not be `http_port` nor an HTTP
//! destination's `srcPort` ([`RenderError::PortConflict`]). HTTP destinations may share a
//! `srcPort` (their rules share the frontend), and an HTTP `srcPort` equal to `http_port` puts
//! the rules in the main frontend. An sni `srcPort` is shared by sni destinations only (of any
//! service): not by HTTP, TCP, the HTTPS frontend nor the stats page. Since one frontend binds
//! it once, the preflight bind check sees one new address however many services share it.
//!
//! # TLS passthrough by SNI
//! A frontend `sni_<srcPort>` (mode tcp) waits up to 5 s for the TLS ClientHello
//! (`tcp-request inspect-delay 5s`, `tcp-request content accept if { req_ssl_hello_type 1 }`),
//! then sends the connection, still encrypted, to the destination whose `serviceDomain` the
//! server name is: `acl sni_<backend> req_ssl_sni -m str -i <names…>` (wildcards:
//! `-m end -i <.suffix…>`), `use_backend`. Rules with exact names only come first, then those
//! with wildcards, longest ending first, then by service name and destination index. A name no
//! destination claims has no backend: HAProxy closes the connection.
//!
//! # Rendering in pieces
//! Each frontend (`http`, `https`, each `http_<srcPort>`) is rendered by `http-frontend.hbs` and
//! each backend by `backend.hbs` (or is its service's `templateBePath` fragment), each with its
//! own view; `haproxy.cfg.hbs` then places their text, in this order: `global`, the HTTP
//! `defaults`, the userlists, the HTTP frontends (`http`, `https`, `http_<srcPort>` by port), the
//! ACME challenge backend, the HTTP backends (by service, then destination index), the stats page,
//! then, when any TCP or SNI frontend exists, the TCP `defaults`, the TCP frontends (by port), the
//! SNI frontends (by port) and the TCP backends. The text of each frontend and backend is kept by
//! the view it was rendered from (the `cache` module), so a change renders again only the pieces
//! whose view it changed; the output is the same as a render from scratch, byte for byte.

mod backend;
mod cache;
mod custom;
pub mod maps;
mod placement;
mod pool;
mod proxy_wide;
mod servers;
mod splice;
mod view;

#[cfg(test)]
mod cache_tests;
#[cfg(test)]
mod placement_tests;
#[cfg(test)]
mod pool_tests;
#[cfg(test)]
mod splice_tests;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex, PoisonError};

use handlebars::Handlebars;
use serde::Serialize;

use crate::spec::{AuthUser, DomainAlgo, Instance, ServiceSpec, MASKED_PASSWORD};

pub use custom::{CustomPolicy, MAX_FRAGMENT_BYTES};
pub use maps::{write_map_files, MapFile, MAPS_DIR};
pub use placement::RoutingIndex;
pub use pool::{pool_backend_name, pool_ceiling, pool_floor, BackendPool, POOL_SIZE, POOL_SLOTS};
pub use proxy_wide::ProxyWide;
pub use servers::{capacity_for, slot_name, ServerSlots, SPARE_ADDRESS};
pub use splice::{CheckedServers, ServiceBackends};

/// The server slots the caller assigned to each service (see the `servers` module); a service
/// without an entry gets its instances packed in order.
pub type SlotsByService<'a> =
    std::collections::BTreeMap<&'a crate::spec::ServiceName, &'a ServerSlots>;

/// The clean 503 page HAProxy serves when no rule matches or a backend has no server; callers
/// write it as `<errors_dir>/503.http` before HAProxy reads the config.
pub const ERROR_PAGE_503: &str = include_str!("../../haproxy/errors/503.http");

/// The main template; the others are partials, registered under their file stem.
const MAIN_TEMPLATE: &str = "haproxy.cfg.hbs";
/// The template of one HTTP frontend (`http`, `https`, `http_<srcPort>`).
const FRONTEND_TEMPLATE: &str = "http-frontend";
/// The template of one backend.
const BACKEND_TEMPLATE: &str = "backend";

/// The HTTP frontend's template file, which writes the map lines.
const FRONTEND_TEMPLATE_FILE: &str = "http-frontend.hbs";

/// Every template file, with its built-in text.
const TEMPLATES: &[(&str, &str)] = &[
    (
        "haproxy.cfg.hbs",
        include_str!("../../templates/haproxy.cfg.hbs"),
    ),
    (
        "http-frontend.hbs",
        include_str!("../../templates/http-frontend.hbs"),
    ),
    ("backend.hbs", include_str!("../../templates/backend.hbs")),
    (
        "rule-acls.hbs",
        include_str!("../../templates/rule-acls.hbs"),
    ),
];

/// Why haproxy.cfg could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A template file could not be read or parsed.
    #[error("template {name}: {message}")]
    Template { name: String, message: String },
    /// Rendering failed (a template used a value the view model does not have).
    #[error("rendering haproxy.cfg failed: {0}")]
    Render(String),
    /// Two destinations want the same port in incompatible ways (two TCP frontends, TCP and
    /// HTTP, or TCP on the HTTP port).
    #[error("port {port} is wanted by both {first} and {second}")]
    PortConflict {
        port: u16,
        first: String,
        second: String,
    },
    /// The same service was passed twice; routing state holds one spec per service.
    #[error("service `{0}` is given twice")]
    DuplicateService(String),
    /// A setting cannot be written into haproxy.cfg safely.
    #[error("setting {setting} = {value:?}: {reason}")]
    Setting {
        setting: &'static str,
        value: String,
        reason: String,
    },
    /// A service's custom fragment (`templateFePath`, `templateBePath`) could not be read or
    /// rendered, or its `backendExtra` is not allowed.
    #[error("service `{service}`, parameter `{parameter}`: {message}")]
    Custom {
        service: String,
        parameter: &'static str,
        message: String,
    },
}

/// Everything the templates need besides the services.
#[derive(Debug, Clone)]
pub struct RenderSettings {
    /// Address the frontends bind to; `None` binds every IPv4 address (`*`).
    pub bind_host: Option<IpAddr>,
    /// Port of the main HTTP frontend.
    pub http_port: u16,
    /// HAProxy's stats socket (admin level, exposes listeners for `-x`). A relative path is
    /// resolved from the directory HAProxy runs in (flow-proxy runs it in the config's directory).
    pub stats_socket: PathBuf,
    /// Directory holding HAProxy's error pages (`503.http`, …); relative like `stats_socket`.
    pub errors_dir: PathBuf,
    /// `--https-only`: every HTTP destination of the main frontend redirects plain HTTP to HTTPS.
    pub https_only: bool,
    /// `--users`: basic auth on every HTTP destination of a service without `users` of its own,
    /// unless the destination has `ignoreAuthorization`. Empty: no global auth.
    pub users: Vec<AuthUser>,
    /// HAProxy's stats page; `None` unless both stats credentials are set.
    pub stats: Option<StatsSettings>,
    /// `--service-domain-algo`: how exact domains match for services without
    /// `serviceDomainAlgo` of their own.
    pub service_domain_algo: DomainAlgo,
    /// `maxconn`, timeouts, connection mode, extra lines, header captures and the request log
    /// (flags, overridden by Consul KV where set).
    pub proxy_wide: ProxyWide,
    /// flow-proxy's ACME challenge responder, when ACME is on: the main HTTP frontend sends
    /// `/.well-known/acme-challenge/…` there ahead of every other rule.
    pub acme_challenge: Option<std::net::SocketAddr>,
}

/// HAProxy's stats page behind basic auth (`--stats-user`, `--stats-pass`, `--stats-uri`,
/// `--stats-port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSettings {
    /// The port it answers on: an HTTP(S) frontend's port (then that frontend routes the URI to
    /// it) or a port of its own.
    pub port: u16,
    /// The URI prefix of the page, e.g. `/admin?stats`; checked before it reaches the config.
    pub uri: String,
    /// The one user allowed to see it.
    pub user: AuthUser,
}

/// The HTTPS frontend, rendered when certificates exist: it serves the main HTTP frontend's
/// rules behind TLS, picking the certificate by SNI from a crt-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Port of the HTTPS frontend.
    pub https_port: u16,
    /// The crt-list file (relative to where HAProxy runs, like `stats_socket`).
    pub crt_list: PathBuf,
    /// Offer HTTP/2 by ALPN (`h2,http/1.1`), else `http/1.1` only.
    pub enable_h2: bool,
}

/// One routed service and its healthy instances.
#[derive(Debug, Clone, Copy)]
pub struct ServiceRoute<'a> {
    /// The service's spec.
    pub spec: &'a ServiceSpec,
    /// The instances to put in its backend(s), in any order (duplicates are dropped).
    pub instances: &'a [Instance],
}

/// Holds the compiled templates, so a reconfigure only renders (templates are parsed once).
pub struct Renderer {
    registry: Handlebars<'static>,
    /// `backend.hbs` comes from `--templates-dir`: backends list their instances only, no
    /// spare slots (see the `servers` module).
    custom_backend_partial: bool,
    /// Whether plain rules go through map files: not when `--templates-dir` replaces
    /// `http-frontend.hbs`, which may not know the map line.
    maps: bool,
    /// Where custom fragments come from and whether `backendExtra` is allowed.
    custom: CustomPolicy,
    /// `haproxy.cfg.hbs` comes from `--templates-dir` (it may write the backends any way it
    /// likes: see the `splice` module).
    custom_main: bool,
    /// The text of each frontend and backend of the last render, by the view it came from.
    pieces: Mutex<cache::PieceCache>,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer").finish_non_exhaustive()
    }
}

impl Renderer {
    /// Loads the templates: each file of `templates_dir` named like a built-in one
    /// (`haproxy.cfg.hbs`, `http-frontend.hbs`, `backend.hbs`, `rule-acls.hbs`) replaces it, the
    /// others stay built in. `haproxy.cfg.hbs` gets each frontend and backend as text (`http`,
    /// `https`, `http_extra`, `http_backends`, `tcp_backends`), rendered by the other two with
    /// their own views. Custom fragments (`templateFePath`, `templateBePath`) are read from
    /// `templates_dir` at each render; without it they are refused. `backendExtra` is refused
    /// until [`Renderer::allow_backend_extra`].
    pub fn new(templates_dir: Option<&Path>) -> Result<Renderer, RenderError> {
        let mut registry = Handlebars::new();
        registry.set_strict_mode(true);
        registry.register_escape_fn(handlebars::no_escape);
        let mut custom_backend_partial = false;
        let mut custom_main = false;
        let templates_dir = templates_dir
            .map(|dir| {
                std::fs::canonicalize(dir).map_err(|error| RenderError::Template {
                    name: dir.display().to_string(),
                    message: error.to_string(),
                })
            })
            .transpose()?;
        let mut maps = true;
        for (file, built_in) in TEMPLATES {
            let text = match &templates_dir {
                None => (*built_in).to_string(),
                Some(dir) => {
                    let path = dir.join(file);
                    match std::fs::read_to_string(&path) {
                        Ok(text) => {
                            tracing::info!(template = %path.display(), "using a template of --templates-dir");
                            custom_backend_partial |= *file == "backend.hbs";
                            custom_main |= *file == MAIN_TEMPLATE;
                            if *file == FRONTEND_TEMPLATE_FILE {
                                tracing::info!("a replaced {FRONTEND_TEMPLATE_FILE}: every rule keeps its acls, none is routed through a map");
                                maps = false;
                            }
                            text
                        }
                        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                            (*built_in).to_string()
                        }
                        Err(error) => {
                            return Err(RenderError::Template {
                                name: path.display().to_string(),
                                message: error.to_string(),
                            })
                        }
                    }
                }
            };
            let parsed = if *file == MAIN_TEMPLATE {
                registry.register_template_string(file, text)
            } else {
                let stem = file.trim_end_matches(".hbs");
                registry.register_partial(stem, text)
            };
            parsed.map_err(|error| RenderError::Template {
                name: (*file).to_string(),
                message: error.to_string(),
            })?;
        }
        Ok(Renderer {
            registry,
            custom_backend_partial,
            custom_main,
            maps,
            custom: CustomPolicy::new(templates_dir, false),
            pieces: Mutex::new(cache::PieceCache::default()),
        })
    }

    /// Accepts (`true`) or refuses `backendExtra` (`--allow-backend-extra`).
    pub fn allow_backend_extra(mut self, allow: bool) -> Renderer {
        self.custom.set_allow_backend_extra(allow);
        self
    }

    /// What this renderer allows of custom fragments and `backendExtra`, for checking a request
    /// before it is queued.
    pub fn custom_policy(&self) -> CustomPolicy {
        self.custom.clone()
    }

    /// Renders the complete haproxy.cfg for these services (in any order), without HTTPS.
    pub fn render(
        &self,
        settings: &RenderSettings,
        services: &[ServiceRoute<'_>],
    ) -> Result<String, RenderError> {
        self.render_with_tls(settings, services, None)
    }

    /// Renders the complete haproxy.cfg for these services, with the HTTPS frontend `tls`
    /// describes when given. The text only: HAProxy also needs the map files it names
    /// ([`Renderer::render_with_maps`]).
    pub fn render_with_tls(
        &self,
        settings: &RenderSettings,
        services: &[ServiceRoute<'_>],
        tls: Option<&TlsSettings>,
    ) -> Result<String, RenderError> {
        Ok(self.render_with_maps(settings, services, tls)?.config)
    }

    /// Renders the complete haproxy.cfg for these services and the map files its map lines
    /// read (see the `maps` module), with the HTTPS frontend `tls` describes when given.
    pub fn render_with_maps(
        &self,
        settings: &RenderSettings,
        services: &[ServiceRoute<'_>],
        tls: Option<&TlsSettings>,
    ) -> Result<Rendered, RenderError> {
        self.render_slotted(
            settings,
            services,
            tls,
            &SlotsByService::new(),
            &BackendPool::none(),
        )
    }

    /// [`Renderer::render_with_maps`] with the services' server slots as the caller assigned
    /// them (the proxy core keeps each instance in its slot; see the `servers` module) and the
    /// pool backends of `pool` (see the `pool` module).
    pub fn render_slotted(
        &self,
        settings: &RenderSettings,
        services: &[ServiceRoute<'_>],
        tls: Option<&TlsSettings>,
        slots: &SlotsByService<'_>,
        pool: &BackendPool,
    ) -> Result<Rendered, RenderError> {
        for route in services {
            self.custom
                .check_backend_extra(route.spec)
                .map_err(|message| RenderError::Custom {
                    service: route.spec.service_name().to_string(),
                    parameter: crate::spec::custom_templates::BACKEND_EXTRA,
                    message,
                })?;
        }
        let (mut text, maps, checked, routing) =
            self.render_views(settings, services, tls, slots, pool)?;
        if text.len() >= LARGE_CONFIG_BYTES {
            crate::memory::release_freed_memory();
        }
        // HAProxy 2.6 rejects a file whose last line has no newline.
        if !text.ends_with('\n') {
            text.push('\n');
        }
        Ok(Rendered {
            config: text,
            maps,
            checked,
            routing: Arc::new(routing),
        })
    }

    /// Builds the views, renders the pieces (or takes them from the cache) and places them;
    /// the text and the map files it reads.
    fn render_views(
        &self,
        settings: &RenderSettings,
        services: &[ServiceRoute<'_>],
        tls: Option<&TlsSettings>,
        slots: &SlotsByService<'_>,
        pool: &BackendPool,
    ) -> Result<(String, Vec<MapFile>, CheckedServers, RoutingIndex), RenderError> {
        let mut view = view::build(settings, services, tls, slots, pool)?;
        if self.custom_backend_partial {
            view.drop_spare_servers();
        }
        let checked = view.relax_strict_limits_for_spare_slots(&settings.proxy_wide);
        if self.maps {
            view.route_plain_rules_through_maps(settings);
        }
        view.render_custom(|fragment, data| self.render_fragment(fragment, data))?;
        let mut pieces = self.lock_pieces();
        let rendered = self.render_pieces(&mut pieces, &view)?;
        let text = self
            .registry
            .render(MAIN_TEMPLATE, &rendered.main_view(&view.layout))
            .map_err(|error| RenderError::Render(error.to_string()))?;
        pieces.finish_render();
        let routing = std::mem::take(&mut view.routing);
        Ok((text, view.take_maps(), checked, routing))
    }

    /// The piece cache (a render that panicked half-way left only whole pieces in it).
    fn lock_pieces(&self) -> std::sync::MutexGuard<'_, cache::PieceCache> {
        self.pieces.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A configuration this long (a few hundred services) leaves megabytes of freed views and JSON
/// behind its render.
const LARGE_CONFIG_BYTES: usize = 256 * 1024;

impl Renderer {
    /// Renders each frontend and backend with its own view (a backend with a `templateBePath`
    /// fragment is that fragment's text), taking the text of an unchanged one from `cache`.
    fn render_pieces(
        &self,
        cache: &mut cache::PieceCache,
        view: &view::ConfigView,
    ) -> Result<RenderedPieces, RenderError> {
        let mut frontend = |frontend: &view::FrontendView| {
            cache.piece(FRONTEND_TEMPLATE, frontend, || {
                self.render_piece(FRONTEND_TEMPLATE, frontend)
            })
        };
        let http = frontend(&view.http)?;
        let https = view.https.as_ref().map(&mut frontend).transpose()?;
        let http_extra = view
            .http_extra
            .iter()
            .map(&mut frontend)
            .collect::<Result<_, _>>()?;
        let mut backend = |backend: &view::BackendView| match backend.custom_text() {
            Some(custom) => Ok(Arc::from(custom)),
            None => cache.piece(BACKEND_TEMPLATE, backend, || {
                self.render_piece(BACKEND_TEMPLATE, backend)
            }),
        };
        let http_backends = view
            .http_backends
            .iter()
            .map(&mut backend)
            .collect::<Result<_, _>>()?;
        let tcp_backends = view
            .tcp_backends
            .iter()
            .map(&mut backend)
            .collect::<Result<_, _>>()?;
        Ok(RenderedPieces {
            http,
            https,
            http_extra,
            http_backends,
            tcp_backends,
        })
    }

    /// One frontend or backend: `template` rendered with its own view alone.
    fn render_piece(&self, template: &str, view: &impl Serialize) -> Result<String, RenderError> {
        self.registry
            .render(template, view)
            .map_err(|error| RenderError::Render(error.to_string()))
    }

    /// How many frontends and backends this renderer has rendered rather than found unchanged.
    #[cfg(test)]
    fn rendered_pieces(&self) -> u64 {
        self.pieces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .misses()
    }

    /// How many rendered frontends and backends this renderer keeps.
    #[cfg(test)]
    fn kept_pieces(&self) -> usize {
        self.pieces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The rendered frontends and backends of one configuration, in the order of the view.
struct RenderedPieces {
    http: Arc<str>,
    https: Option<Arc<str>>,
    http_extra: Vec<Arc<str>>,
    http_backends: Vec<Arc<str>>,
    tcp_backends: Vec<Arc<str>>,
}

impl RenderedPieces {
    /// The main template's view: `layout` and these pieces, each without its last newline (the
    /// main template writes each `{{this}}` on a line of its own).
    fn main_view<'a>(&'a self, layout: &'a view::LayoutView) -> MainView<'a> {
        let line = |piece: &'a Arc<str>| -> &'a str { piece.strip_suffix('\n').unwrap_or(piece) };
        MainView {
            layout,
            http: line(&self.http),
            https: self.https.as_ref().map(line),
            http_extra: self.http_extra.iter().map(line).collect(),
            http_backends: self.http_backends.iter().map(line).collect(),
            tcp_backends: self.tcp_backends.iter().map(line).collect(),
        }
    }
}

/// What `haproxy.cfg.hbs` renders with: the layout's values, and the text of each frontend and
/// backend.
#[derive(Serialize)]
struct MainView<'a> {
    #[serde(flatten)]
    layout: &'a view::LayoutView,
    http: &'a str,
    https: Option<&'a str>,
    http_extra: Vec<&'a str>,
    http_backends: Vec<&'a str>,
    tcp_backends: Vec<&'a str>,
}

/// A rendered configuration: haproxy.cfg's text and the map files (in [`MAPS_DIR`]) it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// haproxy.cfg.
    pub config: String,
    /// The map files, by name.
    pub maps: Vec<MapFile>,
    /// Its health-checked server lines (see the `splice` module).
    pub checked: CheckedServers,
    /// Where its main frontends' rules went (see the `placement` module).
    pub routing: Arc<RoutingIndex>,
}

impl Renderer {
    /// Reads a custom fragment from disk and renders it with `data` (the view of the rule or
    /// backend it replaces); its text without trailing blank lines.
    fn render_fragment(
        &self,
        fragment: &view::CustomFragment,
        data: &serde_json::Value,
    ) -> Result<String, RenderError> {
        let error = |message: String| RenderError::Custom {
            service: fragment.service.clone(),
            parameter: fragment.parameter,
            message,
        };
        let text = self.custom.read(&fragment.path).map_err(error)?;
        let rendered = self.registry.render_template(&text, data).map_err(|why| {
            error(format!(
                "`{}` does not render: {why}",
                fragment.path.as_str()
            ))
        })?;
        Ok(rendered.trim_end().to_string())
    }
}

/// haproxy.cfg as `/config` shows it: the password hash of every `user <name> password <hash>`
/// line of a `userlist` replaced by [`MASKED_PASSWORD`]; every other line unchanged.
pub fn masked_config(config: &str) -> String {
    let mut masked = String::with_capacity(config.len());
    for line in config.split_inclusive('\n') {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["user", name, "password" | "insecure-password", _, ..] => {
                let indent = &line[..line.len() - line.trim_start().len()];
                masked.push_str(&format!("{indent}user {name} password {MASKED_PASSWORD}\n"));
            }
            _ => masked.push_str(line),
        }
    }
    masked
}
