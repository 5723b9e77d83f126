//! Injection, proven harmless: no request, stored spec or registry address may put text of its
//! choosing into haproxy.cfg outside the value slot that belongs to it.
//!
//! Arbitrary queries, stored JSON specs and instance addresses go through the real parser and
//! the real [`Renderer`]. Each input is either refused (a [`SpecError`], a 400), or it renders a
//! config whose directive skeleton (see `skeleton`) is exactly the one the spec asks for and
//! that `haproxy -c` accepts (a `path_reg` pattern HAProxy's regex engine refuses is the one
//! allowed refusal there: the API answers 400 with HAProxy's message).
//!
//! Budgets: `PROPTEST_CASES` cases per property (256 by default) and at most
//! `INJECTION_HAPROXY_CHECKS` runs of `haproxy -c` per property (35 by default, ~35 ms each;
//! with the corpus and the largest spec about 150 runs in all).
//! Run longer by hand with e.g.
//! `PROPTEST_CASES=20000 INJECTION_HAPROXY_CHECKS=2000 cargo test --test api injection::`;
//! `INJECTION_DEBUG=1` prints every refusal (to see what the generators reach).
//!
//! Every case found is kept in `tests/corpus/queries.txt` (raw query strings, replayed every run
//! with `haproxy -c` on each accepted one); proptest's seeds of failures go to
//! `tests/corpus/proptest-seeds.txt`.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use flow_proxy::render::{RenderError, Renderer, ServiceRoute, ERROR_PAGE_503};
use flow_proxy::spec::{Instance, PathType, ServiceSpec, SpecError};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use reqwest::StatusCode;

use crate::helpers::{spawn_backend, TestProxy};
use crate::skeleton::{self, Baseline};

/// Everything the properties share: the renderer, the reference skeleton, a directory for
/// `haproxy -c` (holding the 503 page the config names).
struct Harness {
    renderer: Renderer,
    dir: tempfile::TempDir,
    settings: flow_proxy::render::RenderSettings,
    baseline: Baseline,
    files: AtomicUsize,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let errors = dir.path().join("errors");
        std::fs::create_dir(&errors).expect("errors directory");
        std::fs::write(errors.join("503.http"), ERROR_PAGE_503).expect("503 page");
        let renderer = Renderer::new(None).expect("built-in templates");
        let settings = skeleton::settings(&errors);
        let baseline = Baseline::new(&renderer, &settings);
        Harness {
            renderer,
            dir,
            settings,
            baseline,
            files: AtomicUsize::new(0),
        }
    })
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
    haproxy: &dyn Fn() -> bool,
) -> Result<Outcome, String> {
    check_specs(&[(spec, instances)], haproxy)
}

/// Like [`check_spec`] for several services routed together.
fn check_specs(
    services: &[(&ServiceSpec, &[Instance])],
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
    let config = match harness.renderer.render(&harness.settings, &routes) {
        Ok(config) => config,
        // A tcp srcPort on a port already taken, or one service twice: the API answers 400
        // (the core holds one spec per service, so the second case is an update there).
        Err(RenderError::PortConflict { .. } | RenderError::DuplicateService(_)) => {
            return Ok(Outcome::Refused)
        }
        Err(error) => return Err(format!("{specs:?} do not render: {error}")),
    };
    let actual =
        skeleton::of_config(&config).map_err(|e| format!("{e}\n--- config ---\n{config}"))?;
    let expected = harness.baseline.expected(services);
    if actual != expected {
        return Err(format!(
            "skeleton differs from what {specs:?} asked for\n--- expected ---\n{}\n--- rendered ---\n{}\n--- config ---\n{config}",
            expected.join("\n"),
            actual.join("\n")
        ));
    }
    if haproxy() {
        let file = format!("case-{}.cfg", harness.files.fetch_add(1, Ordering::Relaxed));
        if let Err(output) = skeleton::haproxy_check(dir(harness), &file, &config) {
            if !(specs.iter().any(|spec| uses_path_reg(spec)) && regex_refused(&output)) {
                return Err(format!(
                    "haproxy -c refused accepted specs {specs:?}:\n{output}\n--- config ---\n{config}"
                ));
            }
        }
    }
    Ok(Outcome::Rendered)
}

fn uses_path_reg(spec: &ServiceSpec) -> bool {
    spec.destinations()
        .iter()
        .any(|d| d.effective_path_type(spec) == PathType::PathReg && !d.service_path().is_empty())
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
fn check_query(pairs: &[(String, String)], haproxy: &dyn Fn() -> bool) -> Result<Outcome, String> {
    match ServiceSpec::from_query(pairs) {
        Err(error) => {
            if std::env::var("INJECTION_DEBUG").is_ok() {
                println!("{error}");
            }
            check_refusal(&error)
        }
        Ok(spec) => check_spec(&spec, &some_instances(), haproxy),
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
        1 => Just(skeleton::HTTP_PORT.to_string()),
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
    prop_oneof![8 => http, 1 => tcp].boxed()
}

/// The service-wide parameters a user might add.
fn service_parameters() -> BoxedStrategy<Vec<(String, String)>> {
    (
        "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,66}",
        proptest::option::weighted(0.2, "[a-zA-Z0-9_-]{1,34}"),
        proptest::option::weighted(0.2, "[a-zA-Z0-9_.-]{1,66}"),
        proptest::option::weighted(0.2, one_of(&["true", "false", "1", "0"])),
        proptest::option::weighted(0.2, one_of(PATH_TYPES)),
    )
        .prop_map(|(service, color, acl, skip, path_type)| {
            let mut pairs = vec![("serviceName".to_string(), service)];
            let optional = [
                ("serviceColor", color),
                ("aclName", acl),
                ("skipCheck", skip),
                ("pathType", path_type),
            ];
            pairs.extend(
                optional
                    .into_iter()
                    .filter_map(|(name, value)| value.map(|v| (name.to_string(), v))),
            );
            pairs
        })
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
        5 => Just(Mutation::None),
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
        "reqMode" => one_of(&["http", "tcp", "udp"]),
        _ => any_value(),
    };
    prop_oneof![5 => suited, 1 => any_value()].boxed()
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

fn config() -> Config {
    Config {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/corpus/proptest-seeds.txt",
        ))),
        ..Config::default()
    }
}

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
    let tally = Tally::default();
    let mut runner = proptest::test_runner::TestRunner::new(config());
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
    run("queries", query(), |pairs, tally| {
        check_query(&pairs, &|| tally.take_haproxy_run())
    });
}

/// The regression corpus: every line of `tests/corpus/queries.txt`, decoded as the API decodes a
/// query, is refused or renders as asked, with `haproxy -c` on every config that renders.
#[test]
fn the_regression_corpus_is_refused_or_renders_only_what_it_asked_for() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/queries.txt");
    let corpus = std::fs::read_to_string(&path).expect("the corpus file");
    let (mut refused, mut rendered) = (0, 0);
    for line in corpus.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The API's own decoding: a query that is not URL encoding is a 400 before any spec.
        let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(line) else {
            refused += 1;
            continue;
        };
        match check_query(&pairs, &|| true) {
            Ok(Outcome::Refused) => refused += 1,
            Ok(Outcome::Rendered) => rendered += 1,
            Err(failure) => panic!("corpus case {line:?}: {failure}"),
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
    let destination = |index: u32| {
        (
            proptest::collection::vec(path_item(), 1..4),
            proptest::collection::vec(domain_item(), 0..2),
            proptest::option::weighted(0.2, prop_oneof![5 => one_of(PATH_TYPES), 1 => any_value()]),
            proptest::option::weighted(0.2, prop_oneof![5 => 1u32..65536, 1 => any::<u32>()]),
            proptest::option::weighted(0.1, prop_oneof![5 => 1u32..65536, 1 => any::<u32>()]),
            proptest::option::weighted(0.1, one_of(&["http", "tcp", "udp", "HTTP"])),
        )
            .prop_map(move |(paths, domains, path_type, port, src_port, mode)| {
                serde_json::json!({
                    "Index": index, "ServicePath": paths, "ServiceDomain": domains,
                    "PathType": path_type, "Port": port, "SrcPort": src_port, "ReqMode": mode,
                })
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
    )
        .prop_map(|(name, color, acl, skip, path_type, destinations)| {
            serde_json::json!({
                "ServiceName": name, "ServiceColor": color, "AclName": acl, "SkipCheck": skip,
                "PathType": path_type, "ServiceDest": destinations,
            })
            .to_string()
        })
}

/// A stored spec (KV can be edited by anyone) is refused when read, or renders as asked.
#[test]
fn any_stored_spec_is_refused_or_renders_only_what_it_asked_for() {
    run(
        "stored specs",
        stored_json(),
        |json, tally| match serde_json::from_str::<ServiceSpec>(&json) {
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
            Ok(spec) => check_spec(&spec, &some_instances(), &|| tally.take_haproxy_run()),
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
        check_spec(&spec, &accepted, &|| resolvable && tally.take_haproxy_run())
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
        }
    }
    let spec = ServiceSpec::from_query(&pairs).expect("the largest spec is accepted");
    assert_eq!(spec.destinations().len(), 64);
    let outcome = check_spec(&spec, &some_instances(), &|| true).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome, Outcome::Rendered);
}

/// Through the HTTP API: nasty queries get 400 naming the parameter and change nothing, and
/// every limit answers 400 with its number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nasty_queries_and_limits_are_refused_at_the_api_and_change_nothing() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_backend("demo").await;
    proxy
        .register_instance("go-demo", "go-demo.1", backend.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=go-demo&servicePath=/demo")
        .await;
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

/// Two services routed together (names, ports and rules side by side) render exactly the union
/// of what each asked for, or are refused as a port conflict.
#[test]
fn two_accepted_services_render_only_what_they_asked_for_together() {
    run(
        "two services",
        (plausible_query(), plausible_query()),
        |(first, second), tally| {
            let (Ok(first), Ok(second)) = (
                ServiceSpec::from_query(&first),
                ServiceSpec::from_query(&second),
            ) else {
                return Ok(Outcome::Refused);
            };
            let instances = some_instances();
            check_specs(&[(&first, &instances), (&second, &instances[..1])], &|| {
                tally.take_haproxy_run()
            })
        },
    );
}
