//! The directive skeleton of a haproxy.cfg, and the skeleton a spec asks for.
//!
//! A skeleton keeps, for each section, the words of each line with the names flow-proxy makes
//! up (section, acl, backend, server names, bind and server addresses) replaced by `_`, and the
//! user's values (paths, domains) kept as they are. Lines are read the way HAProxy reads them:
//! words split on spaces and tabs, `#` starts a comment. A quote, a backslash or a control
//! character makes a line unreadable (flow-proxy never writes one). So a value that ended a
//! word, a line or the section shows up as a skeleton that differs from the one the spec asks
//! for, whatever text it smuggled in.
//!
//! Sections and the lines within a section are compared as sorted lists: the order of rules is
//! the renderer's business (tested on its own), what is asked here is that every line is one the
//! spec asked for, and no other.
//!
//! Also used by the fuzz target in `fuzz/` (included by path), so it depends only on the
//! library's public API.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use flow_proxy::render::{RenderSettings, Renderer, ServiceRoute};
use flow_proxy::spec::{Destination, Instance, ReqMode, ServiceSpec};

/// The words of one config line as HAProxy splits them, or why HAProxy would read it otherwise.
pub fn words(line: &str) -> Result<Vec<&str>, String> {
    let code = match line.find('#') {
        Some(comment) => &line[..comment],
        None => line,
    };
    if let Some(c) = code
        .chars()
        .find(|c| matches!(c, '"' | '\'' | '\\') || (c.is_control() && *c != '\t'))
    {
        return Err(format!(
            "line {line:?} has {c:?}, which HAProxy reads specially"
        ));
    }
    Ok(code.split([' ', '\t']).filter(|w| !w.is_empty()).collect())
}

/// One section: its header and its lines, each already reduced to a skeleton line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Section {
    header: String,
    lines: Vec<String>,
}

/// Reduces one line to its skeleton: made-up names become `_`.
fn skeleton_line(words: &[&str]) -> String {
    let keep = |position: usize, word: &str| -> bool {
        match words[0] {
            "frontend" | "backend" | "defaults" | "acl" | "bind" | "default_backend" => {
                position != 1
            }
            "server" => position == 0 || position > 2,
            // `use_backend <backend> if <acl> [<acl>]`
            "use_backend" => position != 1 && !(position > 2 && word != "if"),
            _ => true,
        }
    };
    words
        .iter()
        .enumerate()
        .map(|(position, word)| if keep(position, word) { *word } else { "_" })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The skeleton of a rendered config: sorted sections, each with its sorted lines.
pub fn of_config(config: &str) -> Result<Vec<String>, String> {
    Ok(sorted(sections(config)?))
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
    }
}

/// The main HTTP frontend's port in [`settings`].
pub const HTTP_PORT: u16 = 8080;

/// The sections that do not depend on the services, from configs rendered without services
/// (`global`, `defaults` for HTTP, the main frontend's own lines) and with one TCP service (the
/// `defaults` for TCP).
pub struct Baseline {
    global_and_http: Vec<Section>,
    tcp_defaults: Section,
}

impl Baseline {
    /// Renders the two reference configs.
    pub fn new(renderer: &Renderer, settings: &RenderSettings) -> Baseline {
        let parse = |config: &str| sections(config).expect("the renderer writes plain lines");
        let empty = renderer
            .render(settings, &[])
            .expect("empty config renders");
        let global_and_http = parse(&empty);
        let tcp_spec = ServiceSpec::from_query(&[
            ("serviceName".to_string(), "reference".to_string()),
            ("reqMode".to_string(), "tcp".to_string()),
            ("srcPort".to_string(), "9999".to_string()),
        ])
        .expect("reference tcp spec");
        let with_tcp = renderer
            .render(
                settings,
                &[ServiceRoute {
                    spec: &tcp_spec,
                    instances: &[],
                }],
            )
            .expect("reference tcp config renders");
        let tcp_defaults = parse(&with_tcp)
            .into_iter()
            .find(|s| s.header.starts_with("defaults") && s.lines.iter().any(|l| l == "mode tcp"))
            .expect("a defaults section for tcp");
        Baseline {
            global_and_http,
            tcp_defaults,
        }
    }

    /// The skeleton `services` ask for, derived from the specs alone (not from the renderer):
    /// the fixed sections, then per HTTP destination an acl line for its paths, one per kind of
    /// domain (exact, wildcard), one `use_backend`; per TCP destination a frontend; per
    /// destination a backend with one server per distinct instance.
    pub fn expected(&self, services: &[(&ServiceSpec, &[Instance])]) -> Vec<String> {
        let mut sections = self.global_and_http.clone();
        let main = sections
            .iter()
            .position(|s| s.header.starts_with("frontend"))
            .expect("the main frontend");
        let mut extra_http: std::collections::BTreeMap<u16, Section> = Default::default();
        let mut tcp = Vec::new();
        for (spec, instances) in services {
            for destination in spec.destinations() {
                sections.push(backend(spec, destination, instances));
                let src_port = destination.src_port().map(|p| p.get());
                if destination.req_mode() == ReqMode::Tcp {
                    tcp.push(Section {
                        header: "frontend _".into(),
                        lines: vec![
                            "mode tcp".into(),
                            "bind _".into(),
                            "default_backend _".into(),
                        ],
                    });
                    continue;
                }
                let frontend = match src_port {
                    Some(port) if port != HTTP_PORT => {
                        extra_http.entry(port).or_insert_with(|| Section {
                            header: "frontend _".into(),
                            lines: vec!["mode http".into(), "bind _".into()],
                        })
                    }
                    _ => &mut sections[main],
                };
                frontend.lines.extend(rule_lines(spec, destination));
            }
        }
        sections.extend(extra_http.into_values());
        if !tcp.is_empty() {
            sections.push(self.tcp_defaults.clone());
            sections.extend(tcp);
        }
        sorted(sections)
    }
}

/// The acl and `use_backend` lines of one HTTP destination.
fn rule_lines(spec: &ServiceSpec, destination: &Destination) -> Vec<String> {
    let mut lines = Vec::new();
    let mut acls = 0;
    let paths = destination.service_path();
    if !paths.is_empty() {
        let fetch = destination.effective_path_type(spec).as_str();
        let patterns: Vec<&str> = paths.iter().map(|p| p.as_str()).collect();
        lines.push(format!("acl _ {fetch} {}", patterns.join(" ")));
        acls += 1;
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
        acls += 1;
    }
    lines.push(format!("use_backend _ if{}", " _".repeat(acls)));
    lines
}

/// The backend of one destination: one server per distinct instance.
fn backend(spec: &ServiceSpec, destination: &Destination, instances: &[Instance]) -> Section {
    let mode = destination.req_mode().as_str();
    let distinct: BTreeSet<&Instance> = instances.iter().collect();
    let server = if spec.skip_check() {
        "server _ _"
    } else {
        "server _ _ check"
    };
    let mut lines = vec![format!("mode {mode}"), "balance roundrobin".to_string()];
    lines.extend(distinct.iter().map(|_| server.to_string()));
    Section {
        header: "backend _".into(),
        lines,
    }
}

/// Runs `haproxy -c` on `config` written in `dir`; `Ok` when HAProxy accepts it without
/// warnings, else HAProxy's output.
pub fn haproxy_check(dir: &std::path::Path, name: &str, config: &str) -> Result<(), String> {
    let path = dir.join(name);
    std::fs::write(&path, config).map_err(|e| format!("write {}: {e}", path.display()))?;
    let output = std::process::Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run `haproxy -c` ({e}): install HAProxy 2.6"))?;
    let _ = std::fs::remove_file(&path);
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
