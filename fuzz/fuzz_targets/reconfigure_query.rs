//! Fuzz target: any bytes as a reconfigure query string are refused, or render a haproxy.cfg
//! whose directive skeleton is exactly the one the spec asks for (the same check as
//! `tests/api/injection.rs`, whose `skeleton` module is included here). With
//! `FUZZ_HAPROXY=1`, every config that renders is also given to `haproxy -c`.
//!
//! Run: `cargo +nightly fuzz run reconfigure_query -- -max_total_time=600`
//! (seed it with `tests/corpus/queries.txt`, see `fuzz/README.md`).

#![no_main]

use std::sync::OnceLock;

use flow_proxy::render::{RenderError, RenderSettings, Renderer, ServiceRoute, ERROR_PAGE_503};
use flow_proxy::spec::{Instance, PathType, ServiceSpec};
use libfuzzer_sys::fuzz_target;

#[path = "../../tests/api/skeleton.rs"]
#[allow(dead_code)]
mod skeleton;

struct Harness {
    renderer: Renderer,
    settings: RenderSettings,
    baseline: skeleton::Baseline,
    dir: std::path::PathBuf,
    instances: Vec<Instance>,
    haproxy: bool,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("flow-proxy-fuzz-{}", std::process::id()));
        let errors = dir.join("errors");
        std::fs::create_dir_all(&errors).expect("fuzz directory");
        std::fs::write(errors.join("503.http"), ERROR_PAGE_503).expect("503 page");
        let renderer = Renderer::new(None).expect("built-in templates");
        let settings = skeleton::settings(&errors);
        let baseline = skeleton::Baseline::new(&renderer, &settings);
        let instances = [("127.0.0.1", 8081), ("::1", 8082), ("LocalHost", 8083)]
            .into_iter()
            .map(|(address, port)| Instance::new(address, port).expect("valid instance"))
            .collect();
        Harness {
            renderer,
            settings,
            baseline,
            dir,
            instances,
            haproxy: std::env::var("FUZZ_HAPROXY").is_ok_and(|v| v == "1"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    // The API's own decoding; a query it cannot decode is a 400 before any spec.
    let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(query) else {
        return;
    };
    let spec = match ServiceSpec::from_query(&pairs) {
        Ok(spec) => spec,
        Err(error) => {
            let text = error.to_string();
            assert!(
                !text
                    .chars()
                    .any(|c| c.is_control() || (c.is_whitespace() && c != ' ')),
                "a refusal carries a line break or control character: {text:?}"
            );
            return;
        }
    };
    let harness = harness();
    let json = serde_json::to_string(&spec).expect("a spec serializes");
    let back: ServiceSpec = serde_json::from_str(&json).expect("the stored form reads back");
    assert_eq!(back, spec, "the stored form reads back unchanged");
    let route = ServiceRoute {
        spec: &spec,
        instances: &harness.instances,
    };
    let rendered = match harness
        .renderer
        .render_with_maps(&harness.settings, &[route], None)
    {
        Ok(rendered) => rendered,
        Err(RenderError::PortConflict { .. }) => return,
        Err(error) => panic!("{spec:?} does not render: {error}"),
    };
    let config = &rendered.config;
    let actual = skeleton::of_rendered(&rendered).unwrap_or_else(|e| panic!("{e}\n{config}"));
    let expected = harness.baseline.expected(&[(&spec, &harness.instances)]);
    assert_eq!(actual, expected, "skeleton of\n{config}");
    if harness.haproxy {
        let regex = spec.destinations().iter().any(|d| {
            d.effective_path_type(&spec) == PathType::PathReg && !d.service_path().is_empty()
        });
        if let Err(output) = skeleton::haproxy_check_rendered(&harness.dir, "fuzz.cfg", &rendered) {
            assert!(
                regex && output.contains("regex '"),
                "haproxy -c refused an accepted spec {spec:?}:\n{output}\n{config}"
            );
        }
    }
});
