//! Tests of placing a new plain service without rendering (the `placement` module): whenever
//! [`RoutingIndex::place`] answers, its map files and index, and the configuration with the pool
//! backend's text swapped, are exactly what a complete render of the new state writes.

use proptest::prelude::*;

use super::tests::{golden_settings, inst, spec};
use super::*;
use crate::spec::{Instance, ServiceSpec};

/// Paths that are prefixes of one another in many ways.
const PATHS: &[&str] = &[
    "/a", "/a/b", "/a/b/c", "/ab", "/b", "/b/a", "/c", "/a/c", "/abc", "/bc", "/d/e", "/d",
];

/// A service `s<n>` routing `path`, plain or not, with one instance.
fn service(number: usize, path: &str, flavour: u8) -> (ServiceSpec, Vec<Instance>) {
    let name = format!("s{number}");
    let mut pairs = vec![("serviceName", name.as_str()), ("servicePath", path)];
    match flavour {
        // A rule that keeps its acls: a header condition.
        1 => pairs.push(("serviceHeader", "X-Version:2")),
        // A domain rule (sorts before every path-only rule).
        2 => pairs.push(("serviceDomain", "shop.example.com")),
        // `pathType=path`: not a `path_beg` rule.
        3 => pairs.push(("pathType", "path")),
        _ => {}
    }
    (spec(&pairs), vec![inst("10.0.0.1", 8000 + number as u16)])
}

fn complete(
    renderer: &Renderer,
    services: &[(ServiceSpec, Vec<Instance>)],
    pool: &BackendPool,
    slots: &SlotsByService<'_>,
) -> Rendered {
    let routes: Vec<ServiceRoute<'_>> = services
        .iter()
        .map(|(spec, instances)| ServiceRoute { spec, instances })
        .collect();
    renderer
        .render_slotted(&golden_settings(), &routes, None, slots, pool)
        .expect("renders")
}

/// Places `new` into the render of `services`; compares with the complete render when placed.
/// Whether it was placed.
fn placed_as_complete_render(
    services: &[(ServiceSpec, Vec<Instance>)],
    new: (ServiceSpec, Vec<Instance>),
) -> bool {
    let renderer = Renderer::new(None).expect("templates");
    let pool = BackendPool::with_size(2);
    let applied = complete(&renderer, services, &pool, &SlotsByService::new());
    let mut taken = pool.clone();
    assert!(taken.assign(&new.0));
    let Some((routing, maps)) = applied.routing.place(&new.0, &taken, &applied.maps) else {
        return false;
    };
    let slots = ServerSlots::from_slots(
        new.1
            .iter()
            .cloned()
            .map(Some)
            .chain(std::iter::repeat(None))
            .take(POOL_SLOTS)
            .collect(),
    );
    let mut all = services.to_vec();
    all.push(new.clone());
    let mut assigned = SlotsByService::new();
    assigned.insert(new.0.service_name(), &slots);
    let expected = complete(&renderer, &all, &taken, &assigned);
    assert_eq!(maps, expected.maps);
    assert_eq!(routing, *expected.routing);
    let route = ServiceRoute {
        spec: &new.0,
        instances: &new.1,
    };
    let (free, own) = renderer
        .pool_backends_taken(&golden_settings(), route, &slots, &taken)
        .expect("renders")
        .expect("in the pool");
    assert_eq!(
        own.replace_in(&applied.config, &free),
        Some(expected.config)
    );
    true
}

#[test]
fn a_new_plain_path_joining_a_map_is_placed_as_a_complete_render_writes_it() {
    let services: Vec<_> = [(0, "/a/b", 0), (1, "/b", 0), (2, "/d/e", 0)]
        .iter()
        .map(|(n, path, flavour)| service(*n, path, *flavour))
        .collect();
    assert!(placed_as_complete_render(&services, service(9, "/c", 0)));
    // Shorter paths sort later: `/a` after `/a/b` still joins (no earlier key is a prefix of it).
    assert!(placed_as_complete_render(&services, service(9, "/a", 0)));
    // First of the path rules: it leads the segment the first one led.
    assert!(placed_as_complete_render(
        &services,
        service(9, "/a/b/c/d", 0)
    ));
    // Not plain: keeps its acls.
    assert!(!placed_as_complete_render(&services, service(9, "/c", 1)));
    // Right after a rule that keeps its acls: a new map would start.
    let after_acls = vec![service(0, "/a/b", 0), service(1, "/e", 1)];
    assert!(!placed_as_complete_render(&after_acls, service(9, "/c", 0)));
    // Before a rule that keeps its acls, with no map after it.
    let before_acls = vec![service(0, "/a/b", 1)];
    assert!(!placed_as_complete_render(
        &before_acls,
        service(9, "/c/d/e", 0)
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn whenever_a_new_service_is_placed_it_is_what_a_complete_render_writes(
        existing in proptest::collection::vec((0..PATHS.len(), 0u8..4), 1..8),
        new_path in 0..PATHS.len(),
    ) {
        let services: Vec<_> = existing
            .iter()
            .enumerate()
            .filter(|(_, (path, _))| *path != new_path)
            .map(|(n, (path, flavour))| service(n, PATHS[*path], *flavour))
            .collect();
        prop_assume!(!services.is_empty());
        let mut seen = std::collections::BTreeSet::new();
        let services: Vec<_> = services
            .into_iter()
            .filter(|(spec, _)| seen.insert(spec.destinations()[0].service_path()[0].as_str().to_string()))
            .collect();
        placed_as_complete_render(&services, service(99, PATHS[new_path], 0));
    }
}
