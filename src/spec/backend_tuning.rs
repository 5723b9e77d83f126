//! Backend tuning: how HAProxy spreads, times, compresses, pins and health-checks the requests
//! of one service (`balance`, `timeoutServer`, `timeoutTunnel`, `timeoutClient`,
//! `connectionMode`, `compressionAlgo`, `compressionType`, `sessionType`, `checkPath`,
//! `checkInterval`, `maxFails`, `observe`).
//!
//! Every parameter is per service (as Docker Flow Proxy had them) and applies to each backend of
//! the service; `timeoutClient` applies to the service's `reqMode=tcp` frontends (an HTTP
//! frontend is shared by many services, so it keeps `--timeout-client`). Each value is one of a
//! few words, a number, a time or a list of MIME types, checked strictly here, so nothing a
//! caller writes becomes text of its own in haproxy.cfg. The stored form is the same text the
//! query takes, read back through the same parsers.
//!
//! Health: unless `skipCheck=true`, HAProxy checks each instance (a TCP connect, or `GET
//! <checkPath>` with `checkPath`) every `checkInterval` (default 2s; 3 failures out, 2 passes
//! back) and also watches live traffic (passive health, on by default): after `maxFails`
//! (default 3; 0 turns it off) consecutive failed requests (`observe=layer4`, the default:
//! connection failures and timeouts; `observe=layer7`: also 5xx answers and broken responses)
//! HAProxy takes the instance out at once, and the checks bring it back.

use serde::{Deserialize, Serialize};

use super::proxy_wide::ConnectionMode;
use super::values::{is_path_char, shown, spec_error};
use super::SpecError;

/// Longest timeout HAProxy takes: 2^31-1 ms (about 24.8 days).
const MAX_TIMEOUT_MS: u64 = 2_147_483_647;
/// Most MIME types in `compressionType` (one HAProxy line).
const MAX_COMPRESSION_TYPES: usize = 32;
/// Longest MIME type accepted.
const MAX_MIME_TYPE_LEN: usize = 127;
/// Longest `checkPath`.
const MAX_CHECK_PATH_LEN: usize = 256;
/// Longest parameter or header name in a `balance` algorithm.
const MAX_BALANCE_NAME_LEN: usize = 64;
/// Highest `maxFails`.
const MAX_FAILS: u8 = 100;
/// Default `maxFails`: as Nginx's `max_fails=3` in the workflows users come from.
pub const DEFAULT_MAX_FAILS: u8 = 3;
/// Default `checkInterval`: HAProxy's own `inter`.
pub const DEFAULT_CHECK_INTERVAL: &str = "2s";

/// A load-balancing algorithm HAProxy 2.6 takes in a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    StaticRr,
    LeastConn,
    First,
    Source,
    /// `random`, or `random(<draws>)`.
    Random(Option<u8>),
    /// `uri`: hash of the path (HTTP only).
    Uri,
    /// `url_param <name>` (HTTP only).
    UrlParam(String),
    /// `hdr(<name>)` (HTTP only).
    Hdr(String),
}

impl Balance {
    fn parse(parameter: &str, value: &str) -> Result<Balance, SpecError> {
        let accepted = "roundrobin, static-rr, leastconn, first, source, random, random(<draws>), \
                        uri, url_param <name> or hdr(<name>)";
        let bad = || {
            spec_error(
                parameter,
                format!(
                    "{} is not an algorithm flow-proxy accepts: {accepted}",
                    shown(value)
                ),
            )
        };
        let plain = match value {
            "roundrobin" => Some(Balance::RoundRobin),
            "static-rr" => Some(Balance::StaticRr),
            "leastconn" => Some(Balance::LeastConn),
            "first" => Some(Balance::First),
            "source" => Some(Balance::Source),
            "random" => Some(Balance::Random(None)),
            "uri" => Some(Balance::Uri),
            _ => None,
        };
        if let Some(balance) = plain {
            return Ok(balance);
        }
        let name_ok = |name: &str, extra: &[char]| {
            !name.is_empty()
                && name.len() <= MAX_BALANCE_NAME_LEN
                && name.chars().all(|c| {
                    c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(&c)
                })
        };
        if let Some(name) = value.strip_prefix("url_param ") {
            return if name_ok(name, &['.']) {
                Ok(Balance::UrlParam(name.to_string()))
            } else {
                Err(spec_error(
                    parameter,
                    format!(
                        "url_param takes one parameter name of letters, digits and - _ . (at most {MAX_BALANCE_NAME_LEN}), not {}",
                        shown(name)
                    ),
                ))
            };
        }
        let inner = |prefix: &str| {
            value
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('('))
                .and_then(|rest| rest.strip_suffix(')'))
        };
        if let Some(name) = inner("hdr") {
            return if name_ok(name, &[]) {
                Ok(Balance::Hdr(name.to_string()))
            } else {
                Err(spec_error(
                    parameter,
                    format!(
                        "hdr(<name>) takes a header name of letters, digits, - and _ (at most {MAX_BALANCE_NAME_LEN}), not {}",
                        shown(name)
                    ),
                ))
            };
        }
        if let Some(draws) = inner("random") {
            return match draws.parse::<u8>() {
                Ok(n) if (1..=100).contains(&n) && !draws.starts_with('0') => {
                    Ok(Balance::Random(Some(n)))
                }
                _ => Err(spec_error(
                    parameter,
                    format!(
                        "random(<draws>) takes a number from 1 to 100, not {}",
                        shown(draws)
                    ),
                )),
            };
        }
        Err(bad())
    }

    /// Whether the algorithm reads HTTP (so it cannot serve a `reqMode=tcp` backend).
    pub fn needs_http(&self) -> bool {
        matches!(self, Balance::Uri | Balance::UrlParam(_) | Balance::Hdr(_))
    }

    /// The arguments of HAProxy's `balance` line, e.g. `url_param userid`.
    pub fn as_config(&self) -> String {
        match self {
            Balance::RoundRobin => "roundrobin".into(),
            Balance::StaticRr => "static-rr".into(),
            Balance::LeastConn => "leastconn".into(),
            Balance::First => "first".into(),
            Balance::Source => "source".into(),
            Balance::Random(None) => "random".into(),
            Balance::Random(Some(draws)) => format!("random({draws})"),
            Balance::Uri => "uri".into(),
            Balance::UrlParam(name) => format!("url_param {name}"),
            Balance::Hdr(name) => format!("hdr({name})"),
        }
    }
}

/// A HAProxy time: digits with a unit (`ms`, `s`, `m`, `h`, `d`); bare digits are seconds, as
/// Docker Flow Proxy's `timeoutServer=60` meant. Held in HAProxy's form, e.g. `60s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeout(String);

impl Timeout {
    fn parse(parameter: &str, value: &str) -> Result<Timeout, SpecError> {
        let digits_end = value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len());
        let (digits, unit) = value.split_at(digits_end);
        let unit_ms: u64 = match unit {
            "" | "s" => 1_000,
            "ms" => 1,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => 0,
        };
        let number = if digits.len() <= 10 {
            digits.parse::<u64>().ok()
        } else {
            None
        };
        match number {
            Some(n) if unit_ms > 0 && n > 0 && n.saturating_mul(unit_ms) <= MAX_TIMEOUT_MS => {
                let unit = if unit.is_empty() { "s" } else { unit };
                Ok(Timeout(format!("{n}{unit}")))
            }
            _ => Err(spec_error(
                parameter,
                format!(
                    "{} is not a time: give a positive number of seconds, or digits with a unit \
                     (ms, s, m, h, d), e.g. 60 or 500ms, at most 24 days",
                    shown(value)
                ),
            )),
        }
    }

    /// The time as HAProxy reads it, e.g. `1s`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `observe`: which failures of live traffic count against an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Observe {
    /// Connection failures and timeouts (the default).
    #[default]
    Layer4,
    /// Also 5xx answers (except 501 and 505) and invalid responses (HTTP only).
    Layer7,
}

impl Observe {
    fn parse(parameter: &str, value: &str) -> Result<Observe, SpecError> {
        match value {
            "layer4" => Ok(Observe::Layer4),
            "layer7" => Ok(Observe::Layer7),
            _ => Err(spec_error(
                parameter,
                format!(
                    "{} is not a kind of failure to observe: layer4 (connection failures and \
                     timeouts) or layer7 (also 5xx answers)",
                    shown(value)
                ),
            )),
        }
    }

    /// HAProxy's word.
    pub fn as_str(self) -> &'static str {
        match self {
            Observe::Layer4 => "layer4",
            Observe::Layer7 => "layer7",
        }
    }
}

/// The backend tuning of one service; `None` or empty: HAProxy's (or flow-proxy's) default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackendTuning {
    /// `balance`; default `roundrobin`.
    pub balance: Option<Balance>,
    /// `timeoutServer`: `timeout server` of the backends.
    pub timeout_server: Option<Timeout>,
    /// `timeoutTunnel`: `timeout tunnel` of the backends (WebSocket, CONNECT, TCP).
    pub timeout_tunnel: Option<Timeout>,
    /// `timeoutClient`: `timeout client` of the service's TCP frontends.
    pub timeout_client: Option<Timeout>,
    /// `connectionMode`: `option <mode>` of the HTTP backends.
    pub connection_mode: Option<ConnectionMode>,
    /// `compressionAlgo`: `compression algo …` (gzip, deflate, raw-deflate, identity).
    pub compression_algo: Vec<&'static str>,
    /// `compressionType`: `compression type …` (MIME types).
    pub compression_type: Vec<String>,
    /// `sessionType=sticky-server`: a cookie named after the service pins a client to the
    /// instance that answered it first.
    pub sticky_server: bool,
    /// `checkPath`: the active check is `GET <checkPath>` (2xx/3xx passes) instead of a connect.
    pub check_path: Option<String>,
    /// `checkInterval`: time between active checks (`inter`).
    pub check_interval: Option<Timeout>,
    /// `maxFails`: consecutive failed requests that take an instance out; 0: passive health
    /// off.
    pub max_fails: Option<u8>,
    /// `observe`: which failures count.
    pub observe: Option<Observe>,
}

/// Splits a list on commas and spaces (Docker Flow Proxy's users wrote either).
fn list_items(value: &str) -> Vec<&str> {
    value.split([',', ' ']).collect()
}

impl BackendTuning {
    /// Reads the group from the query's (or the stored spec's) values, by parameter name.
    pub(crate) fn parse<'v>(
        value: impl Fn(&str) -> Option<&'v str>,
    ) -> Result<BackendTuning, SpecError> {
        let time = |name: &str| value(name).map(|v| Timeout::parse(name, v)).transpose();
        let balance = value("balance")
            .map(|v| Balance::parse("balance", v))
            .transpose()?;
        let timeout_server = time("timeoutServer")?;
        let timeout_tunnel = time("timeoutTunnel")?;
        let timeout_client = time("timeoutClient")?;
        let connection_mode = value("connectionMode")
            .map(|v| {
                v.parse::<ConnectionMode>()
                    .map_err(|error| spec_error("connectionMode", error.to_string()))
            })
            .transpose()?;
        let compression_algo = value("compressionAlgo")
            .map(parse_compression_algo)
            .transpose()?
            .unwrap_or_default();
        let compression_type = value("compressionType")
            .map(parse_compression_type)
            .transpose()?
            .unwrap_or_default();
        let sticky_server = match value("sessionType") {
            None => false,
            Some("sticky-server") => true,
            Some(other) => {
                return Err(spec_error(
                    "sessionType",
                    format!(
                        "{} is not a session type: the one type is sticky-server (a cookie pins \
                         each client to an instance)",
                        shown(other)
                    ),
                ))
            }
        };
        let check_path = value("checkPath").map(parse_check_path).transpose()?;
        let check_interval = time("checkInterval")?;
        let max_fails = value("maxFails")
            .map(|v| match v.parse::<u8>() {
                Ok(n) if n <= MAX_FAILS && (v == "0" || !v.starts_with('0')) => Ok(n),
                _ => Err(spec_error(
                    "maxFails",
                    format!(
                        "{} is not a number from 0 (passive health off) to {MAX_FAILS}",
                        shown(v)
                    ),
                )),
            })
            .transpose()?;
        let observe = value("observe")
            .map(|v| Observe::parse("observe", v))
            .transpose()?;
        Ok(BackendTuning {
            balance,
            timeout_server,
            timeout_tunnel,
            timeout_client,
            connection_mode,
            compression_algo,
            compression_type,
            sticky_server,
            check_path,
            check_interval,
            max_fails,
            observe,
        })
    }

    /// Checks the group against the rest of the spec: HTTP-only settings need an HTTP
    /// destination, `timeoutClient` a TCP one, health settings need health checks on.
    pub(crate) fn check(
        &self,
        has_http: bool,
        has_tcp: bool,
        skip_check: bool,
    ) -> Result<(), SpecError> {
        if let Some(balance) = self.balance.as_ref().filter(|b| b.needs_http()) {
            if has_tcp {
                return Err(spec_error(
                    "balance",
                    format!(
                        "{} reads HTTP requests, so it cannot balance this service's reqMode=tcp \
                         destination; use roundrobin, leastconn, source, first, static-rr or random",
                        balance.as_config()
                    ),
                ));
            }
        }
        if !has_http {
            let http_only = [
                ("connectionMode", self.connection_mode.is_some()),
                ("compressionAlgo", !self.compression_algo.is_empty()),
                ("compressionType", !self.compression_type.is_empty()),
                ("sessionType", self.sticky_server),
                ("checkPath", self.check_path.is_some()),
                ("observe", self.observe == Some(Observe::Layer7)),
            ];
            if let Some((parameter, _)) = http_only.iter().find(|(_, set)| *set) {
                return Err(spec_error(
                    parameter,
                    "needs an http destination: it reads HTTP, and this service is reqMode=tcp only",
                ));
            }
        }
        if self.observe == Some(Observe::Layer7) && has_tcp {
            return Err(spec_error(
                "observe",
                "layer7 reads HTTP answers, so it cannot watch this service's reqMode=tcp \
                 destination; use layer4",
            ));
        }
        if self.timeout_client.is_some() && !has_tcp {
            return Err(spec_error(
                "timeoutClient",
                "applies to reqMode=tcp destinations only: an HTTP frontend is shared by every \
                 service, so its client timeout is --timeout-client",
            ));
        }
        if !self.compression_type.is_empty() && self.compression_algo.is_empty() {
            return Err(spec_error(
                "compressionType",
                "needs compressionAlgo (e.g. gzip): HAProxy compresses nothing without one",
            ));
        }
        if skip_check {
            let health = [
                ("checkPath", self.check_path.is_some()),
                ("checkInterval", self.check_interval.is_some()),
                ("maxFails", self.max_fails.is_some()),
                ("observe", self.observe.is_some()),
            ];
            if let Some((parameter, _)) = health.iter().find(|(_, set)| *set) {
                return Err(spec_error(
                    parameter,
                    "has no effect with skipCheck=true (health checks are off); drop one of them",
                ));
            }
        }
        Ok(())
    }

    /// The `maxFails` in force.
    pub fn effective_max_fails(&self) -> u8 {
        self.max_fails.unwrap_or(DEFAULT_MAX_FAILS)
    }

    /// The `observe` in force.
    pub fn effective_observe(&self) -> Observe {
        self.observe.unwrap_or_default()
    }

    /// The `checkInterval` in force, as HAProxy reads it.
    pub fn effective_check_interval(&self) -> &str {
        self.check_interval
            .as_ref()
            .map_or(DEFAULT_CHECK_INTERVAL, Timeout::as_str)
    }
}

fn parse_compression_algo(value: &str) -> Result<Vec<&'static str>, SpecError> {
    const ALGORITHMS: [&str; 4] = ["gzip", "deflate", "raw-deflate", "identity"];
    let mut algorithms = Vec::new();
    for item in list_items(value) {
        let Some(known) = ALGORITHMS.iter().find(|known| **known == item) else {
            return Err(spec_error(
                "compressionAlgo",
                format!(
                    "{} is not an algorithm HAProxy has: gzip, deflate, raw-deflate or identity \
                     (several separated by commas)",
                    shown(item)
                ),
            ));
        };
        if algorithms.contains(known) {
            return Err(spec_error(
                "compressionAlgo",
                format!("{known} is listed twice"),
            ));
        }
        algorithms.push(*known);
    }
    Ok(algorithms)
}

/// A MIME type token character (RFC 6838 restricted-name characters).
fn is_mime_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '!' | '&' | '^' | '_' | '.' | '+' | '-')
}

fn parse_compression_type(value: &str) -> Result<Vec<String>, SpecError> {
    let items = list_items(value);
    if items.len() > MAX_COMPRESSION_TYPES {
        return Err(spec_error(
            "compressionType",
            format!("too many types: at most {MAX_COMPRESSION_TYPES}"),
        ));
    }
    let mut types: Vec<String> = Vec::new();
    for item in items {
        let valid = item.len() <= MAX_MIME_TYPE_LEN
            && item.split_once('/').is_some_and(|(kind, sub)| {
                !kind.is_empty()
                    && !sub.is_empty()
                    && kind.chars().all(is_mime_char)
                    && sub.chars().all(is_mime_char)
            });
        if !valid {
            return Err(spec_error(
                "compressionType",
                format!(
                    "{} is not a MIME type (type/subtype of letters, digits and ! & ^ _ . + -, \
                     e.g. text/html; several separated by commas)",
                    shown(item)
                ),
            ));
        }
        if types.iter().any(|known| known == item) {
            return Err(spec_error(
                "compressionType",
                format!("{item} is listed twice"),
            ));
        }
        types.push(item.to_string());
    }
    Ok(types)
}

fn parse_check_path(value: &str) -> Result<String, SpecError> {
    let valid = value.starts_with('/')
        && value.len() <= MAX_CHECK_PATH_LEN
        && value.chars().all(|c| is_path_char(c) || c == '?');
    if valid {
        Ok(value.to_string())
    } else {
        Err(spec_error(
            "checkPath",
            format!(
                "{} is not a path to check: it starts with / and holds letters, digits and \
                 / - . _ ~ ! & ( ) * + ; = : @ % ? only (at most {MAX_CHECK_PATH_LEN})",
                shown(value)
            ),
        ))
    }
}

/// The stored form of the group: each value as the query takes it (`null` when not set).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct StoredBackendTuning {
    #[serde(default)]
    balance: Option<String>,
    #[serde(default)]
    timeout_server: Option<String>,
    #[serde(default)]
    timeout_tunnel: Option<String>,
    #[serde(default)]
    timeout_client: Option<String>,
    #[serde(default)]
    connection_mode: Option<String>,
    #[serde(default)]
    compression_algo: Option<String>,
    #[serde(default)]
    compression_type: Option<String>,
    #[serde(default)]
    session_type: Option<String>,
    #[serde(default)]
    check_path: Option<String>,
    #[serde(default)]
    check_interval: Option<String>,
    #[serde(default)]
    max_fails: Option<u8>,
    #[serde(default)]
    observe: Option<String>,
}

impl From<&BackendTuning> for StoredBackendTuning {
    fn from(tuning: &BackendTuning) -> StoredBackendTuning {
        let joined = |items: &[String]| (!items.is_empty()).then(|| items.join(","));
        let algorithms: Vec<String> = tuning
            .compression_algo
            .iter()
            .map(|a| a.to_string())
            .collect();
        StoredBackendTuning {
            balance: tuning.balance.as_ref().map(Balance::as_config),
            timeout_server: tuning.timeout_server.as_ref().map(|t| t.0.clone()),
            timeout_tunnel: tuning.timeout_tunnel.as_ref().map(|t| t.0.clone()),
            timeout_client: tuning.timeout_client.as_ref().map(|t| t.0.clone()),
            connection_mode: tuning.connection_mode.map(|m| m.as_str().to_string()),
            compression_algo: joined(&algorithms),
            compression_type: joined(&tuning.compression_type),
            session_type: tuning.sticky_server.then(|| "sticky-server".to_string()),
            check_path: tuning.check_path.clone(),
            check_interval: tuning.check_interval.as_ref().map(|t| t.0.clone()),
            max_fails: tuning.max_fails,
            observe: tuning.observe.map(|o| o.as_str().to_string()),
        }
    }
}

impl TryFrom<&StoredBackendTuning> for BackendTuning {
    type Error = SpecError;

    fn try_from(stored: &StoredBackendTuning) -> Result<BackendTuning, SpecError> {
        let max_fails = stored.max_fails.map(|n| n.to_string());
        BackendTuning::parse(|name| match name {
            "balance" => stored.balance.as_deref(),
            "timeoutServer" => stored.timeout_server.as_deref(),
            "timeoutTunnel" => stored.timeout_tunnel.as_deref(),
            "timeoutClient" => stored.timeout_client.as_deref(),
            "connectionMode" => stored.connection_mode.as_deref(),
            "compressionAlgo" => stored.compression_algo.as_deref(),
            "compressionType" => stored.compression_type.as_deref(),
            "sessionType" => stored.session_type.as_deref(),
            "checkPath" => stored.check_path.as_deref(),
            "checkInterval" => stored.check_interval.as_deref(),
            "maxFails" => max_fails.as_deref(),
            "observe" => stored.observe.as_deref(),
            _ => None,
        })
    }
}
