//! The view model: what goes into haproxy.cfg, in which order and under which names.
//!
//! The templates only lay these values out; every decision is made here, from validated spec
//! types, so a template can never receive a raw user string. See the parent module's doc for
//! the ordering rules.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::backend::{tcp_timeout_client, tuning_view, BackendTuningView};
use super::maps::{route_through_maps, MapFile, MapRouteView, MapRouting, PlainRoute, Routed};
use super::placement::{FrontendIndex, PlacedRule, RoutingIndex};
use super::pool::{free_pool_spec, pool_backend_name, BackendPool, POOL_SLOTS};
use super::servers::{server_views, ServerSlots, ServerView};
use super::splice::CheckedServers;
use super::{
    RenderError, RenderSettings, ServiceRoute, SlotsByService, StatsSettings, TlsSettings,
};
use crate::spec::custom_templates::{TEMPLATE_BE_PATH, TEMPLATE_FE_PATH};
use crate::spec::{
    strip_prefix_rule, AuthUser, Destination, DomainAlgo, HeaderLine, HeaderName, Instance,
    PathType, ReqMode, ServiceSpec, TemplatePath,
};

/// The userlist of `--users`; a service's own is `users_<serviceName>`, so they never clash.
const GLOBAL_USERLIST: &str = "users";
/// The userlist of the stats page's one user.
const STATS_USERLIST: &str = "stats_users";
/// The backend (and, on a port of its own, the frontend) serving HAProxy's stats page; service
/// backends always end in `-be<index>`, so it clashes with none.
const STATS_PROXY: &str = "stats";

/// The whole configuration: the frontends and backends, each rendered with its own template and
/// view (see the parent module's `render_pieces`), and the rest of the main template's view.
#[derive(Debug)]
pub(super) struct ConfigView {
    /// What the main template sees besides the rendered frontends and backends.
    pub(super) layout: LayoutView,
    /// The main HTTP frontend on `http_port`.
    pub(super) http: FrontendView,
    /// The HTTPS frontend: the main frontend's rules behind TLS, when certificates exist.
    pub(super) https: Option<FrontendView>,
    /// Extra HTTP frontends, one per HTTP `srcPort`, by port.
    pub(super) http_extra: Vec<FrontendView>,
    /// Backends of HTTP destinations, by service then destination index.
    pub(super) http_backends: Vec<BackendView>,
    /// Backends of TCP destinations, by service then destination index.
    pub(super) tcp_backends: Vec<BackendView>,
    /// The keys of the main frontends' rules (`http`, `https`), in their order.
    pub(super) main_keys: Vec<RuleKey>,
    /// Where the main frontends' rules went when routed through maps.
    pub(super) routing: RoutingIndex,
}

/// The main template's view besides the frontends and backends.
#[derive(Debug, Serialize)]
pub(super) struct LayoutView {
    stats_socket: String,
    error_503: String,
    /// TCP frontends, by port.
    tcp_frontends: Vec<TcpFrontendView>,
    /// SNI frontends (`reqMode=sni`), by port.
    sni_frontends: Vec<SniFrontendView>,
    /// Whether any TCP or SNI frontend needs the tcp defaults section.
    tcp_defaults: bool,
    /// Basic-auth userlists: `--users`, then each service's own by service name, then the stats
    /// page's.
    userlists: Vec<UserlistView>,
    /// HAProxy's stats page, when both stats credentials are set.
    stats: Option<StatsView>,
    /// `maxconn`, timeouts, connection mode, request log, extra `global` lines.
    proxy_wide: super::proxy_wide::ProxyWideView,
    /// The backend answering ACME HTTP-01 challenges, when ACME is on.
    acme_challenge: Option<AcmeChallengeView>,
    /// The map files the frontends' map lines read (see the `maps` module).
    #[serde(skip)]
    maps: Vec<MapFile>,
    /// `no strict-limits` in `global` (see [`ConfigView::relax_strict_limits_for_spare_slots`]).
    no_strict_limits: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct FrontendView {
    name: String,
    bind: String,
    /// `X-Forwarded-Proto` sent to the backends, when this frontend sets it.
    forwarded_proto: Option<&'static str>,
    /// The stats page's URI, when this frontend's port is the stats port: requests starting
    /// with it go to the stats backend before any service rule.
    stats_uri: Option<String>,
    rules: Vec<RuleView>,
    /// `default_backend`: the backend of the `isDefaultBackend` service, for requests no rule
    /// matched (main HTTP and HTTPS frontends only).
    default_backend: Option<String>,
    /// Proxy-wide lines of the main frontends (header captures, `--extra-frontend`), after
    /// `bind`; empty in the other frontends.
    main_lines: Vec<String>,
    /// The ACME challenge backend, on the main HTTP frontend when ACME is on: its requests pass
    /// every other `http-request` rule (redirects, auth) and go there ahead of every service.
    acme_challenge: Option<&'static str>,
    /// The `http-request set-var` line host+path map keys need, when a map segment has them.
    map_path_var: Option<String>,
}

/// A `userlist` section: user names with crypt(3) hashes, never clear passwords.
#[derive(Debug, Serialize)]
struct UserlistView {
    name: String,
    users: Vec<UserView>,
}

#[derive(Debug, Serialize)]
struct UserView {
    name: String,
    password: String,
}

/// Basic auth in front of one backend: a 401 with `realm` unless the credentials match a user of
/// `userlist`; the checked `Authorization` header is then removed before the backend sees it.
#[derive(Debug, Serialize)]
struct AuthView {
    realm: String,
    userlist: String,
}

/// The stats backend and, when the stats port is no HTTP frontend's, its own frontend.
#[derive(Debug, Serialize)]
struct StatsView {
    name: &'static str,
    uri: String,
    userlist: &'static str,
    /// The `bind` of its own frontend, when it has one.
    bind: Option<String>,
}

/// The acls and `use_backend` of one HTTP destination.
#[derive(Debug, Clone, Serialize)]
pub(super) struct RuleView {
    backend: String,
    path_acl: Option<PathAclView>,
    domain_acl: Option<DomainAclView>,
    /// Redirects of this destination in this frontend, in order. When there are any, the
    /// template declares the rule's acls with them, in the frontend's redirect block before
    /// every `use_backend` (HAProxy runs `http-request` rules before choosing a backend).
    redirects: Vec<RedirectView>,
    /// The hosts `redirectFromDomain` answers, when this frontend redirects them.
    from_domain_acl: Option<FromDomainAclView>,
    /// `servicePathExclude`, `serviceHeader` and `userAgent` acls.
    routing_acls: RoutingAclsView,
    /// The words after `if` of the `use_backend` line: every acl of the rule, the exclusion
    /// negated.
    condition: Vec<String>,
    /// The service the rule routes to (for custom fragments).
    service: String,
    /// `templateFePath`: written instead of the rule's acls and `use_backend` (see
    /// [`ConfigView::render_custom`]).
    #[serde(skip)]
    fragment: Option<CustomFragment>,
    has_custom: bool,
    custom: String,
    /// Set on the first rule of a map segment: the template writes the segment's one map line
    /// instead of this rule's acls and `use_backend` (the segment's other rules are left out of
    /// the list; see the `maps` module).
    map: Option<MapRouteView>,
}

/// One `http-request redirect <target> code <code> if <condition>` line.
#[derive(Debug, Clone, Serialize)]
struct RedirectView {
    /// `scheme https` or `prefix <scheme>://<domain>`.
    target: String,
    code: u16,
    /// The words after `if`: acl names and anonymous acls.
    condition: Vec<String>,
}

/// `acl from_domain_<backend> …`: the exact hosts `redirectFromDomain` lists.
#[derive(Debug, Clone, Serialize)]
struct FromDomainAclView {
    name: String,
    domains: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct PathAclView {
    name: String,
    /// The HAProxy fetch, e.g. `path_beg`.
    fetch: &'static str,
    patterns: Vec<String>,
}

/// Host matches (the Host header without its `:port`, case-insensitive): exact domains in one
/// acl line (matched as `serviceDomainAlgo` says), wildcard endings in a second line of the
/// same acl (HAProxy ORs them).
#[derive(Debug, Clone, Serialize)]
struct DomainAclView {
    name: String,
    /// HAProxy's match method for `exact`: `str`, `beg`, `end` or `dom`.
    exact_match: &'static str,
    exact: Vec<String>,
    suffix: Vec<String>,
}

#[derive(Debug, Serialize)]
struct TcpFrontendView {
    #[serde(skip)]
    port: u16,
    name: String,
    bind: String,
    backend: String,
    /// `timeoutClient` of the service (backend tuning).
    timeout_client: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct BackendView {
    pub(super) name: String,
    mode: &'static str,
    /// `http-request`/`http-response` rules of the destination, in the order HAProxy runs them.
    http_rules: Vec<BackendRuleView>,
    auth: Option<AuthView>,
    /// `http-request replace-path` rules (`stripPath`, then `reqPathSearchReplace`), in order.
    path_rewrites: Vec<PathRewriteView>,
    pub(super) servers: Vec<ServerView>,
    /// `backendExtra` lines, at the bottom of the backend.
    extra: Vec<String>,
    /// The service the backend belongs to (for custom fragments).
    service: String,
    /// `templateBePath`: written instead of the whole backend (see
    /// [`ConfigView::render_custom`]).
    #[serde(skip)]
    fragment: Option<CustomFragment>,
    has_custom: bool,
    custom: String,
    /// Balance, timeouts, connection mode, compression, stickiness, health (`backend.rs`).
    tuning: BackendTuningView,
}

/// One rule line of a backend: `<direction> <action>[ <args>][ if|unless <condition>]`.
#[derive(Debug, Serialize)]
struct BackendRuleView {
    /// `http-request` or `http-response`.
    direction: &'static str,
    /// e.g. `deny deny_status 405`, `set-header`.
    action: &'static str,
    /// The header name, for header rules.
    header: Option<String>,
    /// The header value, for add/set (written double-quoted).
    value: Option<String>,
    /// `if` or `unless`, with `condition`.
    guard: Option<&'static str>,
    condition: Vec<String>,
}

// Routing rules (`servicePathExclude`, `serviceHeader`, `userAgent`, `outboundHostname`,
// `isDefaultBackend`).

/// The acls of a rule's routing conditions: `exclude_<backend>` (the excluded paths, negated on
/// the `use_backend` line), `header_<backend>_<n>` (one per `serviceHeader` item, all required),
/// `agent_<backend>` (any `userAgent` item, contained in the `User-Agent`, case-insensitive).
#[derive(Debug, Clone, Default, Serialize)]
struct RoutingAclsView {
    exclude: Option<PathAclView>,
    headers: Vec<HeaderAclView>,
    agent: Option<AgentAclView>,
}

/// `acl <name> req.hdr(<header>) -m str <value>`.
#[derive(Debug, Clone, Serialize)]
struct HeaderAclView {
    name: String,
    header: String,
    value: String,
}

/// `acl <name> req.hdr(User-Agent) -m sub -i <agents…>`.
#[derive(Debug, Clone, Serialize)]
struct AgentAclView {
    name: String,
    agents: Vec<String>,
}

fn routing_acls(spec: &ServiceSpec, destination: &Destination, backend: &str) -> RoutingAclsView {
    let rules = destination.routing();
    RoutingAclsView {
        exclude: (!rules.path_exclude.is_empty()).then(|| PathAclView {
            name: format!("exclude_{backend}"),
            fetch: destination.effective_path_type(spec).as_str(),
            patterns: rules
                .path_exclude
                .iter()
                .map(|p| p.as_str().to_string())
                .collect(),
        }),
        headers: rules
            .headers
            .iter()
            .enumerate()
            .map(|(position, header)| HeaderAclView {
                name: format!("header_{backend}_{}", position + 1),
                header: header.name().as_str().to_string(),
                value: header.value().as_str().to_string(),
            })
            .collect(),
        agent: (!rules.user_agents.is_empty()).then(|| AgentAclView {
            name: format!("agent_{backend}"),
            agents: rules
                .user_agents
                .iter()
                .map(|a| a.as_str().to_string())
                .collect(),
        }),
    }
}

/// The backend of the main frontend's requests no rule matched: the `isDefaultBackend`
/// service's first HTTP destination (by index) served by the main frontend. Should stored specs
/// name two such services (the API refuses the second), the first by service name wins.
fn default_backend(
    settings: &RenderSettings,
    sorted: &[&ServiceRoute<'_>],
    pool: &BackendPool,
) -> Option<String> {
    sorted
        .iter()
        .filter(|route| route.spec.is_default_backend())
        .find_map(|route| {
            route
                .spec
                .destinations()
                .iter()
                .find(|d| {
                    d.req_mode() == ReqMode::Http
                        && d.src_port()
                            .is_none_or(|port| port.get() == settings.http_port)
                })
                .map(|d| pool.backend_name(route.spec, d))
        })
}

/// The one server of a destination with `outboundHostname`: the host on the destination's
/// `port` (which the spec requires with it).
fn outbound_instance(destination: &Destination) -> Option<Instance> {
    let host = destination.routing().outbound_hostname.as_ref()?;
    host.instance(destination.port()?.get())
}

// TLS passthrough by SNI (`reqMode=sni`).

/// A frontend `sni_<srcPort>`: waits for the TLS ClientHello, then routes the connection, still
/// encrypted, by the server name it asks for.
#[derive(Debug, Serialize)]
struct SniFrontendView {
    name: String,
    bind: String,
    rules: Vec<SniRuleView>,
}

/// `acl sni_<backend> req_ssl_sni …` (exact names, then wildcard endings) and its `use_backend`.
#[derive(Debug, Serialize)]
struct SniRuleView {
    #[serde(skip)]
    order: SniOrder,
    backend: String,
    acl: String,
    exact: Vec<String>,
    suffix: Vec<String>,
}

/// Where an SNI rule sorts; smaller first: rules with exact names only, then those with
/// wildcards (longest ending first, so a more specific wildcard wins), then by service name and
/// destination index. Two services never claim the same name on a port (route claims), so only
/// a wildcard can overlap another rule's name.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SniOrder {
    has_wildcard: bool,
    shortest_suffix: Reverse<usize>,
    service: String,
    index: u16,
}

fn sni_rule(spec: &ServiceSpec, destination: &Destination, backend: &str) -> SniRuleView {
    let domains = destination.service_domain();
    let names = |wildcard: bool| -> Vec<String> {
        domains
            .iter()
            .filter(|d| d.is_wildcard() == wildcard)
            .map(|d| d.host_pattern().to_string())
            .collect()
    };
    let suffix = names(true);
    SniRuleView {
        order: SniOrder {
            has_wildcard: !suffix.is_empty(),
            shortest_suffix: Reverse(suffix.iter().map(String::len).min().unwrap_or(0)),
            service: spec.service_name().to_string(),
            index: destination.index(),
        },
        backend: backend.to_string(),
        acl: format!("sni_{backend}"),
        exact: names(false),
        suffix,
    }
}

/// The backend of one destination: `<serviceName>-be<index>`. Unique, because the index is the
/// only trailing run of digits after the last `-be`.
pub(super) fn backend_name(spec: &ServiceSpec, destination: &Destination) -> String {
    format!("{}-be{}", spec.service_name(), destination.index())
}

/// Where rule `a` of a frontend sorts; smaller first. Field order is the rule order.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RuleOrder<'a> {
    /// 0: `/.well-known` paths; 1: rules with a domain; 2: path-only rules; 3: path-only `/`.
    group: u8,
    /// Longer (more specific) paths first; a `path_beg /` or domain-only rule counts as 0.
    longest_path: Reverse<usize>,
    /// Rules that also need request headers or a user agent (`serviceHeader`, `userAgent`)
    /// before the same path without them, the most conditions first.
    conditions: Reverse<usize>,
    /// Domains matched exactly before wildcard ones and those matched by `hdr_beg`, `hdr_end`
    /// or `hdr_dom` (which may also match another rule's exact domain).
    inexact_domain: bool,
    acl_name: &'a str,
    service: &'a str,
    index: u16,
}

fn rule_order<'a>(
    spec: &'a ServiceSpec,
    destination: &Destination,
    default_domain_algo: DomainAlgo,
) -> RuleOrder<'a> {
    let path_type = destination.effective_path_type(spec);
    let literal_prefix = matches!(
        path_type,
        PathType::Path | PathType::PathBeg | PathType::PathDir
    );
    let paths = destination.service_path();
    let well_known = literal_prefix && paths.iter().any(|p| p.as_str().starts_with("/.well-known"));
    let specificity = |path: &str| {
        if path_type == PathType::PathBeg && path == "/" {
            0
        } else {
            path.len()
        }
    };
    let longest = paths
        .iter()
        .map(|p| specificity(p.as_str()))
        .max()
        .unwrap_or(0);
    let domains = destination.service_domain();
    let group = if well_known {
        0
    } else if !domains.is_empty() {
        1
    } else if longest > 0 {
        2
    } else {
        3
    };
    RuleOrder {
        group,
        longest_path: Reverse(longest),
        conditions: Reverse(
            destination.routing().headers.len()
                + usize::from(!destination.routing().user_agents.is_empty()),
        ),
        inexact_domain: domains.iter().any(|d| d.is_wildcard())
            || (!domains.is_empty()
                && spec.service_domain_algo().unwrap_or(default_domain_algo) != DomainAlgo::Hdr),
        acl_name: spec.ordering_name(),
        service: spec.service_name().as_str(),
        index: destination.index(),
    }
}

/// A rule's place in a frontend's order, owned ([`RuleOrder`] borrows its spec), so the order of
/// a complete render can be kept (see the `placement` module).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct RuleKey {
    group: u8,
    longest_path: Reverse<usize>,
    conditions: Reverse<usize>,
    inexact_domain: bool,
    acl_name: String,
    service: String,
    index: u16,
}

impl From<&RuleOrder<'_>> for RuleKey {
    fn from(order: &RuleOrder<'_>) -> RuleKey {
        RuleKey {
            group: order.group,
            longest_path: order.longest_path,
            conditions: order.conditions,
            inexact_domain: order.inexact_domain,
            acl_name: order.acl_name.to_string(),
            service: order.service.to_string(),
            index: order.index,
        }
    }
}

impl RuleKey {
    /// The key of `destination`'s rule.
    pub(super) fn of(
        spec: &ServiceSpec,
        destination: &Destination,
        default_domain_algo: DomainAlgo,
    ) -> RuleKey {
        RuleKey::from(&rule_order(spec, destination, default_domain_algo))
    }

    /// Whether the rule is in the path-only groups (after every rule with a domain).
    pub(super) fn path_only(&self) -> bool {
        self.group >= 2
    }

    /// The first fields of the key (group, longest path, conditions): a key whose first fields
    /// sort before another's sorts before it.
    pub(super) fn coarse(&self) -> (u8, Reverse<usize>, Reverse<usize>) {
        (self.group, self.longest_path, self.conditions)
    }
}

/// The frontend a rule is rendered in: which redirects it carries there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FrontendKind {
    /// The main HTTP frontend; `https_only_all` is the proxy-wide `--https-only`.
    MainHttp { https_only_all: bool },
    /// The HTTPS frontend (same rules as the main one, behind TLS).
    Https,
    /// An HTTP frontend on a destination's own `srcPort`: `redirectFromDomain` only, to the same
    /// port (there is no HTTPS frontend for that port to send HTTPS redirects to).
    ExtraHttp { port: u16 },
}

/// The redirects of `destination` in a frontend of `kind`, given its rule's acl names.
///
/// Order: `redirectFromDomain` first (its hosts are not the destination's own, so its condition
/// never overlaps the HTTPS redirect's), then the HTTPS redirect.
fn redirects(
    spec: &ServiceSpec,
    destination: &Destination,
    kind: FrontendKind,
    rule_acls: &[String],
    from_domain_acl: Option<&str>,
) -> Vec<RedirectView> {
    let https_wanted = match kind {
        FrontendKind::MainHttp { https_only_all } => {
            https_only_all || destination.https_only() || spec.redirect_when_http_proto()
        }
        FrontendKind::Https | FrontendKind::ExtraHttp { .. } => false,
    };
    let mut lines = Vec::new();
    if let (Some(acl), Some(target)) = (from_domain_acl, destination.service_domain().first()) {
        // On plain HTTP, an HTTPS-only destination is sent straight to HTTPS: one hop, not two.
        let origin = match kind {
            FrontendKind::Https => format!("https://{}", target.host_pattern()),
            FrontendKind::ExtraHttp { port } => format!("http://{}:{port}", target.host_pattern()),
            FrontendKind::MainHttp { .. } if https_wanted && !spec.redirect_when_http_proto() => {
                format!("https://{}", target.host_pattern())
            }
            FrontendKind::MainHttp { .. } => format!("http://{}", target.host_pattern()),
        };
        let mut condition = vec![acl.to_string()];
        condition.extend(
            rule_acls
                .iter()
                .filter(|name| name.starts_with("path_"))
                .cloned(),
        );
        lines.push(RedirectView {
            target: format!("prefix {origin}"),
            code: 301,
            condition,
        });
    }
    if https_wanted {
        let mut condition = rule_acls.to_vec();
        if spec.redirect_when_http_proto() {
            // Behind a load balancer that terminates TLS every request reaches HAProxy in plain
            // HTTP; only the header tells what the client used, so only `http` is redirected.
            condition.push("{ req.hdr(X-Forwarded-Proto) -m str -i http }".to_string());
        } else {
            condition.push("!{ ssl_fc }".to_string());
        }
        lines.push(RedirectView {
            target: "scheme https".to_string(),
            code: destination.redirect_code().get(),
            condition,
        });
    }
    lines
}

pub(super) fn rule_view(
    spec: &ServiceSpec,
    destination: &Destination,
    kind: FrontendKind,
    default_domain_algo: DomainAlgo,
    backend: String,
) -> RuleView {
    let paths = destination.service_path();
    let path_acl = (!paths.is_empty()).then(|| PathAclView {
        name: format!("path_{backend}"),
        fetch: destination.effective_path_type(spec).as_str(),
        patterns: paths.iter().map(|p| p.as_str().to_string()).collect(),
    });
    let domains = destination.service_domain();
    let domain_acl = (!domains.is_empty()).then(|| DomainAclView {
        name: format!("domain_{backend}"),
        exact_match: spec
            .service_domain_algo()
            .unwrap_or(default_domain_algo)
            .match_method(),
        exact: domains
            .iter()
            .filter(|d| !d.is_wildcard())
            .map(|d| d.host_pattern().to_string())
            .collect(),
        suffix: domains
            .iter()
            .filter(|d| d.is_wildcard())
            .map(|d| d.host_pattern().to_string())
            .collect(),
    });
    let from_domain = destination.redirect_from_domain();
    let from_domain_acl = (!from_domain.is_empty()).then(|| FromDomainAclView {
        name: format!("from_domain_{backend}"),
        domains: from_domain
            .iter()
            .map(|d| d.host_pattern().to_string())
            .collect(),
    });
    let routing_acls = routing_acls(spec, destination, &backend);
    let rule_acls: Vec<String> = path_acl
        .iter()
        .map(|acl| acl.name.clone())
        .chain(
            routing_acls
                .exclude
                .iter()
                .map(|acl| format!("!{}", acl.name)),
        )
        .chain(domain_acl.iter().map(|acl| acl.name.clone()))
        .chain(routing_acls.headers.iter().map(|acl| acl.name.clone()))
        .chain(routing_acls.agent.iter().map(|acl| acl.name.clone()))
        .collect();
    let redirects = redirects(
        spec,
        destination,
        kind,
        &rule_acls,
        from_domain_acl.as_ref().map(|acl| acl.name.as_str()),
    );
    RuleView {
        backend,
        path_acl,
        domain_acl,
        redirects,
        from_domain_acl,
        routing_acls,
        condition: rule_acls,
        service: spec.service_name().to_string(),
        fragment: CustomFragment::of(spec, TEMPLATE_FE_PATH),
        has_custom: false,
        custom: String::new(),
        map: None,
    }
}

/// The `http-request`/`http-response` rules of an HTTP destination's backend, in the order
/// HAProxy runs them: method rules (405), then `denyHttp` (403), then the service's request
/// header rules (add, set, del), then its response header rules (add, set, del).
fn backend_rules(spec: &ServiceSpec, destination: &Destination) -> Vec<BackendRuleView> {
    let mut rules = Vec::new();
    let words = |items: &[crate::spec::HttpMethod]| -> Vec<String> {
        let mut condition = vec!["{".to_string(), "method".to_string()];
        condition.extend(items.iter().map(|m| m.as_str().to_string()));
        condition.push("}".to_string());
        condition
    };
    let deny_405 = |guard: &'static str, condition: Vec<String>| BackendRuleView {
        direction: "http-request",
        action: "deny deny_status 405",
        header: None,
        value: None,
        guard: Some(guard),
        condition,
    };
    if spec.verify_client_ssl() {
        // The crt-list asks for the certificate by SNI; this also refuses a request whose Host
        // names the service over a connection made for another name, or over plain HTTP.
        rules.push(BackendRuleView {
            direction: "http-request",
            action: "deny deny_status 403",
            header: None,
            value: None,
            guard: Some("unless"),
            condition: vec![
                "{ ssl_c_used }".to_string(),
                "{ ssl_c_verify 0 }".to_string(),
            ],
        });
    }
    if !destination.allowed_methods().is_empty() {
        rules.push(deny_405("unless", words(destination.allowed_methods())));
    }
    if !destination.denied_methods().is_empty() {
        rules.push(deny_405("if", words(destination.denied_methods())));
    }
    if destination.deny_http() {
        rules.push(BackendRuleView {
            direction: "http-request",
            action: "deny deny_status 403",
            header: None,
            value: None,
            guard: Some("if"),
            condition: vec!["!{ ssl_fc }".to_string()],
        });
    }
    let headers = spec.headers();
    let lines = |direction: &'static str, action: &'static str, items: &[HeaderLine]| {
        items
            .iter()
            .map(move |line| BackendRuleView {
                direction,
                action,
                header: Some(line.name().as_str().to_string()),
                value: Some(line.value().as_str().to_string()),
                guard: None,
                condition: Vec::new(),
            })
            .collect::<Vec<_>>()
    };
    let deletions = |direction: &'static str, items: &[HeaderName]| {
        items
            .iter()
            .map(move |name| BackendRuleView {
                direction,
                action: "del-header",
                header: Some(name.as_str().to_string()),
                value: None,
                guard: None,
                condition: Vec::new(),
            })
            .collect::<Vec<_>>()
    };
    rules.extend(lines("http-request", "add-header", &headers.add_req));
    rules.extend(lines("http-request", "set-header", &headers.set_req));
    rules.extend(deletions("http-request", &headers.del_req));
    rules.extend(lines("http-response", "add-header", &headers.add_res));
    rules.extend(lines("http-response", "set-header", &headers.set_res));
    rules.extend(deletions("http-response", &headers.del_res));
    rules
}

/// The userlist guarding `destination`, if any: the service's own users, else `--users`;
/// none for TCP and for `ignoreAuthorization`.
fn auth_view(
    settings: &RenderSettings,
    spec: &ServiceSpec,
    destination: &Destination,
) -> Option<AuthView> {
    if destination.req_mode() != ReqMode::Http || destination.ignore_authorization() {
        return None;
    }
    let userlist = if !spec.users().is_empty() {
        service_userlist(spec)
    } else if !settings.users.is_empty() {
        GLOBAL_USERLIST.to_string()
    } else {
        return None;
    };
    Some(AuthView {
        realm: spec.service_name().to_string(),
        userlist,
    })
}

fn service_userlist(spec: &ServiceSpec) -> String {
    format!("users_{}", spec.service_name())
}

fn userlist_view(name: String, users: &[AuthUser]) -> UserlistView {
    UserlistView {
        name,
        users: users
            .iter()
            .map(|user| UserView {
                name: user.name().as_str().to_string(),
                password: user.password().as_str().to_string(),
            })
            .collect(),
    }
}

/// The stats URI as config text: a path (and query) of URI characters, nothing that could end
/// a word or a line.
fn stats_uri(stats: &StatsSettings) -> Result<String, RenderError> {
    let invalid = |reason: &str| RenderError::Setting {
        setting: "stats_uri",
        value: stats.uri.clone(),
        reason: reason.to_string(),
    };
    let uri = stats.uri.as_str();
    if !uri.starts_with('/') {
        return Err(invalid("must start with `/`"));
    }
    if uri.len() > 256 {
        return Err(invalid("too long: at most 256 characters"));
    }
    // A path's characters (as a literal `servicePath` takes them) and the query's `?`.
    let allowed = |c: char| crate::spec::values::is_path_char(c) || c == '?';
    if !uri.chars().all(allowed) {
        return Err(invalid(
            "only letters, digits and / - . _ ~ ! & ( ) * + ; = : @ % ? are allowed",
        ));
    }
    Ok(uri.to_string())
}

pub(super) fn backend_view(
    settings: &RenderSettings,
    spec: &ServiceSpec,
    destination: &Destination,
    slots: &ServerSlots,
    name: String,
) -> BackendView {
    let outbound = outbound_instance(destination);
    let fragment = CustomFragment::of(spec, TEMPLATE_BE_PATH);
    let mut servers = server_views(spec, destination, slots, outbound.as_ref());
    if fragment.is_some() {
        // A service's own backend fragment may not write `disabled`: it gets the instances only.
        servers.retain(|server| !server.is_spare());
    }
    let http_rules = match destination.req_mode() {
        ReqMode::Http => backend_rules(spec, destination),
        ReqMode::Tcp | ReqMode::Sni => Vec::new(),
    };
    let path_rewrites = match destination.req_mode() {
        ReqMode::Http => path_rewrites(destination),
        ReqMode::Tcp | ReqMode::Sni => Vec::new(),
    };
    BackendView {
        name,
        mode: destination.req_mode().haproxy_mode(),
        http_rules,
        auth: auth_view(settings, spec, destination),
        path_rewrites,
        servers,
        extra: spec
            .custom_templates()
            .backend_extra
            .iter()
            .map(|line| line.as_str().to_string())
            .collect(),
        service: spec.service_name().to_string(),
        fragment,
        has_custom: false,
        custom: String::new(),
        tuning: tuning_view(spec, destination),
    }
}

// ---- Path rewrites: stripPath, reqPathSearchReplace -----------------------------------------

/// One `http-request replace-path '<regex>' '<format>'` line. Both words are single-quoted in
/// the template; the spec's checks keep quotes, whitespace and `#` out of them.
#[derive(Debug, Serialize)]
struct PathRewriteView {
    regex: String,
    format: String,
}

/// The path rewrites of an HTTP destination's backend, in the order HAProxy runs them: the
/// `servicePath` prefix removed (`stripPath`), then each search/replace pair in order. They come
/// after the access rules and header rules, which do not look at the path.
fn path_rewrites(destination: &Destination) -> Vec<PathRewriteView> {
    let rewrite = destination.path_rewrite();
    let mut views = Vec::new();
    if rewrite.strip_path() && !destination.service_path().is_empty() {
        let (regex, format) = strip_prefix_rule(destination.service_path());
        views.push(PathRewriteView { regex, format });
    }
    views.extend(rewrite.search_replace().iter().map(|pair| PathRewriteView {
        regex: pair.haproxy_regex(),
        format: pair.haproxy_format(),
    }));
    views
}

/// `bind` argument: `*:80`, `10.0.0.1:80` or `[::1]:80` (HAProxy 2.6 takes IPv6 in brackets).
fn bind_address(settings: &RenderSettings, port: u16) -> String {
    match settings.bind_host {
        None => format!("*:{port}"),
        Some(std::net::IpAddr::V4(ip)) => format!("{ip}:{port}"),
        Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
    }
}

/// A file path from the settings as config text; it must not be able to break a line or word.
fn config_path(setting: &'static str, path: &Path) -> Result<String, RenderError> {
    let invalid = |reason: &str| RenderError::Setting {
        setting,
        value: path.display().to_string(),
        reason: reason.to_string(),
    };
    let text = path.to_str().ok_or_else(|| invalid("not valid UTF-8"))?;
    if text.is_empty() {
        return Err(invalid("empty"));
    }
    let safe = |c: char| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                '/' | '_' | '.' | '-' | '+' | '=' | ':' | '@' | ',' | '~' | '%'
            )
    };
    if !text.chars().all(safe) {
        return Err(invalid(
            "only letters, digits and / _ . - + = : @ , ~ % are allowed in paths written to haproxy.cfg",
        ));
    }
    Ok(text.to_string())
}

/// How a port is held: by HTTP frontends (shared by HTTP destinations), by one TCP frontend
/// (the HTTPS frontend or a `reqMode=tcp` destination: exclusive), or by an SNI frontend (shared
/// by `reqMode=sni` destinations only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortKind {
    Http,
    Tcp,
    Sni,
}

/// Who holds a port, for conflict messages.
struct PortOwner {
    who: String,
    kind: PortKind,
}

fn owner(spec: &ServiceSpec, destination: &Destination) -> PortOwner {
    PortOwner {
        who: format!(
            "service `{}` (destination {}, {})",
            spec.service_name(),
            destination.index(),
            destination.req_mode().as_str()
        ),
        kind: match destination.req_mode() {
            ReqMode::Http => PortKind::Http,
            ReqMode::Tcp => PortKind::Tcp,
            ReqMode::Sni => PortKind::Sni,
        },
    }
}

/// Builds the view of the complete configuration; errors on settings that cannot be written
/// safely, on a service given twice and on port conflicts between destinations.
pub(super) fn build(
    settings: &RenderSettings,
    services: &[ServiceRoute<'_>],
    tls: Option<&TlsSettings>,
    slots: &SlotsByService<'_>,
    pool: &BackendPool,
) -> Result<ConfigView, RenderError> {
    let stats_socket = config_path("stats_socket", &settings.stats_socket)?;
    let error_503 = config_path("errors_dir", &settings.errors_dir.join("503.http"))?;

    let mut sorted: Vec<&ServiceRoute<'_>> = services.iter().collect();
    sorted.sort_by(|a, b| a.spec.service_name().cmp(b.spec.service_name()));
    for pair in sorted.windows(2) {
        if pair[0].spec.service_name() == pair[1].spec.service_name() {
            return Err(RenderError::DuplicateService(
                pair[0].spec.service_name().to_string(),
            ));
        }
    }

    // Which port belongs to whom; the main HTTP frontend holds `http_port`.
    let mut ports: BTreeMap<u16, PortOwner> = BTreeMap::new();
    ports.insert(
        settings.http_port,
        PortOwner {
            who: format!("the main HTTP frontend (http_port {})", settings.http_port),
            kind: PortKind::Http,
        },
    );
    if let Some(tls) = tls {
        ports.insert(
            tls.https_port,
            PortOwner {
                who: format!("the HTTPS frontend (https_port {})", tls.https_port),
                kind: PortKind::Tcp,
            },
        );
    }
    let mut main_rules = Vec::new();
    let mut extra_rules: BTreeMap<u16, Vec<_>> = BTreeMap::new();
    let mut http_backends = Vec::new();
    // The backends of destinations that sit in a pool backend, by pool number.
    let mut pooled_backends: BTreeMap<usize, BackendView> = BTreeMap::new();
    let mut tcp_frontends = Vec::new();
    let mut tcp_backends = Vec::new();
    let mut sni_rules: BTreeMap<u16, Vec<SniRuleView>> = BTreeMap::new();

    for route in &sorted {
        let spec = route.spec;
        // The slots the caller assigned, else the instances packed in order.
        let packed;
        let route_slots = match slots.get(spec.service_name()) {
            Some(assigned) => *assigned,
            None => {
                packed = ServerSlots::packed(route.instances);
                &packed
            }
        };
        for destination in spec.destinations() {
            let src_port = destination.src_port().map(|p| p.get());
            let backend = backend_view(
                settings,
                spec,
                destination,
                route_slots,
                pool.backend_name(spec, destination),
            );
            match (destination.req_mode(), src_port) {
                (ReqMode::Sni, Some(port)) => {
                    let me = owner(spec, destination);
                    match ports.get(&port) {
                        Some(holder) if holder.kind != PortKind::Sni => {
                            return Err(RenderError::PortConflict {
                                port,
                                first: holder.who.clone(),
                                second: me.who,
                            })
                        }
                        Some(_) => {}
                        None => {
                            ports.insert(port, me);
                        }
                    }
                    sni_rules.entry(port).or_default().push(sni_rule(
                        spec,
                        destination,
                        &backend.name,
                    ));
                    tcp_backends.push(backend);
                }
                (ReqMode::Tcp, Some(port)) => {
                    let me = owner(spec, destination);
                    if let Some(holder) = ports.get(&port) {
                        return Err(RenderError::PortConflict {
                            port,
                            first: holder.who.clone(),
                            second: me.who,
                        });
                    }
                    ports.insert(port, me);
                    tcp_frontends.push(TcpFrontendView {
                        port,
                        name: format!("tcp_{port}"),
                        bind: bind_address(settings, port),
                        backend: backend.name.clone(),
                        timeout_client: tcp_timeout_client(spec),
                    });
                    tcp_backends.push(backend);
                }
                (_, src_port) => {
                    let key = (
                        rule_order(spec, destination, settings.service_domain_algo),
                        spec,
                        destination,
                    );
                    match src_port {
                        Some(port) if port != settings.http_port => {
                            let me = owner(spec, destination);
                            match ports.get(&port) {
                                Some(holder) if holder.kind != PortKind::Http => {
                                    return Err(RenderError::PortConflict {
                                        port,
                                        first: holder.who.clone(),
                                        second: me.who,
                                    })
                                }
                                Some(_) => {}
                                None => {
                                    ports.insert(port, me);
                                }
                            }
                            extra_rules.entry(port).or_default().push(key);
                        }
                        _ => main_rules.push(key),
                    }
                    match pool.number_of(spec.service_name(), destination) {
                        Some(number) => {
                            pooled_backends.insert(number, backend);
                        }
                        None => http_backends.push(backend),
                    }
                }
            }
        }
    }

    main_rules.sort_by(|a, b| a.0.cmp(&b.0));
    let main_keys = main_rules
        .iter()
        .map(|(order, _, _)| RuleKey::from(order))
        .collect();
    let rule_views = |rules: &[(RuleOrder<'_>, &ServiceSpec, &Destination)], kind| {
        rules
            .iter()
            .map(|(_, spec, destination)| {
                rule_view(
                    spec,
                    destination,
                    kind,
                    settings.service_domain_algo,
                    pool.backend_name(spec, destination),
                )
            })
            .collect::<Vec<_>>()
    };
    // The stats page: routed by the frontend already on its port, else on a frontend of its own.
    let stats_settings = settings.stats.as_ref();
    let stats_uri_text = stats_settings.map(stats_uri).transpose()?;
    let stats_port = stats_settings.map(|stats| stats.port);
    let stats_shares_frontend = stats_port.is_some_and(|port| {
        port == settings.http_port
            || tls.is_some_and(|tls| tls.https_port == port)
            || extra_rules.contains_key(&port)
    });
    if let (Some(port), false) = (stats_port, stats_shares_frontend) {
        if let Some(holder) = ports.get(&port) {
            return Err(RenderError::PortConflict {
                port,
                first: holder.who.clone(),
                second: format!("the stats page (stats_port {port})"),
            });
        }
    }
    let stats_route = |port: u16| {
        (stats_port == Some(port))
            .then(|| stats_uri_text.clone())
            .flatten()
    };

    let frontend = |name: String, port: u16, mut rules: Vec<(RuleOrder<'_>, _, _)>| {
        rules.sort_by(|a, b| a.0.cmp(&b.0));
        FrontendView {
            name,
            bind: bind_address(settings, port),
            forwarded_proto: None,
            stats_uri: stats_route(port),
            rules: rule_views(&rules, FrontendKind::ExtraHttp { port }),
            default_backend: None,
            main_lines: Vec::new(),
            acme_challenge: None,
            map_path_var: None,
        }
    };
    tcp_frontends.sort_by_key(|f| f.port);
    let default_backend = default_backend(settings, &sorted, pool);
    // The pool backends come after every service's, each at its own place (see the `pool`
    // module): a free one, or the backend of the destination that sits in it.
    for number in 1..=pool.size() {
        match pooled_backends.remove(&number) {
            Some(backend) => http_backends.push(backend),
            None => {
                let spec = free_pool_spec(number)?;
                let free = spec.destinations().first().map(|destination| {
                    backend_view(
                        settings,
                        &spec,
                        destination,
                        &ServerSlots::from_slots(vec![None; POOL_SLOTS]),
                        pool_backend_name(number),
                    )
                });
                http_backends.extend(free);
            }
        }
    }
    let http = FrontendView {
        name: "http".to_string(),
        bind: bind_address(settings, settings.http_port),
        forwarded_proto: None,
        stats_uri: stats_route(settings.http_port),
        rules: rule_views(
            &main_rules,
            FrontendKind::MainHttp {
                https_only_all: settings.https_only,
            },
        ),
        default_backend: default_backend.clone(),
        main_lines: super::proxy_wide::main_frontend_lines(&settings.proxy_wide),
        acme_challenge: settings.acme_challenge.map(|_| ACME_CHALLENGE_BACKEND),
        map_path_var: None,
    };
    let https = match tls {
        Some(tls) => {
            let crt_list = config_path("crt_list", &tls.crt_list)?;
            let alpn = if tls.enable_h2 {
                "h2,http/1.1"
            } else {
                "http/1.1"
            };
            Some(FrontendView {
                name: "https".to_string(),
                bind: format!(
                    "{} ssl crt-list {crt_list} alpn {alpn}",
                    bind_address(settings, tls.https_port)
                ),
                forwarded_proto: Some("https"),
                stats_uri: stats_route(tls.https_port),
                rules: rule_views(&main_rules, FrontendKind::Https),
                default_backend: default_backend.clone(),
                main_lines: super::proxy_wide::main_frontend_lines(&settings.proxy_wide),
                acme_challenge: None,
                map_path_var: None,
            })
        }
        None => None,
    };
    let mut userlists = Vec::new();
    if !settings.users.is_empty() {
        userlists.push(userlist_view(GLOBAL_USERLIST.to_string(), &settings.users));
    }
    for route in &sorted {
        if !route.spec.users().is_empty() {
            userlists.push(userlist_view(
                service_userlist(route.spec),
                route.spec.users(),
            ));
        }
    }
    let stats = match (stats_settings, stats_uri_text.clone()) {
        (Some(stats_settings), Some(uri)) => {
            userlists.push(userlist_view(
                STATS_USERLIST.to_string(),
                std::slice::from_ref(&stats_settings.user),
            ));
            Some(StatsView {
                name: STATS_PROXY,
                uri,
                userlist: STATS_USERLIST,
                bind: (!stats_shares_frontend).then(|| bind_address(settings, stats_settings.port)),
            })
        }
        _ => None,
    };
    let sni_frontends: Vec<SniFrontendView> = sni_rules
        .into_iter()
        .map(|(port, mut rules)| {
            rules.sort_by(|a, b| a.order.cmp(&b.order));
            SniFrontendView {
                name: format!("sni_{port}"),
                bind: bind_address(settings, port),
                rules,
            }
        })
        .collect();
    let http_extra: Vec<FrontendView> = extra_rules
        .into_iter()
        .map(|(port, rules)| frontend(format!("http_{port}"), port, rules))
        .collect();
    Ok(ConfigView {
        layout: LayoutView {
            tcp_defaults: !tcp_frontends.is_empty() || !sni_frontends.is_empty(),
            sni_frontends,
            stats_socket,
            error_503,
            tcp_frontends,
            userlists,
            stats,
            proxy_wide: super::proxy_wide::view(&settings.proxy_wide),
            acme_challenge: settings.acme_challenge.map(acme_challenge_view),
            maps: Vec::new(),
            no_strict_limits: false,
        },
        http,
        https,
        http_extra,
        http_backends,
        tcp_backends,
        main_keys,
        routing: RoutingIndex::default(),
    })
}

// Routing through maps (see the `maps` module).

/// What a plain rule puts in a map, when it is one: `path_beg` paths and/or exactly matched
/// domains (`serviceDomainAlgo=hdr`, no wildcard), and nothing else that conditions or precedes
/// its `use_backend` (no `servicePathExclude`, `serviceHeader`, `userAgent`, redirect or
/// `templateFePath`).
pub(super) fn plain_route(rule: &RuleView) -> Option<PlainRoute> {
    let routing = &rule.routing_acls;
    if rule.fragment.is_some()
        || !rule.redirects.is_empty()
        || rule.from_domain_acl.is_some()
        || routing.exclude.is_some()
        || !routing.headers.is_empty()
        || routing.agent.is_some()
    {
        return None;
    }
    let paths: Vec<&str> = match &rule.path_acl {
        None => Vec::new(),
        Some(acl) if acl.fetch == PathType::PathBeg.as_str() => {
            acl.patterns.iter().map(String::as_str).collect()
        }
        Some(_) => return None,
    };
    let domains: Vec<&str> = match &rule.domain_acl {
        None => Vec::new(),
        Some(acl)
            if acl.suffix.is_empty()
                && !acl.exact.is_empty()
                && acl.exact_match == DomainAlgo::Hdr.match_method() =>
        {
            acl.exact.iter().map(String::as_str).collect()
        }
        Some(_) => return None,
    };
    PlainRoute::new(&paths, &domains, &rule.backend)
}

/// Replaces the frontend's runs of plain rules by map lines; returns the map files they read and,
/// for each rule (in order), its plain route with the segment it joined and the entries it added.
fn route_frontend_through_maps(
    frontend: &mut FrontendView,
) -> (Vec<MapFile>, Vec<Option<PlacedRule>>) {
    let rules = std::mem::take(&mut frontend.rules);
    let routes: Vec<Option<PlainRoute>> = rules.iter().map(plain_route).collect();
    let MapRouting {
        rules,
        maps,
        needs_path_var,
        placement,
    } = route_through_maps(&frontend.name, rules, plain_route);
    let placed = routes
        .into_iter()
        .zip(placement)
        .map(|(route, placement)| {
            let (route, (segment, added)) = (route?, placement?);
            Some(PlacedRule {
                route,
                segment,
                added,
            })
        })
        .collect();
    frontend.rules = rules
        .into_iter()
        .map(|item| match item {
            Routed::Rule(rule) => rule,
            Routed::Map(mut rule, map) => {
                rule.map = Some(map);
                rule
            }
        })
        .collect();
    frontend.map_path_var = needs_path_var.then(super::maps::path_var_line);
    (maps, placed)
}

impl ConfigView {
    /// Routes the plain rules of every HTTP frontend through map files (see the `maps` module),
    /// and keeps where the main frontends' rules went ([`ConfigView::routing`]).
    pub(super) fn route_plain_rules_through_maps(&mut self, settings: &RenderSettings) {
        let mut maps = Vec::new();
        let main_kind = FrontendKind::MainHttp {
            https_only_all: settings.https_only,
        };
        let main = std::iter::once((&mut self.http, main_kind)).chain(
            self.https
                .iter_mut()
                .map(|https| (https, FrontendKind::Https)),
        );
        let mut indexed = Vec::new();
        for (frontend, kind) in main {
            let (frontend_maps, placed) = route_frontend_through_maps(frontend);
            maps.extend(frontend_maps);
            indexed.push(FrontendIndex::new(
                frontend.name.clone(),
                kind,
                self.main_keys.iter().cloned().zip(placed),
            ));
        }
        for frontend in &mut self.http_extra {
            maps.extend(route_frontend_through_maps(frontend).0);
        }
        self.routing = RoutingIndex::new(indexed, settings.service_domain_algo);
        self.layout.maps = maps;
    }

    /// The map files of the frontends' map lines, by name.
    pub(super) fn take_maps(&mut self) -> Vec<MapFile> {
        let mut maps = std::mem::take(&mut self.layout.maps);
        maps.sort_by(|a, b| a.name.cmp(&b.name));
        maps
    }
}

// ACME HTTP-01 (the `acme` module answers; see `RenderSettings::acme_challenge`).

/// The backend of ACME challenges: no service backend is named this (theirs end in `-be…`).
const ACME_CHALLENGE_BACKEND: &str = "flow_proxy_acme";

/// The ACME challenge backend: one server, flow-proxy's own challenge responder on loopback.
#[derive(Debug, Serialize)]
struct AcmeChallengeView {
    name: &'static str,
    server: String,
}

fn acme_challenge_view(responder: std::net::SocketAddr) -> AcmeChallengeView {
    AcmeChallengeView {
        name: ACME_CHALLENGE_BACKEND,
        // `SocketAddr`'s own text: `127.0.0.1:8081` or `[::1]:8081`, both read by HAProxy.
        server: responder.to_string(),
    }
}

// Custom fragments (`templateFePath`, `templateBePath`; see the `custom` module).

/// A custom fragment a rule or backend is written with instead of the shipped one.
#[derive(Debug, Clone)]
pub(super) struct CustomFragment {
    /// The service whose spec names it.
    pub(super) service: String,
    /// `templateFePath` or `templateBePath`.
    pub(super) parameter: &'static str,
    /// Relative to `--templates-dir`.
    pub(super) path: TemplatePath,
}

impl CustomFragment {
    /// The fragment `parameter` of `spec` names, if any.
    fn of(spec: &ServiceSpec, parameter: &'static str) -> Option<CustomFragment> {
        let custom = spec.custom_templates();
        let path = if parameter == TEMPLATE_FE_PATH {
            custom.template_fe_path.as_ref()
        } else {
            custom.template_be_path.as_ref()
        };
        path.map(|path| CustomFragment {
            service: spec.service_name().to_string(),
            parameter,
            path: path.clone(),
        })
    }
}

impl ConfigView {
    /// Leaves the spare server slots out of every backend, for a `backend.hbs` of
    /// `--templates-dir` that may not write `disabled` (a spare slot written without it would
    /// take traffic): its backends list the instances only.
    /// Turns HAProxy's `strict-limits` off when the spare server slots alone push the number of
    /// descriptors HAProxy counts past the open-files limit (see
    /// [`CheckedServers::strict_limits_relaxed`]); returns the checked servers counted.
    pub(super) fn relax_strict_limits_for_spare_slots(
        &mut self,
        proxy_wide: &super::ProxyWide,
    ) -> CheckedServers {
        let checked = CheckedServers::of(self.http_backends.iter().chain(&self.tcp_backends));
        self.layout.no_strict_limits = checked.strict_limits_relaxed(proxy_wide);
        checked
    }

    pub(super) fn drop_spare_servers(&mut self) {
        for backend in self.http_backends.iter_mut().chain(&mut self.tcp_backends) {
            backend.drop_spare_servers();
        }
    }

    /// Renders every custom fragment with `render(fragment, view of the rule or backend)`, so
    /// the templates write its text instead of the shipped rule or backend.
    pub(super) fn render_custom(
        &mut self,
        mut render: impl FnMut(&CustomFragment, &serde_json::Value) -> Result<String, RenderError>,
    ) -> Result<(), RenderError> {
        let frontends = std::iter::once(&mut self.http)
            .chain(self.https.iter_mut())
            .chain(self.http_extra.iter_mut());
        for frontend in frontends {
            for rule in &mut frontend.rules {
                if let Some(fragment) = rule.fragment.clone() {
                    rule.custom = render(&fragment, &fragment_data(&*rule)?)?;
                    rule.has_custom = true;
                }
            }
        }
        for backend in self
            .http_backends
            .iter_mut()
            .chain(self.tcp_backends.iter_mut())
        {
            backend.render_custom(&mut render)?;
        }
        Ok(())
    }
}

impl BackendView {
    /// Its servers without the spare slots (for a `backend.hbs` of `--templates-dir`).
    pub(super) fn drop_spare_servers(&mut self) {
        self.servers.retain(|server| !server.is_spare());
    }

    /// Renders its custom fragment (`templateBePath`), if it has one, with `render`.
    pub(super) fn render_custom(
        &mut self,
        mut render: impl FnMut(&CustomFragment, &serde_json::Value) -> Result<String, RenderError>,
    ) -> Result<(), RenderError> {
        if let Some(fragment) = self.fragment.clone() {
            self.custom = render(&fragment, &fragment_data(&*self)?)?;
            self.has_custom = true;
        }
        Ok(())
    }

    /// The rendered `templateBePath` fragment written instead of this backend, if it has one.
    pub(super) fn custom_text(&self) -> Option<&str> {
        self.has_custom.then_some(self.custom.as_str())
    }
}

/// The JSON a custom fragment is rendered with: the view the shipped fragment gets.
fn fragment_data(item: &impl Serialize) -> Result<serde_json::Value, RenderError> {
    serde_json::to_value(item).map_err(|error| RenderError::Render(error.to_string()))
}
