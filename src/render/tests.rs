//! Tests of rendering: golden files, determinism, rule order, conflicts, and `haproxy -c`.
//!
//! Golden files live in `tests/golden/`; run with `UPDATE_GOLDEN=1` to rewrite them after an
//! intended change, then review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::spec::{Instance, ServiceSpec};

pub(super) fn spec(pairs: &[(&str, &str)]) -> ServiceSpec {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match ServiceSpec::from_query(&pairs) {
        Ok(spec) => spec,
        Err(error) => panic!("test spec rejected: {error}"),
    }
}

pub(super) fn inst(address: &str, port: u16) -> Instance {
    Instance::new(address, port).unwrap()
}

/// Settings with fixed paths, for golden files.
pub(super) fn golden_settings() -> RenderSettings {
    RenderSettings {
        bind_host: None,
        http_port: 80,
        stats_socket: PathBuf::from("/run/flow-proxy/admin.sock"),
        errors_dir: PathBuf::from("/etc/flow-proxy/errors"),
        https_only: false,
        users: Vec::new(),
        stats: None,
        service_domain_algo: Default::default(),
        proxy_wide: Default::default(),
        acme_challenge: None,
    }
}

/// A mix of everything a user can ask for.
fn rich_services() -> Vec<(ServiceSpec, Vec<Instance>)> {
    vec![
        (
            spec(&[("serviceName", "go-demo"), ("servicePath", "/demo")]),
            vec![inst("10.0.0.2", 31000), inst("10.0.0.1", 31001)],
        ),
        (
            spec(&[
                ("serviceName", "acme"),
                ("servicePath", "/.well-known/acme-challenge"),
                ("skipCheck", "true"),
            ]),
            vec![inst("10.0.0.9", 8080)],
        ),
        (
            spec(&[
                ("serviceName", "web"),
                ("serviceDomain", "Example.com,*.example.org"),
            ]),
            vec![inst("fd00::5", 8080), inst("10.0.0.5", 8080)],
        ),
        (
            spec(&[
                ("serviceName", "shop"),
                ("serviceColor", "blue"),
                ("aclName", "00-shop"),
                ("servicePath", "/shop,/shop/api"),
                ("serviceDomain", "shop.example.com"),
                ("reqMode.1", "tcp"),
                ("srcPort.1", "5432"),
                ("port.1", "5433"),
                ("servicePath.2", "/admin"),
                ("srcPort.2", "8081"),
                ("port.2", "9000"),
            ]),
            vec![inst("10.0.1.1", 3000), inst("10.0.1.2", 3000)],
        ),
        (
            spec(&[("serviceName", "home"), ("servicePath", "/")]),
            vec![inst("localhost", 8000)],
        ),
        (
            spec(&[("serviceName", "empty"), ("servicePath", "/empty")]),
            vec![],
        ),
        (
            spec(&[
                ("serviceName", "images"),
                ("pathType", "path_reg"),
                ("servicePath", "^/img/[a-z0-9]+[.]png$"),
            ]),
            vec![inst("10.0.2.1", 80)],
        ),
    ]
}

pub(super) fn routes(services: &[(ServiceSpec, Vec<Instance>)]) -> Vec<ServiceRoute<'_>> {
    services
        .iter()
        .map(|(spec, instances)| ServiceRoute { spec, instances })
        .collect()
}

fn render(settings: &RenderSettings, services: &[(ServiceSpec, Vec<Instance>)]) -> String {
    let renderer = Renderer::new(None).unwrap();
    match renderer.render(settings, &routes(services)) {
        Ok(text) => text,
        Err(error) => panic!("render failed: {error}"),
    }
}

fn render_with_maps(
    settings: &RenderSettings,
    services: &[(ServiceSpec, Vec<Instance>)],
) -> Rendered {
    let renderer = Renderer::new(None).unwrap();
    match renderer.render_with_maps(settings, &routes(services), None) {
        Ok(rendered) => rendered,
        Err(error) => panic!("render failed: {error}"),
    }
}

fn render_error(services: &[(ServiceSpec, Vec<Instance>)]) -> RenderError {
    let renderer = Renderer::new(None).unwrap();
    match renderer.render(&golden_settings(), &routes(services)) {
        Ok(text) => panic!("expected an error, rendered:\n{text}"),
        Err(error) => error,
    }
}

/// Compares `text` with `tests/golden/<name>`, or rewrites it when `UPDATE_GOLDEN` is set.
fn assert_golden(name: &str, text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "cannot read {}: {error}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    if expected != text {
        panic!(
            "{} differs from the rendered config (UPDATE_GOLDEN=1 rewrites it):\n--- rendered ---\n{text}",
            path.display()
        );
    }
}

/// Writes `services`' config and the 503 page in a temporary directory and runs
/// `haproxy -c -f` on it; returns HAProxy's output. Fails (never skips) without haproxy.
fn haproxy_check(bind_host: Option<IpAddr>, services: &[(ServiceSpec, Vec<Instance>)]) -> String {
    haproxy_check_with(bind_host, services, |_| {})
}

/// [`haproxy_check`] with settings changed by `edit` first.
fn haproxy_check_with(
    bind_host: Option<IpAddr>,
    services: &[(ServiceSpec, Vec<Instance>)],
    edit: impl FnOnce(&mut RenderSettings),
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let errors_dir = dir.path().join("errors");
    std::fs::create_dir(&errors_dir).unwrap();
    std::fs::write(errors_dir.join("503.http"), ERROR_PAGE_503).unwrap();
    let mut settings = RenderSettings {
        bind_host,
        http_port: 8080,
        stats_socket: dir.path().join("admin.sock"),
        errors_dir,
        https_only: false,
        users: Vec::new(),
        stats: None,
        service_domain_algo: Default::default(),
        proxy_wide: Default::default(),
        acme_challenge: None,
    };
    edit(&mut settings);
    let config = dir.path().join("haproxy.cfg");
    let rendered = render_with_maps(&settings, services);
    std::fs::write(&config, &rendered.config).unwrap();
    write_map_files(dir.path(), &rendered.maps).unwrap();
    let output = match Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&config)
        .current_dir(dir.path())
        .output()
    {
        Ok(output) => output,
        Err(error) => panic!(
            "cannot run `haproxy -c` ({error}): install HAProxy 2.6 (e.g. apt-get install haproxy) to run these tests"
        ),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "haproxy -c rejected the rendered config:\n{text}\n--- config ---\n{}",
        std::fs::read_to_string(&config).unwrap()
    );
    text
}

/// The backends frontend `name` routes to, in the order HAProxy consults them: each acl rule's
/// `use_backend` (and the stats or ACME one), and for a map line the backends of its map file's
/// entries in file order (within one map file the renderer keeps the entries' order and the
/// rules' order equivalent; see `maps.rs`).
fn routing_order(rendered: &Rendered, name: &str) -> Vec<String> {
    let frontend = section(&rendered.config, &format!("frontend {name}"));
    let mut order: Vec<String> = Vec::new();
    for line in frontend.lines() {
        let Some(rest) = line.trim().strip_prefix("use_backend ") else {
            continue;
        };
        let target = rest.split(' ').next().unwrap();
        if target.starts_with("%[") {
            let file = target
                .rsplit_once('(')
                .and_then(|(_, file)| file.strip_suffix(")]"))
                .unwrap_or_else(|| panic!("a map line: {line}"));
            let map = rendered
                .maps
                .iter()
                .find(|map| map.config_path() == file)
                .unwrap_or_else(|| panic!("no map file {file} for {line}"));
            for (_, backend) in &map.entries {
                if order.last() != Some(backend) {
                    order.push(backend.clone());
                }
            }
        } else {
            order.push(target.to_string());
        }
    }
    order
}

/// Where `backend` is in a [`routing_order`].
fn rank(order: &[String], backend: &str) -> usize {
    order
        .iter()
        .position(|b| b == backend)
        .unwrap_or_else(|| panic!("{backend} is not routed: {order:?}"))
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|line| line.trim() == needle)
        .unwrap_or_else(|| panic!("no line `{needle}` in:\n{text}"))
}

#[test]
fn empty_config_matches_golden() {
    let text = render(&golden_settings(), &[]);
    assert_golden("empty.cfg", &text);
}

#[test]
fn rich_config_matches_golden() {
    let text = render(&golden_settings(), &rich_services());
    assert_golden("rich.cfg", &text);
}

#[test]
fn haproxy_accepts_the_empty_config_without_warnings() {
    let output = haproxy_check(None, &[]);
    assert!(!output.contains("[WARNING]"), "{output}");
    assert!(!output.contains("[ALERT]"), "{output}");
}

#[test]
fn haproxy_accepts_the_rich_config_without_warnings() {
    let output = haproxy_check(None, &rich_services());
    assert!(!output.contains("[WARNING]"), "{output}");
    assert!(!output.contains("[ALERT]"), "{output}");
}

#[test]
fn haproxy_accepts_ipv4_and_ipv6_bind_hosts() {
    for host in ["127.0.0.1", "::1"] {
        let output = haproxy_check(Some(host.parse().unwrap()), &rich_services());
        assert!(!output.contains("[WARNING]"), "{host}: {output}");
    }
    let mut settings = golden_settings();
    settings.bind_host = Some("::1".parse().unwrap());
    let text = render(&settings, &rich_services());
    assert!(text.contains("    bind [::1]:80\n"), "{text}");
    assert!(text.contains("    bind [::1]:5432\n"), "{text}");
}

#[test]
fn output_is_the_same_for_any_input_order() {
    let services = rich_services();
    let expected = render(&golden_settings(), &services);
    let mut reversed: Vec<_> = services.iter().rev().cloned().collect();
    for (_, instances) in &mut reversed {
        instances.reverse();
    }
    assert_eq!(render(&golden_settings(), &reversed), expected);
    let mut rotated = services.clone();
    rotated.rotate_left(3);
    // A repeated instance (the registry may list one twice) changes nothing either.
    let repeated = rotated[0].1[0].clone();
    rotated[0].1.push(repeated);
    assert_eq!(render(&golden_settings(), &rotated), expected);
}

#[test]
fn config_ends_with_a_newline() {
    assert!(render(&golden_settings(), &[]).ends_with('\n'));
    assert!(render(&golden_settings(), &rich_services()).ends_with("\n"));
}

#[test]
fn rules_are_ordered_most_specific_first() {
    let rendered = render_with_maps(&golden_settings(), &rich_services());
    let text = rendered.config.clone();
    let order = routing_order(&rendered, "http");
    let well_known = rank(&order, "acme-be0");
    let shop = rank(&order, "shop-be0");
    let web = rank(&order, "web-be0");
    let images = rank(&order, "images-be0");
    let demo = rank(&order, "go-demo-be0");
    let empty = rank(&order, "empty-be0");
    let root = rank(&order, "home-be0");
    assert!(well_known < shop, "well-known first:\n{text}");
    assert!(shop < web, "domain+path before domain only:\n{text}");
    assert!(web < images, "domain rules before path-only rules:\n{text}");
    assert!(images < empty, "longer paths before shorter:\n{text}");
    assert!(
        empty < demo,
        "longer paths (/empty) before shorter (/demo):\n{text}"
    );
    assert!(demo < root, "`/` last:\n{text}");
}

#[test]
fn equal_rules_are_ordered_by_acl_name_then_service_name() {
    let services = vec![
        (
            spec(&[
                ("serviceName", "aaa"),
                ("servicePath", "/x"),
                ("aclName", "zz"),
            ]),
            vec![],
        ),
        (
            spec(&[("serviceName", "bbb"), ("servicePath", "/y")]),
            vec![],
        ),
        (
            spec(&[("serviceName", "ccc"), ("servicePath", "/z")]),
            vec![],
        ),
    ];
    let order = routing_order(&render_with_maps(&golden_settings(), &services), "http");
    let aaa = rank(&order, "aaa-be0");
    let bbb = rank(&order, "bbb-be0");
    let ccc = rank(&order, "ccc-be0");
    assert!(
        bbb < ccc && ccc < aaa,
        "aclName zz sorts aaa last: {order:?}"
    );
}

#[test]
fn domains_match_the_host_without_port_case_insensitively() {
    let text = render(&golden_settings(), &rich_services());
    assert!(
        text.contains("    acl domain_web-be0 req.hdr(host),field(1,:) -m str -i example.com\n")
    );
    assert!(
        text.contains("    acl domain_web-be0 req.hdr(host),field(1,:) -m end -i .example.org\n")
    );
}

#[test]
fn servers_use_the_port_override_brackets_for_ipv6_and_checks_unless_skipped() {
    let text = render(&golden_settings(), &rich_services());
    assert!(
        text.contains("    server s1 10.0.0.1:31001 check\n"),
        "{text}"
    );
    assert!(
        text.contains("    server s2 [fd00::5]:8080 check\n"),
        "{text}"
    );
    assert!(
        text.contains("    server s1 10.0.1.1:5433 check\n"),
        "{text}"
    );
    assert!(
        text.contains("    server s1 10.0.0.9:8080\n    server s2 127.0.0.1:1 disabled\n"),
        "{text}"
    );
    let first = text.find("server s1 10.0.0.1:31001").unwrap();
    let second = text.find("server s2 10.0.0.2:31000").unwrap();
    assert!(
        first < second,
        "servers sorted by address into the first slots"
    );
    assert!(
        text.contains("    server s2 10.0.0.2:31000 check\n    server s3 127.0.0.1:1 check disabled\n    server s4 127.0.0.1:1 check disabled\n"),
        "two instances get four slots, the spare ones disabled:\n{text}"
    );
}

#[test]
fn a_service_without_instances_still_gets_its_backend() {
    let text = render(&golden_settings(), &rich_services());
    let start = text.find("backend empty-be0\n").expect("backend present");
    let section = &text[start..];
    let section = &section[..section.find("\n\n").unwrap_or(section.len())];
    let servers: Vec<&str> = section
        .lines()
        .filter(|line| line.trim_start().starts_with("server "))
        .collect();
    assert_eq!(
        servers,
        [
            "    server s1 127.0.0.1:1 check disabled",
            "    server s2 127.0.0.1:1 check disabled"
        ],
        "only spare slots, none taking traffic:\n{section}"
    );
}

#[test]
fn tcp_and_extra_http_frontends_get_their_own_sections() {
    let rendered = render_with_maps(&golden_settings(), &rich_services());
    let text = rendered.config.clone();
    assert!(text.contains(
        "frontend tcp_5432\n    mode tcp\n    bind *:5432\n    default_backend shop-be1\n"
    ));
    assert!(text.contains("backend shop-be1\n    mode tcp\n"));
    assert!(text.contains("frontend http_8081\n    mode http\n    bind *:8081\n"));
    assert_eq!(routing_order(&rendered, "http_8081"), vec!["shop-be2"]);
    let main = &text[text.find("frontend http\n").unwrap()..];
    let main = &main[..main.find("\n\n").unwrap()];
    assert!(!main.contains("shop-be2"), "{main}");
}

#[test]
fn http_src_port_equal_to_http_port_routes_in_the_main_frontend() {
    let services = vec![(
        spec(&[
            ("serviceName", "a"),
            ("servicePath", "/a"),
            ("srcPort", "80"),
        ]),
        vec![],
    )];
    let rendered = render_with_maps(&golden_settings(), &services);
    assert!(
        !rendered.config.contains("frontend http_80"),
        "{}",
        rendered.config
    );
    assert_eq!(routing_order(&rendered, "http"), vec!["a-be0"]);
}

#[test]
fn two_services_sharing_an_http_src_port_share_the_frontend() {
    let services = vec![
        (
            spec(&[
                ("serviceName", "a"),
                ("servicePath", "/a"),
                ("srcPort", "8081"),
            ]),
            vec![],
        ),
        (
            spec(&[
                ("serviceName", "b"),
                ("servicePath", "/b"),
                ("srcPort", "8081"),
            ]),
            vec![],
        ),
    ];
    let text = render(&golden_settings(), &services);
    assert_eq!(text.matches("frontend http_8081\n").count(), 1, "{text}");
}

#[test]
fn port_conflicts_name_both_services_and_the_port() {
    let tcp = |name: &str, port: &str| {
        (
            spec(&[("serviceName", name), ("reqMode", "tcp"), ("srcPort", port)]),
            vec![],
        )
    };
    let error = render_error(&[tcp("db", "5432"), tcp("other-db", "5432")]);
    let message = error.to_string();
    assert!(
        matches!(error, RenderError::PortConflict { port: 5432, .. }),
        "{message}"
    );
    assert!(
        message.contains("`db`") && message.contains("`other-db`"),
        "{message}"
    );
    assert!(message.contains("5432"), "{message}");

    let error = render_error(&[tcp("db", "80")]);
    let message = error.to_string();
    assert!(
        matches!(error, RenderError::PortConflict { port: 80, .. }),
        "{message}"
    );
    assert!(
        message.contains("`db`") && message.contains("http_port"),
        "{message}"
    );

    let http = (
        spec(&[
            ("serviceName", "web"),
            ("servicePath", "/"),
            ("srcPort", "9000"),
        ]),
        vec![],
    );
    for services in [
        vec![http.clone(), tcp("db", "9000")],
        vec![tcp("db", "9000"), http],
    ] {
        let error = render_error(&services);
        let message = error.to_string();
        assert!(
            matches!(error, RenderError::PortConflict { port: 9000, .. }),
            "{message}"
        );
        assert!(
            message.contains("`web`") && message.contains("`db`"),
            "{message}"
        );
    }
}

#[test]
fn a_service_given_twice_is_an_error() {
    let a = (spec(&[("serviceName", "a"), ("servicePath", "/a")]), vec![]);
    let error = render_error(&[a.clone(), a]);
    assert!(matches!(error, RenderError::DuplicateService(ref name) if name == "a"));
}

#[test]
fn unsafe_setting_paths_are_refused() {
    let mut settings = golden_settings();
    settings.errors_dir = PathBuf::from("/etc/my errors");
    let renderer = Renderer::new(None).unwrap();
    let error = renderer.render(&settings, &[]).unwrap_err();
    assert!(
        matches!(
            error,
            RenderError::Setting {
                setting: "errors_dir",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn templates_can_come_from_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    for (file, text) in TEMPLATES {
        let text = if *file == "backend.hbs" {
            text.replace("balance {{tuning.balance}}", "balance leastconn")
        } else {
            text.to_string()
        };
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let renderer = Renderer::new(Some(dir.path())).unwrap();
    let services = rich_services();
    let text = renderer
        .render(&golden_settings(), &routes(&services))
        .unwrap();
    assert!(text.contains("balance leastconn"), "{text}");
    assert!(!text.contains("balance roundrobin"), "{text}");

    // A file the directory does not have stays built in (only custom fragments may live there).
    std::fs::remove_file(dir.path().join("http-frontend.hbs")).unwrap();
    let renderer = Renderer::new(Some(dir.path())).unwrap();
    let text = renderer
        .render(&golden_settings(), &routes(&services))
        .unwrap();
    assert!(text.contains("balance leastconn"), "{text}");
    assert!(text.contains("frontend http\n"), "{text}");

    let error = Renderer::new(Some(&dir.path().join("missing"))).unwrap_err();
    assert!(error.to_string().contains("missing"), "{error}");
}

#[test]
fn a_template_using_an_unknown_value_fails_in_strict_mode() {
    let dir = tempfile::tempdir().unwrap();
    for (file, text) in TEMPLATES {
        let text = if *file == "haproxy.cfg.hbs" {
            format!("{text}{{{{no_such_value}}}}\n")
        } else {
            text.to_string()
        };
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let renderer = Renderer::new(Some(dir.path())).unwrap();
    let error = renderer.render(&golden_settings(), &[]).unwrap_err();
    assert!(matches!(error, RenderError::Render(_)), "{error}");
}

#[test]
fn the_error_page_is_a_complete_http_response() {
    let (head, body) = ERROR_PAGE_503.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    assert_eq!(lines.next(), Some("HTTP/1.0 503 Service Unavailable"));
    let headers: Vec<&str> = lines.collect();
    for header in [
        "Cache-Control: no-cache",
        "Connection: close",
        "Content-Type: text/html",
    ] {
        assert!(headers.contains(&header), "missing {header}: {headers:?}");
    }
    assert!(headers.contains(&format!("Content-Length: {}", body.len()).as_str()));
}

#[test]
fn haproxy_reads_every_accepted_path_character_as_part_of_one_pattern() {
    let services = vec![(
        spec(&[
            ("serviceName", "chars"),
            ("servicePath", "/a-b.c_d~e!f&g(h)*i+j;k=l:m@n%20o"),
            ("pathType.1", "path_reg"),
            ("servicePath.1", "^/x[0-9]{2}(a|b)?.*$"),
            ("pathType.2", "path_end"),
            ("servicePath.2", ".json"),
        ]),
        vec![inst("127.0.0.1", 9)],
    )];
    let output = haproxy_check(None, &services);
    assert!(!output.contains("[WARNING]"), "{output}");
    let rendered = render_with_maps(&golden_settings(), &services);
    let text = rendered.config.clone();
    // The path_beg path is plain: one word of a map line.
    assert_eq!(
        rendered.maps[0].text(),
        "/a-b.c_d~e!f&g(h)*i+j;k=l:m@n%20o chars-be0\n"
    );
    assert!(
        text.contains("    acl path_chars-be1 path_reg ^/x[0-9]{2}(a|b)?.*$\n"),
        "{text}"
    );
    assert!(
        text.contains("    acl path_chars-be2 path_end .json\n"),
        "{text}"
    );
}

/// `secret` under SHA-512 crypt (`openssl passwd -6 -salt saltsalt secret`).
const SECRET_SHA512: &str =
    "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1";

fn global_users() -> Vec<AuthUser> {
    crate::spec::parse_users("--users", &format!("ops:{SECRET_SHA512}"), true).unwrap()
}

fn stats_on(port: u16) -> StatsSettings {
    StatsSettings {
        port,
        uri: "/admin?stats".into(),
        user: global_users().remove(0),
    }
}

/// A service with its own users and an exempt destination, one relying on `--users`, and a TCP
/// service (never under basic auth).
fn auth_services() -> Vec<(ServiceSpec, Vec<Instance>)> {
    vec![
        (
            spec(&[
                ("serviceName", "shop"),
                ("servicePath.1", "/shop"),
                ("servicePath.2", "/shop/health"),
                ("ignoreAuthorization.2", "true"),
                ("users", &format!("alice:{SECRET_SHA512}")),
                ("usersPassEncrypted", "true"),
            ]),
            vec![inst("10.0.0.1", 8080)],
        ),
        (
            spec(&[("serviceName", "blog"), ("servicePath", "/blog")]),
            vec![inst("10.0.0.2", 8080)],
        ),
        (
            spec(&[
                ("serviceName", "db"),
                ("reqMode", "tcp"),
                ("srcPort", "5432"),
            ]),
            vec![inst("10.0.0.3", 5432)],
        ),
    ]
}

/// The lines of section `header` (up to the next blank line).
fn section<'t>(text: &'t str, header: &str) -> &'t str {
    let start = text
        .find(&format!("\n{header}\n"))
        .unwrap_or_else(|| panic!("no `{header}` in\n{text}"))
        + 1;
    let rest = &text[start..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

#[test]
fn basic_auth_guards_each_http_backend_with_the_service_users_else_the_global_ones() {
    let mut settings = golden_settings();
    settings.users = global_users();
    let text = render(&settings, &auth_services());
    let check = "    http-request auth realm shop unless { http_auth(users_shop) }\n    http-request del-header Authorization\n";
    assert!(section(&text, "backend shop-be1").contains(check), "{text}");
    assert!(
        !section(&text, "backend shop-be2").contains("http-request"),
        "{text}"
    );
    assert!(
        section(&text, "backend blog-be0")
            .contains("http-request auth realm blog unless { http_auth(users) }"),
        "{text}"
    );
    assert!(
        !section(&text, "backend db-be0").contains("http-request"),
        "{text}"
    );
    assert!(section(&text, "userlist users")
        .contains(&format!("    user ops password {SECRET_SHA512}")));
    assert!(section(&text, "userlist users_shop")
        .contains(&format!("    user alice password {SECRET_SHA512}")));

    // Without --users, a service without users of its own is open.
    let text = render(&golden_settings(), &auth_services());
    assert!(
        !section(&text, "backend blog-be0").contains("http-request"),
        "{text}"
    );
    assert!(!text.contains("userlist users\n"), "{text}");
}

#[test]
fn haproxy_accepts_basic_auth_and_the_stats_page_without_warnings() {
    // With --https-only, the frontend on the stats port holds redirects too: the stats page's
    // use_backend must follow them (HAProxy warns about an http-request after a use_backend).
    for (stats_port, https_only) in [(8080, false), (9000, false), (8080, true), (9000, true)] {
        let output = haproxy_check_with(None, &auth_services(), |settings| {
            settings.users = global_users();
            settings.stats = Some(stats_on(stats_port));
            settings.https_only = https_only;
        });
        assert!(
            !output.contains("[WARNING]"),
            "{stats_port}, https_only {https_only}: {output}"
        );
    }
}

#[test]
fn the_stats_page_is_routed_by_the_frontend_on_its_port_else_gets_its_own() {
    let mut settings = golden_settings();
    settings.stats = Some(stats_on(80));
    let rendered = render_with_maps(&settings, &auth_services());
    let text = rendered.config.clone();
    let http = section(&text, "frontend http");
    assert!(
        http.contains("    use_backend stats if { url_beg /admin?stats }\n"),
        "{text}"
    );
    let order = routing_order(&rendered, "http");
    assert!(
        rank(&order, "stats") < rank(&order, "blog-be0"),
        "{order:?}"
    );
    let backend = section(&text, "backend stats");
    assert!(backend.contains("    stats uri /admin?stats\n"), "{text}");
    assert!(
        backend
            .contains("    stats http-request auth realm stats unless { http_auth(stats_users) }"),
        "{text}"
    );
    assert!(section(&text, "userlist stats_users").contains("    user ops password $6$"));
    assert!(!text.contains("frontend stats"), "{text}");

    settings.stats = Some(stats_on(9000));
    let text = render(&settings, &auth_services());
    assert!(!text.contains("use_backend stats"), "{text}");
    assert!(
        section(&text, "frontend stats").contains("    bind *:9000\n    default_backend stats"),
        "{text}"
    );

    // Off: nothing of it.
    let text = render(&golden_settings(), &auth_services());
    assert!(
        !text.contains("stats_users") && !text.contains("backend stats"),
        "{text}"
    );
}

#[test]
fn the_stats_page_cannot_take_a_tcp_port_nor_an_unsafe_uri() {
    let renderer = Renderer::new(None).unwrap();
    let mut settings = golden_settings();
    settings.stats = Some(stats_on(5432));
    let services = auth_services();
    let error = renderer.render(&settings, &routes(&services)).unwrap_err();
    assert!(
        matches!(error, RenderError::PortConflict { port: 5432, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("stats page"), "{error}");

    for uri in [
        "admin",
        "/admin stats",
        "/admin\n    mode tcp",
        "/a#b",
        "/\"x\"",
    ] {
        let mut stats = stats_on(80);
        stats.uri = uri.into();
        settings.stats = Some(stats);
        let error = renderer.render(&settings, &[]).unwrap_err();
        assert!(
            matches!(
                error,
                RenderError::Setting {
                    setting: "stats_uri",
                    ..
                }
            ),
            "{uri:?}: {error}"
        );
    }
}

#[test]
fn masked_config_hides_every_password_hash_and_nothing_else() {
    let mut settings = golden_settings();
    settings.users = global_users();
    settings.stats = Some(stats_on(80));
    let text = render(&settings, &auth_services());
    let masked = masked_config(&text);
    assert!(!masked.contains("$6$"), "{masked}");
    assert!(
        masked.contains("\n    user alice password ***\n"),
        "{masked}"
    );
    assert_eq!(masked.lines().count(), text.lines().count());
    let unmasked: Vec<&str> = text.lines().filter(|l| !l.contains("$6$")).collect();
    let kept: Vec<&str> = masked.lines().filter(|l| !l.contains("***")).collect();
    assert_eq!(unmasked, kept);
}

// ---- Edge rules: redirects, header rules, method rules -------------------------------------

fn edge_services() -> Vec<(ServiceSpec, Vec<Instance>)> {
    vec![
        (
            spec(&[
                ("serviceName", "shop"),
                ("servicePath", "/shop"),
                ("serviceDomain", "shop.example.com"),
                ("httpsOnly", "true"),
                ("httpsRedirectCode", "308"),
                ("redirectFromDomain", "old-shop.example.com"),
                ("allowedMethods", "GET,HEAD"),
                ("denyHttp", "true"),
                ("addReqHeader", "X-Via flow-proxy edge"),
                ("setResHeader", "Strict-Transport-Security max-age=31536000"),
                ("delReqHeader", "X-Internal"),
                ("delResHeader", "Server"),
            ]),
            vec![inst("10.0.1.1", 3000)],
        ),
        (
            spec(&[
                ("serviceName", "api"),
                ("servicePath", "/api"),
                ("redirectWhenHttpProto", "true"),
                ("deniedMethods", "DELETE,TRACE"),
            ]),
            vec![inst("10.0.1.2", 3000)],
        ),
        (
            spec(&[("serviceName", "plain"), ("servicePath", "/plain")]),
            vec![inst("10.0.1.3", 3000)],
        ),
    ]
}

#[test]
fn edge_rules_come_before_every_use_backend_and_headers_are_quoted_in_the_backend() {
    let text = render(&golden_settings(), &edge_services());
    let frontend = text
        .split("\nfrontend http\n")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap();
    let first_use_backend = frontend.find("use_backend").unwrap();
    let last_redirect = frontend.rfind("http-request redirect").unwrap();
    assert!(last_redirect < first_use_backend, "{frontend}");
    assert!(frontend.contains(
        "    acl from_domain_shop-be0 req.hdr(host),field(1,:) -m str -i old-shop.example.com\n    http-request redirect prefix https://shop.example.com code 301 if from_domain_shop-be0 path_shop-be0\n    http-request redirect scheme https code 308 if path_shop-be0 domain_shop-be0 !{ ssl_fc }\n"
    ), "{frontend}");
    assert!(frontend.contains(
        "    http-request redirect scheme https code 302 if path_api-be0 { req.hdr(X-Forwarded-Proto) -m str -i http }\n"
    ), "{frontend}");
    // Each acl is declared once.
    assert_eq!(
        frontend.matches("acl path_shop-be0 ").count(),
        1,
        "{frontend}"
    );
    assert!(
        !frontend.contains("plain-be0 if path_plain-be0 !"),
        "{frontend}"
    );
    assert!(text.contains(
        "backend shop-be0\n    mode http\n    balance roundrobin\n    option redispatch 1\n    default-server inter 2s fall 3 rise 2 observe layer4 error-limit 3 on-error mark-down\n    http-request deny deny_status 405 unless { method GET HEAD }\n    http-request deny deny_status 403 if !{ ssl_fc }\n    http-request add-header X-Via \"flow-proxy edge\"\n    http-request del-header X-Internal\n    http-response set-header Strict-Transport-Security \"max-age=31536000\"\n    http-response del-header Server\n"
    ), "{text}");
    assert!(text.contains("http-request deny deny_status 405 if { method DELETE TRACE }\n"));
    assert!(text.contains("backend plain-be0\n    mode http\n    balance roundrobin\n    option redispatch 1\n    default-server inter 2s fall 3 rise 2 observe layer4 error-limit 3 on-error mark-down\n    server"));
}

#[test]
fn https_only_for_every_service_redirects_every_main_frontend_rule() {
    let mut settings = golden_settings();
    settings.https_only = true;
    let text = render(&settings, &edge_services());
    assert!(
        text.contains(
            "    http-request redirect scheme https code 302 if path_plain-be0 !{ ssl_fc }\n"
        ),
        "{text}"
    );
}

#[test]
fn haproxy_accepts_edge_rules_without_warnings() {
    let output = haproxy_check(None, &edge_services());
    assert!(!output.contains("[WARNING]"), "{output}");
    assert!(!output.contains("[ALERT]"), "{output}");
}

#[test]
fn redirect_from_domain_on_a_src_port_keeps_the_port_and_https_redirects_stay_in_the_main_frontend()
{
    let mut settings = golden_settings();
    settings.https_only = true;
    let services = vec![(
        spec(&[
            ("serviceName", "admin"),
            ("serviceDomain", "admin.example.com"),
            ("srcPort", "8081"),
            ("redirectFromDomain", "old-admin.example.com"),
        ]),
        vec![inst("10.0.1.4", 3000)],
    )];
    let text = render(&settings, &services);
    assert!(text.contains(
        "    http-request redirect prefix http://admin.example.com:8081 code 301 if from_domain_admin-be0\n"
    ), "{text}");
    assert!(!text.contains("scheme https"), "{text}");
}

#[test]
fn tls_per_service_renders_tls_servers_and_the_client_certificate_rule() {
    let secure = spec(&[
        ("serviceName", "secure"),
        ("serviceDomain", "secure.example.com"),
        ("verifyClientSsl", "true"),
        ("sslVerifyNone", "true"),
    ]);
    let instances = vec![inst("10.0.0.7", 8443)];
    let routes = [ServiceRoute {
        spec: &secure,
        instances: &instances,
    }];
    let renderer = Renderer::new(None).unwrap();
    let config = renderer.render(&golden_settings(), &routes).unwrap();
    assert!(
        config.contains("server s1 10.0.0.7:8443 check ssl verify none\n"),
        "{config}"
    );
    assert!(
        config
            .contains("http-request deny deny_status 403 unless { ssl_c_used } { ssl_c_verify 0 }"),
        "{config}"
    );
}

#[test]
fn service_domain_algo_chooses_the_exact_domains_match_and_haproxy_accepts_it() {
    let services = vec![
        (
            spec(&[
                ("serviceName", "own"),
                ("serviceDomain", "own.example.com,*.own.example.org"),
                ("serviceDomainAlgo", "hdr_beg(host)"),
            ]),
            vec![inst("10.0.0.1", 8080)],
        ),
        (
            spec(&[
                ("serviceName", "global"),
                ("serviceDomain", "global.example.com"),
            ]),
            vec![inst("10.0.0.2", 8080)],
        ),
    ];
    let mut settings = golden_settings();
    let rendered = render_with_maps(&settings, &services);
    let text = rendered.config.clone();
    assert!(
        text.contains("acl domain_own-be0 req.hdr(host),field(1,:) -m beg -i own.example.com\n"),
        "{text}"
    );
    assert!(
        text.contains("acl domain_own-be0 req.hdr(host),field(1,:) -m end -i .own.example.org\n"),
        "wildcards keep their suffix match: {text}"
    );
    // The default stays the exact match, which a map keyed on the lowercased host expresses.
    assert_eq!(
        rendered.maps[0].text(),
        "global.example.com global-be0\n",
        "the default stays the exact match: {text}"
    );
    settings.service_domain_algo = DomainAlgo::HdrDom;
    let text = render(&settings, &services);
    assert!(
        text.contains(
            "acl domain_global-be0 req.hdr(host),field(1,:) -m dom -i global.example.com\n"
        ),
        "--service-domain-algo applies to services without their own: {text}"
    );
    assert!(text.contains("-m beg -i own.example.com\n"), "{text}");
    let output = haproxy_check_with(None, &services, |settings| {
        settings.service_domain_algo = DomainAlgo::HdrEnd;
    });
    assert!(!output.contains("[WARNING]"), "{output}");
    assert!(!output.contains("[ALERT]"), "{output}");
}

#[test]
fn exactly_matched_domains_come_before_domains_matched_by_another_algo() {
    let services = vec![
        (
            spec(&[
                ("serviceName", "a-whole-domain"),
                ("serviceDomain", "example.com"),
                ("serviceDomainAlgo", "hdr_dom"),
            ]),
            vec![inst("10.0.0.1", 8080)],
        ),
        (
            spec(&[
                ("serviceName", "b-www"),
                ("serviceDomain", "www.example.com"),
            ]),
            vec![inst("10.0.0.2", 8080)],
        ),
    ];
    let order = routing_order(&render_with_maps(&golden_settings(), &services), "http");
    assert!(
        rank(&order, "b-www-be0") < rank(&order, "a-whole-domain-be0"),
        "www.example.com would otherwise go to the hdr_dom rule: {order:?}"
    );
}

// Routing rules: servicePathExclude, serviceHeader, userAgent, outboundHostname, isDefaultBackend.

fn routing_rule_services() -> Vec<(ServiceSpec, Vec<Instance>)> {
    vec![
        (
            spec(&[
                ("serviceName", "api"),
                ("servicePath", "/api"),
                ("servicePathExclude", "/api/internal"),
            ]),
            vec![inst("10.0.0.1", 3000)],
        ),
        (
            spec(&[
                ("serviceName", "api-v2"),
                ("servicePath", "/api"),
                ("serviceHeader", "X-Version:2,X-Tenant:acme"),
            ]),
            vec![inst("10.0.0.2", 3000)],
        ),
        (
            spec(&[
                ("serviceName", "api-bots"),
                ("servicePath", "/api"),
                ("userAgent", "googlebot,bingbot"),
            ]),
            vec![inst("10.0.0.3", 3000)],
        ),
        (
            spec(&[
                ("serviceName", "api-v2-bots"),
                ("servicePath", "/api"),
                ("serviceHeader", "X-Version:2"),
                ("userAgent", "googlebot"),
            ]),
            vec![inst("10.0.0.4", 3000)],
        ),
        (
            spec(&[
                ("serviceName", "fallback"),
                ("servicePath", "/fallback"),
                ("isDefaultBackend", "true"),
                ("servicePath.1", "/other"),
            ]),
            vec![inst("10.0.0.5", 3000)],
        ),
        (
            spec(&[
                ("serviceName", "ext"),
                ("servicePath", "/ext"),
                ("port", "8443"),
                ("outboundHostname", "LocalHost"),
            ]),
            vec![inst("10.0.0.6", 3000)],
        ),
    ]
}
// ---- backend tuning (render/backend.rs) ------------------------------------------------------

/// The text of backend `name` in `text`.
fn backend_section<'t>(text: &'t str, name: &str) -> &'t str {
    text.split(&format!("\nbackend {name}\n"))
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .map(str::trim_end)
        .unwrap_or_else(|| panic!("no backend {name} in:\n{text}"))
}

fn tuned_services() -> Vec<(ServiceSpec, Vec<Instance>)> {
    vec![
        (
            spec(&[
                ("serviceName", "shop"),
                ("servicePath", "/shop"),
                ("balance", "leastconn"),
                ("timeoutServer", "1s"),
                ("timeoutTunnel", "30m"),
                ("connectionMode", "httpclose"),
                ("compressionAlgo", "gzip"),
                ("compressionType", "text/plain,text/html"),
                ("sessionType", "sticky-server"),
                ("checkPath", "/health"),
                ("checkInterval", "500ms"),
                ("maxFails", "4"),
                ("observe", "layer7"),
            ]),
            vec![inst("10.0.0.1", 8080), inst("10.0.0.2", 8080)],
        ),
        (
            spec(&[
                ("serviceName", "db"),
                ("reqMode", "tcp"),
                ("srcPort", "5432"),
                ("balance", "source"),
                ("timeoutClient", "2m"),
                ("maxFails", "0"),
            ]),
            vec![inst("10.0.0.3", 5432)],
        ),
        (
            spec(&[
                ("serviceName", "raw"),
                ("servicePath", "/raw"),
                ("skipCheck", "true"),
            ]),
            vec![inst("10.0.0.4", 80)],
        ),
    ]
}

#[test]
fn routing_rule_acls_are_declared_and_required_by_their_use_backend() {
    let text = render(&golden_settings(), &routing_rule_services());
    for line in [
        "acl exclude_api-be0 path_beg /api/internal",
        "use_backend api-be0 if path_api-be0 !exclude_api-be0",
        "acl header_api-v2-be0_1 req.hdr(X-Version) -m str 2",
        "acl header_api-v2-be0_2 req.hdr(X-Tenant) -m str acme",
        "use_backend api-v2-be0 if path_api-v2-be0 header_api-v2-be0_1 header_api-v2-be0_2",
        "acl agent_api-bots-be0 req.hdr(User-Agent) -m sub -i googlebot bingbot",
        "use_backend api-bots-be0 if path_api-bots-be0 agent_api-bots-be0",
    ] {
        line_of(&text, line);
    }
}

#[test]
fn rules_with_header_or_user_agent_conditions_come_before_the_same_path_without_them() {
    let rendered = render_with_maps(&golden_settings(), &routing_rule_services());
    let text = rendered.config.clone();
    let both = line_of(
        &text,
        "use_backend api-v2-bots-be0 if path_api-v2-bots-be0 header_api-v2-bots-be0_1 agent_api-v2-bots-be0",
    );
    let two_headers = line_of(
        &text,
        "use_backend api-v2-be0 if path_api-v2-be0 header_api-v2-be0_1 header_api-v2-be0_2",
    );
    let agent = line_of(
        &text,
        "use_backend api-bots-be0 if path_api-bots-be0 agent_api-bots-be0",
    );
    let plain = line_of(
        &text,
        "use_backend api-be0 if path_api-be0 !exclude_api-be0",
    );
    // The most conditions first; equal numbers (two each) fall back to the name order.
    assert!(two_headers < both, "{text}");
    assert!(both < agent, "{text}");
    assert!(agent < plain, "{text}");
    // A longer path stays before a shorter one with conditions.
    let order = routing_order(&rendered, "http");
    assert!(
        rank(&order, "fallback-be0") < rank(&order, "api-v2-bots-be0"),
        "{order:?}"
    );
}

#[test]
fn the_default_backend_is_the_first_main_destination_of_the_default_service_after_every_rule() {
    let text = render(&golden_settings(), &routing_rule_services());
    let http = section(&text, "frontend http");
    let default = line_of(http, "default_backend fallback-be0");
    let lines: Vec<&str> = http.lines().collect();
    let last_rule = lines
        .iter()
        .rposition(|line| line.trim_start().starts_with("use_backend"))
        .expect("rules");
    assert!(last_rule < default, "{http}");
    // Nothing else is a default backend.
    assert_eq!(text.matches("default_backend").count(), 1, "{text}");
}

#[test]
fn an_outbound_destination_forwards_to_its_host_and_port_instead_of_the_instances() {
    let text = render(&golden_settings(), &routing_rule_services());
    let backend = section(&text, "backend ext-be0");
    assert!(
        backend.contains("server localhost_8443 localhost:8443 check"),
        "{backend}"
    );
    assert!(!backend.contains("10.0.0.6"), "{backend}");
}

#[test]
fn haproxy_accepts_the_routing_rules_without_warnings() {
    let output = haproxy_check(None, &routing_rule_services());
    assert!(!output.contains("WARNING"), "{output}");
}

// TLS passthrough by SNI (reqMode=sni).

fn sni_services() -> Vec<(ServiceSpec, Vec<Instance>)> {
    vec![
        (
            spec(&[
                ("serviceName", "beta"),
                ("reqMode", "sni"),
                ("srcPort", "9443"),
                ("serviceDomain", "beta.example.com,*.beta.example.com"),
            ]),
            vec![inst("10.0.0.2", 8443)],
        ),
        (
            spec(&[
                ("serviceName", "alpha"),
                ("reqMode", "sni"),
                ("srcPort", "9443"),
                ("serviceDomain", "alpha.example.com"),
                ("port", "443"),
            ]),
            vec![inst("10.0.0.1", 8443)],
        ),
    ]
}

#[test]
fn sni_destinations_share_one_frontend_per_port_exact_names_before_wildcards() {
    let text = render(&golden_settings(), &sni_services());
    let frontend = section(&text, "frontend sni_9443");
    for line in [
        "mode tcp",
        "bind *:9443",
        "tcp-request inspect-delay 5s",
        "tcp-request content accept if { req_ssl_hello_type 1 }",
        "acl sni_alpha-be0 req_ssl_sni -m str -i alpha.example.com",
        "acl sni_beta-be0 req_ssl_sni -m str -i beta.example.com",
        "acl sni_beta-be0 req_ssl_sni -m end -i .beta.example.com",
    ] {
        line_of(frontend, line);
    }
    let alpha = line_of(frontend, "use_backend alpha-be0 if sni_alpha-be0");
    let beta = line_of(frontend, "use_backend beta-be0 if sni_beta-be0");
    assert!(alpha < beta, "exact-only rules first:\n{frontend}");
    assert_eq!(text.matches("\nfrontend sni_").count(), 1, "{text}");
    let backend = section(&text, "backend alpha-be0");
    line_of(backend, "mode tcp");
    line_of(backend, "server s1 10.0.0.1:443 check");
    assert!(text.contains("\ndefaults tcp_defaults\n"), "{text}");
}

#[test]
fn an_sni_port_is_shared_by_sni_destinations_only() {
    let mut services = sni_services();
    services.push((
        spec(&[
            ("serviceName", "web"),
            ("servicePath", "/web"),
            ("srcPort", "9443"),
        ]),
        Vec::new(),
    ));
    match render_error(&services) {
        RenderError::PortConflict {
            port,
            first,
            second,
        } => {
            assert_eq!(port, 9443);
            assert!(
                first.contains("`alpha`") && first.contains("sni"),
                "{first}"
            );
            assert!(second.contains("`web`"), "{second}");
        }
        other => panic!("expected a port conflict, got {other}"),
    }
    let mut services = sni_services();
    services.push((
        spec(&[
            ("serviceName", "db"),
            ("reqMode", "tcp"),
            ("srcPort", "9443"),
        ]),
        Vec::new(),
    ));
    assert!(matches!(
        render_error(&services),
        RenderError::PortConflict { port: 9443, .. }
    ));
    let services = vec![(
        spec(&[
            ("serviceName", "main"),
            ("reqMode", "sni"),
            ("srcPort", "80"),
            ("serviceDomain", "a.example.com"),
        ]),
        Vec::new(),
    )];
    assert!(matches!(
        render_error(&services),
        RenderError::PortConflict { port: 80, .. }
    ));
}

#[test]
fn haproxy_accepts_sni_frontends_without_warnings() {
    let output = haproxy_check(None, &sni_services());
    assert!(!output.contains("WARNING"), "{output}");
}

// ---- Path rewrites: stripPath, reqPathSearchReplace -----------------------------------------

#[test]
fn path_rewrites_are_the_last_request_lines_of_the_backend_strip_first() {
    let services = vec![(
        spec(&[
            ("serviceName", "hello"),
            ("servicePath", "/hello/v1,/hello/v1/api"),
            ("stripPath", "true"),
            ("reqPathSearchReplace", "/old/,/new/:/v([0-9]),/version-\\1"),
            ("setReqHeader", "X-Version 1"),
        ]),
        vec![inst("127.0.0.1", 8081)],
    )];
    let text = render(&golden_settings(), &services);
    let strip = line_of(
        &text,
        "http-request replace-path '^(/hello/v1/api|/hello/v1)/?(.*)$' '/\\2'",
    );
    let first = line_of(
        &text,
        "http-request replace-path '^(.*?)(/old/)(.*)$' '\\1/new/\\3'",
    );
    let second = line_of(
        &text,
        "http-request replace-path '^(.*?)(/v([0-9]))(.*)$' '\\1/version-\\3\\4'",
    );
    let header = line_of(&text, "http-request set-header X-Version \"1\"");
    assert!(header < strip && strip < first && first < second, "{text}");
    haproxy_check(None, &services);
}

#[test]
fn a_destination_without_rewrites_renders_no_replace_path_line() {
    let services = vec![(
        spec(&[
            ("serviceName", "hello"),
            ("servicePath.1", "/a"),
            ("stripPath.1", "true"),
            ("servicePath.2", "/b"),
        ]),
        vec![inst("127.0.0.1", 8081)],
    )];
    let text = render(&golden_settings(), &services);
    assert_eq!(text.matches("replace-path").count(), 1, "{text}");
    let backend_b = text.find("\nbackend hello-be2").expect("backend of /b");
    assert!(!text[backend_b..].contains("replace-path"), "{text}");
}

#[test]
fn backend_tuning_renders_in_one_block_in_the_documented_order() {
    let text = render(&golden_settings(), &tuned_services());
    assert_eq!(
        backend_section(&text, "shop-be0"),
        "    mode http\n    balance leastconn\n    timeout server 1s\n    timeout tunnel 30m\n    option httpclose\n    compression algo gzip\n    compression type text/plain text/html\n    cookie shop insert indirect nocache\n    option httpchk\n    http-check send meth GET uri /health\n    option redispatch 1\n    default-server inter 500ms fall 3 rise 2 observe layer7 error-limit 4 on-error mark-down\n    server s1 10.0.0.1:8080 check cookie s1\n    server s2 10.0.0.2:8080 check cookie s2\n    server s3 127.0.0.1:1 check disabled cookie s3\n    server s4 127.0.0.1:1 check disabled cookie s4"
    );
    assert_eq!(
        backend_section(&text, "db-be0"),
        "    mode tcp\n    balance source\n    option redispatch 1\n    default-server inter 2s fall 3 rise 2\n    server s1 10.0.0.3:5432 check\n    server s2 127.0.0.1:1 check disabled"
    );
    assert!(
        text.contains("frontend tcp_5432\n    mode tcp\n    bind *:5432\n    timeout client 2m\n    default_backend db-be0\n"),
        "{text}"
    );
    // skipCheck: no check, no health lines at all.
    assert_eq!(
        backend_section(&text, "raw-be0"),
        "    mode http\n    balance roundrobin\n    server s1 10.0.0.4:80\n    server s2 127.0.0.1:1 disabled"
    );
}

#[test]
fn haproxy_accepts_tuned_backends_without_warnings() {
    let output = haproxy_check(None, &tuned_services());
    assert!(!output.contains("WARNING"), "{output}");
}

// ACME HTTP-01: the challenge backend.

#[test]
fn acme_challenges_pass_every_redirect_and_go_to_flow_proxy_before_every_service() {
    let responder: std::net::SocketAddr = "127.0.0.1:40123".parse().unwrap();
    let mut settings = golden_settings();
    settings.https_only = true;
    settings.users = Vec::new();
    settings.acme_challenge = Some(responder);
    let services = vec![(
        spec(&[
            ("serviceName", "shop"),
            ("servicePath", "/"),
            ("serviceDomain", "shop.example.com"),
            ("letsEncrypt", "true"),
        ]),
        vec![inst("10.0.1.4", 3000)],
    )];
    let text = render(&settings, &services);
    let allow = line_of(&text, "http-request allow if flow_proxy_acme_challenge");
    let redirect = text
        .lines()
        .position(|line| {
            line.trim()
                .starts_with("http-request redirect scheme https")
        })
        .expect("the HTTPS redirect");
    let to_acme = line_of(
        &text,
        "use_backend flow_proxy_acme if flow_proxy_acme_challenge",
    );
    let to_shop = text
        .lines()
        .position(|line| line.trim().starts_with("use_backend shop-be"))
        .expect("the shop rule");
    assert!(allow < redirect && to_acme < to_shop, "{text}");
    assert!(
        text.contains(
            "backend flow_proxy_acme\n    mode http\n    server flow-proxy 127.0.0.1:40123\n"
        ),
        "{text}"
    );
    // Without ACME, none of it.
    settings.acme_challenge = None;
    assert!(!render(&settings, &services).contains("acme"));
}

#[test]
fn haproxy_accepts_the_acme_challenge_backend_without_warnings() {
    let output = haproxy_check_with(None, &edge_services(), |settings| {
        settings.https_only = true;
        settings.acme_challenge = Some("127.0.0.1:40123".parse().unwrap());
    });
    assert!(!output.contains("[WARNING]"), "{output}");
    assert!(!output.contains("[ALERT]"), "{output}");
}

#[test]
fn the_http_client_loads_no_ca_store_unless_the_operator_asks_for_it() {
    let mut settings = golden_settings();
    let ours = "httpclient.ssl.verify none";
    assert!(
        render(&settings, &[])
            .lines()
            .any(|line| line.trim() == ours),
        "every process skips the system CA store"
    );
    // The operator's own line comes later in `global`, and HAProxy keeps the last one.
    settings.proxy_wide.extra_global = vec!["httpclient.ssl.verify required".parse().unwrap()];
    let text = render(&settings, &[]);
    assert!(
        line_of(&text, ours) < line_of(&text, "httpclient.ssl.verify required"),
        "{text}"
    );
}

#[test]
fn a_replaced_http_frontend_template_keeps_every_rule_on_acls() {
    // Such a template may predate the map line; it sees every rule as before.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("http-frontend.hbs"),
        include_str!("../../templates/http-frontend.hbs"),
    )
    .unwrap();
    let services = vec![(
        spec(&[("serviceName", "app"), ("servicePath", "/app")]),
        vec![],
    )];
    let replaced = Renderer::new(Some(dir.path()))
        .unwrap()
        .render_with_maps(&golden_settings(), &routes(&services), None)
        .unwrap();
    assert!(replaced.maps.is_empty());
    assert!(
        replaced.config.contains(
            "    acl path_app-be0 path_beg /app\n    use_backend app-be0 if path_app-be0\n"
        ),
        "{}",
        replaced.config
    );
    let built_in = render_with_maps(&golden_settings(), &services);
    assert_eq!(built_in.maps[0].text(), "/app app-be0\n");
}

#[test]
fn strict_limits_go_off_only_when_spare_slots_alone_pass_the_open_files_limit() {
    // One service, one checked instance: two checked slots, one of them spare.
    let services = vec![(
        spec(&[("serviceName", "app"), ("servicePath", "/app")]),
        vec![inst("10.0.0.1", 8080)],
    )];
    let with_limit = |limit: Option<u64>, maxconn: u32| {
        let mut settings = golden_settings();
        settings.proxy_wide.maxconn = maxconn;
        settings.proxy_wide.open_files_limit = limit;
        render(&settings, &services).contains("\n    no strict-limits\n")
    };
    // 2 × 100 + 1 occupied + 256 = 457 fit; the spare slot makes 458.
    assert!(
        with_limit(Some(457), 100),
        "the spare slot alone passes the limit"
    );
    assert!(
        !with_limit(Some(458), 100),
        "everything fits: HAProxy stays strict"
    );
    assert!(
        !with_limit(Some(456), 100),
        "too little even without spare slots: HAProxy refuses it, as it should"
    );
    assert!(!with_limit(None, 100), "limit unknown: HAProxy's default");
}
