//! Docker Flow Proxy's remaining routing parameters: the conditions a request must also meet to
//! reach a destination, where a destination forwards to when it is not a Consul service, and the
//! service that takes the requests no rule matched.
//!
//! Per destination (`name.N` as every destination parameter):
//! - `servicePathExclude`: paths that must not reach the destination even though `servicePath`
//!   matches; matched with the destination's path type.
//! - `serviceHeader`: `Name:value,…`; every listed request header must have exactly that value.
//! - `userAgent`: the `User-Agent` must contain one of the values (case-insensitive), as Docker
//!   Flow Proxy matched it (`hdr_sub(User-Agent) -i`).
//! - `outboundHostname`: a fixed host (DNS name or IP address) the destination forwards to, on
//!   the destination's `port` (required), instead of the Consul service's instances.
//!
//! Per service: `isDefaultBackend=true`, the backend of the requests no rule of the main HTTP
//! (and HTTPS) frontend matched.
//!
//! Values are words of a strict alphabet (no space, quote, `#`, `$`, brace or backslash), so
//! they reach haproxy.cfg as written and cannot end an acl or a line.

use super::query::indexed;
use super::values::{check_chars, parse_flag, parse_list, shown, spec_error, HeaderName};
use super::values::{PathType, ServicePath, MAX_LIST_ITEMS, MAX_PATHS_PER_DESTINATION};
use super::{Instance, SpecError};

/// Longest `serviceHeader` value or `userAgent` item.
const MAX_MATCH_VALUE_LEN: usize = 128;

/// Most `serviceHeader` items per destination (each is an acl on the `use_backend` line, which
/// holds at most 64 words).
pub const MAX_SERVICE_HEADERS: usize = 16;

/// Most `userAgent` items per destination (one acl line).
pub const MAX_USER_AGENTS: usize = 32;

/// The characters of a `serviceHeader` value or a `userAgent` item: a word HAProxy reads as
/// written (no space, quote, `#`, `$`, `%`, brace, parenthesis, comma or backslash).
fn is_match_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '-' | '.' | '_' | '~' | '!' | '&' | '*' | '+' | '/' | ':' | ';' | '=' | '?' | '@'
        )
}

const MATCH_WHAT: &str = "a match value (letters, digits and - . _ ~ ! & * + / : ; = ? @)";

/// A word a request value is compared with: a `serviceHeader` value or a `userAgent` item.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MatchValue(String);

impl MatchValue {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<MatchValue, SpecError> {
        if value.starts_with('-') {
            return Err(spec_error(
                parameter,
                format!(
                    "{} starts with `-`, which HAProxy would read as an acl option",
                    shown(value)
                ),
            ));
        }
        check_chars(
            parameter,
            value,
            MAX_MATCH_VALUE_LEN,
            MATCH_WHAT,
            is_match_char,
            is_match_char,
        )?;
        Ok(MatchValue(value.to_string()))
    }

    /// The value as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One `serviceHeader` item: the request must carry header `name` with exactly `value`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HeaderMatch {
    name: HeaderName,
    value: MatchValue,
}

impl HeaderMatch {
    /// Validates one `Name:value` item given as `parameter`.
    pub fn parse(parameter: &str, item: &str) -> Result<HeaderMatch, SpecError> {
        let Some((name, value)) = item.split_once(':') else {
            return Err(spec_error(
                parameter,
                format!("{} is not `Name:value`", shown(item)),
            ));
        };
        Ok(HeaderMatch {
            name: HeaderName::parse(parameter, name)?,
            value: MatchValue::parse(parameter, value)?,
        })
    }

    /// The header's name.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// The value the header must have.
    pub fn value(&self) -> &MatchValue {
        &self.value
    }
}

impl std::fmt::Display for HeaderMatch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}:{}", self.name.as_str(), self.value.as_str())
    }
}

/// The host `outboundHostname` names: an IP literal or a DNS hostname, checked as strictly as an
/// instance address from the registry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutboundHost(String);

impl OutboundHost {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<OutboundHost, SpecError> {
        // The port is checked separately; any valid one lets the address be checked.
        let instance =
            Instance::new(value, 1).map_err(|error| spec_error(parameter, error.message))?;
        Ok(OutboundHost(instance.address().to_string()))
    }

    /// The host as text (an IP literal in canonical form, or a lowercased hostname).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host as an instance on `port`, for the destination's backend.
    pub fn instance(&self, port: u16) -> Option<Instance> {
        Instance::new(&self.0, port).ok()
    }
}

/// The routing-rule parameters of one destination.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoutingRules {
    /// `servicePathExclude.N`: matched with the destination's path type.
    pub path_exclude: Vec<ServicePath>,
    /// `serviceHeader.N`: all must match.
    pub headers: Vec<HeaderMatch>,
    /// `userAgent.N`: one must be contained in the `User-Agent`.
    pub user_agents: Vec<MatchValue>,
    /// `outboundHostname.N`: forward here instead of the Consul instances.
    pub outbound_hostname: Option<OutboundHost>,
}

impl RoutingRules {
    /// Whether the rule asks more of a request than its path and domain (headers, user agent):
    /// such a rule is placed before the same path and domain without conditions.
    pub fn has_conditions(&self) -> bool {
        !self.headers.is_empty() || !self.user_agents.is_empty()
    }

    /// The conditions in one canonical text (sorted), telling two route claims on the same path
    /// apart; `None` without conditions.
    pub fn condition_text(&self) -> Option<String> {
        if !self.has_conditions() {
            return None;
        }
        let mut headers: Vec<String> = self.headers.iter().map(ToString::to_string).collect();
        headers.sort();
        let mut agents: Vec<&str> = self.user_agents.iter().map(MatchValue::as_str).collect();
        agents.sort_unstable();
        let mut parts = Vec::new();
        if !headers.is_empty() {
            parts.push(format!("headers {}", headers.join(",")));
        }
        if !agents.is_empty() {
            parts.push(format!("user agent {}", agents.join(",")));
        }
        Some(parts.join(" and "))
    }

    /// Reads the group from destination `index`'s raw parameters (`get` returns a parameter's
    /// value and the name to report it under); `path_type` is the destination's path type.
    pub(super) fn parse<'v>(
        get: impl Fn(&str) -> Option<(&'v str, String)>,
        path_type: PathType,
    ) -> Result<RoutingRules, SpecError> {
        let items = |value: &'v str| value.split(',').collect::<Vec<_>>();
        let path_exclude = match get("servicePathExclude") {
            Some((value, parameter)) => parse_list(
                &parameter,
                &items(value),
                MAX_PATHS_PER_DESTINATION,
                "paths",
                |item| ServicePath::parse(&parameter, item, path_type),
            )?,
            None => Vec::new(),
        };
        let headers = match get("serviceHeader") {
            Some((value, parameter)) => parse_list(
                &parameter,
                &items(value),
                MAX_SERVICE_HEADERS,
                "headers",
                |item| HeaderMatch::parse(&parameter, item),
            )?,
            None => Vec::new(),
        };
        let user_agents = match get("userAgent") {
            Some((value, parameter)) => parse_list(
                &parameter,
                &items(value),
                MAX_USER_AGENTS,
                "items",
                |item| MatchValue::parse(&parameter, item),
            )?,
            None => Vec::new(),
        };
        let outbound_hostname = get("outboundHostname")
            .map(|(value, parameter)| OutboundHost::parse(&parameter, value))
            .transpose()?;
        Ok(RoutingRules {
            path_exclude,
            headers,
            user_agents,
            outbound_hostname,
        })
    }

    /// The rules between this group and the rest of destination `index`: exclusions and
    /// conditions are HTTP only; `outboundHostname` needs the destination's `port`; header names
    /// are not given twice.
    pub(super) fn check(
        &self,
        index: u16,
        http: bool,
        has_paths: bool,
        has_port: bool,
    ) -> Result<(), SpecError> {
        let name = |base: &str| indexed(base, index);
        if !http {
            let http_only = [
                ("servicePathExclude", !self.path_exclude.is_empty()),
                ("serviceHeader", !self.headers.is_empty()),
                ("userAgent", !self.user_agents.is_empty()),
            ];
            if let Some((base, _)) = http_only.iter().find(|(_, set)| *set) {
                return Err(spec_error(
                    &name(base),
                    "applies to reqMode=http only (it matches HTTP requests)",
                ));
            }
        }
        if !self.path_exclude.is_empty() && !has_paths {
            return Err(spec_error(
                &name("servicePathExclude"),
                format!(
                    "needs {}: it excludes paths from the ones servicePath matches",
                    name("servicePath")
                ),
            ));
        }
        for (position, header) in self.headers.iter().enumerate() {
            let earlier = self.headers[..position].iter().any(|other| {
                other
                    .name
                    .as_str()
                    .eq_ignore_ascii_case(header.name.as_str())
            });
            if earlier {
                return Err(spec_error(
                    &name("serviceHeader"),
                    format!(
                        "header {} is listed twice: a request header has one value",
                        header.name.as_str()
                    ),
                ));
            }
        }
        if self.outbound_hostname.is_some() && !has_port {
            return Err(spec_error(
                &name("outboundHostname"),
                format!(
                    "needs {}: the port HAProxy connects to on that host",
                    name("port")
                ),
            ));
        }
        Ok(())
    }
}

/// Reads `isDefaultBackend`.
pub(super) fn parse_default_backend(value: Option<&str>) -> Result<bool, SpecError> {
    value
        .map(|v| parse_flag("isDefaultBackend", v))
        .transpose()
        .map(|set| set.unwrap_or(false))
}

/// The stored form of one destination's group (fields of `StoredDestination`, flattened).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct StoredRoutingRules {
    #[serde(default)]
    service_path_exclude: Vec<String>,
    /// `Name:value` items, as in the query.
    #[serde(default)]
    service_header: Vec<String>,
    #[serde(default)]
    user_agent: Vec<String>,
    #[serde(default)]
    outbound_hostname: Option<String>,
}

impl From<&RoutingRules> for StoredRoutingRules {
    fn from(rules: &RoutingRules) -> StoredRoutingRules {
        StoredRoutingRules {
            service_path_exclude: rules
                .path_exclude
                .iter()
                .map(|p| p.as_str().to_string())
                .collect(),
            service_header: rules.headers.iter().map(ToString::to_string).collect(),
            user_agent: rules
                .user_agents
                .iter()
                .map(|a| a.as_str().to_string())
                .collect(),
            outbound_hostname: rules
                .outbound_hostname
                .as_ref()
                .map(|h| h.as_str().to_string()),
        }
    }
}

impl StoredRoutingRules {
    /// Re-validates the stored group of destination `index` with the query's rules.
    pub(super) fn read(&self, index: u16, path_type: PathType) -> Result<RoutingRules, SpecError> {
        let joined = |items: &[String]| (!items.is_empty()).then(|| items.join(","));
        let exclude = joined(&self.service_path_exclude);
        let headers = joined(&self.service_header);
        let agents = joined(&self.user_agent);
        let limit = |parameter: &str, items: &[String]| {
            if items.len() > MAX_LIST_ITEMS {
                Err(spec_error(
                    &indexed(parameter, index),
                    format!("too many items: at most {MAX_LIST_ITEMS}"),
                ))
            } else {
                Ok(())
            }
        };
        limit("serviceHeader", &self.service_header)?;
        limit("userAgent", &self.user_agent)?;
        // A stored item holding a comma would split differently: refuse it as the query would.
        let commas = [
            ("servicePathExclude", &self.service_path_exclude),
            ("serviceHeader", &self.service_header),
            ("userAgent", &self.user_agent),
        ];
        for (parameter, items) in commas {
            if items.iter().any(|item| item.contains(',')) {
                return Err(spec_error(
                    &indexed(parameter, index),
                    "a stored item contains a comma",
                ));
            }
        }
        RoutingRules::parse(
            |base| {
                let value = match base {
                    "servicePathExclude" => exclude.as_deref(),
                    "serviceHeader" => headers.as_deref(),
                    "userAgent" => agents.as_deref(),
                    "outboundHostname" => self.outbound_hostname.as_deref(),
                    _ => None,
                };
                value.map(|v| (v, indexed(base, index)))
            },
            path_type,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::spec::tests::{parse, rejected as refused};
    use crate::spec::ServiceSpec;

    #[test]
    fn the_routing_rules_are_read_per_destination_and_round_trip() {
        let spec = parse(&[
            ("serviceName", "api"),
            ("isDefaultBackend", "true"),
            ("servicePath", "/api"),
            ("servicePathExclude", "/api/internal,/api/admin"),
            ("serviceHeader", "X-Version:2,x-tenant:acme"),
            ("userAgent", "googlebot,iPhone"),
            ("servicePath.1", "/ext"),
            ("port.1", "8443"),
            ("outboundHostname.1", "Example.COM"),
        ])
        .expect("valid");
        assert!(spec.is_default_backend());
        let first = spec.destinations()[0].routing();
        let excluded: Vec<&str> = first.path_exclude.iter().map(|p| p.as_str()).collect();
        assert_eq!(excluded, ["/api/internal", "/api/admin"]);
        let headers: Vec<String> = first.headers.iter().map(ToString::to_string).collect();
        assert_eq!(headers, ["X-Version:2", "x-tenant:acme"]);
        let agents: Vec<&str> = first.user_agents.iter().map(|a| a.as_str()).collect();
        assert_eq!(agents, ["googlebot", "iPhone"]);
        assert!(first.outbound_hostname.is_none());
        let second = spec.destinations()[1].routing();
        assert_eq!(
            second.outbound_hostname.as_ref().map(|h| h.as_str()),
            Some("example.com")
        );
        assert!(spec.uses_registry(), "destination 0 still uses Consul");

        let json = serde_json::to_string(&spec).expect("serializes");
        assert!(json.contains("\"ServicePathExclude\":[\"/api/internal\",\"/api/admin\"]"));
        assert!(json.contains("\"OutboundHostname\":\"example.com\""));
        assert!(json.contains("\"IsDefaultBackend\":true"));
        let back: ServiceSpec = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back, spec);
    }

    #[test]
    fn a_service_whose_every_destination_is_outbound_needs_no_registry() {
        let spec = parse(&[
            ("serviceName", "ext"),
            ("servicePath", "/ext"),
            ("port", "80"),
            ("outboundHostname", "127.0.0.1"),
        ])
        .expect("valid");
        assert!(!spec.uses_registry());
    }

    #[test]
    fn bad_routing_values_are_refused_naming_the_parameter() {
        let base = [("serviceName", "api"), ("servicePath", "/api")];
        let with = |extra: (&'static str, &'static str)| {
            let mut pairs = base.to_vec();
            pairs.push(extra);
            refused(&pairs)
        };
        for (parameter, value) in [
            ("serviceHeader", "X-Version"),
            ("serviceHeader", "X-Version:"),
            ("serviceHeader", "X Version:2"),
            ("serviceHeader", "X-Version:a b"),
            ("serviceHeader", "X-Version:\"2\""),
            ("serviceHeader", "X-Version:2#x"),
            ("serviceHeader", "X-Version:${HOME}"),
            ("serviceHeader", "X-Version:{x}"),
            ("serviceHeader", "X-Version:a\\b"),
            ("serviceHeader", "X-Version:2\nacl x"),
            ("serviceHeader", "X-Version:2,X-Version:3"),
            ("userAgent", "Mozilla 5"),
            ("userAgent", "bot,"),
            ("userAgent", "'bot'"),
            ("userAgent", "bot%[src]"),
            ("servicePathExclude", "/a b"),
            ("servicePathExclude", "/a#b"),
            ("outboundHostname", "bad host"),
            ("outboundHostname", "-bad.example.com"),
            ("outboundHostname", "a.example.com:80"),
            ("isDefaultBackend", "yes please"),
        ] {
            let error = with((parameter, value));
            assert_eq!(error.parameter, parameter, "{value:?}: {error}");
        }
    }

    #[test]
    fn the_rules_between_routing_parameters_are_checked() {
        let error = refused(&[
            ("serviceName", "ext"),
            ("servicePath", "/ext"),
            ("outboundHostname", "example.com"),
        ]);
        assert_eq!(error.parameter, "outboundHostname");
        assert!(error.message.contains("port"), "{error}");

        let error = refused(&[
            ("serviceName", "db"),
            ("reqMode", "tcp"),
            ("srcPort", "5432"),
            ("userAgent", "psql"),
        ]);
        assert_eq!(error.parameter, "userAgent");

        let error = refused(&[
            ("serviceName", "web"),
            ("serviceDomain", "example.com"),
            ("servicePathExclude", "/private"),
        ]);
        assert_eq!(error.parameter, "servicePathExclude");

        let error = refused(&[
            ("serviceName", "web"),
            ("servicePath", "/web"),
            ("srcPort", "8081"),
            ("isDefaultBackend", "true"),
        ]);
        assert_eq!(error.parameter, "isDefaultBackend");

        // Indexed forms name the index.
        let error = refused(&[
            ("serviceName", "web"),
            ("servicePath.1", "/a"),
            ("serviceHeader.1", "X-A"),
        ]);
        assert_eq!(error.parameter, "serviceHeader.1");
    }

    #[test]
    fn conditions_tell_route_claims_on_one_path_apart() {
        let plain = parse(&[("serviceName", "a"), ("servicePath", "/api")]).expect("valid");
        let versioned = parse(&[
            ("serviceName", "b"),
            ("servicePath", "/api"),
            ("serviceHeader", "X-Version:2"),
        ])
        .expect("valid");
        let reordered = parse(&[
            ("serviceName", "c"),
            ("servicePath", "/api"),
            ("userAgent", "iphone,googlebot"),
        ])
        .expect("valid");
        let claims = |spec: &ServiceSpec| spec.route_claims(80);
        assert_ne!(claims(&plain), claims(&versioned));
        assert_ne!(claims(&versioned), claims(&reordered));
        let shown = claims(&reordered)[0].to_string();
        assert_eq!(shown, "path_beg /api with user agent googlebot,iphone");
    }

    #[test]
    fn stored_routing_rules_are_validated_on_read() {
        let stored = r#"{"ServiceName":"api","ServiceDest":[{"Index":0,"ServicePath":["/api"],
            "ServiceHeader":["X-Version:2 acl"]}]}"#;
        let error = serde_json::from_str::<ServiceSpec>(stored).expect_err("refused");
        assert!(error.to_string().contains("serviceHeader"), "{error}");
        let stored = r#"{"ServiceName":"api","ServiceDest":[{"Index":1,"ServicePath":["/api"],
            "UserAgent":["a,b"]}]}"#;
        let error = serde_json::from_str::<ServiceSpec>(stored).expect_err("refused");
        assert!(error.to_string().contains("userAgent.1"), "{error}");
    }
}
