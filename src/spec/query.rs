//! Reading a reconfigure (or remove) query into a [`ServiceSpec`].
//!
//! The names are Docker Flow Proxy's. Destination parameters come unsuffixed (destination 0)
//! or with an index suffix `.1`, `.2`, … (`servicePath.1`, `port.1`); every parameter of one
//! index describes one destination. `pathType` is special: unsuffixed it is the service's
//! default for every destination, `pathType.N` overrides it for destination N.
//!
//! Unknown parameters and parameters given twice are errors: a typo must not silently change
//! routing. Values are validated in a fixed order (service parameters, then destinations by
//! index), so the error for a bad query does not depend on the order of its parameters.
//!
//! Adding a parameter: one row in [`PARAMETERS`], one field in `ServiceSpec` or `Destination`,
//! one line in [`build_spec`] (and its JSON field in `stored.rs`).

use std::collections::BTreeMap;

use super::values::{
    parse_flag, parse_list, parse_users_keeping, shown, spec_error, AclName, Domain, HeaderLine,
    HeaderName, HttpMethod, PathType, Port, RedirectCode, ReqMode, ServiceColor, ServiceName,
    ServicePath, MAX_DOMAINS_PER_DESTINATION, MAX_LIST_ITEMS, MAX_PATHS_PER_DESTINATION,
};
use super::{Destination, HeaderRules, ServiceSpec, SpecError, MAX_DESTINATIONS_PER_SERVICE};

/// Where a parameter may appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Once per service, never indexed.
    Service,
    /// Per destination: unsuffixed is destination 0, `.N` is destination N.
    Destination,
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
    ("port", Scope::Destination),
    ("srcPort", Scope::Destination),
    ("reqMode", Scope::Destination),
    // Edge rules: redirects, header rules, method rules.
    ("httpsOnly", Scope::Destination),
    ("httpsRedirectCode", Scope::Destination),
    ("redirectWhenHttpProto", Scope::Service),
    ("redirectFromDomain", Scope::Destination),
    ("addReqHeader", Scope::Service),
    ("setReqHeader", Scope::Service),
    ("delReqHeader", Scope::Service),
    ("addResHeader", Scope::Service),
    ("setResHeader", Scope::Service),
    ("delResHeader", Scope::Service),
    ("allowedMethods", Scope::Destination),
    ("deniedMethods", Scope::Destination),
    ("denyHttp", Scope::Destination),
    // Basic auth.
    ("users", Scope::Service),
    ("usersPassEncrypted", Scope::Service),
    ("ignoreAuthorization", Scope::Destination),
    // TLS per service (`serviceCert` is taken by the API: it is a certificate, not a spec value).
    ("verifyClientSsl", Scope::Service),
    ("sslVerifyNone", Scope::Service),
];

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
    /// Destination parameters by index (an index's `pathType` override included).
    destinations: BTreeMap<u16, BTreeMap<&'static str, &'q str>>,
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
        let Some(&(known, scope)) = PARAMETERS.iter().find(|(known, _)| *known == base) else {
            return Err(spec_error(
                &shown_name(name),
                "not supported by flow-proxy (check the spelling; names are case-sensitive)",
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
            (Scope::Destination, _) | (Scope::ServiceDefault, _) => {
                raw.destinations.entry(index).or_default()
            }
        };
        if slot.insert(known, value.as_str()).is_some() {
            return Err(spec_error(name, "given more than once"));
        }
    }
    Ok(raw)
}

/// Splits a comma list; the empty string is a list with one empty item (rejected later).
fn items(value: &str) -> Vec<&str> {
    value.split(',').collect()
}

/// Parses the query of `GET /v1/docker-flow-proxy/reconfigure` (pairs already percent-decoded,
/// in request order). A clear password matching the hash `current` (the service's spec now)
/// holds for the same user keeps that hash.
pub(crate) fn build_spec(
    pairs: &[(String, String)],
    current: Option<&ServiceSpec>,
) -> Result<ServiceSpec, SpecError> {
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

    let mut destinations = Vec::new();
    for (&index, params) in &raw.destinations {
        let name = |base: &str| indexed(base, index);
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
            redirect_from_domain,
            allowed_methods,
            denied_methods,
            deny_http,
            ignore_authorization,
        });
    }

    ServiceSpec::checked(ServiceSpec {
        service_name,
        service_color,
        acl_name,
        skip_check,
        path_type,
        destinations,
        redirect_when_http_proto,
        headers,
        users,
        verify_client_ssl,
        ssl_verify_none,
    })
}

/// Reads the `serviceName` of `GET /v1/docker-flow-proxy/remove`; any other parameter is an
/// error, so a mistyped query never removes something by accident.
pub(crate) fn remove_service_name(pairs: &[(String, String)]) -> Result<ServiceName, SpecError> {
    let mut found: Option<&str> = None;
    for (name, value) in pairs {
        if name != "serviceName" {
            return Err(spec_error(&shown_name(name), "not supported by remove"));
        }
        if found.replace(value).is_some() {
            return Err(spec_error("serviceName", "given more than once"));
        }
    }
    match found {
        Some(value) => ServiceName::parse("serviceName", value),
        None => Err(spec_error("serviceName", "required")),
    }
}
