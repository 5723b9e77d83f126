//! The JSON shape of a [`ServiceSpec`]: kept in Consul KV and echoed in Docker Flow Proxy-style
//! answers.
//!
//! ```json
//! {
//!   "ServiceName": "go-demo",
//!   "ServiceColor": null,
//!   "AclName": null,
//!   "SkipCheck": false,
//!   "PathType": "path_beg",
//!   "ServiceDest": [
//!     { "Index": 0, "ServicePath": ["/demo"], "ServiceDomain": [], "PathType": null,
//!       "Port": null, "SrcPort": null, "ReqMode": "http", "IgnoreAuthorization": false,
//!       "HttpsOnly": false, "HttpsRedirectCode": null, "RedirectFromDomain": [],
//!       "AllowedMethods": [], "DeniedMethods": [], "DenyHttp": false,
//!       "ServicePathExclude": [], "ServiceHeader": [], "UserAgent": [],
//!       "OutboundHostname": null, "StripPath": false, "ReqPathSearchReplace": [] }
//!   ],
//!   "RedirectWhenHttpProto": false,
//!   "AddReqHeader": [], "SetReqHeader": [], "DelReqHeader": [],
//!   "AddResHeader": [], "SetResHeader": [], "DelResHeader": [],
//!   "Users": [ { "Username": "alice", "PasswordHash": "$6$…" } ],
//!   "ServiceDomainAlgo": null,
//!   "IsDefaultBackend": false,
//!   "TemplateFePath": null, "TemplateBePath": null, "BackendExtra": [],
//!   "ServiceTag": []
//! }
//! ```
//!
//! `Users` holds crypt(3) hashes only (clear passwords are hashed when the query is parsed);
//! they are checked as strictly as `usersPassEncrypted=true` input when read back.
//!
//! Every field is always written; an absent value is `null` (or `[]` for lists), so the shape
//! is stable. When reading, missing fields take those same defaults (`PathType` `path_beg`,
//! `ReqMode` `http`, flags false, lists empty). Reading re-validates every value with the same rules
//! as the query, and errors name the query parameter (`servicePath.1`), so one message format
//! serves both.

use serde::{Deserialize, Serialize};

use super::backend_tuning::StoredBackendTuning;
use super::custom_templates::StoredCustomTemplates;
use super::path_rewrite::{parse_service_tags, PathRewrite};
use super::query::indexed;
use super::query::MAX_INDEX;
use super::routing_rules::StoredRoutingRules;
use super::values::{parse_list, spec_error, AclName, Domain, DomainAlgo, PathType, Port, ReqMode};
use super::values::{AuthUser, PasswordHash, UserName};
use super::values::{HeaderLine, HeaderName, HttpMethod, RedirectCode};
use super::values::{ServiceColor, ServiceName, ServicePath};
use super::values::{MAX_DOMAINS_PER_DESTINATION, MAX_LIST_ITEMS, MAX_PATHS_PER_DESTINATION};
use super::{
    boxed_unless_default, BackendTuning, Destination, DestinationExtras, HeaderRules, ServiceSpec,
    SpecError, MASKED_PASSWORD, MAX_DESTINATIONS_PER_SERVICE,
};

/// The stored form of a spec: plain values, validated on the way in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct StoredSpec {
    service_name: String,
    #[serde(default)]
    service_color: Option<String>,
    #[serde(default)]
    acl_name: Option<String>,
    #[serde(default)]
    skip_check: bool,
    #[serde(default)]
    path_type: Option<String>,
    #[serde(default)]
    service_dest: Vec<StoredDestination>,
    #[serde(default)]
    redirect_when_http_proto: bool,
    /// `Name value` items, as in the query.
    #[serde(default)]
    add_req_header: Vec<String>,
    #[serde(default)]
    set_req_header: Vec<String>,
    #[serde(default)]
    del_req_header: Vec<String>,
    #[serde(default)]
    add_res_header: Vec<String>,
    #[serde(default)]
    set_res_header: Vec<String>,
    #[serde(default)]
    del_res_header: Vec<String>,
    #[serde(default)]
    users: Vec<StoredUser>,
    #[serde(default)]
    verify_client_ssl: bool,
    #[serde(default)]
    ssl_verify_none: bool,
    /// `hdr`, `hdr_beg`, `hdr_end` or `hdr_dom`; `null`: `--service-domain-algo`.
    #[serde(default)]
    service_domain_algo: Option<String>,
    #[serde(default)]
    is_default_backend: bool,
    /// `TemplateFePath`, `TemplateBePath`, `BackendExtra` (one item per line).
    #[serde(flatten)]
    custom: StoredCustomTemplates,
    /// `serviceTag`: the Consul tags an instance must carry.
    #[serde(default)]
    service_tag: Vec<String>,
    /// `Balance`, `TimeoutServer`, …, `Observe`: see `backend_tuning.rs`.
    #[serde(flatten)]
    backend_tuning: StoredBackendTuning,
    /// `letsEncrypt`.
    #[serde(default)]
    lets_encrypt: bool,
}

/// The stored form of one basic-auth user: the name and the crypt(3) hash of the password.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct StoredUser {
    username: String,
    password_hash: String,
}

/// The stored form of one destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct StoredDestination {
    index: u32,
    #[serde(default)]
    service_path: Vec<String>,
    #[serde(default)]
    service_domain: Vec<String>,
    #[serde(default)]
    path_type: Option<String>,
    #[serde(default)]
    port: Option<u32>,
    #[serde(default)]
    src_port: Option<u32>,
    #[serde(default)]
    req_mode: Option<String>,
    #[serde(default)]
    ignore_authorization: bool,
    #[serde(default)]
    https_only: bool,
    #[serde(default)]
    https_redirect_code: Option<u32>,
    #[serde(default)]
    redirect_from_domain: Vec<String>,
    #[serde(default)]
    allowed_methods: Vec<String>,
    #[serde(default)]
    denied_methods: Vec<String>,
    #[serde(default)]
    deny_http: bool,
    /// `ServicePathExclude`, `ServiceHeader`, `UserAgent`, `OutboundHostname`.
    #[serde(flatten)]
    routing: StoredRoutingRules,
    #[serde(default)]
    strip_path: bool,
    /// `search,replace` pairs, in order.
    #[serde(default)]
    req_path_search_replace: Vec<String>,
}

fn texts<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// Re-validates a stored list with the query parameter's rules.
fn reparse<T: PartialEq>(
    parameter: &str,
    stored: &[String],
    item: impl Fn(&str, &str) -> Result<T, SpecError>,
) -> Result<Vec<T>, SpecError> {
    let items: Vec<&str> = stored.iter().map(String::as_str).collect();
    parse_list(parameter, &items, MAX_LIST_ITEMS, "items", |raw| {
        item(parameter, raw)
    })
}

impl From<ServiceSpec> for StoredSpec {
    fn from(spec: ServiceSpec) -> StoredSpec {
        let headers = spec.headers();
        let backend_tuning = StoredBackendTuning::from(spec.backend_tuning());
        let custom = StoredCustomTemplates::from(spec.custom_templates());
        StoredSpec {
            redirect_when_http_proto: spec.redirect_when_http_proto,
            verify_client_ssl: spec.verify_client_ssl,
            ssl_verify_none: spec.ssl_verify_none,
            add_req_header: texts(&headers.add_req),
            set_req_header: texts(&headers.set_req),
            del_req_header: texts(&headers.del_req),
            add_res_header: texts(&headers.add_res),
            set_res_header: texts(&headers.set_res),
            del_res_header: texts(&headers.del_res),
            service_name: spec.service_name.to_string(),
            service_color: spec.service_color.map(|c| c.as_str().to_string()),
            acl_name: spec.acl_name.map(|a| a.as_str().to_string()),
            skip_check: spec.skip_check,
            service_domain_algo: spec.service_domain_algo.map(|a| a.as_str().to_string()),
            is_default_backend: spec.is_default_backend,
            custom,
            service_tag: texts(&spec.service_tag),
            backend_tuning,
            lets_encrypt: spec.lets_encrypt,
            path_type: Some(spec.path_type.as_str().to_string()),
            service_dest: spec
                .destinations
                .into_iter()
                .map(|d| StoredDestination {
                    index: u32::from(d.index),
                    service_path: d
                        .service_path
                        .iter()
                        .map(|p| p.as_str().to_string())
                        .collect(),
                    service_domain: d.service_domain.iter().map(|x| x.to_string()).collect(),
                    path_type: d.path_type.map(|t| t.as_str().to_string()),
                    port: d.port.map(|p| u32::from(p.get())),
                    src_port: d.src_port.map(|p| u32::from(p.get())),
                    req_mode: Some(d.req_mode.as_str().to_string()),
                    https_only: d.https_only,
                    https_redirect_code: d.https_redirect_code.map(|c| u32::from(c.get())),
                    redirect_from_domain: texts(d.redirect_from_domain()),
                    allowed_methods: texts(d.allowed_methods()),
                    denied_methods: texts(d.denied_methods()),
                    deny_http: d.deny_http,
                    ignore_authorization: d.ignore_authorization,
                    routing: StoredRoutingRules::from(d.routing()),
                    strip_path: d.path_rewrite().strip_path(),
                    req_path_search_replace: d.path_rewrite().stored_pairs(),
                })
                .collect(),
            users: spec
                .users
                .iter()
                .map(|user| StoredUser {
                    username: user.name().as_str().to_string(),
                    password_hash: user.password().as_str().to_string(),
                })
                .collect(),
        }
    }
}

impl StoredSpec {
    /// The stored form with every password hash masked, for answers.
    pub(super) fn masked(spec: ServiceSpec) -> StoredSpec {
        let mut stored = StoredSpec::from(spec);
        for user in &mut stored.users {
            user.password_hash = MASKED_PASSWORD.to_string();
        }
        stored
    }
}

impl TryFrom<StoredSpec> for ServiceSpec {
    type Error = SpecError;

    fn try_from(stored: StoredSpec) -> Result<ServiceSpec, SpecError> {
        let path_type = stored
            .path_type
            .as_deref()
            .map(|v| PathType::parse("pathType", v))
            .transpose()?
            .unwrap_or_default();
        if stored.service_dest.len() > MAX_DESTINATIONS_PER_SERVICE {
            return Err(spec_error(
                "ServiceDest",
                format!(
                    "{} destinations given: at most {MAX_DESTINATIONS_PER_SERVICE} per service",
                    stored.service_dest.len()
                ),
            ));
        }
        let mut destinations = Vec::with_capacity(stored.service_dest.len());
        for dest in &stored.service_dest {
            let index = u16::try_from(dest.index)
                .ok()
                .filter(|i| *i <= MAX_INDEX)
                .ok_or_else(|| {
                    spec_error(
                        "ServiceDest",
                        format!(
                            "destination index {} is out of range 0 to {MAX_INDEX}",
                            dest.index
                        ),
                    )
                })?;
            let name = |base: &str| indexed(base, index);
            let override_type = dest
                .path_type
                .as_deref()
                .map(|v| PathType::parse(&name("pathType"), v))
                .transpose()?;
            let effective = override_type.unwrap_or(path_type);
            let path_param = name("servicePath");
            let paths: Vec<&str> = dest.service_path.iter().map(String::as_str).collect();
            let domain_param = name("serviceDomain");
            let domains: Vec<&str> = dest.service_domain.iter().map(String::as_str).collect();
            destinations.push(Destination {
                index,
                service_path: parse_list(
                    &path_param,
                    &paths,
                    MAX_PATHS_PER_DESTINATION,
                    "paths",
                    |p| ServicePath::parse(&path_param, p, effective),
                )?,
                service_domain: parse_list(
                    &domain_param,
                    &domains,
                    MAX_DOMAINS_PER_DESTINATION,
                    "domains",
                    |d| Domain::parse(&domain_param, d),
                )?,
                path_type: override_type,
                port: dest
                    .port
                    .map(|p| Port::from_number(&name("port"), p))
                    .transpose()?,
                src_port: dest
                    .src_port
                    .map(|p| Port::from_number(&name("srcPort"), p))
                    .transpose()?,
                req_mode: dest
                    .req_mode
                    .as_deref()
                    .map(|v| ReqMode::parse(&name("reqMode"), v))
                    .transpose()?
                    .unwrap_or_default(),
                ignore_authorization: dest.ignore_authorization,
                https_only: dest.https_only,
                https_redirect_code: dest
                    .https_redirect_code
                    .map(|c| RedirectCode::from_number(&name("httpsRedirectCode"), c))
                    .transpose()?,
                extras: boxed_unless_default(DestinationExtras {
                    redirect_from_domain: reparse(
                        &name("redirectFromDomain"),
                        &dest.redirect_from_domain,
                        Domain::parse,
                    )?,
                    allowed_methods: reparse(
                        &name("allowedMethods"),
                        &dest.allowed_methods,
                        HttpMethod::parse,
                    )?,
                    denied_methods: reparse(
                        &name("deniedMethods"),
                        &dest.denied_methods,
                        HttpMethod::parse,
                    )?,
                    path_rewrite: PathRewrite::from_stored(
                        index,
                        dest.strip_path,
                        &dest.req_path_search_replace,
                    )?,
                }),
                deny_http: dest.deny_http,
                routing: boxed_unless_default(dest.routing.read(index, effective)?),
            });
        }
        let headers = HeaderRules {
            add_req: reparse("addReqHeader", &stored.add_req_header, HeaderLine::parse)?,
            set_req: reparse("setReqHeader", &stored.set_req_header, HeaderLine::parse)?,
            del_req: reparse("delReqHeader", &stored.del_req_header, HeaderName::parse)?,
            add_res: reparse("addResHeader", &stored.add_res_header, HeaderLine::parse)?,
            set_res: reparse("setResHeader", &stored.set_res_header, HeaderLine::parse)?,
            del_res: reparse("delResHeader", &stored.del_res_header, HeaderName::parse)?,
        };
        let mut users: Vec<AuthUser> = Vec::with_capacity(stored.users.len());
        for user in &stored.users {
            let name = UserName::parse("users", &user.username)?;
            if users.iter().any(|known| known.name() == &name) {
                return Err(spec_error(
                    "users",
                    format!("user `{}` is listed twice", name.as_str()),
                ));
            }
            users.push(AuthUser::new(
                name,
                PasswordHash::parse("users", &user.password_hash)?,
            ));
        }
        ServiceSpec::checked(ServiceSpec {
            service_name: ServiceName::parse("serviceName", &stored.service_name)?,
            service_color: stored
                .service_color
                .as_deref()
                .map(|v| ServiceColor::parse("serviceColor", v))
                .transpose()?,
            acl_name: stored
                .acl_name
                .as_deref()
                .map(|v| AclName::parse("aclName", v))
                .transpose()?,
            skip_check: stored.skip_check,
            path_type,
            destinations,
            redirect_when_http_proto: stored.redirect_when_http_proto,
            headers: boxed_unless_default(headers),
            users,
            verify_client_ssl: stored.verify_client_ssl,
            ssl_verify_none: stored.ssl_verify_none,
            service_domain_algo: stored
                .service_domain_algo
                .as_deref()
                .map(|v| DomainAlgo::parse("serviceDomainAlgo", v))
                .transpose()?,
            is_default_backend: stored.is_default_backend,
            custom: boxed_unless_default(stored.custom.checked()?),
            service_tag: {
                let tags: Vec<&str> = stored.service_tag.iter().map(String::as_str).collect();
                parse_service_tags("serviceTag", &tags)?
            },
            backend_tuning: boxed_unless_default(BackendTuning::try_from(&stored.backend_tuning)?),
            lets_encrypt: stored.lets_encrypt,
        })
    }
}
