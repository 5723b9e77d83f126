//! Reading a reconfigure (or remove) query into a [`ServiceSpec`].
//!
//! The names are Docker Flow Proxy's. Destination parameters come unsuffixed (destination 0)
//! or with an index suffix `.1`, `.2`, … (`servicePath.1`, `port.1`); every parameter of one
//! index describes one destination. Both generations of Docker Flow Proxy's clients are read:
//! the unsuffixed destination exists when it has a `servicePath` or a `serviceDomain` (or is a
//! whole tcp destination, `reqMode=tcp&srcPort=…`, or there is no indexed destination), and the
//! unsuffixed value of a [`Scope::DestinationDefault`] parameter (`port`, `reqMode`,
//! `httpsOnly`, …) is also the default of every indexed destination that does not set its own.
//! `pathType` is special: unsuffixed it is the service's default for every destination,
//! `pathType.N` overrides it.
//!
//! Parameters Docker Flow Proxy's clients send that mean nothing here ([`IGNORED_PARAMETERS`])
//! are accepted and reported back with the reason. Any other unknown parameter and parameters
//! given twice are errors (naming the closest known name): a typo must not silently change
//! routing. Values are validated in a fixed order (service parameters, then destinations by
//! index), so the error for a bad query does not depend on the order of its parameters.
//!
//! Adding a parameter: one row in [`PARAMETERS`], one field in `ServiceSpec` or `Destination`,
//! one line in [`build_spec`] (and its JSON field in `stored.rs`).

use std::collections::{BTreeMap, BTreeSet};

use super::custom_templates::CustomTemplates;
use super::path_rewrite::{parse_service_tags, PathRewrite};
use super::routing_rules::{parse_default_backend, RoutingRules};
use super::values::{
    parse_flag, parse_list, parse_users_keeping, shown, spec_error, AclName, Domain, DomainAlgo,
    HeaderLine, HeaderName, HttpMethod, PathType, Port, RedirectCode, ReqMode, ServiceColor,
    ServiceName, ServicePath, MAX_DOMAINS_PER_DESTINATION, MAX_LIST_ITEMS,
    MAX_PATHS_PER_DESTINATION,
};
use super::{
    boxed_unless_default, BackendTuning, Destination, DestinationExtras, HeaderRules, ServiceSpec,
    SpecError, MAX_DESTINATIONS_PER_SERVICE,
};

/// Where a parameter may appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Once per service, never indexed.
    Service,
    /// Per destination: unsuffixed is destination 0, `.N` is destination N.
    Destination,
    /// Per destination, as `Destination`; the unsuffixed value is also the default of every
    /// indexed destination that does not set its own.
    DestinationDefault,
    /// Unsuffixed: the service's default; `.N`: destination N's override.
    ServiceDefault,
}

/// The parameters flow-proxy understands, by their Docker Flow Proxy names.
const PARAMETERS: &[(&str, Scope)] = &[
    ("serviceName", Scope::Service),
    ("serviceColor", Scope::Service),
    ("aclName", Scope::Service),
    ("skipCheck", Scope::Service),
    ("pathType", Scope::ServiceDefault),
    ("servicePath", Scope::Destination),
    ("serviceDomain", Scope::Destination),
    ("port", Scope::DestinationDefault),
    ("srcPort", Scope::DestinationDefault),
    ("reqMode", Scope::DestinationDefault),
    // Edge rules: redirects, header rules, method rules.
    ("httpsOnly", Scope::DestinationDefault),
    ("httpsRedirectCode", Scope::DestinationDefault),
    ("redirectWhenHttpProto", Scope::Service),
    ("redirectFromDomain", Scope::Destination),
    ("addReqHeader", Scope::Service),
    ("setReqHeader", Scope::Service),
    ("delReqHeader", Scope::Service),
    ("addResHeader", Scope::Service),
    ("setResHeader", Scope::Service),
    ("delResHeader", Scope::Service),
    ("allowedMethods", Scope::DestinationDefault),
    ("deniedMethods", Scope::DestinationDefault),
    ("denyHttp", Scope::DestinationDefault),
    // Basic auth.
    ("users", Scope::Service),
    ("usersPassEncrypted", Scope::Service),
    ("ignoreAuthorization", Scope::DestinationDefault),
    // TLS per service (`serviceCert` is taken by the API: it is a certificate, not a spec value).
    ("verifyClientSsl", Scope::Service),
    ("sslVerifyNone", Scope::Service),
    // Docker Flow Proxy compatibility.
    ("serviceDomainAlgo", Scope::Service),
    // Routing rules (`routing_rules.rs`): exclusions, header and user-agent conditions, a fixed
    // outbound host, the default backend.
    ("servicePathExclude", Scope::Destination),
    ("serviceHeader", Scope::Destination),
    ("userAgent", Scope::Destination),
    ("outboundHostname", Scope::DestinationDefault),
    ("isDefaultBackend", Scope::Service),
    // Custom templates and raw backend lines (`custom_templates.rs`).
    ("templateFePath", Scope::Service),
    ("templateBePath", Scope::Service),
    ("backendExtra", Scope::Service),
    // Versioned services on a shared prefix (`path_rewrite.rs`): tagged instances, path rewrites.
    ("serviceTag", Scope::Service),
    ("stripPath", Scope::DestinationDefault),
    ("reqPathSearchReplace", Scope::Destination),
    ("reqPathSearch", Scope::Destination),
    ("reqPathReplace", Scope::Destination),
    // Backend tuning (`backend_tuning.rs`): balance, timeouts, connection mode, compression,
    // stickiness, health checks.
    ("balance", Scope::Service),
    ("timeoutServer", Scope::Service),
    ("timeoutTunnel", Scope::Service),
    ("timeoutClient", Scope::Service),
    ("connectionMode", Scope::Service),
    ("compressionAlgo", Scope::Service),
    ("compressionType", Scope::Service),
    ("sessionType", Scope::Service),
    ("checkPath", Scope::Service),
    ("checkInterval", Scope::Service),
    ("maxFails", Scope::Service),
    ("observe", Scope::Service),
    // ACME certificates (`acme.rs`).
    ("letsEncrypt", Scope::Service),
];

// Docker Flow Proxy compatibility: parameters its clients send that mean nothing here, each
// with the reason given back in the answer's `Message`.

/// Reconfigure (and remove) parameters that are accepted and ignored, with the reason.
pub(crate) const IGNORED_PARAMETERS: &[(&str, &str)] = &[
    (
        "distribute",
        "every flow-proxy sharing the registry applies each change already",
    ),
    (
        "replicas",
        "instances come from the registry's healthy services, not from a replica count",
    ),
    (
        "discoveryType",
        "instances always come from the Consul-compatible registry",
    ),
    (
        "proxyInstanceName",
        "where specs are kept is set by --kv-prefix",
    ),
    (
        "fromListener",
        "every caller's request is handled alike (there is no swarm listener)",
    ),
    (
        "recreate",
        "each reconfigure replaces the service's whole spec already",
    ),
    (
        "checkTcp",
        "every server is health-checked already (tcp destinations by a TCP connect) unless skipCheck=true",
    ),
];

/// Remove parameters that are accepted and ignored (besides [`IGNORED_PARAMETERS`]).
const IGNORED_ON_REMOVE: &[(&str, &str)] = &[(
    "aclName",
    "a service is removed by serviceName, with every rule it has",
)];

/// Docker Flow Proxy parameters flow-proxy refuses (400), each with the reason and what to do
/// instead: accepting them would change less than the caller asked for.
const UNSUPPORTED_PARAMETERS: &[(&str, &str)] = &[
    (
        "consulTemplateFePath",
        "flow-proxy renders handlebars, not consul-template; put a handlebars fragment under \
         --templates-dir and name it with templateFePath",
    ),
    (
        "consulTemplateBePath",
        "flow-proxy renders handlebars, not consul-template; put a handlebars fragment under \
         --templates-dir and name it with templateBePath",
    ),
    (
        "usersSecret",
        "per-service Docker secrets are not read; pass users (hashed, with \
         usersPassEncrypted=true) or set --users",
    ),
    (
        "httpsPort",
        "a Docker Swarm setting; HAProxy connects to each instance on its Consul port or on port",
    ),
    (
        "srcHttpsPort",
        "HTTPS is served on --https-port for every route of the main HTTP frontend",
    ),
    (
        "xForwardedProto",
        "the HTTPS frontend already sends X-Forwarded-Proto https; behind a load balancer that \
         terminates TLS, use setReqHeader=X-Forwarded-Proto%20https",
    ),
    (
        "checkResolvers",
        "instances are the addresses Consul reports, not names HAProxy resolves",
    ),
    (
        "balanceGroup",
        "tcp service groups are not supported; give each tcp service its own srcPort",
    ),
    (
        "serviceGroup",
        "tcp service groups are not supported; give each tcp service its own srcPort",
    ),
    (
        "clitcpka",
        "TCP keep-alive towards clients is not configurable per service; use --extra-frontend",
    ),
    (
        "userDef",
        "custom templates get only validated spec values, never free text",
    ),
];

/// Older Docker Flow Proxy names still read, with the name they stand for now.
const RENAMED_PARAMETERS: &[(&str, &str)] =
    &[("addHeader", "addReqHeader"), ("setHeader", "setReqHeader")];

/// Docker Flow Proxy's old `serviceDomainMatchAll=true`: the same as `serviceDomainAlgo=hdr_dom`.
const DOMAIN_MATCH_ALL: &str = "serviceDomainMatchAll";

/// A parameter Docker Flow Proxy's clients send that flow-proxy accepts and ignores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredParameter {
    /// The parameter as the user wrote it.
    pub parameter: String,
    /// Why it means nothing here.
    pub reason: &'static str,
}

impl std::fmt::Display for IgnoredParameter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "`{}` ignored: {}", self.parameter, self.reason)
    }
}

/// Notes `name` (base name `base`) when a table of ignored parameters lists it; true if so.
fn note_ignored(
    ignored: &mut Vec<IgnoredParameter>,
    tables: &[&[(&'static str, &'static str)]],
    name: &str,
    base: &str,
) -> bool {
    let Some(&(_, reason)) = tables
        .iter()
        .flat_map(|table| table.iter())
        .find(|(known, _)| *known == base)
    else {
        return false;
    };
    if !ignored.iter().any(|note| note.parameter == name) {
        ignored.push(IgnoredParameter {
            parameter: shown_name(name),
            reason,
        });
    }
    true
}

/// The error for an unknown parameter `name` (`base` with index `index`): names it, and the
/// closest of `known` when one is close enough to be a typo (case-insensitive).
fn unknown_parameter<'k>(
    name: &str,
    base: &str,
    index: u16,
    known: impl Iterator<Item = &'k str>,
    what: &str,
) -> SpecError {
    let written = base.to_ascii_lowercase();
    let closest = known
        .map(|candidate| {
            let distance = strsim::damerau_levenshtein(&written, &candidate.to_ascii_lowercase());
            (distance, candidate)
        })
        .filter(|(distance, candidate)| *distance <= typo_distance(candidate))
        .min_by_key(|(distance, _)| *distance);
    match closest {
        Some((_, candidate)) => spec_error(
            &shown_name(name),
            format!(
                "{what}; did you mean `{}`? (names are case-sensitive)",
                indexed(candidate, index)
            ),
        ),
        None => spec_error(
            &shown_name(name),
            format!("{what} (check the spelling; names are case-sensitive)"),
        ),
    }
}

/// How many edits (after lowercasing) still read as a typo of `name`.
fn typo_distance(name: &str) -> usize {
    match name.len() {
        0..=4 => 1,
        5..=9 => 2,
        _ => 3,
    }
}

/// Highest destination index accepted.
pub(crate) const MAX_INDEX: u16 = 999;

/// The name a user wrote for parameter `base` of destination `index`.
pub(crate) fn indexed(base: &str, index: u16) -> String {
    if index == 0 {
        base.to_string()
    } else {
        format!("{base}.{index}")
    }
}

/// A query sorted by parameter, before any value is validated.
#[derive(Debug, Default)]
struct RawQuery<'q> {
    /// Unsuffixed service (and service-default) parameters.
    service: BTreeMap<&'static str, &'q str>,
    /// Destination parameters by index (an index's `pathType` override included), the
    /// unsuffixed defaults an indexed destination takes included.
    destinations: BTreeMap<u16, BTreeMap<&'static str, &'q str>>,
    /// Per indexed destination, the parameters it takes from the unsuffixed ones.
    inherited: BTreeMap<u16, BTreeSet<&'static str>>,
    /// Accepted parameters that mean nothing here.
    ignored: Vec<IgnoredParameter>,
}

impl RawQuery<'_> {
    /// The index whose parameter `base` destination `index` uses: 0 when it took the
    /// unsuffixed default, else its own.
    fn origin(&self, index: u16, base: &str) -> u16 {
        match self.inherited.get(&index) {
            Some(names) if names.contains(base) => 0,
            _ => index,
        }
    }

    /// With indexed destinations, the unsuffixed [`Scope::DestinationDefault`] values are the
    /// defaults of each indexed destination, and the unsuffixed destination exists only when it
    /// has a parameter of its own (`servicePath`, `serviceDomain`, …).
    fn apply_unsuffixed_defaults(&mut self) {
        if self.destinations.keys().all(|&index| index == 0) {
            return;
        }
        let Some(unsuffixed) = self.destinations.get(&0) else {
            return;
        };
        let is_default = |base: &str| {
            PARAMETERS
                .iter()
                .any(|(known, scope)| *known == base && *scope == Scope::DestinationDefault)
        };
        let defaults: Vec<(&'static str, &str)> = unsuffixed
            .iter()
            .filter(|(base, _)| is_default(base))
            .map(|(base, value)| (*base, *value))
            .collect();
        // A complete tcp destination (`reqMode=tcp&srcPort=…`) has no path or domain, yet is
        // one: it stays, rather than vanish into defaults.
        let tcp_destination = unsuffixed.get("reqMode").is_some_and(|mode| *mode == "tcp")
            && unsuffixed.contains_key("srcPort");
        if !tcp_destination && unsuffixed.keys().all(|base| is_default(base)) {
            self.destinations.remove(&0);
        }
        for (&index, params) in self.destinations.iter_mut().filter(|(&i, _)| i != 0) {
            for &(base, value) in &defaults {
                if !params.contains_key(base) {
                    params.insert(base, value);
                    self.inherited.entry(index).or_default().insert(base);
                }
            }
        }
    }
}

/// Splits `servicePath.12` into `("servicePath", 12)`; unsuffixed names have index 0.
fn split_name(name: &str) -> Result<(&str, u16), SpecError> {
    let Some((base, suffix)) = name.split_once('.') else {
        return Ok((name, 0));
    };
    let canonical = !suffix.is_empty()
        && suffix.len() <= 3
        && suffix.bytes().all(|b| b.is_ascii_digit())
        && !suffix.starts_with('0');
    match suffix.parse::<u16>() {
        Ok(index) if canonical && index <= MAX_INDEX => Ok((base, index)),
        _ => Err(spec_error(
            &shown_name(name),
            format!("the index suffix must be a number from 1 to {MAX_INDEX} (the unsuffixed parameter is destination 0)"),
        )),
    }
}

/// A parameter name safe to echo: the name itself when it is plain, else escaped.
fn shown_name(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
        && name.len() <= 64
    {
        name.to_string()
    } else {
        shown(name)
    }
}

fn sort_query(pairs: &[(String, String)]) -> Result<RawQuery<'_>, SpecError> {
    let mut raw = RawQuery::default();
    for (name, value) in pairs {
        let (base, index) = split_name(name)?;
        if note_ignored(&mut raw.ignored, &[IGNORED_PARAMETERS], name, base) {
            continue;
        }
        if let Some(&(_, reason)) = UNSUPPORTED_PARAMETERS.iter().find(|(k, _)| *k == base) {
            return Err(spec_error(
                &shown_name(name),
                format!("not supported by flow-proxy: {reason}"),
            ));
        }
        let (base, value) = match base {
            DOMAIN_MATCH_ALL if index == 0 => match parse_flag(DOMAIN_MATCH_ALL, value)? {
                true => ("serviceDomainAlgo", "hdr_dom"),
                false => continue,
            },
            _ => (
                RENAMED_PARAMETERS
                    .iter()
                    .find(|(old, _)| *old == base)
                    .map_or(base, |(_, new)| *new),
                value.as_str(),
            ),
        };
        let Some(&(known, scope)) = PARAMETERS.iter().find(|(known, _)| *known == base) else {
            let known = (PARAMETERS.iter().map(|(k, _)| *k))
                .chain(IGNORED_PARAMETERS.iter().map(|(k, _)| *k));
            return Err(unknown_parameter(
                name,
                base,
                index,
                known,
                "not supported by flow-proxy",
            ));
        };
        let slot = match (scope, index) {
            (Scope::Service, 0) | (Scope::ServiceDefault, 0) => &mut raw.service,
            (Scope::Service, _) => {
                return Err(spec_error(
                    name,
                    format!("`{known}` applies to the whole service and takes no index suffix"),
                ))
            }
            (Scope::Destination, _)
            | (Scope::DestinationDefault, _)
            | (Scope::ServiceDefault, _) => raw.destinations.entry(index).or_default(),
        };
        if slot.insert(known, value).is_some() {
            return Err(spec_error(name, "given more than once"));
        }
    }
    raw.apply_unsuffixed_defaults();
    Ok(raw)
}

/// Splits a comma list; the empty string is a list with one empty item (rejected later).
fn items(value: &str) -> Vec<&str> {
    value.split(',').collect()
}

/// Parses the query of `GET /v1/docker-flow-proxy/reconfigure` (pairs already percent-decoded,
/// in request order). A clear password matching the hash `current` (the service's spec now)
/// holds for the same user keeps that hash. Also returns the parameters accepted and ignored.
pub(crate) fn build_spec(
    pairs: &[(String, String)],
    current: Option<&ServiceSpec>,
) -> Result<(ServiceSpec, Vec<IgnoredParameter>), SpecError> {
    let raw = sort_query(pairs)?;
    // Before any value is read: the first destination over the limit, by index, is named.
    if let Some((&index, params)) = raw.destinations.iter().nth(MAX_DESTINATIONS_PER_SERVICE) {
        let first = params.keys().next().copied().unwrap_or("servicePath");
        return Err(spec_error(
            &indexed(first, index),
            format!(
                "{} destinations given: at most {MAX_DESTINATIONS_PER_SERVICE} per service",
                raw.destinations.len()
            ),
        ));
    }
    let service = &raw.service;

    let service_name = match service.get("serviceName") {
        Some(value) => ServiceName::parse("serviceName", value)?,
        None => return Err(spec_error("serviceName", "required")),
    };
    let service_color = service
        .get("serviceColor")
        .map(|v| ServiceColor::parse("serviceColor", v))
        .transpose()?;
    let acl_name = service
        .get("aclName")
        .map(|v| AclName::parse("aclName", v))
        .transpose()?;
    let skip_check = service
        .get("skipCheck")
        .map(|v| parse_flag("skipCheck", v))
        .transpose()?
        .unwrap_or(false);
    let path_type = service
        .get("pathType")
        .map(|v| PathType::parse("pathType", v))
        .transpose()?
        .unwrap_or_default();
    let service_domain_algo = service
        .get("serviceDomainAlgo")
        .map(|v| DomainAlgo::parse("serviceDomainAlgo", v))
        .transpose()?;
    let users_pass_encrypted = service
        .get("usersPassEncrypted")
        .map(|v| parse_flag("usersPassEncrypted", v))
        .transpose()?
        .unwrap_or(false);
    let users = service
        .get("users")
        .map(|v| {
            let known = current
                .filter(|spec| spec.service_name == service_name)
                .map_or(&[][..], |spec| spec.users.as_slice());
            parse_users_keeping("users", v, users_pass_encrypted, known)
        })
        .transpose()?
        .unwrap_or_default();

    let redirect_when_http_proto = service
        .get("redirectWhenHttpProto")
        .map(|v| parse_flag("redirectWhenHttpProto", v))
        .transpose()?
        .unwrap_or(false);
    let verify_client_ssl = service
        .get("verifyClientSsl")
        .map(|v| parse_flag("verifyClientSsl", v))
        .transpose()?
        .unwrap_or(false);
    let ssl_verify_none = service
        .get("sslVerifyNone")
        .map(|v| parse_flag("sslVerifyNone", v))
        .transpose()?
        .unwrap_or(false);
    let header_lines = |parameter: &str| {
        service
            .get(parameter)
            .map(|v| {
                parse_list(parameter, &items(v), MAX_LIST_ITEMS, "items", |item| {
                    HeaderLine::parse(parameter, item)
                })
            })
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let header_names = |parameter: &str| {
        service
            .get(parameter)
            .map(|v| {
                parse_list(parameter, &items(v), MAX_LIST_ITEMS, "items", |item| {
                    HeaderName::parse(parameter, item).map_err(|error| {
                        if item.contains(' ') {
                            spec_error(
                                parameter,
                                format!("{} must be a header name only (no value)", shown(item)),
                            )
                        } else {
                            error
                        }
                    })
                })
            })
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let headers = HeaderRules {
        add_req: header_lines("addReqHeader")?,
        set_req: header_lines("setReqHeader")?,
        del_req: header_names("delReqHeader")?,
        add_res: header_lines("addResHeader")?,
        set_res: header_lines("setResHeader")?,
        del_res: header_names("delResHeader")?,
    };
    let backend_tuning =
        boxed_unless_default(BackendTuning::parse(|name| service.get(name).copied())?);

    let mut destinations = Vec::new();
    for (&index, params) in &raw.destinations {
        let name = |base: &str| indexed(base, raw.origin(index, base));
        let path_type_override = params
            .get("pathType")
            .map(|v| PathType::parse(&name("pathType"), v))
            .transpose()?;
        let effective = path_type_override.unwrap_or(path_type);
        let service_path = params
            .get("servicePath")
            .map(|v| {
                let parameter = name("servicePath");
                parse_list(
                    &parameter,
                    &items(v),
                    MAX_PATHS_PER_DESTINATION,
                    "paths",
                    |item| ServicePath::parse(&parameter, item, effective),
                )
            })
            .transpose()?
            .unwrap_or_default();
        let service_domain = params
            .get("serviceDomain")
            .map(|v| {
                let parameter = name("serviceDomain");
                parse_list(
                    &parameter,
                    &items(v),
                    MAX_DOMAINS_PER_DESTINATION,
                    "domains",
                    |item| Domain::parse(&parameter, item),
                )
            })
            .transpose()?
            .unwrap_or_default();
        let port = params
            .get("port")
            .map(|v| Port::parse(&name("port"), v))
            .transpose()?;
        let src_port = params
            .get("srcPort")
            .map(|v| Port::parse(&name("srcPort"), v))
            .transpose()?;
        let req_mode = params
            .get("reqMode")
            .map(|v| ReqMode::parse(&name("reqMode"), v))
            .transpose()?
            .unwrap_or_default();
        let flag = |base: &str| {
            params
                .get(base)
                .map(|v| parse_flag(&name(base), v))
                .transpose()
                .map(|set| set.unwrap_or(false))
        };
        let methods = |base: &str| {
            let parameter = name(base);
            params
                .get(base)
                .map(|v| {
                    parse_list(&parameter, &items(v), MAX_LIST_ITEMS, "items", |item| {
                        HttpMethod::parse(&parameter, item)
                    })
                })
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let https_only = flag("httpsOnly")?;
        let https_redirect_code = params
            .get("httpsRedirectCode")
            .map(|v| RedirectCode::parse(&name("httpsRedirectCode"), v))
            .transpose()?;
        let redirect_from_domain = params
            .get("redirectFromDomain")
            .map(|v| {
                let parameter = name("redirectFromDomain");
                parse_list(&parameter, &items(v), MAX_LIST_ITEMS, "items", |item| {
                    Domain::parse(&parameter, item)
                })
            })
            .transpose()?
            .unwrap_or_default();
        let allowed_methods = methods("allowedMethods")?;
        let denied_methods = methods("deniedMethods")?;
        let deny_http = flag("denyHttp")?;
        let ignore_authorization = params
            .get("ignoreAuthorization")
            .map(|v| parse_flag(&name("ignoreAuthorization"), v))
            .transpose()?
            .unwrap_or(false);
        let routing =
            RoutingRules::parse(|base| params.get(base).map(|v| (*v, name(base))), effective)?;
        let path_rewrite = PathRewrite::parse(params, name)?;
        destinations.push(Destination {
            index,
            service_path,
            service_domain,
            path_type: path_type_override,
            port,
            src_port,
            req_mode,
            https_only,
            https_redirect_code,
            extras: boxed_unless_default(DestinationExtras {
                redirect_from_domain,
                allowed_methods,
                denied_methods,
                path_rewrite,
            }),
            deny_http,
            ignore_authorization,
            routing: boxed_unless_default(routing),
        });
    }
    let is_default_backend = parse_default_backend(service.get("isDefaultBackend").copied())?;
    let service_tag = service
        .get("serviceTag")
        .map(|v| parse_service_tags("serviceTag", &items(v)))
        .transpose()?
        .unwrap_or_default();

    ServiceSpec::checked(ServiceSpec {
        service_name,
        service_color,
        acl_name,
        skip_check,
        path_type,
        destinations,
        redirect_when_http_proto,
        headers: boxed_unless_default(headers),
        users,
        verify_client_ssl,
        ssl_verify_none,
        service_domain_algo,
        is_default_backend,
        custom: boxed_unless_default(CustomTemplates::parse(|parameter| {
            service.get(parameter).copied()
        })?),
        service_tag,
        backend_tuning,
        lets_encrypt: super::acme::parse_lets_encrypt(service.get("letsEncrypt").copied())?,
    })
    .map(|spec| (spec, raw.ignored.clone()))
}

/// Reads the `serviceName` of `GET /v1/docker-flow-proxy/remove`, with the Docker Flow Proxy
/// parameters accepted and ignored; any other parameter is an error, so a mistyped query never
/// removes something by accident.
pub(crate) fn remove_service_name(
    pairs: &[(String, String)],
) -> Result<(ServiceName, Vec<IgnoredParameter>), SpecError> {
    let mut found: Option<&str> = None;
    let mut ignored = Vec::new();
    let tables = [IGNORED_PARAMETERS, IGNORED_ON_REMOVE];
    for (name, value) in pairs {
        if note_ignored(&mut ignored, &tables, name, name) {
            continue;
        }
        if name != "serviceName" {
            let known = std::iter::once("serviceName").chain(
                tables
                    .iter()
                    .flat_map(|table| table.iter().map(|(k, _)| *k)),
            );
            return Err(unknown_parameter(
                name,
                name,
                0,
                known,
                "not supported by remove",
            ));
        }
        if found.replace(value).is_some() {
            return Err(spec_error("serviceName", "given more than once"));
        }
    }
    match found {
        Some(value) => Ok((ServiceName::parse("serviceName", value)?, ignored)),
        None => Err(spec_error("serviceName", "required")),
    }
}
