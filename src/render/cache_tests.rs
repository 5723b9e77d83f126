//! Tests of piecewise rendering and its cache: a renderer that rendered other states before gives
//! exactly the text a fresh one gives, whatever changed; thousands of services render correctly,
//! re-rendering only what changed, and how long it takes (printed with `--nocapture`; the debug
//! build's figures compare changes, they are no benchmark).

use std::path::PathBuf;
use std::time::Duration;

use super::tests::{golden_settings, inst, routes, spec};
use super::*;
use crate::spec::{Instance, ServiceSpec, TimeoutName};

/// `count` plain path services (`/service-<n>`), each with three instances, as the benchmark has.
fn plain_services(count: usize) -> Vec<(ServiceSpec, Vec<Instance>)> {
    (0..count)
        .map(|index| {
            let pairs = vec![
                ("serviceName".to_string(), format!("service-{index}")),
                ("servicePath".to_string(), format!("/service-{index}")),
            ];
            let spec = ServiceSpec::from_query(&pairs).unwrap();
            let instances = (0..3)
                .map(|n| Instance::new(&format!("10.0.{}.{n}", index % 250), 8080).unwrap())
                .collect();
            (spec, instances)
        })
        .collect()
}

/// HTTP (with users, rules, headers, a `srcPort`), TCP and SNI services.
pub(super) fn rich_services() -> Vec<(ServiceSpec, Vec<Instance>)> {
    vec![
        (
            spec(&[("serviceName", "go-demo"), ("servicePath", "/demo")]),
            vec![inst("10.0.0.2", 31000), inst("10.0.0.1", 31001)],
        ),
        (
            spec(&[
                ("serviceName", "shop"),
                ("servicePath", "/shop,/shop/api"),
                ("serviceDomain", "shop.example.com,*.shop.example.org"),
                ("addReqHeader", "X-Shop 1"),
                ("users", "alice:secret"),
                ("reqMode.1", "tcp"),
                ("srcPort.1", "5432"),
                ("servicePath.2", "/admin"),
                ("srcPort.2", "8081"),
            ]),
            vec![inst("10.0.1.1", 3000), inst("10.0.1.2", 3000)],
        ),
        (
            spec(&[
                ("serviceName", "secure"),
                ("reqMode", "sni"),
                ("srcPort", "9443"),
                ("serviceDomain", "secure.example.com"),
            ]),
            vec![inst("10.0.3.1", 8443)],
        ),
        (
            spec(&[
                ("serviceName", "legacy"),
                ("serviceDomain", "legacy.example.com"),
                ("redirectFromDomain", "old.example.com"),
                ("httpsOnly", "true"),
            ]),
            vec![inst("10.0.4.1", 80)],
        ),
        (
            spec(&[("serviceName", "home"), ("servicePath", "/")]),
            vec![inst("fd00::5", 8000)],
        ),
    ]
}

/// The CPU time this thread spends in `work` (other builds share the machine, so wall-clock time
/// would measure them too).
fn timed<T>(work: impl FnOnce() -> T) -> (T, Duration) {
    let started = thread_cpu_time();
    let result = work();
    (result, thread_cpu_time().saturating_sub(started))
}

fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to write.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(status, 0, "clock_gettime");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[test]
fn thousands_of_services_each_get_their_rule_and_backend() {
    for count in [1_000, 10_000] {
        let mut services = plain_services(count);
        let renderer = Renderer::new(None).unwrap();
        let (text, cold) = timed(|| {
            renderer
                .render(&golden_settings(), &routes(&services))
                .unwrap()
        });
        assert_eq!(text.matches("\nbackend service-").count(), count);
        let maps = renderer
            .render_with_maps(&golden_settings(), &routes(&services), None)
            .unwrap()
            .maps;
        let entries: usize = maps.iter().map(|map| map.entries.len()).sum();
        assert_eq!(entries, count, "each plain service is one map entry");
        assert!(text.contains(" 10.0.249.2:8080 check\n"));

        let (again, unchanged) = timed(|| {
            renderer
                .render(&golden_settings(), &routes(&services))
                .unwrap()
        });
        assert_eq!(again, text);

        // One service's instances change: only its backend is rendered again.
        services[count / 2].1 = vec![Instance::new("10.9.9.9", 9000).unwrap()];
        let rendered_before = renderer.rendered_pieces();
        let (changed, one_change) = timed(|| {
            renderer
                .render(&golden_settings(), &routes(&services))
                .unwrap()
        });
        assert_eq!(renderer.rendered_pieces() - rendered_before, 1);
        assert!(changed.contains(" 10.9.9.9:9000 check\n"));
        let fresh = Renderer::new(None).unwrap();
        assert_eq!(
            changed,
            fresh
                .render(&golden_settings(), &routes(&services))
                .unwrap()
        );

        let ms = |took: Duration| took.as_secs_f64() * 1e3;
        println!(
            "render, {count} services x 3 instances, debug build, CPU time: first {:.1} ms, \
             unchanged {:.1} ms, one instance change {:.1} ms ({} bytes)",
            ms(cold),
            ms(unchanged),
            ms(one_change),
            text.len()
        );
    }
}

/// Renders `services` with `renderer` (which rendered other states before) and with a fresh
/// renderer, asserts both give the same text and that it differs from `before`; returns it.
fn same_as_fresh_and_changed(
    renderer: &Renderer,
    settings: &RenderSettings,
    services: &[(ServiceSpec, Vec<Instance>)],
    tls: Option<&TlsSettings>,
    before: &str,
    what: &str,
) -> String {
    let cached = renderer
        .render_with_tls(settings, &routes(services), tls)
        .unwrap();
    let fresh = Renderer::new(None)
        .unwrap()
        .render_with_tls(settings, &routes(services), tls)
        .unwrap();
    assert_eq!(cached, fresh, "after {what}");
    assert_ne!(cached, before, "{what} changes the configuration");
    cached
}

#[test]
fn the_cache_never_serves_text_a_full_render_would_not_write() {
    let renderer = Renderer::new(None).unwrap();
    let mut settings = golden_settings();
    let mut services = rich_services();
    let mut text = renderer.render(&settings, &routes(&services)).unwrap();
    let mut step = |settings: &RenderSettings,
                    services: &[(ServiceSpec, Vec<Instance>)],
                    tls: Option<&TlsSettings>,
                    what: &str| {
        text = same_as_fresh_and_changed(&renderer, settings, services, tls, &text, what);
    };

    services[1].0 = spec(&[
        ("serviceName", "shop"),
        ("servicePath", "/shop,/shop/api,/shop/v2"),
        ("serviceDomain", "shop.example.com,*.shop.example.org"),
        ("addReqHeader", "X-Shop 2"),
        ("users", "alice:secret"),
        ("reqMode.1", "tcp"),
        ("srcPort.1", "5432"),
        ("timeoutClient", "30"),
        ("servicePath.2", "/admin"),
        ("srcPort.2", "8081"),
    ]);
    step(&settings, &services, None, "a changed spec");

    services[0].1.push(inst("10.0.0.3", 31000));
    step(&settings, &services, None, "a new instance");
    services[2].1 = vec![inst("10.0.3.2", 8443)];
    step(
        &settings,
        &services,
        None,
        "changed instances of an sni service",
    );

    settings.users = crate::spec::parse_users("--users", "ops:opspass", false).unwrap();
    step(
        &settings,
        &services,
        None,
        "--users (basic auth on every backend)",
    );
    settings
        .proxy_wide
        .timeouts
        .insert(TimeoutName::Server, "90s".parse().unwrap());
    step(&settings, &services, None, "a proxy-wide timeout");
    settings.https_only = true;
    step(&settings, &services, None, "--https-only");
    settings.service_domain_algo = crate::spec::DomainAlgo::HdrDom;
    step(&settings, &services, None, "--service-domain-algo");

    let mut tls = TlsSettings {
        https_port: 443,
        crt_list: PathBuf::from("certs/crt-list.txt"),
        enable_h2: false,
    };
    step(&settings, &services, Some(&tls), "the first certificate");
    tls.enable_h2 = true;
    step(
        &settings,
        &services,
        Some(&tls),
        "HTTP/2 on the HTTPS frontend",
    );
    step(&settings, &services, None, "the last certificate removed");

    let removed = services.remove(1);
    step(&settings, &services, None, "a removed service");
    services.push(removed);
    step(&settings, &services, None, "the service routed again");
}

#[test]
fn the_cache_keeps_only_the_pieces_of_the_last_render() {
    let renderer = Renderer::new(None).unwrap();
    let services = plain_services(50);
    renderer
        .render(&golden_settings(), &routes(&services))
        .unwrap();
    // The main HTTP frontend and one backend per service.
    assert_eq!(renderer.kept_pieces(), 51);
    renderer
        .render(&golden_settings(), &routes(&services[..3]))
        .unwrap();
    assert_eq!(renderer.kept_pieces(), 4);
    renderer.render(&golden_settings(), &[]).unwrap();
    assert_eq!(renderer.kept_pieces(), 1);
}
