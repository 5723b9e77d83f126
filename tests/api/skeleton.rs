//! The directive skeleton of a haproxy.cfg, and the skeleton a spec asks for.
//!
//! A skeleton keeps, for each section, the words of each line with the names flow-proxy makes
//! up (section, acl, backend, userlist, server names, bind and server addresses) replaced by
//! `_`, and the user's values (paths, domains, header names and values, methods, user names,
//! password hashes) kept as they are. Lines are read the way HAProxy reads them: words split on
//! spaces and tabs, `#` starts a comment, a double-quoted part belongs to its word (kept with its
//! quotes, so `"a b"` is one word). A single-quoted part (HAProxy takes everything in it
//! literally up to the next single quote) belongs to its word too, kept with its quotes; the
//! path rewrites' regexes are written so. A backslash outside single quotes, a control
//! character, an unterminated quote, a space, tab, `#` or double quote inside single quotes, and
//! a `$` or `%` inside double quotes (HAProxy expands environment variables and log-format there)
//! make a line unreadable: flow-proxy never writes one. So a value that ended a word, a line or the section shows up as a skeleton that differs
//! from the one the spec asks for, whatever text it smuggled in.
//!
//! In conditions (the words after `if`/`unless`), acl names become `_`; anonymous acls
//! (`{ … }`, `!{ … }`) are kept, except the userlist name in `http_auth(<userlist>)`.
//!
//! Sections and the lines within a section are compared as sorted lists: the order of rules is
//! the renderer's business (tested on its own), what is asked here is that every line is one the
//! spec asked for, and no other.
//!
//! Also used by the fuzz target in `fuzz/` (included by path), so it depends only on the
//! library's public API.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use flow_proxy::render::{RenderSettings, Rendered, Renderer, ServiceRoute, TlsSettings};
use flow_proxy::spec::{Destination, DomainAlgo, Instance, PathType, ReqMode, ServiceSpec};

/// The words of one config line as HAProxy splits them (a double-quoted part kept with its
/// quotes), or why HAProxy would read it otherwise.
pub fn words(line: &str) -> Result<Vec<String>, String> {
    let special = |c: char, why: &str| Err(format!("line {line:?} has {c:?}, {why}"));
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    let mut single_quoted = false;
    for c in line.chars() {
        if c.is_control() && c != '\t' {
            return special(c, "a control character");
        }
        if single_quoted {
            match c {
                '\'' => single_quoted = false,
                ' ' | '\t' | '#' | '"' => {
                    return special(c, "which flow-proxy never writes inside single quotes")
                }
                _ => {}
            }
            word.get_or_insert_with(String::new).push(c);
            continue;
        }
        if quoted {
            match c {
                '"' => quoted = false,
                '\\' | '$' | '%' => {
                    return special(c, "which HAProxy reads specially inside double quotes")
                }
                '\t' => return special(c, "a tab inside double quotes"),
                _ => {}
            }
            word.get_or_insert_with(String::new).push(c);
            continue;
        }
        match c {
            '#' => break,
            ' ' | '\t' => words.extend(word.take()),
            '\\' => return special(c, "which HAProxy reads specially"),
            _ => {
                quoted = c == '"';
                single_quoted = c == '\'';
                word.get_or_insert_with(String::new).push(c);
            }
        }
    }
    if quoted {
        return Err(format!("line {line:?} has an unterminated double quote"));
    }
    if single_quoted {
        return Err(format!("line {line:?} has an unterminated single quote"));
    }
    words.extend(word);
    Ok(words)
}

/// One section: its header and its lines, each already reduced to a skeleton line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Section {
    header: String,
    lines: Vec<String>,
}

/// Reduces one line to its skeleton: made-up names become `_`.
fn skeleton_line(words: &[String]) -> String {
    let first = words.first().map(String::as_str).unwrap_or_default();
    // Where a condition may start: after the fixed words of the directive.
    let condition_from = match first {
        "use_backend" => 2,
        "http-request" | "http-response" => 2,
        _ => usize::MAX,
    };
    let mut in_condition = false;
    let mut depth = 0usize;
    let mut out = Vec::with_capacity(words.len());
    for (position, word) in words.iter().enumerate() {
        let word = word.as_str();
        let masked = if in_condition {
            match word {
                "{" | "!{" => {
                    depth += 1;
                    word
                }
                "}" => {
                    depth = depth.saturating_sub(1);
                    word
                }
                "!" | "or" | "||" => word,
                _ if depth > 0 => {
                    if word.starts_with("http_auth(") && word.ends_with(')') {
                        "http_auth(_)"
                    } else {
                        word
                    }
                }
                _ => "_",
            }
        } else {
            if position >= condition_from && matches!(word, "if" | "unless") {
                in_condition = true;
            }
            let made_up = match first {
                "frontend" | "backend" | "defaults" | "userlist" | "acl" | "bind"
                | "default_backend" | "use_backend" => position == 1,
                // The server's name, address and stickiness cookie value.
                "server" => {
                    position == 1
                        || position == 2
                        || (position > 2 && words[position - 1] == "cookie")
                }
                _ => false,
            };
            if made_up {
                "_"
            } else {
                word
            }
        };
        out.push(masked);
    }
    out.join(" ")
}

/// The skeleton of one line the model writes (read and masked like a rendered one).
fn normalized(line: &str) -> String {
    match words(line) {
        Ok(words) => skeleton_line(&words),
        Err(error) => format!("unreadable model line: {error}"),
    }
}

/// The skeleton of a rendered config: sorted sections, each with its sorted lines.
#[allow(dead_code)]
pub fn of_config(config: &str) -> Result<Vec<String>, String> {
    Ok(sorted(sections(config)?))
}

// ---- Map files (plain rules routed through maps) ----------------------------------------------

/// Header of the pseudo-section holding every map entry as `<key> _`.
const MAP_ENTRIES: &str = "map entries";

/// The three lookups a map line may use, with `{}` for the map file.
const MAP_LOOKUPS: [&str; 3] = [
    "path,map_beg({})",
    "req.hdr(host),field(1,:),lower,concat(,txn.flow_proxy_path,),map_beg({})",
    "req.hdr(host),field(1,:),lower,map_str({})",
];

/// The line setting the variable host+path lookups read.
const PATH_VAR_LINE: &str = "http-request set-var(txn.flow_proxy_path) path";

/// The skeleton of a rendered config with its map files: [`of_config`] without the map lines
/// (each exactly `use_backend %[<lookup>] if { <lookup> -m found }` with one of the three fixed
/// lookups of a map file the render made) and the path variable's line, plus a pseudo-section
/// of every map entry as `<key> _` (each map line exactly two words, read like a config line).
pub fn of_rendered(rendered: &Rendered) -> Result<Vec<String>, String> {
    let map_line = |line: &str| {
        rendered.maps.iter().any(|map| {
            MAP_LOOKUPS.iter().any(|lookup| {
                let lookup = lookup.replace("{}", &map.config_path());
                line == format!("use_backend %[{lookup}] if {{ {lookup} -m found }}")
            })
        })
    };
    let config: String = rendered
        .config
        .lines()
        .filter(|line| {
            let line = line.trim_start();
            !(map_line(line) || line == PATH_VAR_LINE)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let mut sections = sections(&config)?;
    let mut entries = BTreeSet::new();
    for map in &rendered.maps {
        for line in map.text().lines() {
            let words = words(line)?;
            match &words[..] {
                [key, _backend] => entries.insert(format!("{key} _")),
                _ => {
                    return Err(format!(
                        "map {} has a line of {} words: {line:?}",
                        map.name,
                        words.len()
                    ))
                }
            };
        }
    }
    if !entries.is_empty() {
        sections.push(Section {
            header: MAP_ENTRIES.into(),
            lines: entries.into_iter().collect(),
        });
    }
    Ok(sorted(sections))
}

/// The sections of a config, in order, their lines reduced to skeletons.
fn sections(config: &str) -> Result<Vec<Section>, String> {
    let mut sections: Vec<Section> = Vec::new();
    for line in config.lines() {
        let line_words = words(line)?;
        if line_words.is_empty() {
            continue;
        }
        let skeleton = skeleton_line(&line_words);
        let indented = line.starts_with([' ', '\t']);
        match (indented, sections.last_mut()) {
            (false, _) => sections.push(Section {
                header: skeleton,
                lines: Vec::new(),
            }),
            (true, Some(section)) => section.lines.push(skeleton),
            (true, None) => return Err(format!("indented line before any section: {line:?}")),
        }
    }
    Ok(sections)
}

fn sorted(mut sections: Vec<Section>) -> Vec<String> {
    let mut out: Vec<String> = sections
        .iter_mut()
        .map(|section| {
            section.lines.sort();
            let mut text = section.header.clone();
            for line in &section.lines {
                let _ = write!(text, "\n    {line}");
            }
            text
        })
        .collect();
    out.sort();
    out
}

/// The settings every skeleton test renders with.
pub fn settings(errors_dir: &std::path::Path) -> RenderSettings {
    RenderSettings {
        bind_host: Some(std::net::Ipv4Addr::LOCALHOST.into()),
        http_port: HTTP_PORT,
        stats_socket: "haproxy.sock".into(),
        errors_dir: errors_dir.to_path_buf(),
        https_only: false,
        users: Vec::new(),
        stats: None,
        service_domain_algo: Default::default(),
        proxy_wide: Default::default(),
        acme_challenge: None,
    }
}

/// The main HTTP frontend's port in [`settings`].
pub const HTTP_PORT: u16 = 8080;

/// The line that tells the HTTPS frontend apart from the other HTTP frontends.
const HTTPS_MARK: &str = "http-request set-header X-Forwarded-Proto https";

/// The sections that do not depend on the services, from configs rendered without services
/// (`global`, `defaults` for HTTP, the `--users` and stats userlists, the main and HTTPS
/// frontends' own lines, the stats page) and with one TCP service (the `defaults` for TCP); and
/// the settings that decide what each service adds.
pub struct Baseline {
    global_and_http: Vec<Section>,
    tcp_defaults: Section,
    settings: RenderSettings,
    tls: Option<TlsSettings>,
}

/// Which frontend a rule is rendered in, for its redirects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frontend {
    /// The main HTTP frontend.
    Main,
    /// The HTTPS frontend.
    Https,
    /// An HTTP frontend of a destination's own `srcPort`.
    Extra(u16),
}

impl Baseline {
    /// Renders the two reference configs without TLS (the fuzz target's baseline).
    #[allow(dead_code)]
    pub fn new(renderer: &Renderer, settings: &RenderSettings) -> Baseline {
        Baseline::with_tls(renderer, settings, None)
    }

    /// Renders the two reference configs, with the HTTPS frontend `tls` describes when given.
    pub fn with_tls(
        renderer: &Renderer,
        settings: &RenderSettings,
        tls: Option<&TlsSettings>,
    ) -> Baseline {
        let parse = |config: &str| sections(config).expect("the renderer writes plain lines");
        let empty = renderer
            .render_with_tls(settings, &[], tls)
            .expect("empty config renders");
        let global_and_http = parse(&empty);
        let tcp_spec = ServiceSpec::from_query(&[
            ("serviceName".to_string(), "reference".to_string()),
            ("reqMode".to_string(), "tcp".to_string()),
            ("srcPort".to_string(), "9999".to_string()),
        ])
        .expect("reference tcp spec");
        let with_tcp = renderer
            .render_with_tls(
                settings,
                &[ServiceRoute {
                    spec: &tcp_spec,
                    instances: &[],
                }],
                tls,
            )
            .expect("reference tcp config renders");
        let tcp_defaults = parse(&with_tcp)
            .into_iter()
            .find(|s| s.header.starts_with("defaults") && s.lines.iter().any(|l| l == "mode tcp"))
            .expect("a defaults section for tcp");
        Baseline {
            global_and_http,
            tcp_defaults,
            settings: settings.clone(),
            tls: tls.cloned(),
        }
    }

    /// The skeleton `services` ask for, derived from the specs and the settings (not from the
    /// renderer): the fixed sections; per HTTP destination, in the main frontend (and the HTTPS
    /// one) or its `srcPort`'s frontend, an acl line for its paths, one per kind of domain
    /// (exact, wildcard), one `use_backend`, and its redirects with their acl; per TCP
    /// destination a frontend; per destination a backend with its auth lines and
    /// `http-request`/`http-response` rules and one server per distinct instance (then spare
    /// server slots up to `capacity_for` the instances, unless it has a `templateBePath`); per service
    /// with `users` a userlist; a service's `backendExtra` lines in each of its backends (a custom
    /// fragment must render what the shipped one does: the harness's fragments reproduce it).
    pub fn expected(&self, services: &[(&ServiceSpec, &[Instance])]) -> Vec<String> {
        let mut sections = self.global_and_http.clone();
        let is_frontend = |s: &Section| s.header == "frontend _";
        let main = sections
            .iter()
            .position(is_frontend)
            .expect("the main frontend");
        let https = self.tls.as_ref().map(|_| {
            sections
                .iter()
                .position(|s| is_frontend(s) && s.lines.iter().any(|l| l == HTTPS_MARK))
                .expect("the HTTPS frontend")
        });
        let stats = self.settings.stats.as_ref();
        // The stats page's own frontend, when its port is no frontend's in the baseline.
        let stats_frontend = stats.and_then(|_| {
            sections
                .iter()
                .position(|s| is_frontend(s) && s.lines.iter().any(|l| l == "default_backend _"))
        });
        let mut extra_http: std::collections::BTreeMap<u16, Section> = Default::default();
        let mut tcp = Vec::new();
        let mut sni: std::collections::BTreeMap<u16, Section> = Default::default();
        let mut userlists = Vec::new();
        let mut map_keys = BTreeSet::new();
        for (spec, instances) in services {
            if !spec.users().is_empty() {
                userlists.push(Section {
                    header: "userlist _".into(),
                    lines: spec
                        .users()
                        .iter()
                        .map(|user| {
                            normalized(&format!(
                                "user {} password {}",
                                user.name().as_str(),
                                user.password().as_str()
                            ))
                        })
                        .collect(),
                });
            }
            for destination in spec.destinations() {
                sections.push(self.backend(spec, destination, instances));
                let src_port = destination.src_port().map(|p| p.get());
                if destination.req_mode() == ReqMode::Sni {
                    let port = src_port.expect("an sni destination has a srcPort");
                    let frontend = sni.entry(port).or_insert_with(|| Section {
                        header: "frontend _".into(),
                        lines: vec![
                            "mode tcp".into(),
                            "bind _".into(),
                            "tcp-request inspect-delay 5s".into(),
                            normalized("tcp-request content accept if { req_ssl_hello_type 1 }"),
                        ],
                    });
                    let domains = destination.service_domain();
                    for (wildcard, match_kind) in [(false, "str"), (true, "end")] {
                        let names: Vec<&str> = domains
                            .iter()
                            .filter(|d| d.is_wildcard() == wildcard)
                            .map(|d| d.host_pattern())
                            .collect();
                        if !names.is_empty() {
                            frontend.lines.push(normalized(&format!(
                                "acl _ req_ssl_sni -m {match_kind} -i {}",
                                names.join(" ")
                            )));
                        }
                    }
                    frontend.lines.push("use_backend _ if _".into());
                    continue;
                }
                if destination.req_mode() == ReqMode::Tcp {
                    let mut lines = vec!["mode tcp".to_string(), "bind _".to_string()];
                    if let Some(timeout) = &spec.backend_tuning().timeout_client {
                        lines.push(format!("timeout client {}", timeout.as_str()));
                    }
                    lines.push("default_backend _".into());
                    tcp.push(Section {
                        header: "frontend _".into(),
                        lines: lines.iter().map(|line| normalized(line)).collect(),
                    });
                    continue;
                }
                match src_port {
                    Some(port) if port != self.settings.http_port => {
                        let lines = self.rule_lines(
                            spec,
                            destination,
                            Frontend::Extra(port),
                            &mut map_keys,
                        );
                        extra_http
                            .entry(port)
                            .or_insert_with(|| {
                                let mut lines = vec!["mode http".into(), "bind _".into()];
                                if let Some(stats) = stats.filter(|s| s.port == port) {
                                    lines.push(normalized(&format!(
                                        "use_backend _ if {{ url_beg {} }}",
                                        stats.uri
                                    )));
                                }
                                Section {
                                    header: "frontend _".into(),
                                    lines,
                                }
                            })
                            .lines
                            .extend(lines);
                    }
                    _ => {
                        let lines =
                            self.rule_lines(spec, destination, Frontend::Main, &mut map_keys);
                        sections[main].lines.extend(lines);
                        if let Some(https) = https {
                            let lines =
                                self.rule_lines(spec, destination, Frontend::Https, &mut map_keys);
                            sections[https].lines.extend(lines);
                        }
                    }
                }
            }
        }
        // `isDefaultBackend`: the first such service by name gives the main (and HTTPS)
        // frontend its `default_backend`, when it has an HTTP destination there.
        let mut by_name: Vec<&(&ServiceSpec, &[Instance])> = services.iter().collect();
        by_name.sort_by(|a, b| a.0.service_name().cmp(b.0.service_name()));
        let default_service = by_name
            .iter()
            .filter(|(spec, _)| spec.is_default_backend())
            .find(|(spec, _)| {
                spec.destinations().iter().any(|d| {
                    d.req_mode() == ReqMode::Http
                        && d.src_port()
                            .is_none_or(|port| port.get() == self.settings.http_port)
                })
            });
        if default_service.is_some() {
            sections[main].lines.push("default_backend _".into());
            if let Some(https) = https {
                sections[https].lines.push("default_backend _".into());
            }
        }
        // An HTTP srcPort on the stats port routes the stats page: no frontend of its own.
        if let (Some(stats), Some(position)) = (stats, stats_frontend) {
            if extra_http.contains_key(&stats.port) {
                sections.remove(position);
            }
        }
        sections.extend(extra_http.into_values());
        sections.extend(userlists);
        if !map_keys.is_empty() {
            sections.push(Section {
                header: MAP_ENTRIES.into(),
                lines: map_keys.into_iter().map(|key| format!("{key} _")).collect(),
            });
        }
        if !tcp.is_empty() || !sni.is_empty() {
            sections.push(self.tcp_defaults.clone());
            sections.extend(tcp);
            sections.extend(sni.into_values());
        }
        sorted(sections)
    }

    /// The lines one HTTP destination adds to a frontend: its acls and `use_backend`, then its
    /// redirects there (`redirectFromDomain` with its acl; the HTTPS redirect of `httpsOnly`,
    /// `--https-only` or `redirectWhenHttpProto`, in the main frontend only).
    fn rule_lines(
        &self,
        spec: &ServiceSpec,
        destination: &Destination,
        frontend: Frontend,
        map_keys: &mut BTreeSet<String>,
    ) -> Vec<String> {
        if let Some(keys) = self.plain_keys(spec, destination, frontend) {
            map_keys.extend(keys);
            return Vec::new();
        }
        let mut lines = Vec::new();
        let mut acls = Vec::new();
        let paths = destination.service_path();
        if !paths.is_empty() {
            let fetch = destination.effective_path_type(spec).as_str();
            let patterns: Vec<&str> = paths.iter().map(|p| p.as_str()).collect();
            lines.push(format!("acl _ {fetch} {}", patterns.join(" ")));
            acls.push("path");
        }
        let routing = destination.routing();
        if !routing.path_exclude.is_empty() {
            let fetch = destination.effective_path_type(spec).as_str();
            let patterns: Vec<&str> = routing.path_exclude.iter().map(|p| p.as_str()).collect();
            lines.push(format!("acl _ {fetch} {}", patterns.join(" ")));
            acls.push("exclude");
        }
        let domains = destination.service_domain();
        for (wildcard, match_kind) in [(false, "str"), (true, "end")] {
            let hosts: Vec<&str> = domains
                .iter()
                .filter(|d| d.is_wildcard() == wildcard)
                .map(|d| d.host_pattern())
                .collect();
            if !hosts.is_empty() {
                lines.push(format!(
                    "acl _ req.hdr(host),field(1,:) -m {match_kind} -i {}",
                    hosts.join(" ")
                ));
            }
        }
        if !domains.is_empty() {
            acls.push("domain");
        }
        for header in &routing.headers {
            lines.push(format!(
                "acl _ req.hdr({}) -m str {}",
                header.name().as_str(),
                header.value().as_str()
            ));
            acls.push("header");
        }
        if !routing.user_agents.is_empty() {
            let agents: Vec<&str> = routing.user_agents.iter().map(|a| a.as_str()).collect();
            lines.push(format!(
                "acl _ req.hdr(User-Agent) -m sub -i {}",
                agents.join(" ")
            ));
            acls.push("agent");
        }
        lines.push(format!("use_backend _ if{}", " _".repeat(acls.len())));

        let redirect_when_http_proto = spec.redirect_when_http_proto();
        let https_wanted = frontend == Frontend::Main
            && (self.settings.https_only || destination.https_only() || redirect_when_http_proto);
        let from = destination.redirect_from_domain();
        if let (false, Some(target)) = (from.is_empty(), domains.first()) {
            let host = target.host_pattern();
            let origin = match frontend {
                Frontend::Https => format!("https://{host}"),
                Frontend::Extra(port) => format!("http://{host}:{port}"),
                Frontend::Main if https_wanted && !redirect_when_http_proto => {
                    format!("https://{host}")
                }
                Frontend::Main => format!("http://{host}"),
            };
            let from_hosts: Vec<&str> = from.iter().map(|d| d.host_pattern()).collect();
            lines.push(format!(
                "acl _ req.hdr(host),field(1,:) -m str -i {}",
                from_hosts.join(" ")
            ));
            let path_acl = if paths.is_empty() { "" } else { " _" };
            lines.push(format!(
                "http-request redirect prefix {origin} code 301 if _{path_acl}"
            ));
        }
        if https_wanted {
            let condition = if redirect_when_http_proto {
                "{ req.hdr(X-Forwarded-Proto) -m str -i http }"
            } else {
                "!{ ssl_fc }"
            };
            lines.push(format!(
                "http-request redirect scheme https code {} if{} {condition}",
                destination.redirect_code().get(),
                " _".repeat(acls.len())
            ));
        }
        lines.iter().map(|line| normalized(line)).collect()
    }

    /// The map keys of a destination that the README calls plain in `frontend` (`path_beg`
    /// paths and/or exact domains matched as `hdr`, nothing else conditioning or preceding its
    /// `use_backend`: no exclusion, header, user agent, redirect or custom fragment): its paths,
    /// its hosts, or each host followed by each path. `None`: it keeps its acls.
    fn plain_keys(
        &self,
        spec: &ServiceSpec,
        destination: &Destination,
        frontend: Frontend,
    ) -> Option<Vec<String>> {
        let routing = destination.routing();
        let redirects = !destination.redirect_from_domain().is_empty()
            || (frontend == Frontend::Main
                && (self.settings.https_only
                    || destination.https_only()
                    || spec.redirect_when_http_proto()));
        if spec.custom_templates().template_fe_path.is_some()
            || redirects
            || !routing.path_exclude.is_empty()
            || !routing.headers.is_empty()
            || !routing.user_agents.is_empty()
        {
            return None;
        }
        let paths: Vec<&str> = destination
            .service_path()
            .iter()
            .map(|p| p.as_str())
            .collect();
        if !paths.is_empty() && destination.effective_path_type(spec) != PathType::PathBeg {
            return None;
        }
        let domains = destination.service_domain();
        let algo = spec
            .service_domain_algo()
            .unwrap_or(self.settings.service_domain_algo);
        if !domains.is_empty()
            && (algo != DomainAlgo::Hdr || domains.iter().any(|d| d.is_wildcard()))
        {
            return None;
        }
        let hosts: Vec<&str> = domains.iter().map(|d| d.host_pattern()).collect();
        match (hosts.is_empty(), paths.is_empty()) {
            (true, true) => None,
            (true, false) => Some(paths.iter().map(|p| p.to_string()).collect()),
            (false, true) => Some(hosts.iter().map(|h| h.to_string()).collect()),
            (false, false) => Some(
                hosts
                    .iter()
                    .flat_map(|h| paths.iter().map(move |p| format!("{h}{p}")))
                    .collect(),
            ),
        }
    }

    /// The backend of one destination: basic auth (the service's users, else `--users`, unless
    /// `ignoreAuthorization`), method rules, `denyHttp`, header rules (HTTP only), one server
    /// per distinct instance.
    fn backend(
        &self,
        spec: &ServiceSpec,
        destination: &Destination,
        instances: &[Instance],
    ) -> Section {
        let mode = destination.req_mode().haproxy_mode();
        // `outboundHostname`: one server, the host on the destination's port.
        let outbound: Vec<Instance> = destination
            .routing()
            .outbound_hostname
            .iter()
            .filter_map(|host| host.instance(destination.port()?.get()))
            .collect();
        let instances = if destination.routing().outbound_hostname.is_some() {
            &outbound[..]
        } else {
            instances
        };
        let distinct: BTreeSet<&Instance> = instances.iter().collect();
        let http = destination.req_mode() == ReqMode::Http;
        let tuning = spec.backend_tuning();
        let mut server = if spec.skip_check() {
            "server _ _".to_string()
        } else {
            "server _ _ check".to_string()
        };
        // A spare server slot: `disabled` after the health words.
        let mut spare_server = format!("{server} disabled");
        if http && tuning.sticky_server {
            server.push_str(" cookie _");
            spare_server.push_str(" cookie _");
        }
        let balance = tuning
            .balance
            .as_ref()
            .map_or_else(|| "roundrobin".to_string(), |b| b.as_config());
        let mut lines = vec![format!("mode {mode}"), format!("balance {balance}")];
        lines.extend(backend_tuning_lines(spec, http));
        if destination.req_mode() == ReqMode::Http {
            let users = !spec.users().is_empty() || !self.settings.users.is_empty();
            if users && !destination.ignore_authorization() {
                lines.push(format!(
                    "http-request auth realm {} unless {{ http_auth(_) }}",
                    spec.service_name().as_str()
                ));
                lines.push("http-request del-header Authorization".to_string());
            }
            let methods = |items: &[flow_proxy::spec::HttpMethod]| {
                items
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            if !destination.allowed_methods().is_empty() {
                lines.push(format!(
                    "http-request deny deny_status 405 unless {{ method {} }}",
                    methods(destination.allowed_methods())
                ));
            }
            if !destination.denied_methods().is_empty() {
                lines.push(format!(
                    "http-request deny deny_status 405 if {{ method {} }}",
                    methods(destination.denied_methods())
                ));
            }
            if destination.deny_http() {
                lines.push("http-request deny deny_status 403 if !{ ssl_fc }".to_string());
            }
            let headers = spec.headers();
            for (direction, add, set, del) in [
                (
                    "http-request",
                    &headers.add_req,
                    &headers.set_req,
                    &headers.del_req,
                ),
                (
                    "http-response",
                    &headers.add_res,
                    &headers.set_res,
                    &headers.del_res,
                ),
            ] {
                for (action, items) in [("add-header", add), ("set-header", set)] {
                    lines.extend(items.iter().map(|line| {
                        format!(
                            "{direction} {action} {} \"{}\"",
                            line.name().as_str(),
                            line.value().as_str()
                        )
                    }));
                }
                lines.extend(
                    del.iter()
                        .map(|name| format!("{direction} del-header {}", name.as_str())),
                );
            }
            lines.extend(path_rewrite_lines(destination));
        }
        lines.extend(distinct.iter().map(|_| server.clone()));
        // Backends fed by instances have spare slots up to their capacity, unless a service's
        // own backend fragment writes them (it gets the instances only).
        if destination.routing().outbound_hostname.is_none()
            && spec.custom_templates().template_be_path.is_none()
        {
            let spares = flow_proxy::render::capacity_for(distinct.len()) - distinct.len();
            lines.extend((0..spares).map(|_| spare_server.clone()));
        }
        // `backendExtra`: the service's own lines, as given.
        lines.extend(
            spec.custom_templates()
                .backend_extra
                .iter()
                .map(|line| line.as_str().to_string()),
        );
        Section {
            header: "backend _".into(),
            lines: lines.iter().map(|line| normalized(line)).collect(),
        }
    }
}

/// The backend tuning lines of `spec` (after `balance`), as `src/render/backend.rs` documents
/// them: timeouts, connection mode, compression and the stickiness cookie (HTTP), then the
/// health lines unless `skipCheck`.
fn backend_tuning_lines(spec: &ServiceSpec, http: bool) -> Vec<String> {
    let tuning = spec.backend_tuning();
    let mut lines = Vec::new();
    if let Some(timeout) = &tuning.timeout_server {
        lines.push(format!("timeout server {}", timeout.as_str()));
    }
    if let Some(timeout) = &tuning.timeout_tunnel {
        lines.push(format!("timeout tunnel {}", timeout.as_str()));
    }
    if http {
        if let Some(mode) = tuning.connection_mode {
            lines.push(format!("option {}", mode.as_str()));
        }
        if !tuning.compression_algo.is_empty() {
            lines.push(format!(
                "compression algo {}",
                tuning.compression_algo.join(" ")
            ));
        }
        if !tuning.compression_type.is_empty() {
            lines.push(format!(
                "compression type {}",
                tuning.compression_type.join(" ")
            ));
        }
        if tuning.sticky_server {
            lines.push(format!(
                "cookie {} insert indirect nocache",
                spec.service_name().as_str()
            ));
        }
    }
    if !spec.skip_check() {
        if let (true, Some(path)) = (http, &tuning.check_path) {
            lines.push("option httpchk".to_string());
            lines.push(format!("http-check send meth GET uri {path}"));
        }
        lines.push("option redispatch 1".to_string());
        let mut default_server = format!(
            "default-server inter {} fall 3 rise 2",
            tuning.effective_check_interval()
        );
        if tuning.effective_max_fails() > 0 {
            default_server.push_str(&format!(
                " observe {} error-limit {} on-error mark-down",
                tuning.effective_observe().as_str(),
                tuning.effective_max_fails()
            ));
        }
        lines.push(default_server);
    }
    lines
}

/// Runs `haproxy -c` on `config` written in `dir`; `Ok` when HAProxy accepts it without
/// warnings, else HAProxy's output.
#[allow(dead_code)]
pub fn haproxy_check(dir: &std::path::Path, name: &str, config: &str) -> Result<(), String> {
    haproxy_check_rendered(
        dir,
        name,
        &Rendered {
            config: config.to_string(),
            maps: Vec::new(),
            checked: Default::default(),
            routing: Default::default(),
        },
    )
}

/// [`haproxy_check`] of a config with its map files: both written in a directory of their own
/// (`<dir>/<name>.d/`, removed after), where HAProxy runs.
pub fn haproxy_check_rendered(
    dir: &std::path::Path,
    name: &str,
    rendered: &Rendered,
) -> Result<(), String> {
    let case_dir = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&case_dir)
        .map_err(|e| format!("create {}: {e}", case_dir.display()))?;
    // The config's other relative paths (a crt-list, say) resolve from `dir`, as before.
    for entry in std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| format!("read {}: {e}", dir.display()))?;
        let file_name = entry.file_name();
        if !file_name.to_string_lossy().ends_with(".d") {
            let _ = std::os::unix::fs::symlink(entry.path(), case_dir.join(&file_name));
        }
    }
    flow_proxy::render::write_map_files(&case_dir, &rendered.maps)
        .map_err(|e| format!("write the map files in {}: {e}", case_dir.display()))?;
    let path = case_dir.join(name);
    std::fs::write(&path, &rendered.config)
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    let output = std::process::Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .current_dir(&case_dir)
        .output()
        .map_err(|e| format!("cannot run `haproxy -c` ({e}): install HAProxy 2.6"))?;
    let _ = std::fs::remove_dir_all(&case_dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && !text.contains("[WARNING]") {
        Ok(())
    } else {
        Err(text)
    }
}

// ---- Path rewrites: stripPath, reqPathSearchReplace -----------------------------------------

/// The `replace-path` lines a destination asks for, built from the user's values as the README
/// describes them: `stripPath` removes the longest matching `servicePath` (regex operators
/// escaped) and one optional `/`; each search is wrapped as `^(.*?)(<search>)(.*)$` and its
/// replacement gets the text before and after the match around it, its `\N` moved past the
/// wrapper's two groups and its `%` doubled.
fn path_rewrite_lines(destination: &Destination) -> Vec<String> {
    let rewrite = destination.path_rewrite();
    let mut lines = Vec::new();
    if rewrite.strip_path() {
        let mut paths: Vec<&str> = destination
            .service_path()
            .iter()
            .map(|p| p.as_str())
            .collect();
        paths.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        let escaped: Vec<String> = paths
            .iter()
            .map(|path| {
                path.chars()
                    .map(|c| {
                        if "\\.()*+?[]{}|^$".contains(c) {
                            format!("\\{c}")
                        } else {
                            c.to_string()
                        }
                    })
                    .collect()
            })
            .collect();
        lines.push(format!(
            "http-request replace-path '^({})/?(.*)$' '/\\2'",
            escaped.join("|")
        ));
    }
    for pair in rewrite.search_replace() {
        let groups = count_groups(pair.search());
        let mut format = String::from("\\1");
        let mut chars = pair.replace().chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    let group = chars.next().and_then(|d| d.to_digit(10)).unwrap_or(99);
                    format.push_str(&format!("\\{}", group + 2));
                }
                '%' => format.push_str("%%"),
                c => format.push(c),
            }
        }
        format.push_str(&format!("\\{}", groups + 3));
        lines.push(format!(
            "http-request replace-path '^(.*?)({})(.*)$' '{format}'",
            pair.search()
        ));
    }
    lines
}

/// The capture groups of a search: each `(` that is neither escaped nor inside a class.
fn count_groups(search: &str) -> usize {
    let mut groups = 0;
    let mut chars = search.chars().peekable();
    let mut in_class = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '[' if !in_class => {
                in_class = true;
                if chars.peek() == Some(&'^') {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                }
            }
            ']' if in_class => in_class = false,
            '(' if !in_class => groups += 1,
            _ => {}
        }
    }
    groups
}
