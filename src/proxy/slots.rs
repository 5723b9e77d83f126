//! The server slots of each routed service: which instance sits in which `server s<n>` line of
//! the service's backends (see `render::ServerSlots`).
//!
//! An instance keeps its slot while it lives; a new one takes a spare slot (one that was empty
//! before this change) before a slot emptied by this very change, so an instance that leaves and
//! one that arrives in the same change (a blue-green switch) never share a server. When the
//! instances no longer fit, the backend grows to [`capacity_for`] their number (at least twice
//! as many slots), keeping every slot where it was: the file then has new lines and the change
//! reloads once; the changes after it fit again. Slots never shrink while flow-proxy runs.
//!
//! Every other difference between two configurations is left to the render: the core applies a
//! change at runtime only when the rendered files differ in slot contents alone
//! (`haproxy::slot_changes`).

use std::collections::BTreeSet;

use crate::render::{capacity_for, ServerSlots};
use crate::spec::Instance;

/// The slots for `instances` (in any order, duplicates dropped), keeping each instance of
/// `previous` that is still there in its slot. Without `previous` the instances are packed in
/// sorted order.
pub(super) fn reassign(previous: Option<&ServerSlots>, instances: &[Instance]) -> ServerSlots {
    let Some(previous) = previous else {
        return ServerSlots::packed(instances);
    };
    let wanted: BTreeSet<&Instance> = instances.iter().collect();
    let mut slots: Vec<Option<Instance>> = Vec::with_capacity(previous.capacity());
    let mut spare = Vec::new();
    let mut emptied = Vec::new();
    for (position, slot) in previous.slots().iter().enumerate() {
        match slot {
            Some(instance) if wanted.contains(instance) => slots.push(Some(instance.clone())),
            Some(_) => {
                emptied.push(position);
                slots.push(None);
            }
            None => {
                spare.push(position);
                slots.push(None);
            }
        }
    }
    let placed: BTreeSet<&Instance> = previous.instances().collect();
    let arriving: Vec<&Instance> = wanted
        .iter()
        .copied()
        .filter(|instance| !placed.contains(instance))
        .collect();
    let needed = slots.iter().flatten().count() + arriving.len();
    if needed > slots.len() {
        slots.resize(capacity_for(needed).max(slots.len()), None);
    }
    let mut free = spare
        .into_iter()
        .chain(previous.capacity()..slots.len())
        .chain(emptied);
    for instance in arriving {
        if let Some(position) = free.next() {
            slots[position] = Some(instance.clone());
        }
    }
    ServerSlots::from_slots(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(port: u16) -> Instance {
        Instance::new("10.0.0.1", port).expect("valid instance")
    }

    fn slots(list: &[Option<u16>]) -> ServerSlots {
        ServerSlots::from_slots(list.iter().map(|port| port.map(instance)).collect())
    }

    #[test]
    fn without_previous_slots_the_instances_are_packed() {
        assert_eq!(
            reassign(None, &[instance(2), instance(1)]),
            slots(&[Some(1), Some(2), None, None])
        );
    }

    #[test]
    fn an_instance_keeps_its_slot_and_a_new_one_takes_a_spare_slot() {
        let before = slots(&[Some(1), Some(2), None, None]);
        // 1 leaves, 3 arrives: 2 stays in s2, 3 takes s3 (spare), not s1 (just emptied).
        assert_eq!(
            reassign(Some(&before), &[instance(2), instance(3)]),
            slots(&[None, Some(2), Some(3), None])
        );
    }

    #[test]
    fn a_switch_of_every_instance_uses_spare_slots_only() {
        let before = slots(&[Some(1), Some(2), None, None]);
        assert_eq!(
            reassign(Some(&before), &[instance(3), instance(4)]),
            slots(&[None, None, Some(3), Some(4)])
        );
    }

    #[test]
    fn an_emptied_slot_is_reused_only_when_no_spare_one_is_left() {
        let before = slots(&[Some(1), Some(2)]);
        assert_eq!(
            reassign(Some(&before), &[instance(2), instance(3)]),
            slots(&[Some(3), Some(2)])
        );
    }

    #[test]
    fn instances_that_no_longer_fit_grow_the_slots_keeping_each_in_place() {
        let before = slots(&[Some(1), Some(2)]);
        let after = reassign(Some(&before), &[instance(1), instance(2), instance(3)]);
        assert_eq!(after.capacity(), capacity_for(3));
        assert_eq!(
            &after.slots()[..3],
            &[Some(instance(1)), Some(instance(2)), Some(instance(3))]
        );
        assert!(after.slots()[3..].iter().all(Option::is_none));
    }

    #[test]
    fn slots_never_shrink_and_the_same_instances_change_nothing() {
        let before = slots(&[Some(1), None, Some(3), None]);
        assert_eq!(reassign(Some(&before), &[instance(3), instance(1)]), before);
        assert_eq!(
            reassign(Some(&before), &[]),
            slots(&[None, None, None, None])
        );
    }
}
