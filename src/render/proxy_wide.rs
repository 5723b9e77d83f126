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
    /// `hard-stop-after` in `global`: how long an old process may keep serving its open
    /// connections after a reload before it is stopped.
    pub hard_stop_after: HaproxyTime,
    /// The open-files limit HAProxy inherits (flow-proxy's, raised at start), when known: with
    /// it, spare server slots that would push HAProxy's descriptor count past it turn HAProxy's
    /// `strict-limits` off (see `ConfigView::relax_strict_limits_for_spare_slots`).
    pub open_files_limit: Option<u64>,
}

/// The `maxconn` flow-proxy always wrote.
pub const DEFAULT_MAXCONN: u32 = 4096;

/// The `hard-stop-after` flow-proxy always wrote.
pub const DEFAULT_HARD_STOP_AFTER: HaproxyTime = HaproxyTime::whole_seconds(30);

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
            hard_stop_after: DEFAULT_HARD_STOP_AFTER,
            open_files_limit: None,
        }
    }
}

/// What the templates see of the proxy-wide settings.
#[derive(Debug, Serialize)]
pub(super) struct ProxyWideView {
    maxconn: u32,
    hard_stop_after: String,
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
        hard_stop_after: settings.hard_stop_after.to_string(),
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use super::*;
    use crate::render::{RenderSettings, Renderer, ServiceRoute, ERROR_PAGE_503};
    use crate::spec::{Instance, ServiceSpec};

    fn settings(proxy_wide: ProxyWide, errors_dir: PathBuf) -> RenderSettings {
        RenderSettings {
            bind_host: Some(std::net::Ipv4Addr::LOCALHOST.into()),
            http_port: 8080,
            stats_socket: PathBuf::from("admin.sock"),
            errors_dir,
            https_only: false,
            users: Vec::new(),
            stats: None,
            service_domain_algo: Default::default(),
            proxy_wide,
            acme_challenge: None,
        }
    }

    fn everything() -> ProxyWide {
        let mut proxy_wide = ProxyWide {
            maxconn: 1234,
            connection_mode: ConnectionMode::HttpServerClose,
            extra_global: vec!["tune.bufsize 32768".parse().unwrap()],
            extra_frontend: vec!["http-response set-header X-Served-By flow-proxy"
                .parse()
                .unwrap()],
            capture_request_headers: vec!["X-Request-Id:36".parse().unwrap()],
            access_log: true,
            ..ProxyWide::default()
        };
        proxy_wide
            .timeouts
            .insert(TimeoutName::Server, HaproxyTime::parse("2500ms").unwrap());
        proxy_wide
            .timeouts
            .insert(TimeoutName::Queue, HaproxyTime::parse("30s").unwrap());
        proxy_wide
    }

    fn render(proxy_wide: ProxyWide, errors_dir: PathBuf) -> String {
        render_with_maps(proxy_wide, errors_dir).config
    }

    fn render_with_maps(proxy_wide: ProxyWide, errors_dir: PathBuf) -> crate::render::Rendered {
        let http: Vec<(String, String)> = vec![
            ("serviceName".into(), "web".into()),
            ("servicePath".into(), "/web".into()),
        ];
        let tcp: Vec<(String, String)> = vec![
            ("serviceName".into(), "db".into()),
            ("reqMode".into(), "tcp".into()),
            ("srcPort".into(), "5432".into()),
        ];
        let web = ServiceSpec::from_query(&http).unwrap();
        let db = ServiceSpec::from_query(&tcp).unwrap();
        let instances = vec![Instance::new("127.0.0.1", 9000).unwrap()];
        Renderer::new(None)
            .unwrap()
            .render_with_maps(
                &settings(proxy_wide, errors_dir),
                &[
                    ServiceRoute {
                        spec: &web,
                        instances: &instances,
                    },
                    ServiceRoute {
                        spec: &db,
                        instances: &instances,
                    },
                ],
                None,
            )
            .unwrap()
    }

    #[test]
    fn defaults_render_what_haproxy_cfg_always_had() {
        let config = render(ProxyWide::default(), PathBuf::from("errors"));
        for line in [
            "    maxconn 4096\n",
            "    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    timeout http-request 10s\n    timeout http-keep-alive 10s\n    timeout tunnel 1h\n",
        ] {
            assert!(config.contains(line), "{line:?} in:\n{config}");
        }
        for absent in ["timeout queue", "option http-", "log ", "capture "] {
            assert!(!config.contains(absent), "{absent:?} in:\n{config}");
        }
    }

    #[test]
    fn every_proxy_wide_setting_lands_in_its_section_and_haproxy_accepts_it() {
        let dir = tempfile::tempdir().unwrap();
        let errors = dir.path().join("errors");
        std::fs::create_dir(&errors).unwrap();
        std::fs::write(errors.join("503.http"), ERROR_PAGE_503).unwrap();
        let rendered = render_with_maps(everything(), errors);
        crate::render::write_map_files(dir.path(), &rendered.maps).unwrap();
        let config = rendered.config;
        let section = |header: &str| -> String {
            let start = config
                .find(&format!("\n{header}\n"))
                .unwrap_or_else(|| panic!("{header} in:\n{config}"));
            let rest = &config[start + 1..];
            let end = rest[1..].find("\n\n").map_or(rest.len(), |end| end + 1);
            rest[..end].to_string()
        };
        let global = section("global");
        assert!(global.contains("    maxconn 1234\n"), "{global}");
        assert!(
            global.contains("    log stdout format raw local0\n"),
            "{global}"
        );
        assert!(global.ends_with("    tune.bufsize 32768"), "{global}");
        let http_defaults = section("defaults http_defaults");
        for line in [
            "timeout server 2500ms",
            "timeout queue 30s",
            "option http-server-close",
            "log global",
            "option httplog",
        ] {
            assert!(http_defaults.contains(line), "{line}: {http_defaults}");
        }
        let tcp_defaults = section("defaults tcp_defaults");
        for line in [
            "timeout server 2500ms",
            "timeout queue 30s",
            "option tcplog",
        ] {
            assert!(tcp_defaults.contains(line), "{line}: {tcp_defaults}");
        }
        assert!(!tcp_defaults.contains("timeout tunnel"), "{tcp_defaults}");
        let http = section("frontend http");
        assert!(
            http.contains(
                "    bind 127.0.0.1:8080\n    capture request header X-Request-Id len 36\n    http-response set-header X-Served-By flow-proxy\n"
            ),
            "{http}"
        );
        let tcp = section("frontend tcp_5432");
        assert!(!tcp.contains("capture"), "{tcp}");

        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, &config).unwrap();
        let output = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&file)
            .current_dir(dir.path())
            .output()
            .expect("haproxy runs");
        let printed = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{printed}\n{config}");
        assert!(!printed.contains("[WARNING]"), "{printed}\n{config}");
    }
}
