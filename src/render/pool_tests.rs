//! Tests of the pool backends: where the render writes them, and that a default plain service in
//! one differs from the free pool backend in its server slots only (what the proxy core applies
//! at runtime), while a service with settings of its own does not.

use super::tests::golden_settings;
use super::*;
use crate::haproxy::slot_changes;
use crate::spec::{Instance, ServiceSpec};

fn spec(query: &str) -> ServiceSpec {
    let pairs: Vec<(String, String)> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ServiceSpec::from_query(&pairs).expect("test spec")
}

/// Renders `specs` (each with one instance) with `pool`, each service's slots being the free
/// pool backend's spare ones when it sits in one.
fn render(specs: &[&ServiceSpec], pool: &BackendPool) -> Rendered {
    let instances = [Instance::new("10.0.0.1", 8080).expect("instance")];
    let routes: Vec<ServiceRoute<'_>> = specs
        .iter()
        .map(|spec| ServiceRoute {
            spec,
            instances: &instances,
        })
        .collect();
    let pooled = ServerSlots::from_slots(
        std::iter::once(Some(instances[0].clone()))
            .chain(std::iter::repeat_n(None, POOL_SLOTS - 1))
            .collect(),
    );
    let slots: SlotsByService<'_> = specs
        .iter()
        .filter(|spec| !pool.backends_of(spec.service_name()).is_empty())
        .map(|spec| (spec.service_name(), &pooled))
        .collect();
    Renderer::new(None)
        .expect("built-in templates")
        .render_slotted(&golden_settings(), &routes, None, &slots, pool)
        .expect("renders")
}

#[test]
fn free_pool_backends_come_after_the_services_with_spare_slots_and_no_rule() {
    let seed = spec("serviceName=seed&servicePath=/seed");
    let config = render(&[&seed], &BackendPool::with_size(2)).config;
    let seed_at = config
        .find("backend seed-be0")
        .expect("the service's backend");
    let pool_1 = config.find("backend pool-1\n").expect("pool-1");
    let pool_2 = config.find("backend pool-2\n").expect("pool-2");
    assert!(seed_at < pool_1 && pool_1 < pool_2, "{config}");
    assert!(!config.contains("backend pool-3"), "{config}");
    let spare = "server s8 127.0.0.1:1 check disabled";
    assert_eq!(config.matches(spare).count(), 2, "{config}");
    assert!(!config.contains("use_backend pool-"), "no rule: {config}");
    assert!(!render(&[&seed], &BackendPool::none())
        .config
        .contains("pool-"));
}

#[test]
fn a_default_plain_service_in_a_pool_backend_differs_in_server_slots_only() {
    let seed = spec("serviceName=seed&servicePath=/seed");
    let fresh = spec("serviceName=fresh&servicePath=/fresh");
    let before = render(&[&seed], &BackendPool::with_size(2));
    let mut pool = BackendPool::with_size(2);
    assert!(pool.assign(&fresh));
    assert_eq!(pool.free(), 1);
    let after = render(&[&seed, &fresh], &pool);
    let changes = slot_changes(&before.config, &after.config).expect("slot changes only");
    assert_eq!(changes.len(), 1, "one slot filled: {changes:?}");
    assert!(!after.config.contains("fresh-be0"), "{}", after.config);
    let entry = ("/fresh".to_string(), "pool-1".to_string());
    assert!(
        after.maps.iter().any(|map| map.entries.contains(&entry)),
        "{:?}",
        after.maps
    );
}

#[test]
fn a_service_with_backend_settings_of_its_own_differs_in_more_than_slots() {
    let seed = spec("serviceName=seed&servicePath=/seed");
    let before = render(&[&seed], &BackendPool::with_size(2));
    for query in [
        "serviceName=tuned&servicePath=/tuned&timeoutServer=45",
        "serviceName=methods&servicePath=/methods&allowedMethods=GET",
    ] {
        let tuned = spec(query);
        let mut pool = BackendPool::with_size(2);
        assert!(pool.assign(&tuned));
        let after = render(&[&seed, &tuned], &pool);
        assert_eq!(
            slot_changes(&before.config, &after.config),
            None,
            "{query}: new config text"
        );
    }
}

#[test]
fn the_pool_assigns_free_backends_and_gives_them_back() {
    let two = spec("serviceName=two&servicePath=/a&servicePath.1=/b");
    let one = spec("serviceName=one&servicePath=/one");
    let mut pool = BackendPool::with_size(2);
    assert!(pool.assign(&two));
    assert_eq!(pool.free(), 0);
    assert!(!pool.assign(&one), "no free backend left");
    assert_eq!(pool.backends_of(one.service_name()).len(), 0);
    pool.release(two.service_name());
    assert_eq!(pool.free(), 2);
    assert!(pool.assign(&one));
    assert_eq!(
        pool.backends_of(one.service_name())
            .values()
            .collect::<Vec<_>>(),
        ["pool-1"]
    );
}

#[test]
fn the_pool_a_quiet_refill_makes_grows_with_thousands_of_services_up_to_the_cap() {
    use super::pool::{pool_ceiling, pool_floor, MAX_POOL_FLOOR, MAX_POOL_SIZE};
    assert_eq!(pool_floor(0), POOL_SIZE);
    assert_eq!(
        pool_floor(511),
        POOL_SIZE,
        "a few hundred services keep the pool of 8"
    );
    assert_eq!(pool_floor(1_000), 15);
    assert_eq!(pool_floor(10_000), 156);
    assert_eq!(pool_floor(1_000_000), MAX_POOL_FLOOR);
    // A wave grows the pool to 32 with few services routed, and to the quiet pool beyond that:
    // the ceiling is never below the floor.
    assert_eq!(pool_ceiling(1), MAX_POOL_SIZE);
    assert_eq!(pool_ceiling(1_000), MAX_POOL_SIZE);
    assert_eq!(pool_ceiling(10_000), 156);
    for routed in [0, 1, 100, 2_047, 2_048, 2_049, 10_000, 16_384, 1_000_000] {
        assert!(pool_floor(routed) <= pool_ceiling(routed), "{routed}");
    }
}
