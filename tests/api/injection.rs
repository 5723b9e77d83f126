//! Injection, proven harmless: no request, stored spec or registry address may put text of its
//! choosing into haproxy.cfg outside the value slot that belongs to it.
//!
//! Arbitrary queries, stored JSON specs and instance addresses go through the real parser and
//! the real [`Renderer`]. Each input is either refused (a [`SpecError`], a 400), or it renders a
//! config whose directive skeleton (see `skeleton`) is exactly the one the spec asks for and
//! that `haproxy -c` accepts without warnings (a `path_reg` pattern HAProxy's regex engine
//! refuses is the one allowed refusal there: the API answers 400 with HAProxy's message).
//!
//! Every parameter is generated, the edge rules (redirects, header and method rules), basic
//! auth, custom fragments and `backendExtra` (the renderer reads its `--templates-dir`
//! fragments from a directory whose fragments write what the shipped templates do, and allows
//! `backendExtra`, whose lines the skeleton expects in each backend of their service),
//! `serviceTag` and the path rewrites (`stripPath`, `reqPathSearchReplace`, whose regexes are
//! written single-quoted; a regex HAProxy's engine refuses is allowed there as for `path_reg`)
//! included, and each case is rendered under one of several profiles ([`profiles`]): plain
//! HTTP, with an HTTPS frontend (a crt-list of a real certificate), with `--https-only`,
//! `--users` and the stats page on its own port, on the HTTPS port or on the main port, with
//! every proxy-wide setting (`--timeout-*`, `--maxconn`, `--extra-*`, captures, access log). A
//! further property checks that a clear password never reaches the config, the stored spec or
//! the answer: only its SHA-512 crypt hash does.
//!
//! Budgets: `PROPTEST_CASES` cases per property (256 by default; the clear-password property
//! runs an eighth of them, two services a quarter) and at most `INJECTION_HAPROXY_CHECKS` runs
//! of `haproxy -c` per property (35 by default; with the corpus and the largest spec about 170
//! runs in all).
//! Run longer by hand with e.g.
//! `PROPTEST_CASES=20000 INJECTION_HAPROXY_CHECKS=2000 cargo test --test api injection::`;
//! `INJECTION_DEBUG=1` prints every refusal (to see what the generators reach).
//!
//! Every case found is kept in `tests/corpus/queries.txt` (raw query strings, replayed every run
//! under every profile, with `haproxy -c` on one profile's config per line, in turn); proptest's
//! seeds of failures go to `tests/corpus/proptest-seeds.txt`.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use flow_proxy::render::{
    RenderError, RenderSettings, Renderer, ServiceRoute, StatsSettings, TlsSettings, ERROR_PAGE_503,
};
use flow_proxy::spec::{parse_users, Instance, PasswordHash, PathType, ServiceSpec, SpecError};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use reqwest::StatusCode;

use crate::helpers::proxy_routing_demo;
use crate::skeleton::{self, Baseline};

/// Everything the properties share: the renderer, the render profiles with their reference
/// skeletons, a directory for `haproxy -c` (holding the 503 page and the certificate the configs
/// name).
struct Harness {
    renderer: Renderer,
    dir: tempfile::TempDir,
    profiles: Vec<Profile>,
    files: AtomicUsize,
}

/// One way the proxy may be run: its settings (`--https-only`, `--users`, the stats page), its
/// HTTPS frontend when certificates exist, and the reference skeleton of both.
struct Profile {
    name: &'static str,
    settings: RenderSettings,
    tls: Option<TlsSettings>,
    baseline: Baseline,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// The HTTPS port of the profiles with TLS, and the stats page's port of its own.
const HTTPS_PORT: u16 = 8443;
const STATS_PORT: u16 = 8404;

/// Writes a self-signed certificate and a crt-list naming it under `dir`; the crt-list's path
/// relative to `dir` (where `haproxy -c` runs).
fn write_crt_list(dir: &Path) -> std::path::PathBuf {
    let tls = dir.join("tls");
    std::fs::create_dir(&tls).expect("tls directory");
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = rcgen::CertificateParams::new(vec!["example.test".to_string()])
        .expect("certificate params")
        .self_signed(&key)
        .expect("self-signed certificate");
    let pem = format!("{}{}", certificate.pem(), key.serialize_pem());
    std::fs::write(tls.join("example.test.pem"), pem).expect("certificate file");
    std::fs::write(tls.join("crt-list"), "tls/example.test.pem\n").expect("crt-list");
    "tls/crt-list".into()
}

/// The profiles every generated spec may be rendered with: plain HTTP; with TLS; with
/// `--https-only`, `--users` and the stats page on its own port; everything with the stats page
/// on the HTTPS port; `--users` and the stats page on the main port; with TLS and every
/// proxy-wide setting (timeouts, maxconn, connection mode, extra lines, captures, request log).
fn profiles(renderer: &Renderer, dir: &Path, errors: &Path) -> Vec<Profile> {
    let plain = skeleton::settings(errors);
    let users = parse_users(
        "--users",
        "admin:admin-secret,ops@example.test:$5$salt$Ur8Mk7rDvTjKTS6ZeudOrcWCVJH9xK/L6y4RDeJ84W9",
        false,
    )
    .expect("--users");
    let stats_user = parse_users("--stats-user", "stats:stats-secret", false)
        .expect("stats user")
        .remove(0);
    let stats = |port: u16, uri: &str| StatsSettings {
        port,
        uri: uri.to_string(),
        user: stats_user.clone(),
    };
    let crt_list = write_crt_list(dir);
    let tls = |enable_h2: bool| TlsSettings {
        https_port: HTTPS_PORT,
        crt_list: crt_list.clone(),
        enable_h2,
    };
    let profile = |name, settings: RenderSettings, tls: Option<TlsSettings>| Profile {
        name,
        baseline: Baseline::with_tls(renderer, &settings, tls.as_ref()),
        settings,
        tls,
    };
    vec![
        profile("plain", plain.clone(), None),
        profile("tls", plain.clone(), Some(tls(true))),
        profile(
            "https-only, users, stats on its own port",
            RenderSettings {
                https_only: true,
                users: users.clone(),
                stats: Some(stats(STATS_PORT, "/admin?stats")),
                ..plain.clone()
            },
            None,
        ),
        profile(
            "tls, https-only, users, stats on the https port",
            RenderSettings {
                https_only: true,
                users: users.clone(),
                stats: Some(stats(HTTPS_PORT, "/stats")),
                ..plain.clone()
            },
            Some(tls(false)),
        ),
        profile(
            "users, stats on the main port",
            RenderSettings {
                users,
                stats: Some(stats(skeleton::HTTP_PORT, "/haproxy-stats")),
                ..plain.clone()
            },
            None,
        ),
        profile(
            "tls, every proxy-wide setting",
            RenderSettings {
                proxy_wide: every_proxy_wide_setting(),
                // ACME on: the challenge backend and its rules in the main frontend.
                acme_challenge: Some(std::net::SocketAddr::from((
                    std::net::Ipv4Addr::LOCALHOST,
                    40123,
                ))),
                ..plain
            },
            Some(tls(true)),
        ),
    ]
}

/// The proxy-wide flags all set (timeouts, maxconn, connection mode, extra lines, header
/// captures, the request log), as `--timeout-*`, `--maxconn`, … or Consul KV would set them.
fn every_proxy_wide_setting() -> flow_proxy::render::ProxyWide {
    use flow_proxy::spec::{ConnectionMode, HaproxyTime, TimeoutName};
    let mut proxy_wide = flow_proxy::render::ProxyWide {
        maxconn: 2000,
        connection_mode: ConnectionMode::HttpServerClose,
        extra_global: vec!["tune.bufsize 32768".parse().expect("a line")],
        extra_frontend: vec!["http-response set-header X-Served-By flow-proxy"
            .parse()
            .expect("a line")],
        capture_request_headers: vec!["X-Request-Id:36".parse().expect("a capture")],
        access_log: true,
        ..Default::default()
    };
    for (name, time) in [
        (TimeoutName::Server, "2500ms"),
        (TimeoutName::Queue, "30s"),
        (TimeoutName::Tunnel, "2h"),
    ] {
        proxy_wide
            .timeouts
            .insert(name, HaproxyTime::parse(time).expect("a time"));
    }
    proxy_wide
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let errors = dir.path().join("errors");
        std::fs::create_dir(&errors).expect("errors directory");
        std::fs::write(errors.join("503.http"), ERROR_PAGE_503).expect("503 page");
        let templates = dir.path().join("templates");
        std::fs::create_dir(&templates).expect("templates directory");
        std::fs::write(templates.join(SHIPPED_RULE), SHIPPED_RULE_TEXT).expect("fragment");
        std::fs::write(templates.join(SHIPPED_BACKEND), SHIPPED_BACKEND_TEXT).expect("fragment");
        let renderer = Renderer::new(Some(&templates))
            .expect("built-in templates and the custom fragments")
            .allow_backend_extra(true);
        let profiles = profiles(&renderer, dir.path(), &errors);
        Harness {
            renderer,
            dir,
            profiles,
            files: AtomicUsize::new(0),
        }
    })
}

/// Custom fragments under the harness's `--templates-dir` that write what the shipped
/// templates write (`templateFePath`, `templateBePath`): a spec naming them must render the
/// skeleton it would without them, so values reach a custom fragment as safely as a shipped one.
const SHIPPED_RULE: &str = "shipped-rule.hbs";
const SHIPPED_RULE_TEXT: &str = "\
{{#unless redirects}}
{{> rule-acls this}}
{{/unless}}
    use_backend {{backend}} if{{#each condition}} {{this}}{{/each}}
";
const SHIPPED_BACKEND: &str = "shipped-backend.hbs";
const SHIPPED_BACKEND_TEXT: &str = "{{> backend this}}\n";

/// Whether `spec` names a fragment the harness's renderer must refuse (missing, or the other
/// slot's, whose view lacks its values): the API answers 400 for it.
fn names_a_refused_fragment(spec: &ServiceSpec) -> bool {
    let custom = spec.custom_templates();
    let wrong = |path: &Option<flow_proxy::spec::TemplatePath>, right: &str| {
        path.as_ref().is_some_and(|path| path.as_str() != right)
    };
    wrong(&custom.template_fe_path, SHIPPED_RULE)
        || wrong(&custom.template_be_path, SHIPPED_BACKEND)
}

/// A profile to render with, by any index.
fn profile(at: usize) -> &'static Profile {
    let profiles = &harness().profiles;
    &profiles[at % profiles.len()]
}

/// How many `haproxy -c` runs one property may spend.
fn haproxy_budget() -> usize {
    std::env::var("INJECTION_HAPROXY_CHECKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(35)
}

fn dir(harness: &Harness) -> &Path {
    harness.dir.path()
}

/// The instances every accepted spec is rendered with: IPv4, IPv6, a hostname, a duplicate.
fn some_instances() -> Vec<Instance> {
    [
        ("127.0.0.1", 8081),
        ("::1", 8082),
        ("LocalHost", 8083),
        ("127.0.0.1", 8081),
    ]
    .into_iter()
    .map(|(address, port)| Instance::new(address, port).expect("valid instance"))
    .collect()
}

/// What happened to one input.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Refused before rendering: the API answers 400.
    Refused,
    /// Rendered with the skeleton the spec asked for (and, when checked, HAProxy accepted it or
    /// refused a `path_reg` regex).
    Rendered,
}

/// Renders `spec` with `instances` and checks the skeleton, and `haproxy -c` when `haproxy()`
/// says so (asked only for configs that rendered).
fn check_spec(
    spec: &ServiceSpec,
    instances: &[Instance],
    profile: &Profile,
    haproxy: &dyn Fn() -> bool,
) -> Result<Outcome, String> {
    check_specs(&[(spec, instances)], profile, haproxy)
}

/// Like [`check_spec`] for several services routed together.
fn check_specs(
    services: &[(&ServiceSpec, &[Instance])],
    profile: &Profile,
    haproxy: &dyn Fn() -> bool,
) -> Result<Outcome, String> {
    let harness = harness();
    for (spec, _) in services {
        // A spec in hand always survives the trip through KV unchanged.
        let json = serde_json::to_string(spec).map_err(|e| format!("serialize: {e}"))?;
        let back: ServiceSpec = serde_json::from_str(&json)
            .map_err(|e| format!("stored form {json} reads back: {e}"))?;
        if &back != *spec {
            return Err(format!("stored form {json} reads back as {back:?}"));
        }
    }
    let routes: Vec<ServiceRoute<'_>> = services
        .iter()
        .map(|(spec, instances)| ServiceRoute { spec, instances })
        .collect();
    let specs: Vec<&ServiceSpec> = services.iter().map(|(spec, _)| *spec).collect();
    let rendered =
        harness
            .renderer
            .render_with_maps(&profile.settings, &routes, profile.tls.as_ref());
    let rendered = match rendered {
        Ok(rendered) => rendered,
        // A tcp srcPort on a port already taken, or one service twice: the API answers 400
        // (the core holds one spec per service, so the second case is an update there).
        Err(RenderError::PortConflict { .. } | RenderError::DuplicateService(_)) => {
            return Ok(Outcome::Refused)
        }
        // A fragment that does not exist or does not render: the API answers 400.
        Err(RenderError::Custom { .. })
            if specs.iter().any(|spec| names_a_refused_fragment(spec)) =>
        {
            return Ok(Outcome::Refused)
        }
        Err(error) => {
            return Err(format!(
                "{specs:?} do not render with profile {profile:?}: {error}"
            ))
        }
    };
    let config = &rendered.config;
    let actual =
        skeleton::of_rendered(&rendered).map_err(|e| format!("{e}\n--- config ---\n{config}"))?;
    let expected = profile.baseline.expected(services);
    if actual != expected {
        return Err(format!(
            "skeleton differs from what {specs:?} asked for (profile {profile:?})\n--- expected ---\n{}\n--- rendered ---\n{}\n--- config ---\n{config}",
            expected.join("\n"),
            actual.join("\n")
        ));
    }
    if haproxy() {
        let file = format!("case-{}.cfg", harness.files.fetch_add(1, Ordering::Relaxed));
        if let Err(output) = skeleton::haproxy_check_rendered(dir(harness), &file, &rendered) {
            let regex = specs.iter().any(|spec| uses_path_reg(spec)) && regex_refused(&output);
            // Raw lines HAProxy does not take: the API answers 400 with HAProxy's message (the
            // skeleton above already showed each stayed one line of its own backend).
            let backend_extra = specs
                .iter()
                .any(|spec| !spec.custom_templates().backend_extra.is_empty());
            if !(regex || backend_extra) {
                return Err(format!(
                    "haproxy -c refused accepted specs {specs:?} (profile {profile:?}):\n{output}\n--- config ---\n{config}"
                ));
            }
        }
    }
    Ok(Outcome::Rendered)
}

fn uses_path_reg(spec: &ServiceSpec) -> bool {
    spec.destinations().iter().any(|d| {
        (d.effective_path_type(spec) == PathType::PathReg && !d.service_path().is_empty())
            || !d.path_rewrite().search_replace().is_empty()
    })
}

/// Whether HAProxy's only complaint is a regular expression that does not compile.
fn regex_refused(output: &str) -> bool {
    output
        .lines()
        .filter(|line| line.contains("[ALERT]"))
        .all(|line| {
            line.contains("regex '")
                || line.contains("no such ACL")
                || line.contains("Error(s) found in configuration file")
                || line.contains("Fatal errors found in configuration")
        })
        && output.contains("regex '")
}

/// Checks a refusal: it names a parameter and its message cannot break a line of a log or an
/// answer.
fn check_refusal(error: &SpecError) -> Result<Outcome, String> {
    let text = error.to_string();
    if error.parameter.is_empty() || error.message.is_empty() {
        return Err(format!("a refusal names no parameter: {text:?}"));
    }
    if !printable_on_one_line(&text) {
        return Err(format!(
            "a refusal carries a line break or control character: {text:?}"
        ));
    }
    Ok(Outcome::Refused)
}

/// Whether `text` shows on one line: no control character, no whitespace but the space.
fn printable_on_one_line(text: &str) -> bool {
    !text
        .chars()
        .any(|c| c.is_control() || (c.is_whitespace() && c != ' '))
}

/// The property for one query: refused, or rendered as asked.
fn check_query(
    pairs: &[(String, String)],
    profile: &Profile,
    haproxy: &dyn Fn() -> bool,
) -> Result<Outcome, String> {
    match ServiceSpec::from_query(pairs) {
        Err(error) => {
            if std::env::var("INJECTION_DEBUG").is_ok() {
                println!("{error}");
            }
            check_refusal(&error)
        }
        Ok(spec) => check_spec(&spec, &some_instances(), profile, haproxy),
    }
}

// ---- Generators -------------------------------------------------------------------------

/// Pieces of text that mean something to HAProxy's config parser, to handlebars, to the URL
/// decoder or to the spec's own grammar.
const NASTY: &[&str] = &[
    "\n",
    "\r",
    "\r\n",
    " ",
    "\t",
    "#",
    "\"",
    "'",
    "`",
    "\\",
    "\\n",
    "{{",
    "}}",
    "{{{",
    "}}}",
    "{{> backend}}",
    "%[",
    "%[src]",
    "]",
    "%0A",
    "%0D%0A",
    "%20",
    "%23",
    "%",
    "${HOME}",
    "$HOME",
    "\"${HOME}\"",
    "\0",
    "\u{7f}",
    "\u{85}",
    "\u{2028}",
    "é",
    "ß",
    "İ",
    "\u{feff}",
    "\u{202e}",
    "bind :1",
    "backend evil",
    "\n    bind *:1",
    "\nfrontend x\n",
    "-i",
    "-m",
    "--",
    "-f /etc/passwd",
    ",",
    ",,",
    "/",
    "//",
    "*",
    "*.",
    ".",
    "..",
    "a",
    "A",
    "0",
    "/x",
    "if TRUE",
    "!",
    "||",
    "or",
    "^",
    "$",
    "[",
    "(",
    ")",
    "{2,1}",
    "?",
    "|",
    ";",
    "&",
    "=",
    ":",
    "@",
    "~",
    "+",
    "_",
    "-",
];

fn nasty() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(NASTY), 1..6)
        .prop_map(|parts| parts.concat())
}

/// A value for any parameter: mostly nasty, sometimes anything at all, sometimes long.
fn any_value() -> BoxedStrategy<String> {
    prop_oneof![
        4 => nasty(),
        2 => any::<String>(),
        1 => "[ -~]{0,30}",
        1 => (1usize..600, proptest::sample::select(&["/", "a", "*.", "é"][..]))
            .prop_map(|(n, unit)| format!("{unit}{}", "a".repeat(n))),
    ]
    .boxed()
}

fn path_item() -> BoxedStrategy<String> {
    prop_oneof![
        20 => "/[a-zA-Z0-9._~!&()*+;=:@%-]{0,12}",
        1 => "[a-z0-9.^$|?\\[\\]{}()/]{1,10}",
        1 => (500usize..520).prop_map(|n| format!("/{}", "p".repeat(n))),
        1 => any_value(),
    ]
    .boxed()
}

fn domain_item() -> BoxedStrategy<String> {
    prop_oneof![
        20 => "(\\*\\.?)?[a-zA-Z0-9]{1,8}(\\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?){0,3}",
        1 => (60usize..66).prop_map(|n| format!("{}.com", "d".repeat(n))),
        1 => any_value(),
    ]
    .boxed()
}

/// A domain to redirect from: mostly exact (a wildcard is refused there), sometimes any.
fn redirect_domain_item() -> BoxedStrategy<String> {
    prop_oneof![
        12 => "[a-zA-Z0-9]{1,8}(\\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?){0,3}",
        1 => domain_item(),
    ]
    .boxed()
}

/// A comma list of `item`s, sometimes longer than any cap.
fn list(item: BoxedStrategy<String>) -> BoxedStrategy<String> {
    prop_oneof![
        12 => proptest::collection::vec(item.clone(), 1..4),
        1 => proptest::collection::vec(item, 45..56),
    ]
    .prop_map(|items| items.join(","))
    .boxed()
}

fn one_of(values: &'static [&'static str]) -> BoxedStrategy<String> {
    proptest::sample::select(values)
        .prop_map(str::to_string)
        .boxed()
}

const PATH_TYPES: &[&str] = &[
    "path", "path_beg", "path_dir", "path_end", "path_reg", "path_sub",
];

fn port_value() -> BoxedStrategy<String> {
    prop_oneof![
        12 => (1u32..65536).prop_map(|p| p.to_string()),
        1 => one_of(&["8080", "8443", "8404"]),
        1 => one_of(&["0", "65536", "-1", "080", "1e3", "99999999999"]),
    ]
    .boxed()
}

/// The parameters of one destination, as a user would write them.
fn destination(index: u16) -> BoxedStrategy<Vec<(String, String)>> {
    let name = move |base: &str| {
        if index == 0 {
            base.to_string()
        } else {
            format!("{base}.{index}")
        }
    };
    let tcp = (port_value(), proptest::option::weighted(0.3, port_value())).prop_map(
        move |(src_port, port)| {
            let mut pairs = vec![
                (name("reqMode"), "tcp".to_string()),
                (name("srcPort"), src_port),
            ];
            pairs.extend(port.map(|p| (name("port"), p)));
            pairs
        },
    );
    let http = (
        proptest::option::weighted(0.85, list(path_item())),
        proptest::option::weighted(0.35, list(domain_item())),
        proptest::option::weighted(0.2, one_of(PATH_TYPES)),
        proptest::option::weighted(0.2, port_value()),
        proptest::option::weighted(0.2, port_value()),
        proptest::option::weighted(0.1, Just("http".to_string())),
    )
        .prop_map(move |(paths, domains, path_type, port, src_port, mode)| {
            let parts = [
                ("servicePath", paths),
                ("serviceDomain", domains),
                ("pathType", path_type),
                ("port", port),
                ("srcPort", src_port),
                ("reqMode", mode),
            ];
            parts
                .into_iter()
                .filter_map(|(base, value)| value.map(|v| (name(base), v)))
                .collect::<Vec<_>>()
        });
    let http = (
        http,
        destination_edge_rules(),
        destination_routing_rules(),
        destination_path_rewrites(),
    )
        .prop_map(move |(mut pairs, edge, routing, rewrites)| {
            let has_domain = pairs.iter().any(|(n, _)| n.starts_with("serviceDomain"));
            pairs.extend(
                edge.into_iter()
                    .chain(routing)
                    .filter(|(base, _)| base != "redirectFromDomain" || has_domain)
                    .map(|(base, value)| (name(&base), value)),
            );
            pairs.extend(
                rewrites
                    .into_iter()
                    .map(|(base, value)| (name(&base), value)),
            );
            pairs
        });
    // TLS passthrough by SNI: a srcPort (often one the other destinations share) and names.
    let sni = (
        prop_oneof![2 => one_of(&["9443"]), 1 => port_value()],
        list(domain_item()),
        proptest::option::weighted(0.3, port_value()),
    )
        .prop_map(move |(src_port, domains, port)| {
            let mut pairs = vec![
                (name("reqMode"), "sni".to_string()),
                (name("srcPort"), src_port),
                (name("serviceDomain"), domains),
            ];
            pairs.extend(port.map(|p| (name("port"), p)));
            pairs
        });
    prop_oneof![8 => http, 1 => tcp, 1 => sni].boxed()
}

const FLAGS: &[&str] = &["true", "false", "1", "0"];

const REDIRECT_CODES: &[&str] = &["301", "302", "303", "307", "308"];

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "PROPFIND", "MKCOL", "X_CUSTOM",
];

/// An HTTP method: mostly a real one, sometimes not one.
fn method_item() -> BoxedStrategy<String> {
    prop_oneof![
        30 => one_of(METHODS),
        1 => one_of(&["get", "G ET", "-GET", "GET{", ""]),
        1 => any_value(),
    ]
    .boxed()
}

/// A comma list of methods.
fn methods() -> BoxedStrategy<String> {
    prop_oneof![
        12 => proptest::collection::vec(method_item(), 1..4),
        1 => proptest::collection::vec(method_item(), 30..34),
    ]
    .prop_map(|items| items.join(","))
    .boxed()
}

/// The edge rules of one HTTP destination a user might add (by base name).
fn destination_edge_rules() -> BoxedStrategy<Vec<(String, String)>> {
    (
        proptest::option::weighted(0.15, one_of(FLAGS)),
        proptest::option::weighted(0.1, one_of(REDIRECT_CODES)),
        proptest::option::weighted(0.35, list(redirect_domain_item())),
        proptest::option::weighted(0.1, methods()),
        proptest::option::weighted(0.1, methods()),
        proptest::option::weighted(0.1, one_of(FLAGS)),
        proptest::option::weighted(0.1, one_of(FLAGS)),
    )
        .prop_map(
            |(https_only, code, from_domain, allowed, denied, deny_http, ignore_auth)| {
                [
                    ("httpsOnly", https_only),
                    ("httpsRedirectCode", code),
                    ("redirectFromDomain", from_domain),
                    ("allowedMethods", allowed),
                    ("deniedMethods", denied),
                    ("denyHttp", deny_http),
                    ("ignoreAuthorization", ignore_auth),
                ]
                .into_iter()
                .filter_map(|(base, value)| value.map(|v| (base.to_string(), v)))
                .collect()
            },
        )
        .boxed()
}

// Routing rules: servicePathExclude, serviceHeader, userAgent, outboundHostname (per
// destination), isDefaultBackend (per service).

/// A `serviceHeader` value or `userAgent` item: mostly plausible, sometimes anything.
fn match_value() -> BoxedStrategy<String> {
    prop_oneof![
        12 => "[A-Za-z0-9._~!&*+/:;=?@-]{1,16}",
        1 => any_value(),
    ]
    .boxed()
}
// Versioned services: serviceTag, stripPath, reqPathSearchReplace (`path_rewrite.rs`).

/// A regex search: mostly plausible (groups, classes, escapes, anchors), sometimes with
/// characters HAProxy's parser or the wrapper `^(.*?)(…)(.*)$` would read specially.
fn search_item() -> BoxedStrategy<String> {
    prop_oneof![
        12 => "/[a-z0-9]{1,6}/?",
        6 => "\\^?/[a-z]{1,4}(\\([a-z0-9|]{1,4}\\))?(\\[[a-z0-9^\\]-]{1,4}\\])?[*+?]?\\$?",
        2 => "(\\\\[dDwWsSbB./()\\[\\]{}|^$*+?%]|[a-z/]){1,8}",
        1 => "[a-z0-9/.()|\\[\\]{}^$*+?\\\\%!&;=@~_-]{1,12}",
        1 => nasty(),
    ]
    .boxed()
}

/// A `serviceHeader` item, `Name:value`.
fn header_match() -> BoxedStrategy<String> {
    (header_name(), match_value())
        .prop_map(|(name, value)| format!("{name}:{value}"))
        .boxed()
}

/// An `outboundHostname`: names HAProxy resolves here (so `haproxy -c` has nothing to warn
/// about), IP literals, sometimes anything.
fn outbound_host() -> BoxedStrategy<String> {
    prop_oneof![
        8 => one_of(&["localhost", "LocalHost", "127.0.0.1", "::1", "0:0:0:0:0:0:0:1"]),
        1 => any_value(),
    ]
    .boxed()
}
/// A replacement: path text, sometimes with backreferences or anything nasty.
fn replace_item() -> BoxedStrategy<String> {
    prop_oneof![
        12 => "(/[a-z0-9%:.-]{0,6}){1,3}",
        2 => "/(/[a-z0-9%:.-]{0,6}|\\\\0){0,4}",
        1 => nasty(),
    ]
    .boxed()
}

/// The routing rules of one HTTP destination, by base name (only those set).
fn destination_routing_rules() -> BoxedStrategy<Vec<(String, String)>> {
    (
        proptest::option::weighted(0.05, list(path_item())),
        proptest::option::weighted(0.05, list(header_match())),
        proptest::option::weighted(0.05, list(match_value())),
        proptest::option::weighted(0.05, outbound_host()),
    )
        .prop_map(|(exclude, headers, agents, outbound)| {
            [
                ("servicePathExclude", exclude),
                ("serviceHeader", headers),
                ("userAgent", agents),
                ("outboundHostname", outbound),
            ]
            .into_iter()
            .filter_map(|(base, value)| value.map(|v| (base.to_string(), v)))
            .collect()
        })
        .boxed()
}
/// `search,replace:search2,replace2`.
fn search_replace_value() -> BoxedStrategy<String> {
    prop_oneof![
        12 => proptest::collection::vec((search_item(), replace_item()), 1..3),
        1 => proptest::collection::vec((search_item(), replace_item()), 15..18),
    ]
    .prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(search, replace)| format!("{search},{replace}"))
            .collect::<Vec<_>>()
            .join(":")
    })
    .boxed()
}

/// The path rewrites of one HTTP destination a user might add (by base name).
fn destination_path_rewrites() -> BoxedStrategy<Vec<(String, String)>> {
    (
        proptest::option::weighted(0.05, one_of(FLAGS)),
        proptest::option::weighted(0.05, search_replace_value()),
        proptest::option::weighted(0.02, (search_item(), replace_item())),
    )
        .prop_map(|(strip, pairs, old_pair)| {
            let mut fields = Vec::new();
            fields.extend(strip.map(|v| ("stripPath".to_string(), v)));
            fields.extend(pairs.map(|v| ("reqPathSearchReplace".to_string(), v)));
            if let Some((search, replace)) = old_pair {
                fields.push(("reqPathSearch".to_string(), search));
                fields.push(("reqPathReplace".to_string(), replace));
            }
            fields
        })
        .boxed()
}

/// A `serviceTag` value: Consul tags, sometimes anything.
fn service_tag_value() -> BoxedStrategy<String> {
    prop_oneof![
        8 => proptest::collection::vec("[a-zA-Z0-9_.:/@-]{1,10}", 1..4).prop_map(|t| t.join(",")),
        1 => nasty(),
    ]
    .boxed()
}

/// A header name: mostly plausible, sometimes with characters HAProxy reads specially.
fn header_name() -> BoxedStrategy<String> {
    prop_oneof![
        12 => "[A-Za-z][A-Za-z0-9!&*+.^_|~-]{0,14}",
        1 => any_value(),
    ]
    .boxed()
}

/// `Name value`: a header line as `addReqHeader` & co. take it; the value has every printable
/// character a header value may hold, and sometimes one it may not.
fn header_line() -> BoxedStrategy<String> {
    let value = prop_oneof![
        12 => "[A-Za-z0-9(){}<>&|;:=/.?@!*+_^~`'\\[\\]-]([ A-Za-z0-9(){}<>&|;:=/.?@!*+_^~`'\\[\\]-]{0,20}[A-Za-z0-9])?",
        1 => any_value(),
    ];
    (header_name(), value)
        .prop_map(|(name, value)| format!("{name} {value}"))
        .boxed()
}

/// A user name and a clear password (any printable text but the list's comma).
fn clear_user() -> BoxedStrategy<String> {
    ("[a-zA-Z0-9][a-zA-Z0-9_.@-]{0,10}", "[ -+\\--~]{1,16}")
        .prop_map(|(name, password)| format!("{name}:{password}"))
        .boxed()
}

/// A crypt(3) hash in the shape `usersPassEncrypted` takes (HAProxy checks the shape only).
fn password_hash() -> BoxedStrategy<String> {
    prop_oneof![
        6 => "\\$6\\$(rounds=[1-9][0-9]{3,5}\\$)?[a-zA-Z0-9./]{1,16}\\$[a-zA-Z0-9./]{86}",
        2 => "\\$5\\$[a-zA-Z0-9./]{1,16}\\$[a-zA-Z0-9./]{43}",
        1 => "\\$[1-7y]\\$[a-zA-Z0-9./$]{1,100}",
    ]
    .boxed()
}

/// `users` with clear passwords, or hashes with `usersPassEncrypted=true` (by base name).
fn users() -> BoxedStrategy<Vec<(String, String)>> {
    let clear = (
        proptest::collection::vec(clear_user(), 1..3),
        proptest::option::weighted(0.2, Just("false".to_string())),
    )
        .prop_map(|(users, encrypted)| {
            let mut pairs = vec![("users".to_string(), users.join(","))];
            pairs.extend(encrypted.map(|e| ("usersPassEncrypted".to_string(), e)));
            pairs
        });
    let hashed =
        proptest::collection::vec(("[a-zA-Z0-9][a-zA-Z0-9_.@-]{0,10}", password_hash()), 1..3)
            .prop_map(|users| {
                let users: Vec<String> = users
                    .into_iter()
                    .map(|(name, hash)| format!("{name}:{hash}"))
                    .collect();
                vec![
                    ("users".to_string(), users.join(",")),
                    ("usersPassEncrypted".to_string(), "true".to_string()),
                ]
            });
    prop_oneof![3 => clear, 2 => hashed].boxed()
}

/// The service-wide edge rules and basic auth a user might add.
fn service_edge_rules() -> BoxedStrategy<Vec<(String, String)>> {
    let header_lines = || proptest::option::weighted(0.08, list(header_line()));
    let header_names = || proptest::option::weighted(0.08, list(header_name()));
    (
        proptest::option::weighted(0.1, one_of(FLAGS)),
        (header_lines(), header_lines(), header_names()),
        (header_lines(), header_lines(), header_names()),
        proptest::option::weighted(0.15, users()),
    )
        .prop_map(|(proto, request, response, users)| {
            let named = [
                ("redirectWhenHttpProto", proto),
                ("addReqHeader", request.0),
                ("setReqHeader", request.1),
                ("delReqHeader", request.2),
                ("addResHeader", response.0),
                ("setResHeader", response.1),
                ("delResHeader", response.2),
            ];
            let mut pairs: Vec<(String, String)> = named
                .into_iter()
                .filter_map(|(base, value)| value.map(|v| (base.to_string(), v)))
                .collect();
            pairs.extend(users.into_iter().flatten());
            pairs
        })
        .boxed()
}

/// The service-wide parameters a user might add.
fn service_parameters() -> BoxedStrategy<Vec<(String, String)>> {
    (
        "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,66}",
        proptest::option::weighted(0.2, "[a-zA-Z0-9_-]{1,34}"),
        proptest::option::weighted(0.2, "[a-zA-Z0-9_.-]{1,66}"),
        proptest::option::weighted(0.2, one_of(&["true", "false", "1", "0"])),
        proptest::option::weighted(0.2, one_of(PATH_TYPES)),
        service_edge_rules(),
        proptest::option::weighted(0.05, one_of(FLAGS)),
        custom_templates(),
        proptest::option::weighted(0.08, service_tag_value()),
        backend_tuning_parameters(),
    )
        .prop_map(
            |(service, color, acl, skip, path_type, edge, default_backend, custom, tag, tuning)| {
                let mut pairs = vec![("serviceName".to_string(), service)];
                let optional = [
                    ("serviceColor", color),
                    ("aclName", acl),
                    ("skipCheck", skip),
                    ("pathType", path_type),
                    ("isDefaultBackend", default_backend),
                    ("serviceTag", tag),
                ];
                pairs.extend(
                    optional
                        .into_iter()
                        .filter_map(|(name, value)| value.map(|v| (name.to_string(), v))),
                );
                pairs.extend(edge);
                pairs.extend(custom);
                pairs.extend(tuning);
                pairs
            },
        )
        .boxed()
}

/// `templateFePath`, `templateBePath` (the harness's fragments, a missing one, one outside the
/// directory, the other slot's) and `backendExtra` (lines of backend keywords with values).
fn custom_templates() -> BoxedStrategy<Vec<(String, String)>> {
    (
        proptest::option::weighted(0.05, template_path(SHIPPED_RULE)),
        proptest::option::weighted(0.05, template_path(SHIPPED_BACKEND)),
        proptest::option::weighted(0.05, backend_extra()),
    )
        .prop_map(|(fe, be, extra)| {
            [
                ("templateFePath", fe),
                ("templateBePath", be),
                ("backendExtra", extra),
            ]
            .into_iter()
            .filter_map(|(name, value)| value.map(|v| (name.to_string(), v)))
            .collect()
        })
        .boxed()
}

/// A fragment path: mostly `right` (the harness's fragment for the slot), else the other
/// slot's, a missing one, one outside the directory, or anything path-like.
fn template_path(right: &'static str) -> BoxedStrategy<String> {
    prop_oneof![
        12 => Just(right.to_string()),
        1 => one_of(&[
            SHIPPED_RULE,
            SHIPPED_BACKEND,
            "missing.hbs",
            "../shipped-rule.hbs",
            "/etc/passwd",
            "templates/shipped-rule.hbs",
        ]),
        1 => "[a-z./-]{1,20}",
    ]
    .boxed()
}

/// `backendExtra`: one to three lines, each a backend keyword (or not) with a few words.
fn backend_extra() -> BoxedStrategy<String> {
    let keyword = prop_oneof![
        12 => one_of(&[
            "http-response set-header X-Extra",
            "http-request set-header X-Extra",
            "http-response del-header",
            "timeout server",
            "retries",
            "option",
            "acl extra_acl",
            "balance",
            "http-request deny if",
            "server extra",
        ]),
        1 => one_of(&["frontend", "backend", "listen", "global", "bind", "use_backend", "errorfile"]),
    ];
    let word = prop_oneof![
        24 => "[a-zA-Z0-9_./:-]{1,12}",
        1 => one_of(&["\"a b\"", "{ ssl_fc }", "%[src]", "5s", "3", "redispatch", "leastconn"]),
        1 => nasty(),
    ];
    let line = (keyword, proptest::collection::vec(word, 0..4))
        .prop_map(|(keyword, words)| format!("{keyword} {}", words.join(" ")));
    let separator = one_of(&["\n", "\r\n", "\n\n  "]);
    (proptest::collection::vec(line, 1..4), separator)
        .prop_map(|(lines, separator)| lines.join(&separator))
        .boxed()
}

/// How a plausible query is spoiled, if at all.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    /// The value of the pair at this index is replaced.
    Replace(proptest::sample::Index, String),
    /// Text is appended to the value of the pair at this index.
    Append(proptest::sample::Index, String),
    /// Another pair is added.
    Add((String, String)),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        10 => Just(Mutation::None),
        2 => (any::<proptest::sample::Index>(), any_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        2 => (any::<proptest::sample::Index>(), nasty()).prop_map(|(i, v)| Mutation::Append(i, v)),
        1 => (name(), any_value()).prop_map(Mutation::Add),
    ]
}

/// What a user would write: the service parameters and one to three destinations.
fn plausible_query() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::sample::subsequence(vec![0u16, 1, 2, 3, 17, 999], 1..4)
        .prop_flat_map(|indices| {
            let destinations: Vec<_> = indices.into_iter().map(destination).collect();
            (service_parameters(), destinations)
        })
        .prop_map(|(mut pairs, destinations)| {
            pairs.extend(destinations.into_iter().flatten());
            pairs
        })
}

/// A query: usually what a user would write, possibly spoiled by one mutation; sometimes loose
/// pairs of known names, sometimes anything at all.
fn query() -> impl Strategy<Value = Vec<(String, String)>> {
    let plausible = (plausible_query(), mutation()).prop_map(|(mut pairs, mutation)| {
        match mutation {
            Mutation::None => {}
            Mutation::Replace(at, value) => {
                let i = at.index(pairs.len());
                pairs[i].1 = value;
            }
            Mutation::Append(at, value) => {
                let i = at.index(pairs.len());
                pairs[i].1.push_str(&value);
            }
            Mutation::Add(pair) => pairs.push(pair),
        }
        pairs
    });
    let anything = proptest::collection::vec((any_value(), any_value()), 0..5);
    let loose = (
        value_for("serviceName"),
        proptest::collection::vec(pair(), 1..5),
    )
        .prop_map(|(service, mut pairs)| {
            pairs.insert(0, ("serviceName".to_string(), service));
            pairs
        });
    prop_oneof![16 => plausible, 2 => loose, 1 => anything]
}

/// A value suited to parameter `base` most of the time, anything otherwise.
fn value_for(base: &str) -> BoxedStrategy<String> {
    let suited: BoxedStrategy<String> = match base {
        "serviceName" => "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,70}".boxed(),
        "serviceColor" => "[a-zA-Z0-9_-]{1,35}".boxed(),
        "aclName" => "[a-zA-Z0-9_.-]{1,70}".boxed(),
        "skipCheck" => one_of(&["true", "false", "1", "0", "yes"]),
        "pathType" => one_of(PATH_TYPES),
        "servicePath" => list(path_item()),
        "serviceDomain" => list(domain_item()),
        "port" | "srcPort" => port_value(),
        "reqMode" => one_of(&["http", "tcp", "sni", "udp"]),
        "httpsOnly"
        | "redirectWhenHttpProto"
        | "denyHttp"
        | "ignoreAuthorization"
        | "usersPassEncrypted"
        | "letsEncrypt" => one_of(&["true", "false", "1", "0", "yes"]),
        "httpsRedirectCode" => one_of(&["301", "302", "303", "307", "308", "300", "200", "3O1"]),
        "redirectFromDomain" => list(domain_item()),
        "addReqHeader" | "setReqHeader" | "addResHeader" | "setResHeader" => list(header_line()),
        "delReqHeader" | "delResHeader" => list(header_name()),
        "allowedMethods" | "deniedMethods" => methods(),
        "servicePathExclude" => list(path_item()),
        "serviceHeader" => list(header_match()),
        "userAgent" => list(match_value()),
        "outboundHostname" => outbound_host(),
        "isDefaultBackend" => one_of(&["true", "false", "1", "0", "yes"]),
        "templateFePath" => template_path(SHIPPED_RULE),
        "templateBePath" => template_path(SHIPPED_BACKEND),
        "backendExtra" => backend_extra(),
        "serviceTag" => service_tag_value(),
        "stripPath" => one_of(&["true", "false", "1", "0", "yes"]),
        "reqPathSearchReplace" => search_replace_value(),
        "reqPathSearch" => search_item(),
        "reqPathReplace" => replace_item(),
        "users" => prop_oneof![
            3 => list(clear_user()),
            1 => proptest::collection::vec(("[a-z]{1,8}", password_hash()), 1..3).prop_map(
                |users| users
                    .into_iter()
                    .map(|(name, hash)| format!("{name}:{hash}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ]
        .boxed(),
        _ => match backend_tuning_value(base) {
            Some(suited) => suited,
            None => any_value(),
        },
    };
    prop_oneof![5 => suited, 1 => any_value()].boxed()
}

/// A value suited to backend tuning parameter `base` (a few of them refused on purpose).
fn backend_tuning_value(base: &str) -> Option<BoxedStrategy<String>> {
    let time = "[1-9][0-9]{0,5}(ms|s|m|h|d|us)?";
    let suited = match base {
        "balance" => prop_oneof![
            3 => one_of(&[
                "roundrobin", "static-rr", "leastconn", "first", "source", "random",
                "random(3)", "uri", "rdp-cookie",
            ]),
            1 => "url_param [a-zA-Z0-9_.-]{1,12}",
            1 => "hdr\\([a-zA-Z0-9_-]{1,12}\\)",
        ]
        .boxed(),
        "timeoutServer" | "timeoutTunnel" | "timeoutClient" | "checkInterval" => time.boxed(),
        "connectionMode" => one_of(&[
            "http-keep-alive",
            "http-server-close",
            "httpclose",
            "forceclose",
        ]),
        "compressionAlgo" => one_of(&["gzip", "deflate", "gzip,deflate", "raw-deflate identity"]),
        "compressionType" => {
            "[a-z]{1,8}/[a-z0-9.+-]{1,10}([, ][a-z]{1,8}/[a-z0-9.+-]{1,10}){0,2}".boxed()
        }
        "sessionType" => one_of(&["sticky-server", "sticky"]),
        "checkPath" => "/[a-zA-Z0-9/._~!&()*+;=:@%?-]{0,20}".boxed(),
        "maxFails" => "[0-9]{1,3}".boxed(),
        "observe" => one_of(&["layer4", "layer7"]),
        _ => return None,
    };
    Some(suited)
}

/// Backend tuning parameters a user might add, each now and then, with suited values.
fn backend_tuning_parameters() -> BoxedStrategy<Vec<(String, String)>> {
    const TUNING: [&str; 12] = [
        "balance",
        "timeoutServer",
        "timeoutTunnel",
        "timeoutClient",
        "connectionMode",
        "compressionAlgo",
        "compressionType",
        "sessionType",
        "checkPath",
        "checkInterval",
        "maxFails",
        "observe",
    ];
    TUNING
        .iter()
        .map(|name| {
            let value = backend_tuning_value(name).unwrap_or_else(any_value);
            proptest::option::weighted(0.025, value)
                .prop_map(move |value| value.map(|v| (name.to_string(), v)))
        })
        .collect::<Vec<_>>()
        .prop_map(|pairs| pairs.into_iter().flatten().collect())
        .boxed()
}

const NAMES: &[&str] = &[
    "serviceColor",
    "aclName",
    "skipCheck",
    "pathType",
    "servicePath",
    "serviceDomain",
    "port",
    "srcPort",
    "reqMode",
    "httpsOnly",
    "httpsRedirectCode",
    "redirectWhenHttpProto",
    "redirectFromDomain",
    "addReqHeader",
    "setReqHeader",
    "delReqHeader",
    "addResHeader",
    "setResHeader",
    "delResHeader",
    "allowedMethods",
    "deniedMethods",
    "denyHttp",
    "users",
    "usersPassEncrypted",
    "ignoreAuthorization",
    "servicePathExclude",
    "serviceHeader",
    "userAgent",
    "outboundHostname",
    "isDefaultBackend",
    "templateFePath",
    "templateBePath",
    "backendExtra",
    "serviceTag",
    "stripPath",
    "reqPathSearchReplace",
    "reqPathSearch",
    "reqPathReplace",
    // Backend tuning.
    "balance",
    "timeoutServer",
    "timeoutTunnel",
    "timeoutClient",
    "connectionMode",
    "compressionAlgo",
    "compressionType",
    "sessionType",
    "checkPath",
    "checkInterval",
    "maxFails",
    "observe",
    // ACME.
    "letsEncrypt",
];

/// A parameter name: a known one with a destination suffix (good or bad), or anything.
fn name() -> BoxedStrategy<String> {
    let suffix = proptest::sample::select(
        &[
            "", "", "", ".1", ".2", ".999", ".0", ".01", ".1000", ".x", ".", ".1.2",
        ][..],
    );
    prop_oneof![
        9 => (proptest::sample::select(NAMES), suffix).prop_map(|(n, s)| format!("{n}{s}")),
        1 => any_value(),
    ]
    .boxed()
}

/// A pair of a [`name`] and a value suited to it (mostly).
fn pair() -> BoxedStrategy<(String, String)> {
    name()
        .prop_flat_map(|name| {
            let base = name.split('.').next().unwrap_or_default().to_string();
            (Just(name), value_for(&base))
        })
        .boxed()
}

/// Which profile a case renders with (any index; see [`profile`]).
fn any_profile() -> impl Strategy<Value = usize> {
    0usize..64
}

fn config() -> Config {
    let mut config = Config {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/corpus/proptest-seeds.txt",
        ))),
        ..Config::default()
    };
    // The suite's own run draws the same cases every time, so its tally (and the floor of
    // inputs that reach the renderer) does not depend on luck; a longer run
    // (`PROPTEST_CASES=…`) or `PROPTEST_RNG_SEED=…` draws new ones.
    if std::env::var_os("PROPTEST_CASES").is_none()
        && std::env::var_os("PROPTEST_RNG_SEED").is_none()
    {
        config.rng_seed = proptest::test_runner::RngSeed::Fixed(SUITE_SEED);
    }
    config
}

/// The seed of the suite's own run (see [`config`]).
const SUITE_SEED: u64 = 20_261_122;

// ---- Properties -------------------------------------------------------------------------

/// What one property run did, to print and to check that it exercised both outcomes.
#[derive(Debug, Default)]
struct Tally {
    cases: AtomicUsize,
    rendered: AtomicUsize,
    haproxy_runs: AtomicUsize,
}

impl Tally {
    /// Whether this run may still spend a `haproxy -c` (and counts it if so).
    fn take_haproxy_run(&self) -> bool {
        let budget = haproxy_budget();
        self.haproxy_runs
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < budget).then_some(n + 1)
            })
            .is_ok()
    }

    fn record(&self, outcome: &Outcome) {
        self.cases.fetch_add(1, Ordering::Relaxed);
        if *outcome == Outcome::Rendered {
            self.rendered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prints the tally and asserts the generator reached the renderer and HAProxy.
    fn report(&self, what: &str) {
        let cases = self.cases.load(Ordering::Relaxed);
        let rendered = self.rendered.load(Ordering::Relaxed);
        let runs = self.haproxy_runs.load(Ordering::Relaxed);
        println!("{what}: {cases} cases, {rendered} rendered, {runs} haproxy -c runs");
        assert!(
            rendered * 10 >= cases,
            "{what}: too few inputs reach the renderer ({rendered} of {cases}): the generator is too wild"
        );
        assert!(runs > 0, "{what}: haproxy -c never ran");
    }
}

/// Runs `property` on `strategy` with the suite's config; fails with proptest's minimal case.
fn run<S: Strategy>(
    what: &str,
    strategy: S,
    property: impl Fn(S::Value, &Tally) -> Result<Outcome, String>,
) where
    S::Value: std::fmt::Debug,
{
    run_with(config(), what, strategy, property);
}

/// [`run`] with its own config.
fn run_with<S: Strategy>(
    config: Config,
    what: &str,
    strategy: S,
    property: impl Fn(S::Value, &Tally) -> Result<Outcome, String>,
) where
    S::Value: std::fmt::Debug,
{
    let tally = Tally::default();
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&strategy, |input| {
        let outcome = property(input, &tally).map_err(TestCaseError::fail)?;
        tally.record(&outcome);
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{what}: {failure}");
    }
    tally.report(what);
}

#[test]
fn any_query_is_refused_or_renders_only_what_it_asked_for() {
    run("queries", (query(), any_profile()), |(pairs, at), tally| {
        check_query(&pairs, profile(at), &|| tally.take_haproxy_run())
    });
}

/// The regression corpus: every line of `tests/corpus/queries.txt`, decoded as the API decodes a
/// query, is refused or renders as asked under every profile, with `haproxy -c` on the config
/// of one profile (in turn, by line number) when it renders.
#[test]
fn the_regression_corpus_is_refused_or_renders_only_what_it_asked_for() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/queries.txt");
    let corpus = std::fs::read_to_string(&path).expect("the corpus file");
    let (mut refused, mut rendered) = (0, 0);
    for (number, line) in corpus.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The API's own decoding: a query that is not URL encoding is a 400 before any spec.
        let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(line) else {
            refused += 1;
            continue;
        };
        let profiles = harness().profiles.len();
        let outcomes: Vec<Outcome> = (0..profiles)
            .map(|at| {
                let haproxy = at == number % profiles;
                check_query(&pairs, profile(at), &|| haproxy)
                    .unwrap_or_else(|failure| panic!("corpus case {line:?}: {failure}"))
            })
            .collect();
        match outcomes.iter().all(|o| *o == Outcome::Refused) {
            true => refused += 1,
            false => rendered += 1,
        }
    }
    println!("corpus: {refused} refused, {rendered} rendered");
    assert!(
        refused > 0 && rendered > 0,
        "the corpus has cases of both kinds"
    );
}

/// A stored spec as anyone with KV access could write it: the right shape, nasty values.
fn stored_json() -> impl Strategy<Value = String> {
    let text = || prop_oneof![3 => value_for("servicePath"), 1 => any_value()];
    let destination =
        |index: u32| {
            (
            proptest::collection::vec(path_item(), 1..4),
            proptest::collection::vec(domain_item(), 0..2),
            proptest::option::weighted(0.2, prop_oneof![5 => one_of(PATH_TYPES), 1 => any_value()]),
            proptest::option::weighted(0.2, prop_oneof![5 => 1u32..65536, 1 => any::<u32>()]),
            proptest::option::weighted(0.1, prop_oneof![5 => 1u32..65536, 1 => any::<u32>()]),
            proptest::option::weighted(0.1, one_of(&["http", "tcp", "sni", "udp", "HTTP"])),
            stored_edge_rules(),
        )
            .prop_map(move |(paths, domains, path_type, port, src_port, mode, edge)| {
                let mut destination = serde_json::json!({
                    "Index": index, "ServicePath": paths, "ServiceDomain": domains,
                    "PathType": path_type, "Port": port, "SrcPort": src_port, "ReqMode": mode,
                });
                if let (Some(destination), serde_json::Value::Object(edge)) =
                    (destination.as_object_mut(), edge)
                {
                    destination.extend(edge);
                }
                destination
            })
        };
    let indices = prop_oneof![
        12 => proptest::sample::subsequence(vec![0u32, 1, 2, 3, 999], 1..4),
        1 => proptest::sample::subsequence(vec![0u32, 1000, 65536, u32::MAX], 0..3),
    ];
    let destinations = prop_oneof![
        12 => indices.prop_flat_map(move |indices| {
            indices.into_iter().map(destination).collect::<Vec<_>>()
        }),
        // Repeated indices.
        1 => proptest::collection::vec(destination(7), 2..3),
    ];
    (
        prop_oneof![8 => value_for("serviceName"), 1 => text()],
        proptest::option::weighted(0.2, value_for("serviceColor")),
        proptest::option::weighted(0.2, value_for("aclName")),
        any::<bool>(),
        proptest::option::weighted(0.3, one_of(PATH_TYPES)),
        destinations,
        stored_service_rules(),
    )
        .prop_map(|(name, color, acl, skip, path_type, destinations, rules)| {
            let mut spec = serde_json::json!({
                "ServiceName": name, "ServiceColor": color, "AclName": acl, "SkipCheck": skip,
                "PathType": path_type, "ServiceDest": destinations,
            });
            if let (Some(spec), serde_json::Value::Object(rules)) = (spec.as_object_mut(), rules) {
                spec.extend(rules);
            }
            spec.to_string()
        })
}

/// A stored list: the items a query would give, sometimes anything.
fn stored_list(item: BoxedStrategy<String>) -> BoxedStrategy<Vec<String>> {
    proptest::collection::vec(prop_oneof![8 => item, 1 => any_value()], 0..3).boxed()
}

/// The edge rules and `IgnoreAuthorization` of a stored destination (only the fields set).
fn stored_edge_rules() -> BoxedStrategy<serde_json::Value> {
    (
        proptest::option::weighted(0.1, any::<bool>()),
        proptest::option::weighted(
            0.1,
            prop_oneof![5 => proptest::sample::select(&[301u32, 302, 303, 307, 308][..]), 1 => any::<u32>()],
        ),
        proptest::option::weighted(0.1, stored_list(redirect_domain_item())),
        proptest::option::weighted(0.1, stored_list(method_item())),
        proptest::option::weighted(0.1, stored_list(method_item())),
        proptest::option::weighted(0.1, any::<bool>()),
        proptest::option::weighted(0.1, any::<bool>()),
        stored_path_rewrites(),
    )
        .prop_map(
            |(https_only, code, from_domain, allowed, denied, deny_http, ignore_auth, rewrites)| {
                let mut fields = serde_json::Map::new();
                if let serde_json::Value::Object(rewrites) = rewrites {
                    fields.extend(rewrites);
                }
                let mut set = |key: &str, value: Option<serde_json::Value>| {
                    if let Some(value) = value {
                        fields.insert(key.to_string(), value);
                    }
                };
                set("HttpsOnly", https_only.map(Into::into));
                set("HttpsRedirectCode", code.map(Into::into));
                set("RedirectFromDomain", from_domain.map(Into::into));
                set("AllowedMethods", allowed.map(Into::into));
                set("DeniedMethods", denied.map(Into::into));
                set("DenyHttp", deny_http.map(Into::into));
                set("IgnoreAuthorization", ignore_auth.map(Into::into));
                serde_json::Value::Object(fields)
            },
        )
        .boxed()
}

/// `StripPath` and `ReqPathSearchReplace` of a stored destination (only the fields set).
fn stored_path_rewrites() -> BoxedStrategy<serde_json::Value> {
    let pair = (search_item(), replace_item()).prop_map(|(s, r)| format!("{s},{r}"));
    (
        proptest::option::weighted(0.15, any::<bool>()),
        proptest::option::weighted(0.2, stored_list(pair.boxed())),
    )
        .prop_map(|(strip, pairs)| {
            let mut fields = serde_json::Map::new();
            if let Some(strip) = strip {
                fields.insert("StripPath".into(), strip.into());
            }
            if let Some(pairs) = pairs {
                fields.insert("ReqPathSearchReplace".into(), pairs.into());
            }
            serde_json::Value::Object(fields)
        })
        .boxed()
}

/// The service-wide rules and users of a stored spec (only the fields set): a stored password
/// must be a crypt hash, a clear one is refused.
fn stored_service_rules() -> BoxedStrategy<serde_json::Value> {
    let lines = || proptest::option::weighted(0.08, stored_list(header_line()));
    let names = || proptest::option::weighted(0.08, stored_list(header_name()));
    let user = (
        prop_oneof![8 => "[a-zA-Z0-9][a-zA-Z0-9_.@-]{0,10}".boxed(), 1 => any_value()],
        prop_oneof![8 => password_hash(), 1 => any_value()],
    )
        .prop_map(|(name, hash)| serde_json::json!({ "Username": name, "PasswordHash": hash }));
    (
        proptest::option::weighted(0.1, any::<bool>()),
        (lines(), lines(), names()),
        (lines(), lines(), names()),
        proptest::option::weighted(0.15, proptest::collection::vec(user, 0..3)),
        (
            proptest::option::weighted(0.08, template_path(SHIPPED_RULE)),
            proptest::option::weighted(0.08, template_path(SHIPPED_BACKEND)),
            proptest::option::weighted(
                0.1,
                backend_extra()
                    .prop_map(|lines| lines.split('\n').map(str::to_string).collect::<Vec<_>>()),
            ),
        ),
        proptest::option::weighted(
            0.1,
            stored_list(prop_oneof![4 => "[a-zA-Z0-9_.:/@-]{1,10}", 1 => nasty()].boxed()),
        ),
    )
        .prop_map(|(proto, request, response, users, custom, tags)| {
            let mut fields = serde_json::Map::new();
            let mut set = |key: &str, value: Option<serde_json::Value>| {
                if let Some(value) = value {
                    fields.insert(key.to_string(), value);
                }
            };
            set("RedirectWhenHttpProto", proto.map(Into::into));
            set("AddReqHeader", request.0.map(Into::into));
            set("SetReqHeader", request.1.map(Into::into));
            set("DelReqHeader", request.2.map(Into::into));
            set("AddResHeader", response.0.map(Into::into));
            set("SetResHeader", response.1.map(Into::into));
            set("DelResHeader", response.2.map(Into::into));
            set("Users", users.map(Into::into));
            set("TemplateFePath", custom.0.map(Into::into));
            set("TemplateBePath", custom.1.map(Into::into));
            set("BackendExtra", custom.2.map(Into::into));
            set("ServiceTag", tags.map(Into::into));
            serde_json::Value::Object(fields)
        })
        .boxed()
}

/// A stored spec (KV can be edited by anyone) is refused when read, or renders as asked.
#[test]
fn any_stored_spec_is_refused_or_renders_only_what_it_asked_for() {
    run(
        "stored specs",
        (stored_json(), any_profile()),
        |(json, at), tally| match serde_json::from_str::<ServiceSpec>(&json) {
            Err(error) => {
                let text = error.to_string();
                if std::env::var("INJECTION_DEBUG").is_ok() {
                    println!("{text}");
                }
                if !printable_on_one_line(&text) {
                    return Err(format!(
                        "a refusal carries a line break or control character: {text:?}"
                    ));
                }
                Ok(Outcome::Refused)
            }
            Ok(spec) => check_spec(&spec, &some_instances(), profile(at), &|| {
                tally.take_haproxy_run()
            }),
        },
    );
}

/// An instance address as anyone who registers a service could write it.
fn address() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
        2 => any::<std::net::Ipv6Addr>().prop_map(|ip| ip.to_string()),
        1 => any::<std::net::Ipv4Addr>().prop_map(|ip| format!("::ffff:{ip}")),
        2 => "[a-zA-Z0-9-]{1,10}(\\.[a-zA-Z0-9-]{1,10}){0,3}",
        1 => Just("localhost".to_string()),
        3 => any_value(),
    ]
    .boxed()
}

/// Any registered address and port is refused, or becomes exactly one `server` line of each
/// backend, which HAProxy accepts.
#[test]
fn any_instance_address_is_refused_or_becomes_one_server_line() {
    let spec = ServiceSpec::from_query(&[
        ("serviceName".to_string(), "svc".to_string()),
        ("servicePath".to_string(), "/a".to_string()),
        ("reqMode.1".to_string(), "tcp".to_string()),
        ("srcPort.1".to_string(), "9000".to_string()),
    ])
    .expect("a spec with an http and a tcp destination");
    let instances = proptest::collection::vec((address(), any::<u16>()), 1..4);
    run("instances", instances, |candidates, tally| {
        let mut accepted = Vec::new();
        for (address, port) in &candidates {
            match Instance::new(address, *port) {
                Ok(instance) => accepted.push(instance),
                Err(error) => {
                    check_refusal(&error)?;
                }
            }
        }
        if accepted.is_empty() {
            return Ok(Outcome::Refused);
        }
        // Hostnames other than localhost do not resolve here: HAProxy would only warn.
        let resolvable = accepted
            .iter()
            .all(|i| i.address().parse::<std::net::IpAddr>().is_ok() || i.address() == "localhost");
        check_spec(&spec, &accepted, profile(0), &|| {
            resolvable && tally.take_haproxy_run()
        })
    });
}

/// The largest spec the limits allow renders a config HAProxy accepts: 64 destinations, each
/// with 50 paths of 512 characters and 50 domains of 253 characters, under the longest names.
#[test]
fn the_largest_accepted_spec_renders_a_config_haproxy_accepts() {
    let mut pairs = vec![
        ("serviceName".to_string(), "s".repeat(64)),
        ("serviceColor".to_string(), "c".repeat(32)),
        ("aclName".to_string(), "a".repeat(64)),
    ];
    let domain = |n: usize| {
        // 253 characters: three labels of 63, one of 61, a distinct first label.
        let label = "d".repeat(63);
        format!(
            "x{n:02}{}.{label}.{label}.{}",
            "d".repeat(60),
            "d".repeat(61)
        )
    };
    for index in 0..64u16 {
        let name = |base: &str| {
            if index == 0 {
                base.to_string()
            } else {
                format!("{base}.{}", index + 935)
            }
        };
        let paths: Vec<String> = (0..50)
            .map(|n| format!("/{index:02}{n:02}{}", "p".repeat(507)))
            .collect();
        let domains: Vec<String> = (0..50)
            .map(|n| {
                let d = domain(n);
                if n % 2 == 0 {
                    d
                } else {
                    format!("*.{d}")
                }
            })
            .collect();
        assert_eq!(paths[0].len(), 512);
        assert_eq!(domain(0).len(), 253);
        pairs.push((name("servicePath"), paths.join(",")));
        pairs.push((name("serviceDomain"), domains.join(",")));
        if index % 2 == 1 {
            pairs.push((name("pathType"), "path_reg".to_string()));
            // Not the unsuffixed destination's stripPath: a path_reg pattern has no prefix.
            pairs.push((name("stripPath"), "false".to_string()));
        } else {
            pairs.push((name("stripPath"), "true".to_string()));
        }
        // The most search/replace pairs, each as long as allowed, with the most groups.
        let search = format!("/(a)(b)(c)(d)(e)(f){}", "x".repeat(237));
        let replace = format!("/\\6{}", "r".repeat(253));
        assert_eq!((search.len(), replace.len()), (256, 256));
        let all_pairs = vec![format!("{search},{replace}"); 16].join(":");
        pairs.push((name("reqPathSearchReplace"), all_pairs));
    }
    let spec = ServiceSpec::from_query(&pairs).expect("the largest spec is accepted");
    assert_eq!(spec.destinations().len(), 64);
    // Plain, and with every setting on (an HTTPS frontend repeating every rule, HTTPS redirects,
    // basic auth in every backend).
    for at in [0, 3] {
        let outcome = check_spec(&spec, &some_instances(), profile(at), &|| true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome, Outcome::Rendered);
    }
}

/// Through the HTTP API: nasty queries get 400 naming the parameter and change nothing, and
/// every limit answers 400 with its number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nasty_queries_and_limits_are_refused_at_the_api_and_change_nothing() {
    let (proxy, _backend) = proxy_routing_demo().await;
    let before = proxy.snapshot().await;

    let many_paths = (0..51)
        .map(|i| format!("/p{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let many_domains = (0..51)
        .map(|i| format!("d{i}.example.com"))
        .collect::<Vec<_>>()
        .join(",");
    let many_destinations = (1..=65)
        .map(|i| format!("servicePath.{i}=/d{i}"))
        .collect::<Vec<_>>()
        .join("&");
    let cases = [
        // A raw newline and a new directive, percent-encoded and not.
        (
            "serviceName=go-demo&servicePath=/demo%0A%20%20%20%20bind%20*:1".to_string(),
            "servicePath",
            "a newline",
        ),
        (
            "serviceName=go-demo&servicePath=/demo%0D%0Afrontend%20evil".to_string(),
            "servicePath",
            "a carriage return",
        ),
        (
            "serviceName=go-demo&serviceDomain=x.com%20if%20TRUE".to_string(),
            "serviceDomain",
            "a space",
        ),
        (
            "serviceName=go-demo&servicePath=/%7B%7Bbind%7D%7D".to_string(),
            "servicePath",
            "`{`",
        ),
        (
            "serviceName=go-demo&servicePath=/%25%5Bsrc%5D".to_string(),
            "servicePath",
            "`[`",
        ),
        (
            "serviceName=go-demo&servicePath=-i&pathType=path_end".to_string(),
            "servicePath",
            "must not start with `-`",
        ),
        (
            "serviceName=go-demo&servicePath=/a%E2%80%A8b".to_string(),
            "servicePath",
            "character U+2028",
        ),
        (
            "serviceName=go-demo&%0A=x".to_string(),
            "\"\\n\"",
            "not supported",
        ),
        (
            format!("serviceName=go-demo&servicePath={many_paths}"),
            "servicePath",
            "51 paths given: at most 50 per destination",
        ),
        (
            format!("serviceName=go-demo&serviceDomain={many_domains}"),
            "serviceDomain",
            "51 domains given: at most 50 per destination",
        ),
        (
            format!("serviceName=go-demo&servicePath=/demo&{many_destinations}"),
            "servicePath.64",
            "66 destinations given: at most 64 per service",
        ),
        (
            format!("serviceName=go-demo&servicePath=/{}", "a".repeat(512)),
            "servicePath",
            "513 characters, at most 512",
        ),
        (
            format!("serviceName={}&servicePath=/demo", "a".repeat(65)),
            "serviceName",
            "65 characters, at most 64",
        ),
    ];
    for (query, parameter, needle) in &cases {
        let (status, answer) = proxy.reconfigure(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
        let message = answer["Message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("parameter `{parameter}`")) && message.contains(needle),
            "{query}: the message names `{parameter}` and says {needle:?}: {message}"
        );
    }
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(proxy.names_answering("/demo", None, 1).await, ["demo"]);

    // At the limits, the same service is accepted and routed: 50 paths, the last one served.
    let fifty_paths = (0..50)
        .map(|i| format!("/p{i}"))
        .collect::<Vec<_>>()
        .join(",");
    proxy
        .reconfigure_ok(&format!("serviceName=go-demo&servicePath={fifty_paths}"))
        .await;
    assert_eq!(proxy.names_answering("/p49", None, 1).await, ["demo"]);
}

/// A spec from a plausible query the parser accepts (refusals are [`query`]'s business).
fn accepted_spec() -> impl Strategy<Value = ServiceSpec> {
    plausible_query().prop_filter_map("a refused query", |pairs| {
        ServiceSpec::from_query(&pairs).ok()
    })
}

/// Two services routed together (names, ports and rules side by side) render exactly the union
/// of what each asked for, or are refused as a port conflict.
///
/// Nearly every case renders two services here, so it runs a quarter of `PROPTEST_CASES`.
#[test]
fn two_accepted_services_render_only_what_they_asked_for_together() {
    let config = config();
    run_with(
        Config {
            cases: (config.cases / 4).max(1),
            ..config
        },
        "two services",
        (accepted_spec(), accepted_spec(), any_profile()),
        |(first, second, at), tally| {
            let instances = some_instances();
            check_specs(
                &[(&first, &instances), (&second, &instances[..1])],
                profile(at),
                &|| tally.take_haproxy_run(),
            )
        },
    );
}

/// A clear password no config holds by chance: ten random letters and digits, sometimes followed
/// by text that means something to HAProxy (without the comma that separates users).
fn clear_password() -> BoxedStrategy<String> {
    ("[A-Za-z0-9]{10}", proptest::option::weighted(0.5, nasty()))
        .prop_map(|(unique, tail)| format!("{unique}{}", tail.unwrap_or_default().replace(',', "")))
        .boxed()
}

/// Query pairs, or users with their clear passwords.
type Pairs = Vec<(String, String)>;

/// A query with `users` in clear, and the users and passwords it gives.
fn query_with_clear_passwords() -> impl Strategy<Value = (Pairs, Pairs)> {
    (
        "[a-z][a-z0-9-]{0,10}",
        proptest::collection::vec(("[a-zA-Z0-9][a-zA-Z0-9_.@-]{0,10}", clear_password()), 1..4),
        proptest::option::weighted(0.3, one_of(&["false", "0"])),
        proptest::option::weighted(0.3, one_of(FLAGS)),
        any::<bool>(),
    )
        .prop_map(|(service, users, encrypted, ignore, tcp)| {
            let list: Vec<String> = users
                .iter()
                .map(|(name, password)| format!("{name}:{password}"))
                .collect();
            let mut pairs = vec![
                ("serviceName".to_string(), service),
                ("servicePath".to_string(), "/app".to_string()),
                ("servicePath.1".to_string(), "/open".to_string()),
                ("users".to_string(), list.join(",")),
            ];
            pairs.extend(encrypted.map(|e| ("usersPassEncrypted".to_string(), e)));
            pairs.extend(ignore.map(|i| ("ignoreAuthorization.1".to_string(), i)));
            if tcp {
                pairs.push(("reqMode.2".to_string(), "tcp".to_string()));
                pairs.push(("srcPort.2".to_string(), "9000".to_string()));
            }
            (pairs, users)
        })
}

/// `users` in clear never puts a clear password into haproxy.cfg, the stored spec or the
/// answer: each user's line holds a crypt(3) hash of its password, and the config renders as
/// asked.
///
/// Hashing and checking a password takes ~20 ms here, so this property runs an eighth of
/// `PROPTEST_CASES` (32 by default).
#[test]
fn a_clear_password_never_reaches_the_config_only_its_hash() {
    let config = config();
    run_with(
        Config {
            cases: (config.cases / 8).max(1),
            ..config
        },
        "clear passwords",
        (query_with_clear_passwords(), any_profile()),
        |((pairs, users), at), tally| {
            let spec = match ServiceSpec::from_query(&pairs) {
                Err(error) => return check_refusal(&error),
                Ok(spec) => spec,
            };
            let profile = profile(at);
            // HAProxy's view of userlists is the query property's; a few runs suffice here.
            let outcome = check_spec(&spec, &some_instances(), profile, &|| {
                tally.haproxy_runs.load(Ordering::Relaxed) < 10 && tally.take_haproxy_run()
            })?;
            let route = ServiceRoute {
                spec: &spec,
                instances: &[],
            };
            let config = harness()
                .renderer
                .render_with_tls(&profile.settings, &[route], profile.tls.as_ref())
                .map_err(|e| format!("renders once, not twice: {e}"))?;
            let stored = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
            let answer = spec.to_answer_json().to_string();
            for (name, clear) in &users {
                for (what, text) in [
                    ("haproxy.cfg", &config),
                    ("the stored spec", &stored),
                    ("the answer", &answer),
                ] {
                    if text.contains(clear.as_str()) {
                        return Err(format!(
                            "{what} holds the clear password {clear:?}:\n{text}"
                        ));
                    }
                }
                let line = config
                    .lines()
                    .map(str::trim)
                    .find(|line| line.starts_with(&format!("user {name} password ")))
                    .ok_or_else(|| format!("no user line for {name}:\n{config}"))?;
                let hash = line.rsplit(' ').next().unwrap_or_default();
                let parsed = PasswordHash::parse("users", hash)
                    .map_err(|e| format!("{line:?} holds no crypt hash: {e}"))?;
                if !hash.starts_with("$6$") || !parsed.matches(clear) {
                    return Err(format!(
                        "{line:?} is not the SHA-512 crypt hash of {clear:?}"
                    ));
                }
            }
            Ok(outcome)
        },
    );
}
