//! Service specs: the typed, validated description of how one service is routed.
//!
//! Everything that reaches haproxy.cfg passes through a type of this module, and each type only
//! holds values that matched a strict pattern when it was built ([`values`]). No raw string from
//! a request or from the registry reaches a template.
//!
//! - [`values`]: the validated newtypes (service name, path, domain, port, …).
//! - [`query`](ServiceSpec::from_query): the Docker Flow Proxy query parameters and their parsing.
//! - [`custom_templates`]: `templateFePath`, `templateBePath` and `backendExtra`, the service's
//!   custom fragments and raw backend lines.
//! - `path_rewrite`: versioned services on a shared prefix: `serviceTag` (which instances are
//!   routed) and the path rewrites `stripPath` and `reqPathSearchReplace`.
//! - `backend_tuning`: `balance`, the timeouts, `connectionMode`, compression, `sessionType`
//!   and the health settings (`checkPath`, `checkInterval`, `maxFails`, `observe`) of a service.
//! - `stored`: the JSON shape kept in Consul KV and echoed in answers; reading it back
//!   re-validates everything, because KV can be edited by anyone.
//!
//! Basic-auth passwords are hashed (SHA-512 crypt, [`PasswordHash::of_clear`]) while the query is
//! parsed, so no spec, stored document, answer or log line ever holds a clear one; answers mask
//! even the hashes ([`ServiceSpec::to_answer_json`]).
//!
//! A spec has one or more destinations. A destination is either HTTP (routed by `servicePath`
//! and/or `serviceDomain`, optionally on its own `srcPort`) or TCP (`reqMode=tcp`, a frontend on
//! `srcPort` forwarding everything).

pub mod acme;
mod backend_tuning;
pub mod custom_templates;
mod docker_flow;
mod path_rewrite;
pub mod proxy_wide;
mod query;
mod routing_rules;
mod stored;
pub mod values;

#[cfg(test)]
mod tests;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use backend_tuning::{
    BackendTuning, Balance, Observe, Timeout, DEFAULT_CHECK_INTERVAL, DEFAULT_MAX_FAILS,
};
pub use custom_templates::{BackendExtraLine, CustomTemplates, TemplatePath};
pub use docker_flow::{services_from_docker_flow, DockerFlowService, DOCKER_FLOW_PREFIX};
pub use path_rewrite::{strip_prefix_rule, PathRewrite, SearchReplace, ServiceTag};
pub use values::{
    parse_users, AclName, AuthUser, Domain, DomainAlgo, HeaderLine, HeaderName, HeaderValue,
    HttpMethod, PasswordHash, PathType, Port, RedirectCode, ReqMode, ServiceColor, ServiceName,
    ServicePath, UserName,
};

pub use proxy_wide::{
    CapturedHeader, ConfigLine, ConnectionMode, HaproxyTime, ProxyWideError, TimeUnit, TimeoutName,
};
use query::indexed;
pub use query::IgnoredParameter;
pub use routing_rules::{HeaderMatch, MatchValue, OutboundHost, RoutingRules};
use values::{shown, spec_error, MAX_DOMAIN_LABEL_LEN, MAX_DOMAIN_LEN};

/// Most destinations one service may have (indices run from 0 to 999, but at most this many
/// of them may be used at once).
pub const MAX_DESTINATIONS_PER_SERVICE: usize = 64;

/// Most items in `redirectFromDomain`, `allowedMethods` or `deniedMethods`: each list becomes
/// one HAProxy line, and a line holds at most 64 words.
const MAX_EDGE_LIST_ITEMS: usize = 32;

/// What answers and `/config` show instead of a password hash.
pub const MASKED_PASSWORD: &str = "***";

/// A request parameter that failed validation; the HTTP answer is 400 and names the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter `{parameter}`: {message}")]
pub struct SpecError {
    /// The query parameter (or stored field) at fault, as the user wrote it, e.g. `servicePath.1`.
    pub parameter: String,
    /// What is wrong with it, in words a user can act on.
    pub message: String,
}

/// How one service is routed: the spec stored in KV and echoed in API answers.
///
/// Only [`ServiceSpec::from_query`] and deserialization build one, and both check every value
/// and every rule between values, so a `ServiceSpec` in hand is always renderable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "stored::StoredSpec", into = "stored::StoredSpec")]
pub struct ServiceSpec {
    service_name: ServiceName,
    service_color: Option<ServiceColor>,
    acl_name: Option<AclName>,
    skip_check: bool,
    path_type: PathType,
    /// Sorted by index, indices unique.
    destinations: Vec<Destination>,
    /// Basic-auth users of this service (`users`), passwords hashed; empty: `--users` applies.
    users: Vec<AuthUser>,
    /// Redirect to HTTPS when `X-Forwarded-Proto` is `http` (a load balancer in front
    /// terminates TLS), instead of when the connection itself is plain.
    redirect_when_http_proto: bool,
    /// Header rules, applied in every HTTP destination's backend.
    /// `None` when there is none (most specs), never `Some` of empty rules.
    headers: Option<Box<HeaderRules>>,
    /// `verifyClientSsl`: clients must present a certificate signed by `--ca-file`.
    verify_client_ssl: bool,
    /// `sslVerifyNone`: the instances speak TLS, connected to without verifying their certificate.
    ssl_verify_none: bool,
    /// `serviceDomainAlgo`: how exact domains match; `None`: `--service-domain-algo`.
    service_domain_algo: Option<DomainAlgo>,
    /// `isDefaultBackend`: requests no rule of the main frontend matched go to this service.
    is_default_backend: bool,
    /// `templateFePath`, `templateBePath`, `backendExtra`; `None` when there is none (most
    /// specs), never `Some` of empty ones.
    custom: Option<Box<CustomTemplates>>,
    /// `serviceTag`: only instances carrying every one of these Consul tags are routed.
    service_tag: Vec<ServiceTag>,
    /// Backend tuning: balance, timeouts, connection mode, compression, stickiness, health;
    /// `None` when every value is the default (most specs: with 10,000 routed, an allocation each
    /// adds up), never `Some` of the defaults, so specs compare equal.
    backend_tuning: Option<Box<BackendTuning>>,
    /// `letsEncrypt`: certificates for the exact `serviceDomain`s are ordered over ACME.
    lets_encrypt: bool,
}

/// The header rules of a service (`addReqHeader`, `setReqHeader`, `delReqHeader`,
/// `addResHeader`, `setResHeader`, `delResHeader`), each list in the order given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderRules {
    /// `http-request add-header`: appended to the request sent to the instance.
    pub add_req: Vec<HeaderLine>,
    /// `http-request set-header`: replaces any header of that name in the request.
    pub set_req: Vec<HeaderLine>,
    /// `http-request del-header`: removed from the request.
    pub del_req: Vec<HeaderName>,
    /// `http-response add-header`: appended to the response sent to the client.
    pub add_res: Vec<HeaderLine>,
    /// `http-response set-header`: replaces any header of that name in the response.
    pub set_res: Vec<HeaderLine>,
    /// `http-response del-header`: removed from the response.
    pub del_res: Vec<HeaderName>,
}

impl HeaderRules {
    /// Whether no header rule is set.
    pub fn is_empty(&self) -> bool {
        self.add_req.is_empty()
            && self.set_req.is_empty()
            && self.del_req.is_empty()
            && self.add_res.is_empty()
            && self.set_res.is_empty()
            && self.del_res.is_empty()
    }
}

/// One destination of a service: where requests come from (paths, domains, a source port) and
/// which port of the instances they go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    index: u16,
    service_path: Vec<ServicePath>,
    service_domain: Vec<Domain>,
    /// This destination's own `pathType.N`, if given.
    path_type: Option<PathType>,
    port: Option<Port>,
    src_port: Option<Port>,
    req_mode: ReqMode,
    /// `httpsOnly.N`: plain HTTP requests are redirected to HTTPS.
    https_only: bool,
    /// `httpsRedirectCode.N`: the status of that redirect (default 302).
    https_redirect_code: Option<RedirectCode>,
    /// `redirectFromDomain.N`, `allowedMethods.N`, `deniedMethods.N`, `stripPath.N`,
    /// `reqPathSearchReplace.N`; `None` when none is set (most destinations), never `Some` of
    /// the defaults.
    extras: Option<Box<DestinationExtras>>,
    /// `denyHttp.N`: plain HTTP requests get 403 (only HTTPS reaches the instances).
    deny_http: bool,
    /// `ignoreAuthorization`: no basic auth on this destination, even with `users`/`--users`.
    ignore_authorization: bool,
    /// `servicePathExclude`, `serviceHeader`, `userAgent`, `outboundHostname`; `None` when there
    /// is none (most destinations), never `Some` of empty rules.
    routing: Option<Box<RoutingRules>>,
}

/// The settings of a destination that most destinations leave unset (see
/// `Destination::extras`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct DestinationExtras {
    /// `redirectFromDomain.N`: hosts answered with a 301 to the first `serviceDomain`.
    pub(crate) redirect_from_domain: Vec<Domain>,
    /// `allowedMethods.N`: any other method gets 405.
    pub(crate) allowed_methods: Vec<HttpMethod>,
    /// `deniedMethods.N`: these methods get 405.
    pub(crate) denied_methods: Vec<HttpMethod>,
    /// `stripPath.N`, `reqPathSearchReplace.N`: how the path is rewritten for the instances.
    pub(crate) path_rewrite: PathRewrite,
}

/// `value` boxed, or `None` when it is the default: for the groups of settings most specs leave
/// unset (a spec holds a pointer instead of the whole group).
pub(crate) fn boxed_unless_default<T: Default + PartialEq>(value: T) -> Option<Box<T>> {
    (value != T::default()).then(|| Box::new(value))
}

impl DestinationExtras {
    /// The defaults, for a destination without extras.
    fn none() -> &'static DestinationExtras {
        static NONE: std::sync::LazyLock<DestinationExtras> =
            std::sync::LazyLock::new(DestinationExtras::default);
        &NONE
    }
}

impl ServiceSpec {
    /// Parses a reconfigure query (all pairs, percent-decoded, in request order) into a spec.
    pub fn from_query(pairs: &[(String, String)]) -> Result<ServiceSpec, SpecError> {
        query::build_spec(pairs, None).map(|(spec, _)| spec)
    }

    /// [`ServiceSpec::from_query`] for a service whose spec is `current` now: a clear password
    /// that matches the hash `current` holds for the same user keeps that hash, so repeating a
    /// reconfigure renders the same haproxy.cfg (a new random salt would change it). Also returns
    /// the Docker Flow Proxy parameters that were accepted and ignored, for the answer.
    pub fn from_query_keeping(
        pairs: &[(String, String)],
        current: Option<&ServiceSpec>,
    ) -> Result<(ServiceSpec, Vec<IgnoredParameter>), SpecError> {
        query::build_spec(pairs, current)
    }

    /// The service this spec routes.
    pub fn service_name(&self) -> &ServiceName {
        &self.service_name
    }

    /// The Consul service whose instances back this spec: `<serviceName>` or `<serviceName>-<color>`.
    pub fn consul_service_name(&self) -> String {
        match &self.service_color {
            Some(color) => format!("{}-{}", self.service_name, color.as_str()),
            None => self.service_name.to_string(),
        }
    }

    /// The blue-green color, if any.
    pub fn service_color(&self) -> Option<&ServiceColor> {
        self.service_color.as_ref()
    }

    /// The key that orders this service's rules among equally specific ones: `aclName`, else
    /// the service name.
    pub fn ordering_name(&self) -> &str {
        match &self.acl_name {
            Some(acl) => acl.as_str(),
            None => self.service_name.as_str(),
        }
    }

    /// The `aclName` given, if any.
    pub fn acl_name(&self) -> Option<&AclName> {
        self.acl_name.as_ref()
    }

    /// The custom fragments and raw backend lines (`templateFePath`, `templateBePath`,
    /// `backendExtra`).
    pub fn custom_templates(&self) -> &CustomTemplates {
        static NONE: CustomTemplates = CustomTemplates {
            template_fe_path: None,
            template_be_path: None,
            backend_extra: Vec::new(),
        };
        self.custom.as_deref().unwrap_or(&NONE)
    }

    /// Whether HAProxy should skip health checks on this service's servers.
    pub fn skip_check(&self) -> bool {
        self.skip_check
    }

    /// The service-wide path type (destinations may override it).
    pub fn path_type(&self) -> PathType {
        self.path_type
    }

    /// The destinations, by index.
    pub fn destinations(&self) -> &[Destination] {
        &self.destinations
    }

    /// Whether HTTPS redirects follow `X-Forwarded-Proto: http` instead of the connection.
    pub fn redirect_when_http_proto(&self) -> bool {
        self.redirect_when_http_proto
    }

    /// The header rules applied in every HTTP destination's backend.
    pub fn headers(&self) -> &HeaderRules {
        static NONE: HeaderRules = HeaderRules {
            add_req: Vec::new(),
            set_req: Vec::new(),
            del_req: Vec::new(),
            add_res: Vec::new(),
            set_res: Vec::new(),
            del_res: Vec::new(),
        };
        self.headers.as_deref().unwrap_or(&NONE)
    }

    /// Whether clients must present a certificate signed by `--ca-file` (`verifyClientSsl`).
    pub fn verify_client_ssl(&self) -> bool {
        self.verify_client_ssl
    }

    /// Whether the instances speak TLS, unverified (`sslVerifyNone`).
    pub fn ssl_verify_none(&self) -> bool {
        self.ssl_verify_none
    }

    /// Whether certificates for the service's exact domains are ordered over ACME
    /// (`letsEncrypt`).
    pub fn lets_encrypt(&self) -> bool {
        self.lets_encrypt
    }

    /// The service's `serviceDomain`s over every destination, in destination order, unique.
    pub fn all_service_domains(&self) -> Vec<&Domain> {
        let mut domains: Vec<&Domain> = Vec::new();
        for domain in self
            .destinations
            .iter()
            .flat_map(|d| d.service_domain.iter())
        {
            if !domains.contains(&domain) {
                domains.push(domain);
            }
        }
        domains
    }

    /// The `serviceDomainAlgo` given, if any (else `--service-domain-algo` applies).
    pub fn service_domain_algo(&self) -> Option<DomainAlgo> {
        self.service_domain_algo
    }

    /// Whether requests no rule matched go to this service (`isDefaultBackend=true`).
    pub fn is_default_backend(&self) -> bool {
        self.is_default_backend
    }

    /// Whether some destination forwards to the Consul service's instances (not every one has
    /// an `outboundHostname`): only then are its instances read and watched.
    pub fn uses_registry(&self) -> bool {
        self.destinations
            .iter()
            .any(|d| d.routing().outbound_hostname.is_none())
    }

    /// The Consul tags an instance must carry to be routed (`serviceTag`); empty: every one.
    pub fn service_tag(&self) -> &[ServiceTag] {
        &self.service_tag
    }
    /// The backend tuning (`balance`, timeouts, `connectionMode`, compression, `sessionType`,
    /// health checks).
    pub fn backend_tuning(&self) -> &BackendTuning {
        static DEFAULTS: std::sync::LazyLock<BackendTuning> =
            std::sync::LazyLock::new(BackendTuning::default);
        self.backend_tuning.as_deref().unwrap_or(&DEFAULTS)
    }

    /// The service's own basic-auth users (`users`); empty when it has none.
    pub fn users(&self) -> &[AuthUser] {
        &self.users
    }

    /// The spec as API answers (`/services`, reconfigure) show it: the stored JSON with every
    /// password hash replaced by [`MASKED_PASSWORD`]. A crypt hash is not a password, but it can
    /// be attacked offline, and the read endpoints may be open; only KV and haproxy.cfg hold it.
    pub fn to_answer_json(&self) -> serde_json::Value {
        serde_json::to_value(stored::StoredSpec::masked(self.clone())).unwrap_or_default()
    }

    /// Checks the rules between values and sorts the destinations; every constructor ends here.
    fn checked(mut spec: ServiceSpec) -> Result<ServiceSpec, SpecError> {
        spec.destinations.sort_by_key(|d| d.index);
        if spec.destinations.len() > MAX_DESTINATIONS_PER_SERVICE {
            return Err(spec_error(
                "ServiceDest",
                format!(
                    "{} destinations given: at most {MAX_DESTINATIONS_PER_SERVICE} per service",
                    spec.destinations.len()
                ),
            ));
        }
        if spec.destinations.is_empty() {
            return Err(spec_error(
                "servicePath",
                "at least one destination is required: give servicePath, serviceDomain, or srcPort with reqMode=tcp",
            ));
        }
        for pair in spec.destinations.windows(2) {
            if pair[0].index == pair[1].index {
                return Err(spec_error(
                    "ServiceDest",
                    format!("destination index {} appears twice", pair[0].index),
                ));
            }
        }
        let no_http = spec
            .destinations
            .iter()
            .all(|d| d.req_mode != ReqMode::Http);
        if no_http {
            let headers = spec.headers();
            let set = [
                ("addReqHeader", headers.add_req.is_empty()),
                ("setReqHeader", headers.set_req.is_empty()),
                ("delReqHeader", headers.del_req.is_empty()),
                ("addResHeader", headers.add_res.is_empty()),
                ("setResHeader", headers.set_res.is_empty()),
                ("delResHeader", headers.del_res.is_empty()),
            ];
            if let Some((parameter, _)) = set.iter().find(|(_, empty)| !empty) {
                return Err(spec_error(
                    parameter,
                    "needs an http destination: header rules do not apply to reqMode=tcp or sni",
                ));
            }
        }
        if spec.ssl_verify_none && spec.destinations.iter().any(|d| d.req_mode == ReqMode::Sni) {
            return Err(spec_error(
                "sslVerifyNone",
                "not allowed with reqMode=sni: the client's TLS passes through to the instances \
                 untouched, HAProxy opens no TLS of its own to them",
            ));
        }
        if no_http && spec.custom_templates().template_fe_path.is_some() {
            return Err(spec_error(
                custom_templates::TEMPLATE_FE_PATH,
                "needs an http destination: a reqMode=tcp destination has no frontend rule to \
                 replace (its frontend is only `bind` and `default_backend`)",
            ));
        }
        acme::check_lets_encrypt(&spec)?;
        if spec.verify_client_ssl && spec.all_service_domains().is_empty() {
            return Err(spec_error(
                "verifyClientSsl",
                "needs a serviceDomain: HAProxy asks for a client certificate by the name the \
                 client sends (SNI), so the service must be reached by domain",
            ));
        }
        if spec.verify_client_ssl {
            if spec
                .destinations
                .iter()
                .any(|d| d.req_mode != ReqMode::Http)
            {
                return Err(spec_error(
                    "verifyClientSsl",
                    "applies to http destinations only: client certificates are checked by the \
                     HTTPS frontend, which a reqMode=tcp destination does not pass through",
                ));
            }
            let loose = spec
                .all_service_domains()
                .into_iter()
                .find(|d| d.is_wildcard() && !d.host_pattern().starts_with('.'));
            if let Some(domain) = loose {
                return Err(spec_error(
                    "verifyClientSsl",
                    format!(
                        "cannot ask for a client certificate on serviceDomain {domain}: a TLS \
                         client names one host, so use exact domains or whole-label wildcards \
                         (`*.example.com`)"
                    ),
                ));
            }
        }
        let main_http = spec
            .destinations
            .iter()
            .any(|d| d.req_mode == ReqMode::Http && d.src_port.is_none());
        if spec.is_default_backend && !main_http {
            return Err(spec_error(
                "isDefaultBackend",
                "needs an http destination without srcPort: the default backend takes the \
                 requests of the main HTTP (and HTTPS) frontend that no rule matched",
            ));
        }
        // sni destinations are TCP backends too (balanced without reading HTTP), but their
        // frontend is shared by every sni service of the port, so only reqMode=tcp takes
        // `timeoutClient`.
        let has_tcp_backend = spec
            .destinations
            .iter()
            .any(|d| d.req_mode != ReqMode::Http);
        spec.backend_tuning()
            .check(!no_http, has_tcp_backend, spec.skip_check)?;
        let has_tcp_frontend = spec.destinations.iter().any(|d| d.req_mode == ReqMode::Tcp);
        if spec.backend_tuning().timeout_client.is_some() && !has_tcp_frontend {
            return Err(spec_error(
                "timeoutClient",
                "applies to reqMode=tcp destinations only: an HTTP frontend, and an sni frontend, \
                 is shared by every service on its port",
            ));
        }
        for (position, destination) in spec.destinations.iter().enumerate() {
            destination.check()?;
            destination.path_rewrite().check(
                destination.index,
                destination.req_mode,
                destination.effective_path_type(&spec),
                &destination.service_path,
            )?;
            // Two destinations of one service cannot share a source port unless both are
            // HTTP (then they are simply two rule sets in the same extra frontend).
            let Some(port) = destination.src_port else {
                continue;
            };
            let earlier = spec.destinations[..position]
                .iter()
                .find(|other| other.src_port == Some(port));
            if let Some(other) = earlier {
                let shared = matches!(
                    (other.req_mode, destination.req_mode),
                    (ReqMode::Http, ReqMode::Http) | (ReqMode::Sni, ReqMode::Sni)
                );
                if !shared {
                    return Err(spec_error(
                        &indexed("srcPort", destination.index),
                        format!(
                            "port {port} is already used by destination {} of this service ({}); a tcp frontend needs a port of its own, and an sni port is shared by sni destinations only",
                            other.index,
                            other.req_mode.as_str()
                        ),
                    ));
                }
            }
        }
        Ok(spec)
    }
}

impl Destination {
    /// The destination's index: 0 for unsuffixed parameters, N for `.N`.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The path patterns (may be empty when domains are given, or for TCP).
    pub fn service_path(&self) -> &[ServicePath] {
        &self.service_path
    }

    /// The domains (may be empty: then every domain matches).
    pub fn service_domain(&self) -> &[Domain] {
        &self.service_domain
    }

    /// The `pathType.N` override, if given; see [`Destination::effective_path_type`].
    pub fn path_type_override(&self) -> Option<PathType> {
        self.path_type
    }

    /// The path type this destination's paths are matched with.
    pub fn effective_path_type(&self, spec: &ServiceSpec) -> PathType {
        self.path_type.unwrap_or(spec.path_type)
    }

    /// The port HAProxy connects to on every instance, instead of the registered one.
    pub fn port(&self) -> Option<Port> {
        self.port
    }

    /// The extra frontend port (always set for TCP).
    pub fn src_port(&self) -> Option<Port> {
        self.src_port
    }

    /// HTTP or TCP.
    pub fn req_mode(&self) -> ReqMode {
        self.req_mode
    }

    /// Whether plain HTTP requests of this destination are redirected to HTTPS.
    pub fn https_only(&self) -> bool {
        self.https_only
    }

    /// The `httpsRedirectCode` given, if any; see [`Destination::redirect_code`].
    pub fn https_redirect_code(&self) -> Option<RedirectCode> {
        self.https_redirect_code
    }

    /// The status of this destination's HTTPS redirect: `httpsRedirectCode`, else 302.
    pub fn redirect_code(&self) -> RedirectCode {
        self.https_redirect_code.unwrap_or(RedirectCode::DEFAULT)
    }

    /// Hosts whose requests get a 301 to this destination's first `serviceDomain`.
    pub fn redirect_from_domain(&self) -> &[Domain] {
        &self.extras().redirect_from_domain
    }

    /// The only methods let through (empty: every method).
    pub fn allowed_methods(&self) -> &[HttpMethod] {
        &self.extras().allowed_methods
    }

    /// Methods refused with 405.
    pub fn denied_methods(&self) -> &[HttpMethod] {
        &self.extras().denied_methods
    }

    /// Whether plain HTTP requests are refused with 403.
    pub fn deny_http(&self) -> bool {
        self.deny_http
    }

    /// Whether this destination is exempt from basic auth (`ignoreAuthorization=true`).
    pub fn ignore_authorization(&self) -> bool {
        self.ignore_authorization
    }

    /// `servicePathExclude`, `serviceHeader`, `userAgent` and `outboundHostname`.
    pub fn routing(&self) -> &RoutingRules {
        static NONE: RoutingRules = RoutingRules {
            path_exclude: Vec::new(),
            headers: Vec::new(),
            user_agents: Vec::new(),
            outbound_hostname: None,
        };
        self.routing.as_deref().unwrap_or(&NONE)
    }

    /// How the path is rewritten before the request reaches an instance.
    pub fn path_rewrite(&self) -> &PathRewrite {
        &self.extras().path_rewrite
    }

    fn extras(&self) -> &DestinationExtras {
        self.extras.as_deref().unwrap_or(DestinationExtras::none())
    }

    fn check(&self) -> Result<(), SpecError> {
        let name = |base: &str| indexed(base, self.index);
        self.routing().check(
            self.index,
            self.req_mode == ReqMode::Http,
            !self.service_path.is_empty(),
            self.port.is_some(),
        )?;
        match self.req_mode {
            ReqMode::Tcp | ReqMode::Sni => {
                let mode = self.req_mode.as_str();
                let routed_by = match self.req_mode {
                    ReqMode::Sni => {
                        "sni is routed by srcPort and the TLS server name (serviceDomain)"
                    }
                    _ => "TCP is routed by srcPort only",
                };
                if self.src_port.is_none() {
                    return Err(spec_error(
                        &name("srcPort"),
                        format!("required with reqMode={mode}: the port of the TCP frontend"),
                    ));
                }
                if !self.service_path.is_empty() {
                    return Err(spec_error(
                        &name("servicePath"),
                        format!("not allowed with reqMode={mode} ({routed_by})"),
                    ));
                }
                if self.req_mode == ReqMode::Tcp && !self.service_domain.is_empty() {
                    return Err(spec_error(
                        &name("serviceDomain"),
                        format!("not allowed with reqMode={mode} ({routed_by})"),
                    ));
                }
                if self.req_mode == ReqMode::Sni && self.service_domain.is_empty() {
                    return Err(spec_error(
                        &name("serviceDomain"),
                        "required with reqMode=sni: the TLS server names this destination takes",
                    ));
                }
                if self.path_type.is_some() {
                    return Err(spec_error(
                        &name("pathType"),
                        format!("not allowed with reqMode={mode} ({routed_by})"),
                    ));
                }
                let http_only_rules = [
                    ("httpsOnly", self.https_only),
                    ("httpsRedirectCode", self.https_redirect_code.is_some()),
                    (
                        "redirectFromDomain",
                        !self.redirect_from_domain().is_empty(),
                    ),
                    ("allowedMethods", !self.allowed_methods().is_empty()),
                    ("deniedMethods", !self.denied_methods().is_empty()),
                    ("denyHttp", self.deny_http),
                ];
                if let Some((base, _)) = http_only_rules.iter().find(|(_, set)| *set) {
                    return Err(spec_error(
                        &name(base),
                        format!("not allowed with reqMode={mode} (an HTTP rule; TCP is forwarded as is)"),
                    ));
                }
            }
            ReqMode::Http => {
                if self.service_path.is_empty() && self.service_domain.is_empty() {
                    return Err(spec_error(
                        &name("servicePath"),
                        "an http destination needs servicePath or serviceDomain",
                    ));
                }
                if !self.redirect_from_domain().is_empty() {
                    self.check_redirect_from_domain()?;
                }
                if self.https_only && self.src_port.is_some() {
                    return Err(spec_error(
                        &name("httpsOnly"),
                        format!(
                            "not available with {}: HTTPS serves the main HTTP frontend's routes only, so there is nowhere to redirect to",
                            name("srcPort")
                        ),
                    ));
                }
                // Each list is one HAProxy line, which may hold at most 64 words.
                for (base, len) in [
                    ("redirectFromDomain", self.redirect_from_domain().len()),
                    ("allowedMethods", self.allowed_methods().len()),
                    ("deniedMethods", self.denied_methods().len()),
                ] {
                    if len > MAX_EDGE_LIST_ITEMS {
                        return Err(spec_error(
                            &name(base),
                            format!("too many items: at most {MAX_EDGE_LIST_ITEMS}"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Destination {
    /// `redirectFromDomain` needs an exact first `serviceDomain` to redirect to, and exact
    /// domains to redirect from (none of which is a `serviceDomain` itself, or it would loop).
    fn check_redirect_from_domain(&self) -> Result<(), SpecError> {
        let parameter = indexed("redirectFromDomain", self.index);
        match self.service_domain.first() {
            None => {
                return Err(spec_error(
                    &parameter,
                    format!(
                        "needs {}: requests are redirected to the first serviceDomain",
                        indexed("serviceDomain", self.index)
                    ),
                ))
            }
            Some(target) if target.is_wildcard() => {
                return Err(spec_error(
                    &parameter,
                    format!(
                        "the first {} ({target}) is a wildcard; a redirect needs an exact domain to go to",
                        indexed("serviceDomain", self.index)
                    ),
                ))
            }
            Some(_) => {}
        }
        for from in self.redirect_from_domain() {
            if from.is_wildcard() {
                return Err(spec_error(
                    &parameter,
                    format!("{from} is a wildcard; list exact domains to redirect from"),
                ));
            }
            if self.service_domain.contains(from) {
                return Err(spec_error(
                    &parameter,
                    format!("{from} is also a serviceDomain of this destination: it would redirect to itself"),
                ));
            }
        }
        Ok(())
    }
}

/// The condition of an sni destination's claims: its names are TLS server names, not hosts.
const SNI_CLAIM: &str = "TLS passthrough (reqMode=sni)";

/// One request pattern an HTTP destination claims: a path (with its path type), a domain, or
/// both, on a frontend. Two services may not claim the same one: the second would never see a
/// request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteClaim {
    /// The extra frontend's port; `None` for the main HTTP frontend.
    pub src_port: Option<u16>,
    /// The domain matched, if any.
    pub domain: Option<String>,
    /// The path type and path matched, if any.
    pub path: Option<(&'static str, String)>,
    /// The request headers and user agents also required (`serviceHeader`, `userAgent`), in
    /// canonical text; `None` when the rule has none.
    pub condition: Option<String>,
}

impl RouteClaim {
    /// One text that tells claims apart: the fields joined by newlines, which no validated value
    /// holds. Smaller than the claim itself, for indexing the claims of thousands of services.
    pub fn key(&self) -> Box<str> {
        let (path_type, path) = self
            .path
            .as_ref()
            .map_or(("", ""), |(path_type, path)| (*path_type, path.as_str()));
        format!(
            "{}\n{}\n{path_type}\n{path}\n{}",
            self.src_port.map_or(String::new(), |port| port.to_string()),
            self.domain.as_deref().unwrap_or("\t"),
            self.condition.as_deref().unwrap_or("\t"),
        )
        .into_boxed_str()
    }
}

impl std::fmt::Display for RouteClaim {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some((path_type, path)) => write!(formatter, "{path_type} {path}")?,
            None => formatter.write_str("every path")?,
        }
        if let Some(domain) = &self.domain {
            write!(formatter, " of {domain}")?;
        }
        if let Some(port) = self.src_port {
            write!(formatter, " on port {port}")?;
        }
        if let Some(condition) = &self.condition {
            write!(formatter, " with {condition}")?;
        }
        Ok(())
    }
}

impl ServiceSpec {
    /// Every request pattern this spec's HTTP destinations claim; `main_port` is the main HTTP
    /// frontend's port (a `srcPort` equal to it is the main frontend).
    pub fn route_claims(&self, main_port: u16) -> Vec<RouteClaim> {
        let mut claims = Vec::new();
        for destination in &self.destinations {
            if destination.req_mode == ReqMode::Sni {
                // The TLS server names an sni port passes through: one claim per name.
                let src_port = destination.src_port.map(Port::get);
                claims.extend(destination.service_domain.iter().map(|domain| RouteClaim {
                    src_port,
                    domain: Some(domain.to_string()),
                    path: None,
                    condition: Some(SNI_CLAIM.to_string()),
                }));
                continue;
            }
            if destination.req_mode != ReqMode::Http {
                continue;
            }
            let src_port = destination
                .src_port
                .map(Port::get)
                .filter(|port| *port != main_port);
            let path_type = destination.effective_path_type(self).as_str();
            // The hosts `redirectFromDomain` redirects are taken as well: nobody else would
            // see those requests.
            let domains: Vec<Option<String>> = if destination.service_domain.is_empty() {
                vec![None]
            } else {
                destination
                    .service_domain
                    .iter()
                    .chain(destination.redirect_from_domain())
                    .map(|domain| Some(domain.to_string()))
                    .collect()
            };
            let paths: Vec<Option<(&'static str, String)>> = if destination.service_path.is_empty()
            {
                vec![None]
            } else {
                destination
                    .service_path
                    .iter()
                    .map(|path| Some((path_type, path.as_str().to_string())))
                    .collect()
            };
            let condition = destination.routing().condition_text();
            for domain in &domains {
                for path in &paths {
                    claims.push(RouteClaim {
                        src_port,
                        domain: domain.clone(),
                        path: path.clone(),
                        condition: condition.clone(),
                    });
                }
            }
        }
        claims
    }
}

/// Reads the `serviceName` of a remove query, with the Docker Flow Proxy parameters accepted and
/// ignored (`aclName`, `distribute`, …); every other parameter is rejected.
pub fn service_name_from_query(
    pairs: &[(String, String)],
) -> Result<(ServiceName, Vec<IgnoredParameter>), SpecError> {
    query::remove_service_name(pairs)
}

/// One healthy instance of a service as HAProxy will reach it: a validated address and a port.
///
/// Addresses come from the registry, which anyone can write to, so they are checked as
/// strictly as query parameters: an IPv4 or IPv6 literal (stored in canonical form) or a DNS
/// hostname (stored lowercased).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Instance {
    address: String,
    port: u16,
}

impl Instance {
    /// Validates an address (IPv4, IPv6 or DNS name) and port read from the registry.
    pub fn new(address: &str, port: u16) -> Result<Instance, SpecError> {
        let port = Port::from_number("ServicePort", u32::from(port))?.get();
        if let Ok(ip) = address.parse::<IpAddr>() {
            return Ok(Instance {
                address: ip.to_string(),
                port,
            });
        }
        let hostname_ok = !address.is_empty()
            && address.len() <= MAX_DOMAIN_LEN
            && address.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= MAX_DOMAIN_LABEL_LEN
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !hostname_ok {
            return Err(spec_error(
                "ServiceAddress",
                format!(
                    "{} is neither an IP address nor a DNS hostname (at most {MAX_DOMAIN_LEN} characters, labels of 1 to {MAX_DOMAIN_LABEL_LEN} letters, digits or `-` between dots)",
                    shown(address)
                ),
            ));
        }
        Ok(Instance {
            address: address.to_ascii_lowercase(),
            port,
        })
    }

    /// The instance's address: a canonical IP literal or a lowercased hostname.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The instance's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the address is an IPv6 literal (HAProxy needs it in brackets before a port).
    pub fn is_ipv6(&self) -> bool {
        self.address.contains(':')
    }
}
