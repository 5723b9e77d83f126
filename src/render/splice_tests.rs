//! Tests of one service's backends rendered alone and put in place (the `splice` module): the
//! text is exactly what a complete render of the new state writes, for every kind of service.

use super::cache_tests::rich_services;
use super::tests::{golden_settings, inst, spec};
use super::*;
use crate::spec::{Instance, ServiceSpec};

/// Renders `services` completely, each with the slots `slots` gives it.
fn complete(
    renderer: &Renderer,
    services: &[(ServiceSpec, Vec<Instance>)],
    slots: &[ServerSlots],
    pool: &BackendPool,
) -> Rendered {
    let routes: Vec<ServiceRoute<'_>> = services
        .iter()
        .map(|(spec, instances)| ServiceRoute { spec, instances })
        .collect();
    let assigned: SlotsByService<'_> = services
        .iter()
        .zip(slots)
        .map(|((spec, _), slots)| (spec.service_name(), slots))
        .collect();
    renderer
        .render_slotted(&golden_settings(), &routes, None, &assigned, pool)
        .expect("renders")
}

fn backends(
    renderer: &Renderer,
    service: &(ServiceSpec, Vec<Instance>),
    slots: &ServerSlots,
    pool: &BackendPool,
) -> ServiceBackends {
    let route = ServiceRoute {
        spec: &service.0,
        instances: &service.1,
    };
    renderer
        .service_backends(&golden_settings(), route, slots, pool)
        .expect("renders")
        .expect("the shipped main template")
}

#[test]
fn a_service_whose_slots_change_is_spliced_exactly_as_a_complete_render_writes_it() {
    let renderer = Renderer::new(None).expect("templates");
    let mut services = rich_services();
    services.push((
        spec(&[("serviceName", "plain"), ("servicePath", "/plain")]),
        vec![inst("10.0.5.1", 80)],
    ));
    let pool = BackendPool::with_size(2);
    let mut slots: Vec<ServerSlots> = services
        .iter()
        .map(|(_, instances)| ServerSlots::packed(instances))
        .collect();
    let mut applied = complete(&renderer, &services, &slots, &pool);
    for index in 0..services.len() {
        // A spare slot filled, then the first instance's slot emptied.
        let mut changed = slots[index].slots().to_vec();
        let spare = changed
            .iter()
            .position(Option::is_none)
            .expect("a spare slot");
        changed[spare] = Some(inst("10.9.9.9", 9000 + index as u16));
        changed[0] = None;
        let changed = ServerSlots::from_slots(changed);
        let before = backends(&renderer, &services[index], &slots[index], &pool);
        let after = backends(&renderer, &services[index], &changed, &pool);
        let spliced = after
            .replace_in(&applied.config, &before)
            .expect("the service's backends are in the file once");
        slots[index] = changed;
        let expected = complete(&renderer, &services, &slots, &pool);
        let name = services[index].0.service_name();
        assert_eq!(spliced, expected.config, "{name}");
        assert_eq!(
            applied.checked.replaced(before.checked, after.checked),
            expected.checked,
            "{name}"
        );
        applied = expected;
    }
}

#[test]
fn a_service_in_a_pool_backend_is_spliced_under_the_pool_backend() {
    let renderer = Renderer::new(None).expect("templates");
    let services = vec![(
        spec(&[("serviceName", "fresh"), ("servicePath", "/fresh")]),
        vec![inst("10.0.6.1", 80)],
    )];
    let mut pool = BackendPool::with_size(2);
    assert!(pool.assign(&services[0].0));
    let slots = vec![ServerSlots::from_slots(vec![
        Some(inst("10.0.6.1", 80)),
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    ])];
    let applied = complete(&renderer, &services, &slots, &pool);
    let before = backends(&renderer, &services[0], &slots[0], &pool);
    assert!(before
        .pieces()
        .all(|piece| piece.starts_with("backend pool-")));
    let mut moved = slots[0].slots().to_vec();
    moved[1] = Some(inst("10.0.6.2", 80));
    let moved = vec![ServerSlots::from_slots(moved)];
    let after = backends(&renderer, &services[0], &moved[0], &pool);
    assert_eq!(
        after.replace_in(&applied.config, &before),
        Some(complete(&renderer, &services, &moved, &pool).config)
    );
}

#[test]
fn a_backend_not_in_the_file_exactly_once_is_not_spliced() {
    let renderer = Renderer::new(None).expect("templates");
    let service = (
        spec(&[("serviceName", "web"), ("servicePath", "/web")]),
        vec![inst("10.0.0.1", 80)],
    );
    let pool = BackendPool::none();
    let slots = ServerSlots::packed(&service.1);
    let before = backends(&renderer, &service, &slots, &pool);
    let after = backends(&renderer, &service, &ServerSlots::packed(&[]), &pool);
    let section = before.pieces().next().expect("one backend").to_string();
    assert_eq!(after.replace_in("global\n", &before), None);
    let twice = format!("{section}\n\n{section}\n");
    assert_eq!(after.replace_in(&twice, &before), None);
    // A section that only starts like it (a longer backend) is not it.
    let longer = format!("{section}\n    server s9 10.0.0.9:80\n");
    assert_eq!(after.replace_in(&longer, &before), None);
    let once = format!("global\n\n{section}\n\nbackend other-be0\n");
    let replaced = after.replace_in(&once, &before).expect("found once");
    assert!(
        replaced.starts_with("global\n\nbackend web-be0\n"),
        "{replaced}"
    );
    assert!(!replaced.contains("10.0.0.1:80"), "{replaced}");
}
