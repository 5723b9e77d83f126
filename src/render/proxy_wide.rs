//! The proxy-wide part of haproxy.cfg: `maxconn` and the request log in `global`, the timeouts
//! and the connection mode in the `defaults` sections, the operator's extra lines in `global` and
//! in the main frontends, and the captured request headers.
//!
//! [`ProxyWide`] holds the effective values (flags, overridden by Consul KV where the core says
//! so); this module only lays them out for the templates.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::spec::{CapturedHeader, ConfigLine, ConnectionMode, HaproxyTime, TimeUnit, TimeoutName};

/// The proxy-wide settings in force; `Default` is what haproxy.cfg had before any of them was a
/// setting (and what the flags default to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyWide {
    /// `maxconn` in `global`.
    pub maxconn: u32,
    /// The timeouts of the `defaults` sections; a timeout without a value is left to HAProxy
    /// (`timeout queue` then follows `timeout connect`).
    pub timeouts: BTreeMap<TimeoutName, HaproxyTime>,
    /// `option <mode>` in the HTTP defaults (`http-keep-alive`, HAProxy's own default, is not
    /// written).
    pub connection_mode: ConnectionMode,
    /// Lines appended to `global`.
    pub extra_global: Vec<ConfigLine>,
    /// Lines added to the main frontends (`http`, and `https` when it exists), after `bind`.
    pub extra_frontend: Vec<ConfigLine>,
    /// Request headers captured in the main frontends (shown in the request log).
    pub capture_request_headers: Vec<CapturedHeader>,
    /// HAProxy's request log to its standard output (flow-proxy's, which it inherits).
    pub access_log: bool,
}

/// The `maxconn` flow-proxy always wrote.
pub const DEFAULT_MAXCONN: u32 = 4096;

/// The timeouts flow-proxy always wrote, as (name, amount, unit).
const DEFAULT_TIMEOUTS: [(TimeoutName, u64, TimeUnit); 6] = [
    (TimeoutName::Connect, 5, TimeUnit::Seconds),
    (TimeoutName::Client, 60, TimeUnit::Seconds),
    (TimeoutName::Server, 60, TimeUnit::Seconds),
    (TimeoutName::HttpRequest, 10, TimeUnit::Seconds),
    (TimeoutName::HttpKeepAlive, 10, TimeUnit::Seconds),
    (TimeoutName::Tunnel, 1, TimeUnit::Hours),
];

/// The default of one timeout (`None`: HAProxy's own, for `queue`).
pub fn default_timeout(name: TimeoutName) -> Option<HaproxyTime> {
    DEFAULT_TIMEOUTS
        .iter()
        .find(|(known, _, _)| *known == name)
        .and_then(|(_, amount, unit)| HaproxyTime::new(*amount, *unit).ok())
}

impl Default for ProxyWide {
    fn default() -> ProxyWide {
        ProxyWide {
            maxconn: DEFAULT_MAXCONN,
            timeouts: TimeoutName::ALL
                .into_iter()
                .filter_map(|name| default_timeout(name).map(|time| (name, time)))
                .collect(),
            connection_mode: ConnectionMode::default(),
            extra_global: Vec::new(),
            extra_frontend: Vec::new(),
            capture_request_headers: Vec::new(),
            access_log: false,
        }
    }
}

/// What the templates see of the proxy-wide settings.
#[derive(Debug, Serialize)]
pub(super) struct ProxyWideView {
    maxconn: u32,
    access_log: bool,
    extra_global: Vec<String>,
    /// `timeout <name> <value>` lines of the HTTP defaults, in a fixed order.
    http_timeouts: Vec<TimeoutView>,
    /// The same for the TCP defaults (the timeouts that apply to TCP).
    tcp_timeouts: Vec<TimeoutView>,
    /// `option <mode>` of the HTTP defaults, unless it is HAProxy's default.
    connection_mode: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct TimeoutView {
    name: &'static str,
    value: String,
}

/// The view of the proxy-wide settings.
pub(super) fn view(settings: &ProxyWide) -> ProxyWideView {
    let timeouts = |tcp_only: bool| {
        TimeoutName::ALL
            .into_iter()
            .filter(|name| !tcp_only || name.applies_to_tcp())
            .filter_map(|name| {
                settings.timeouts.get(&name).map(|value| TimeoutView {
                    name: name.as_str(),
                    value: value.to_string(),
                })
            })
            .collect()
    };
    ProxyWideView {
        maxconn: settings.maxconn,
        access_log: settings.access_log,
        extra_global: lines(&settings.extra_global),
        http_timeouts: timeouts(false),
        tcp_timeouts: timeouts(true),
        connection_mode: (settings.connection_mode != ConnectionMode::HttpKeepAlive)
            .then(|| settings.connection_mode.as_str()),
    }
}

/// The lines the main frontends (`http`, `https`) get after `bind`: header captures, then the
/// operator's extra lines.
pub(super) fn main_frontend_lines(settings: &ProxyWide) -> Vec<String> {
    settings
        .capture_request_headers
        .iter()
        .map(|header| {
            format!(
                "capture request header {} len {}",
                header.name(),
                header.length()
            )
        })
        .chain(lines(&settings.extra_frontend))
        .collect()
}

fn lines(lines: &[ConfigLine]) -> Vec<String> {
    lines.iter().map(|line| line.as_str().to_string()).collect()
}
