//! The HTTP face of the registry: routing the way Consul's Go mux does (percent-decoding, `301`
//! for unclean paths, `405` with `Allow`), query-meta headers, Consul's plain-text errors, and
//! the handlers for status, agent, catalog, health and KV.
//!
//! Routing is one fallback handler rather than an axum route table because Consul's behaviour
//! depends on the raw path: KV keys may hold any characters, and `//` must redirect.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use serde::Serialize;
use tokio::sync::watch;

use super::blocking::{Blocking, BlockingError};
use super::checks::Runner;
use super::register::{self, RegisterError};
use super::store::{Check, KvEntry, Service, State as RegistryState, Store, PASSING};
use super::Fault;

mod tools;

/// Consul's default `kv_max_value_size`.
pub(crate) const KV_MAX_VALUE_SIZE: usize = 524_288;
/// Bound on agent request bodies (Consul has none; this keeps memory bounded).
const AGENT_MAX_BODY: usize = 8 * 1024 * 1024;
const DATACENTER: &str = "dc1";
const NODE_ADDRESS: &str = "127.0.0.1";
const LEADER: &str = "127.0.0.1:8300";

/// What every handler needs.
pub(crate) struct App {
    pub store: Arc<Store>,
    pub runner: Arc<Runner>,
    /// The node name (the machine's hostname).
    pub node_name: String,
    pub fault: Mutex<Option<Fault>>,
    /// Flips to `true` at shutdown so blocking queries answer at once.
    pub shutdown: watch::Receiver<bool>,
}

/// What the request's token may read under the simulated [`Fault`], and whether it presented
/// one. A list the ACLs filtered carries [`FILTERED_BY_ACLS`]`: true` (Consul 1.11 and later),
/// only when something was left out and only for a token that is not the anonymous one
/// (Consul's `maskResultsFilteredByACLs`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Access {
    /// `node:read`.
    pub nodes: bool,
    /// `service:read`.
    pub services: bool,
    /// A token was given (`X-Consul-Token`, `Authorization: Bearer` or `?token=`).
    pub token: bool,
}

/// Consul's header on a list its ACLs filtered.
pub(crate) const FILTERED_BY_ACLS: &str = "X-Consul-Results-Filtered-By-ACLs";

impl Access {
    fn new(fault: Option<Fault>, token: bool) -> Access {
        let (nodes, services) = match fault {
            Some(Fault::PermissionDenied) => (false, false),
            Some(Fault::ServiceReadDenied) => (true, false),
            Some(Fault::NoLeader) | None => (true, true),
        };
        Access {
            nodes,
            services,
            token,
        }
    }

    /// Whether a service instance (or a catalog or health entry for one) may be read: its node
    /// and its service both.
    pub fn instance(&self) -> bool {
        self.nodes && self.services
    }

    /// Whether a check may be read: its node, and its service unless it is a node check.
    pub fn check(&self, service_name: &str) -> bool {
        self.nodes && (service_name.is_empty() || self.services)
    }

    /// Marks `response` as filtered when `removed` says the ACLs left something out.
    pub fn mark(&self, response: &mut Response, removed: bool) {
        if removed && self.token {
            response
                .headers_mut()
                .insert(FILTERED_BY_ACLS, HeaderValue::from_static("true"));
        }
    }
}

/// Whether the request presents a token, in any of the places Consul reads one from.
fn token_given(request: &Request, params: &Params) -> bool {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let bearer = header("authorization");
    let bearer = bearer.strip_prefix("Bearer ").unwrap_or("").trim();
    !header("x-consul-token").is_empty()
        || !bearer.is_empty()
        || params.get("token").is_some_and(|token| !token.is_empty())
}

/// Builds the router serving the Consul API subset.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new().fallback(dispatch).with_state(app)
}

// ---- errors ---------------------------------------------------------------------------------

/// Every failure a client can see, mapped to Consul's status and plain-text body in one place.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("method {method} not allowed")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("No path to datacenter")]
    NoPathToDatacenter,
    #[error("No cluster leader")]
    NoLeader,
    #[error("404 page not found")]
    NoRoute,
}

impl From<BlockingError> for ApiError {
    fn from(error: BlockingError) -> Self {
        ApiError::BadRequest(error.to_string())
    }
}

impl From<super::store::PersistError> for ApiError {
    fn from(error: super::store::PersistError) -> Self {
        ApiError::Internal(error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::Internal(_) | ApiError::NoPathToDatacenter | ApiError::NoLeader => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.to_string(),
        )
            .into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::MethodNotAllowed { allow, .. } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::NoPathToDatacenter | ApiError::NoLeader => {
                headers.insert("X-Consul-Index", HeaderValue::from_static("1"));
                headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("false"));
                headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
            }
            ApiError::TooLarge(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

// ---- query parameters -----------------------------------------------------------------------

/// The query string as ordered pairs; a bare flag (`?recurse`) has an empty value.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: Option<&str>) -> Params {
        Params(
            query
                .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok())
                .unwrap_or_default(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Go's `url.Values.Encode()`: sorted by key, query-escaped.
    fn encoded(&self) -> String {
        let mut pairs = self.0.clone();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }

    fn blocking(&self) -> Result<Blocking, ApiError> {
        Ok(Blocking::parse(self.get("index"), self.get("wait"))?)
    }

    /// Consul's `parseDC`: only our own datacenter is reachable.
    fn check_dc(&self) -> Result<(), ApiError> {
        match self.get("dc") {
            None | Some("") | Some(DATACENTER) => Ok(()),
            Some(_) => Err(ApiError::NoPathToDatacenter),
        }
    }

    /// Consul's `parseConsistency` conflicts; returns the effective consistency.
    fn consistency(&self) -> Result<&'static str, ApiError> {
        let stale = self.has("stale");
        let consistent = self.has("consistent");
        if stale && consistent {
            return Err(ApiError::BadRequest(
                "Cannot specify ?stale with ?consistent, conflicting semantics.".into(),
            ));
        }
        if self.has("cached") && consistent {
            return Err(ApiError::BadRequest(
                "Cannot specify ?cached with ?consistent, conflicting semantics.".into(),
            ));
        }
        Ok(if stale {
            "stale"
        } else if consistent {
            "consistent"
        } else {
            "leader"
        })
    }
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseUint(text, 10, 64)` with its error text.
fn parse_go_uint(text: &str) -> Result<u64, ApiError> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>().map_err(|_| {
            ApiError::Internal(format!(
                "strconv.ParseUint: parsing {text:?}: value out of range"
            ))
        })
    } else {
        Err(ApiError::Internal(format!(
            "strconv.ParseUint: parsing {text:?}: invalid syntax"
        )))
    }
}

// ---- responses ------------------------------------------------------------------------------

/// Query meta for a read answer.
struct Meta {
    index: u64,
    /// `X-Consul-Effective-Consistency`, set on catalog and health.
    consistency: Option<&'static str>,
}

fn set_meta(response: &mut Response, meta: &Meta) {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&meta.index.max(1).to_string()) {
        headers.insert("X-Consul-Index", value);
    }
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    if let Some(consistency) = meta.consistency {
        headers.insert(
            "X-Consul-Effective-Consistency",
            HeaderValue::from_static(consistency),
        );
    }
}

fn json<T: Serialize>(
    value: &T,
    params: &Params,
    meta: Option<Meta>,
) -> Result<Response, ApiError> {
    let body = if params.has("pretty") {
        let mut out = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
        value
            .serialize(&mut serializer)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        out.push(b'\n');
        out
    } else {
        serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.to_string()))?
    };
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    if let Some(meta) = meta {
        set_meta(&mut response, &meta);
    }
    Ok(response)
}

fn empty_ok() -> Response {
    StatusCode::OK.into_response()
}

fn not_found_with_meta(index: u64) -> Response {
    let mut response = StatusCode::NOT_FOUND.into_response();
    set_meta(
        &mut response,
        &Meta {
            index,
            consistency: None,
        },
    );
    response
}

// ---- paths ----------------------------------------------------------------------------------

/// Percent-decodes a path the way Go's `url.PathUnescape` does.
fn percent_decode(path: &str) -> Result<String, ApiError> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                }
                None => {
                    let bad: String = path[i..].chars().take(3).collect();
                    return Err(ApiError::BadRequest(format!("invalid URL escape {bad:?}")));
                }
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Go's `cleanPath`: collapses `//`, resolves `.`/`..`, keeps a trailing slash.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    let mut cleaned = format!("/{}", parts.join("/"));
    if path.ends_with('/') && cleaned != "/" {
        cleaned.push('/');
    }
    cleaned
}

/// Escapes a decoded path for a `Location` header.
fn escape_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~:@!$&'()*+,;=".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The endpoints served, with what the path carries.
enum Route {
    StatusLeader,
    StatusPeers,
    AgentServices,
    AgentRegister,
    AgentDeregister(String),
    AgentCheck(&'static str, String),
    CatalogServices,
    CatalogService(String),
    HealthService(String),
    Kv(String),
    /// What the Consul tools read (`tools.rs`).
    Tools(tools::ToolRoute),
}

impl Route {
    fn find(path: &str) -> Option<Route> {
        let rest = |prefix: &str| path.strip_prefix(prefix).map(str::to_string);
        Some(match path {
            "/v1/status/leader" => Route::StatusLeader,
            "/v1/status/peers" => Route::StatusPeers,
            "/v1/agent/services" => Route::AgentServices,
            "/v1/agent/service/register" => Route::AgentRegister,
            "/v1/catalog/services" => Route::CatalogServices,
            _ => {
                if let Some(route) = tools::ToolRoute::find(path) {
                    Route::Tools(route)
                } else if let Some(key) = rest("/v1/kv/") {
                    Route::Kv(key)
                } else if let Some(name) = rest("/v1/catalog/service/") {
                    Route::CatalogService(name)
                } else if let Some(name) = rest("/v1/health/service/") {
                    Route::HealthService(name)
                } else if let Some(id) = rest("/v1/agent/service/deregister/") {
                    Route::AgentDeregister(id)
                } else if let Some(id) = rest("/v1/agent/check/pass/") {
                    Route::AgentCheck(super::store::PASSING, id)
                } else if let Some(id) = rest("/v1/agent/check/warn/") {
                    Route::AgentCheck(super::store::WARNING, id)
                } else if let Some(id) = rest("/v1/agent/check/fail/") {
                    Route::AgentCheck(super::store::CRITICAL, id)
                } else {
                    return None;
                }
            }
        })
    }

    /// The `Allow` header value (also the methods accepted besides OPTIONS).
    fn allow(&self) -> &'static str {
        match self {
            Route::Kv(_) => "OPTIONS,GET,PUT,DELETE",
            Route::AgentRegister | Route::AgentDeregister(_) | Route::AgentCheck(..) => {
                "OPTIONS,PUT"
            }
            _ => "OPTIONS,GET",
        }
    }

    fn allows(&self, method: &Method) -> bool {
        self.allow().split(',').any(|m| m == method.as_str())
    }
}

// ---- dispatch -------------------------------------------------------------------------------

async fn dispatch(State(app): State<Arc<App>>, request: Request) -> Response {
    match handle(&app, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// A `301` to `path` (already escaped), keeping the query string.
fn redirect(path: &str, query: Option<&str>) -> Response {
    let mut location = path.to_string();
    if let Some(query) = query {
        location.push('?');
        location.push_str(query);
    }
    let mut response = StatusCode::MOVED_PERMANENTLY.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

async fn handle(app: &App, request: Request) -> Result<Response, ApiError> {
    let path = percent_decode(request.uri().path())?;
    let cleaned = clean_path(&path);
    if cleaned != path {
        return Ok(redirect(&escape_path(&cleaned), request.uri().query()));
    }
    // Go's mux redirects a subtree root without its slash to the subtree.
    if ["/v1/kv", "/v1/catalog/service", "/v1/health/service"].contains(&path.as_str())
        || tools::ToolRoute::SUBTREE_ROOTS.contains(&path.as_str())
    {
        return Ok(redirect(&format!("{path}/"), request.uri().query()));
    }
    let route = Route::find(&path).ok_or(ApiError::NoRoute)?;
    let method = request.method().clone();
    if method == Method::OPTIONS {
        let mut response = empty_ok();
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(route.allow()));
        return Ok(response);
    }
    if !route.allows(&method) {
        return Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow: route.allow(),
        });
    }
    let params = Params::parse(request.uri().query());
    let fault = *app.fault.lock().unwrap_or_else(|e| e.into_inner());
    let access = Access::new(fault, token_given(&request, &params));

    match route {
        Route::StatusLeader => {
            let leader = if fault == Some(Fault::NoLeader) {
                ""
            } else {
                LEADER
            };
            json(&leader, &params, None)
        }
        Route::StatusPeers => json(&[LEADER], &params, None),
        Route::AgentServices => {
            let mut services = app.store.read(|s| {
                s.services
                    .values()
                    .map(|svc| (svc.id.clone(), AgentServiceView::new(svc)))
                    .collect::<BTreeMap<_, _>>()
            });
            let removed = !access.services && !services.is_empty();
            if !access.services {
                services.clear();
            }
            let mut response = json(&services, &params, None)?;
            access.mark(&mut response, removed);
            Ok(response)
        }
        Route::AgentRegister => {
            deny_writes(fault)?;
            let body = read_body(request, AGENT_MAX_BODY, "").await?;
            agent_register(app, &params, &body)
        }
        Route::AgentDeregister(id) => {
            deny_writes(fault)?;
            let removed = app.store.write(|s, index| {
                let removed = s.deregister_service(&id, index);
                let changed = removed.is_some();
                (removed.unwrap_or_default(), changed)
            })?;
            for check_id in removed {
                app.runner.stop(&check_id);
            }
            Ok(empty_ok())
        }
        Route::AgentCheck(status, id) => {
            deny_writes(fault)?;
            agent_check_update(app, &params, status, &id)
        }
        Route::CatalogServices => {
            params.check_dc()?;
            let consistency = params.consistency()?;
            no_leader(fault)?;
            let blocking = params.blocking()?;
            let node_meta_ok = node_meta_matches(&params);
            // The instances are taken under the lock; the answer is built after it is released.
            let (index, instances) = blocking
                .run(
                    &app.store,
                    app.shutdown.clone(),
                    RegistryState::services_table_index,
                    |s| {
                        if node_meta_ok {
                            s.services.values().cloned().collect()
                        } else {
                            Vec::new()
                        }
                    },
                )
                .await;
            let mut services: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for svc in &instances {
                let tags = services.entry(svc.name.as_str()).or_default();
                for tag in &svc.tags {
                    if !tags.contains(&tag.as_str()) {
                        tags.push(tag);
                    }
                }
            }
            let removed = !access.services && !services.is_empty();
            if !access.services {
                services.clear();
            }
            let mut response = json(
                &services,
                &params,
                Some(Meta {
                    index,
                    consistency: Some(consistency),
                }),
            )?;
            access.mark(&mut response, removed);
            Ok(response)
        }
        Route::CatalogService(name) => {
            service_read(app, &params, fault, access, &name, Kind::Catalog).await
        }
        Route::HealthService(name) => {
            service_read(app, &params, fault, access, &name, Kind::Health).await
        }
        Route::Tools(route) => tools::handle(app, &params, fault, access, route).await,
        Route::Kv(key) => {
            params.check_dc()?;
            no_leader(fault)?;
            if fault == Some(Fault::PermissionDenied) {
                return Err(ApiError::Forbidden("Permission denied".into()));
            }
            match method {
                Method::GET => kv_get(app, &params, &key).await,
                Method::PUT => kv_put(app, &params, &key, request).await,
                _ => kv_delete(app, &params, &key),
            }
        }
    }
}

fn no_leader(fault: Option<Fault>) -> Result<(), ApiError> {
    match fault {
        Some(Fault::NoLeader) => Err(ApiError::NoLeader),
        _ => Ok(()),
    }
}

fn deny_writes(fault: Option<Fault>) -> Result<(), ApiError> {
    match fault {
        Some(Fault::PermissionDenied) => Err(ApiError::Forbidden("Permission denied".into())),
        _ => Ok(()),
    }
}

/// `node-meta=key:value` filters against our single node's meta.
fn node_meta_matches(params: &Params) -> bool {
    params.all("node-meta").iter().all(|pair| {
        let (key, value) = pair.split_once(':').unwrap_or((pair, ""));
        key == "consul-network-segment" && value.is_empty()
    })
}

/// Reads a request body up to `limit` bytes; beyond that, Consul's 413 text (with the size when
/// a `Content-Length` announced it). The limit holds for chunked bodies too.
async fn read_body(request: Request, limit: usize, option: &str) -> Result<Bytes, ApiError> {
    let too_large = |size: Option<u64>| {
        let size = size.map(|n| format!("({n} bytes)")).unwrap_or_default();
        let see = if option.is_empty() {
            String::new()
        } else {
            format!(" See https://www.consul.io/docs/agent/options.html#{option}.")
        };
        ApiError::TooLarge(format!(
            "Request body{size} too large, max size: {limit} bytes.{see}"
        ))
    };
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = announced {
        if length > limit as u64 {
            return Err(too_large(Some(length)));
        }
    }
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| too_large(None))
}

// ---- agent ----------------------------------------------------------------------------------

fn agent_register(app: &App, params: &Params, body: &[u8]) -> Result<Response, ApiError> {
    let registration = register::decode(body).map_err(|e| match e {
        RegisterError::BadRequest(message) => ApiError::BadRequest(message),
        RegisterError::ScriptsDisabled => ApiError::Internal(e.to_string()),
    })?;
    let replace = params.has("replace-existing-checks");
    let outcome = app.store.write(|s, index| {
        let outcome = s.register_service(registration.service, registration.checks, replace, index);
        let changed = outcome.is_some();
        (outcome.unwrap_or_default(), changed)
    })?;
    for check_id in outcome.removed {
        app.runner.stop(&check_id);
    }
    for (check_id, definition) in outcome.started {
        app.runner.start(&check_id, &definition);
    }
    Ok(empty_ok())
}

fn agent_check_update(
    app: &App,
    params: &Params,
    status: &'static str,
    check_id: &str,
) -> Result<Response, ApiError> {
    let note = params.get("note").unwrap_or("").to_string();
    let updated = app.store.write(|s, index| {
        let is_ttl = s
            .checks
            .get(check_id)
            .is_some_and(|c| c.definition.kind == super::store::CheckKind::Ttl);
        if !is_ttl {
            return (false, false);
        }
        let changed = s.update_check(check_id, status, note, index) == Some(true);
        (true, changed)
    })?;
    if !updated {
        return Err(ApiError::Internal(format!(
            "CheckID {check_id:?} does not have associated TTL"
        )));
    }
    app.runner.ttl_touched(check_id);
    Ok(empty_ok())
}

// ---- catalog and health ---------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Catalog,
    Health,
}

async fn service_read(
    app: &App,
    params: &Params,
    fault: Option<Fault>,
    access: Access,
    name: &str,
    kind: Kind,
) -> Result<Response, ApiError> {
    params.check_dc()?;
    let consistency = params.consistency()?;
    no_leader(fault)?;
    if name.is_empty() {
        return Err(ApiError::BadRequest("Missing service name".into()));
    }
    let passing = match (kind, params.get("passing")) {
        (Kind::Health, Some("")) => true,
        (Kind::Health, Some(value)) => parse_go_bool(value)
            .ok_or_else(|| ApiError::BadRequest("Invalid value for ?passing".into()))?,
        _ => false,
    };
    let blocking = params.blocking()?;
    let tags: Vec<String> = params
        .all("tag")
        .into_iter()
        .map(str::to_lowercase)
        .collect();
    let node_meta_ok = node_meta_matches(params);
    let node = NodeView::new(app);
    let (index, (body, removed)) = blocking
        .run(
            &app.store,
            app.shutdown.clone(),
            |s| s.service_index(name),
            |s| {
                let tagged = |svc: &&Service| {
                    tags.iter()
                        .all(|tag| svc.tags.iter().any(|t| t.to_lowercase() == *tag))
                };
                if !node_meta_ok {
                    return (serde_json::Value::Array(Vec::new()), false);
                }
                if !access.instance() {
                    // Consul filters by ACL before it drops the instances that are not passing.
                    let removed = s.instances(name).any(|svc| tagged(&svc));
                    return (serde_json::Value::Array(Vec::new()), removed);
                }
                let instances = s.instances(name).filter(tagged);
                let body = match kind {
                    Kind::Catalog => serde_json::to_value(
                        instances
                            .map(|svc| CatalogServiceView::new(&node, svc))
                            .collect::<Vec<_>>(),
                    ),
                    Kind::Health => serde_json::to_value(
                        instances
                            .map(|svc| HealthView::new(&node, s, svc))
                            .filter(|entry| {
                                !passing || entry.checks.iter().all(|c| c.status == PASSING)
                            })
                            .collect::<Vec<_>>(),
                    ),
                };
                (body.unwrap_or_default(), false)
            },
        )
        .await;
    let mut response = json(
        &body,
        params,
        Some(Meta {
            index,
            consistency: Some(consistency),
        }),
    )?;
    access.mark(&mut response, removed);
    if params.has("cached") {
        response
            .headers_mut()
            .insert("X-Cache", HeaderValue::from_static("MISS"));
    }
    Ok(response)
}

// ---- KV -------------------------------------------------------------------------------------

async fn kv_get(app: &App, params: &Params, key: &str) -> Result<Response, ApiError> {
    params.consistency()?;
    let keys = params.has("keys");
    let recurse = params.has("recurse");
    if key.is_empty() && !keys && !recurse {
        return Err(ApiError::BadRequest("Missing key name".into()));
    }
    let blocking = params.blocking()?;
    let shutdown = app.shutdown.clone();
    if keys {
        let separator = params
            .get("separator")
            .or_else(|| params.get("seperator"))
            .unwrap_or("")
            .to_string();
        let (index, list) = blocking
            .run(
                &app.store,
                shutdown,
                |s| s.kv_prefix_index(key),
                |s| {
                    let mut list: Vec<String> = Vec::new();
                    for entry in s.kv_under(key) {
                        let after = &entry.key[key.len()..];
                        let folded = match (separator.is_empty(), after.find(separator.as_str())) {
                            (false, Some(at)) => &entry.key[..key.len() + at + separator.len()],
                            _ => entry.key.as_str(),
                        };
                        if list.last().map(String::as_str) != Some(folded) {
                            list.push(folded.to_string());
                        }
                    }
                    list
                },
            )
            .await;
        if list.is_empty() && !key.is_empty() {
            return Ok(not_found_with_meta(index));
        }
        return json(
            &list,
            params,
            Some(Meta {
                index,
                consistency: None,
            }),
        );
    }
    if recurse {
        // The entries are taken under the lock; their base64 is made after it is released.
        let (index, shared) = blocking
            .run(
                &app.store,
                shutdown,
                |s| s.kv_prefix_index(key),
                |s| s.kv_under_shared(key).cloned().collect::<Vec<_>>(),
            )
            .await;
        let entries: Vec<KvView> = shared.iter().map(|entry| KvView::new(entry)).collect();
        if entries.is_empty() {
            return Ok(not_found_with_meta(index));
        }
        return json(
            &entries,
            params,
            Some(Meta {
                index,
                consistency: None,
            }),
        );
    }
    let (index, entry) = blocking
        .run(
            &app.store,
            shutdown,
            |s| s.kv_key_index(key),
            |s| s.kv.get(key).cloned(),
        )
        .await;
    let Some(entry) = entry else {
        return Ok(not_found_with_meta(index));
    };
    let meta = Meta {
        index,
        consistency: None,
    };
    if params.has("raw") {
        let mut response = if entry.value.is_empty() {
            empty_ok()
        } else {
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "text/plain"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                    (header::CONTENT_SECURITY_POLICY, "sandbox"),
                ],
                entry.value.clone(),
            )
                .into_response()
        };
        set_meta(&mut response, &meta);
        return Ok(response);
    }
    json(&[KvView::new(&entry)], params, Some(meta))
}

async fn kv_put(
    app: &App,
    params: &Params,
    key: &str,
    request: Request,
) -> Result<Response, ApiError> {
    if key.is_empty() {
        return Err(ApiError::BadRequest("Missing key name".into()));
    }
    let flags = params
        .get("flags")
        .map(parse_go_uint)
        .transpose()?
        .unwrap_or(0);
    let cas = params.get("cas").map(parse_go_uint).transpose()?;
    if params.has("cas") && (params.has("acquire") || params.has("release")) {
        return Err(ApiError::BadRequest(format!(
            "Conflicting flags: {}",
            params.encoded()
        )));
    }
    if let Some(session) = params.get("acquire").or_else(|| params.get("release")) {
        return Err(ApiError::Internal(format!("invalid session {session:?}")));
    }
    let value = read_body(request, KV_MAX_VALUE_SIZE, "kv_max_value_size").await?;
    let key = key.to_string();
    let written = app.store.write(|s, index| {
        let written = s.kv_put(&key, value.to_vec(), flags, cas, index);
        (written, written)
    })?;
    json(&written, params, None)
}

fn kv_delete(app: &App, params: &Params, key: &str) -> Result<Response, ApiError> {
    let recurse = params.has("recurse");
    if key.is_empty() && !recurse {
        return Err(ApiError::BadRequest("Missing key name".into()));
    }
    if recurse && params.has("cas") {
        return Err(ApiError::BadRequest(format!(
            "Conflicting flags: {}",
            params.encoded()
        )));
    }
    let cas = params.get("cas").map(parse_go_uint).transpose()?;
    let answer = app
        .store
        .write(|s, index| s.kv_delete(key, recurse, cas, index))?;
    json(&answer, params, None)
}

// ---- wire shapes ----------------------------------------------------------------------------

fn tagged_node_addresses() -> BTreeMap<&'static str, &'static str> {
    ["lan", "lan_ipv4", "wan", "wan_ipv4"]
        .into_iter()
        .map(|k| (k, NODE_ADDRESS))
        .collect()
}

fn node_meta() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([("consul-network-segment", "")])
}

/// The node facts shared by catalog and health answers.
struct NodeView {
    id: String,
    name: String,
    index: u64,
}

impl NodeView {
    fn new(app: &App) -> NodeView {
        let (id, index) = app.store.read(|s| (s.node_id.clone(), s.node_index));
        NodeView {
            id,
            name: app.node_name.clone(),
            index,
        }
    }
}

/// Tagged addresses of a service: explicit ones plus `lan_ipv4`/`wan_ipv4` (or `_ipv6`) derived
/// from its address, as Consul 1.7's agent adds them.
fn service_tagged_addresses(svc: &Service) -> BTreeMap<String, super::store::TaggedAddress> {
    let mut map = BTreeMap::new();
    if !svc.address.is_empty() {
        let suffix = match svc.address.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(_)) => Some("ipv6"),
            Ok(std::net::IpAddr::V4(_)) => Some("ipv4"),
            Err(_) => None,
        };
        if let Some(suffix) = suffix {
            for scope in ["lan", "wan"] {
                map.insert(
                    format!("{scope}_{suffix}"),
                    super::store::TaggedAddress {
                        address: svc.address.clone(),
                        port: svc.port,
                    },
                );
            }
        }
    }
    for (tag, address) in &svc.tagged_addresses {
        map.insert(tag.clone(), address.clone());
    }
    map
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ProxyView {
    mesh_gateway: Empty,
    expose: Empty,
}

const PROXY: ProxyView = ProxyView {
    mesh_gateway: Empty {},
    expose: Empty {},
};

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogServiceView {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: &'static str,
    datacenter: &'static str,
    tagged_addresses: BTreeMap<&'static str, &'static str>,
    node_meta: BTreeMap<&'static str, &'static str>,
    service_kind: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    service_address: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    service_tagged_addresses: BTreeMap<String, super::store::TaggedAddress>,
    service_weights: super::store::Weights,
    service_meta: BTreeMap<String, String>,
    service_port: i64,
    service_enable_tag_override: bool,
    service_proxy: ProxyView,
    service_connect: Empty,
    create_index: u64,
    modify_index: u64,
}

impl CatalogServiceView {
    fn new(node: &NodeView, svc: &Service) -> Self {
        CatalogServiceView {
            id: node.id.clone(),
            node: node.name.clone(),
            address: NODE_ADDRESS,
            datacenter: DATACENTER,
            tagged_addresses: tagged_node_addresses(),
            node_meta: node_meta(),
            service_kind: svc.kind.clone(),
            service_id: svc.id.clone(),
            service_name: svc.name.clone(),
            service_tags: svc.tags.clone(),
            service_address: svc.address.clone(),
            service_tagged_addresses: service_tagged_addresses(svc),
            service_weights: svc.weights.clone(),
            service_meta: svc.meta.clone().unwrap_or_default(),
            service_port: svc.port,
            service_enable_tag_override: svc.enable_tag_override,
            service_proxy: PROXY,
            service_connect: Empty {},
            create_index: svc.create_index,
            modify_index: svc.modify_index,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNodeView {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: &'static str,
    datacenter: &'static str,
    tagged_addresses: BTreeMap<&'static str, &'static str>,
    meta: BTreeMap<&'static str, &'static str>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthServiceView {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    tags: Vec<String>,
    address: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tagged_addresses: BTreeMap<String, super::store::TaggedAddress>,
    meta: Option<BTreeMap<String, String>>,
    port: i64,
    weights: super::store::Weights,
    enable_tag_override: bool,
    proxy: ProxyView,
    connect: Empty,
    create_index: u64,
    modify_index: u64,
}

impl HealthServiceView {
    /// `svc` as Consul's `NodeService` shows it, in health and catalog node answers.
    fn new(svc: &Service) -> Self {
        HealthServiceView {
            id: svc.id.clone(),
            service: svc.name.clone(),
            tags: svc.tags.clone(),
            address: svc.address.clone(),
            tagged_addresses: service_tagged_addresses(svc),
            meta: svc.meta.clone(),
            port: svc.port,
            weights: svc.weights.clone(),
            enable_tag_override: svc.enable_tag_override,
            proxy: PROXY,
            connect: Empty {},
            create_index: svc.create_index,
            modify_index: svc.modify_index,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckView {
    node: String,
    #[serde(rename = "CheckID")]
    check_id: String,
    name: String,
    status: String,
    notes: String,
    output: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    #[serde(rename = "Type")]
    kind: String,
    definition: Empty,
    create_index: u64,
    modify_index: u64,
}

impl CheckView {
    fn serf(node: &NodeView) -> Self {
        CheckView {
            node: node.name.clone(),
            check_id: "serfHealth".into(),
            name: "Serf Health Status".into(),
            status: PASSING.into(),
            notes: String::new(),
            output: "Agent alive and reachable".into(),
            service_id: String::new(),
            service_name: String::new(),
            service_tags: Vec::new(),
            kind: String::new(),
            definition: Empty {},
            create_index: node.index,
            modify_index: node.index,
        }
    }

    fn new(node: &NodeView, check: &Check) -> Self {
        CheckView {
            node: node.name.clone(),
            check_id: check.check_id.clone(),
            name: check.name.clone(),
            status: check.status.clone(),
            notes: check.notes.clone(),
            output: check.output.clone(),
            service_id: check.service_id.clone(),
            service_name: check.service_name.clone(),
            service_tags: check.service_tags.clone(),
            kind: check.definition.kind.type_name().to_string(),
            definition: Empty {},
            create_index: check.create_index,
            modify_index: check.modify_index,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthView {
    node: HealthNodeView,
    service: HealthServiceView,
    checks: Vec<CheckView>,
}

impl HealthView {
    fn new(node: &NodeView, state: &RegistryState, svc: &Service) -> Self {
        let mut checks = vec![CheckView::serf(node)];
        checks.extend(state.checks_of(&svc.id).map(|c| CheckView::new(node, c)));
        HealthView {
            node: HealthNodeView {
                id: node.id.clone(),
                node: node.name.clone(),
                address: NODE_ADDRESS,
                datacenter: DATACENTER,
                tagged_addresses: tagged_node_addresses(),
                meta: node_meta(),
                create_index: node.index,
                modify_index: node.index,
            },
            service: HealthServiceView::new(svc),
            checks,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentServiceView {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
    port: i64,
    address: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tagged_addresses: BTreeMap<String, super::store::TaggedAddress>,
    weights: super::store::Weights,
    enable_tag_override: bool,
}

impl AgentServiceView {
    fn new(svc: &Service) -> Self {
        AgentServiceView {
            id: svc.id.clone(),
            service: svc.name.clone(),
            tags: svc.tags.clone(),
            meta: svc.meta.clone().unwrap_or_default(),
            port: svc.port,
            address: svc.address.clone(),
            tagged_addresses: service_tagged_addresses(svc),
            weights: svc.weights.clone(),
            enable_tag_override: svc.enable_tag_override,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct KvView {
    lock_index: u64,
    key: String,
    flags: u64,
    value: Option<String>,
    create_index: u64,
    modify_index: u64,
}

impl KvView {
    fn new(entry: &KvEntry) -> Self {
        KvView {
            lock_index: 0,
            key: entry.key.clone(),
            flags: entry.flags,
            value: (!entry.value.is_empty())
                .then(|| base64::engine::general_purpose::STANDARD.encode(&entry.value)),
            create_index: entry.create_index,
            modify_index: entry.modify_index,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_clean_like_go() {
        assert_eq!(clean_path("/v1/kv//lead"), "/v1/kv/lead");
        assert_eq!(clean_path("/v1/kv/"), "/v1/kv/");
        assert_eq!(clean_path("/v1/kv/a/../b"), "/v1/kv/b");
        assert_eq!(percent_decode("/v1/kv/a%20b%2Fc").unwrap(), "/v1/kv/a b/c");
        assert!(percent_decode("/v1/kv/%zz").is_err());
    }

    #[test]
    fn go_uint_errors() {
        assert_eq!(
            parse_go_uint("-1").unwrap_err().to_string(),
            "strconv.ParseUint: parsing \"-1\": invalid syntax"
        );
        assert_eq!(parse_go_uint("42").unwrap(), 42);
    }
}
