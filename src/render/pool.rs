//! The pool of pre-provisioned backends: empty backends `pool-1` … `pool-<size>` that a new
//! plain service can take without new configuration text, so it goes live without a reload.
//!
//! Each free pool backend is exactly the backend a default plain service would get (rendered
//! from the spec of `serviceName=pool-<n>&servicePath=/`, with [`POOL_SLOTS`] spare server
//! slots), and no rule points at it. The caller (the proxy core) may assign a destination of a
//! service to a pool backend ([`BackendPool::assign`]): the render then writes that destination's
//! backend under the pool backend's name, at the pool backend's place (after every service's
//! backend, by pool number), and its rules (map entries) name it. When the service's backend is
//! the default one, the file differs from the one with the free pool backend in its server
//! lines only, which HAProxy changes at runtime. Whether it is, the caller decides by comparing
//! the two renders, never from a list of parameters.
//!
//! Pool backend names end in a digit run after `pool-`, never in `-be<index>`, so they clash
//! with no service's backend.

use std::collections::BTreeMap;

use crate::spec::{Destination, ServiceName, ServiceSpec};

/// How many pool backends the proxy core keeps in the file at first, and after a quiet spell
/// (more with thousands of services routed: [`pool_floor`]).
pub const POOL_SIZE: usize = 8;

/// The most pool backends the core grows the pool to while new services keep coming, with up to
/// a few thousand services routed ([`pool_ceiling`]). Each costs every reload a little (its 8
/// spare servers are parsed and set up): at 1 service, a reload with 64 of them took 26 ms
/// instead of 18.5.
pub const MAX_POOL_SIZE: usize = 32;

/// The most pool backends a quiet refill makes, however many services are routed.
pub const MAX_POOL_FLOOR: usize = 256;

/// Routed services per pool backend the pool keeps at least (see [`pool_floor`]).
const SERVICES_PER_POOL_BACKEND: usize = 64;

/// The pool a refill after a quiet spell makes with `routed` services: [`POOL_SIZE`], and one per
/// 64 routed services from 512 on, up to [`MAX_POOL_FLOOR`]. A refill is a reload, whose cost
/// grows with the services (about 0.55 s of HAProxy's parse at 10,000, and about as much CPU again
/// while the replaced process exits), while a pool backend costs a reload about 0.13 ms at 1
/// service and about 0.4 ms at 10,000. With the pool growing with the services, a refill comes
/// every `routed / 128` new services (from 512 on), so the reload time a new service costs on
/// average stays about the same (about 7 ms of HAProxy's parse) at any size.
pub fn pool_floor(routed: usize) -> usize {
    (routed / SERVICES_PER_POOL_BACKEND).clamp(POOL_SIZE, MAX_POOL_FLOOR)
}

/// The most pool backends a refill in a wave of new services makes with `routed` services:
/// [`MAX_POOL_SIZE`], or the quiet pool ([`pool_floor`]) when that is larger.
pub fn pool_ceiling(routed: usize) -> usize {
    pool_floor(routed).max(MAX_POOL_SIZE)
}

/// How many server slots a free pool backend has: a new service with up to this many instances
/// fits without new server lines.
pub const POOL_SLOTS: usize = 8;

/// The name of pool backend `number` (1-based): `pool-<number>`.
pub fn pool_backend_name(number: usize) -> String {
    format!("pool-{number}")
}

/// The pool backends a render writes and which service destinations sit in them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendPool {
    size: usize,
    /// Pool number (1-based) of each assigned destination, by service and destination index.
    assigned: BTreeMap<(ServiceName, u16), usize>,
}

impl BackendPool {
    /// No pool backend at all (what `flow-proxy render` and the plain render calls write).
    pub fn none() -> BackendPool {
        BackendPool::default()
    }

    /// `size` pool backends, all free.
    pub fn with_size(size: usize) -> BackendPool {
        BackendPool {
            size,
            assigned: BTreeMap::new(),
        }
    }

    /// How many pool backends the file has.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Makes the file carry `size` pool backends from the next render on (the core does so only
    /// with a reload that gives every service its own backend back).
    pub fn resize(&mut self, size: usize) {
        self.size = size;
    }

    /// How many pool backends no destination sits in.
    pub fn free(&self) -> usize {
        self.size.saturating_sub(self.assigned.len())
    }

    /// Whether any destination sits in a pool backend.
    pub fn is_empty(&self) -> bool {
        self.assigned.is_empty()
    }

    /// Gives every destination of `spec` a free pool backend; `false` (nothing assigned) when
    /// there are not enough free ones.
    pub fn assign(&mut self, spec: &ServiceSpec) -> bool {
        let destinations = spec.destinations();
        if destinations.len() > self.free() {
            return false;
        }
        let mut numbers =
            (1..=self.size).filter(|number| !self.assigned.values().any(|n| n == number));
        let mut taken = Vec::with_capacity(destinations.len());
        for destination in destinations {
            match numbers.next() {
                Some(number) => taken.push((destination.index(), number)),
                None => return false,
            }
        }
        for (index, number) in taken {
            self.assigned
                .insert((spec.service_name().clone(), index), number);
        }
        true
    }

    /// Frees the pool backends of `service`'s destinations.
    pub fn release(&mut self, service: &ServiceName) {
        self.assigned.retain(|(name, _), _| name != service);
    }

    /// Keeps only the assignments of the services `keep` says are still routed.
    pub fn retain_services(&mut self, mut keep: impl FnMut(&ServiceName) -> bool) {
        self.assigned.retain(|(name, _), _| keep(name));
    }

    /// Every assignment: (service, destination index) and its pool number.
    pub fn assignments(&self) -> impl Iterator<Item = (&(ServiceName, u16), &usize)> {
        self.assigned.iter()
    }

    /// Frees every pool backend (after a reload, every service has its own backend back).
    pub fn clear(&mut self) {
        self.assigned.clear();
    }

    /// The pool number of a destination of `service`, when it sits in one.
    pub fn number_of(&self, service: &ServiceName, destination: &Destination) -> Option<usize> {
        self.assigned
            .get(&(service.clone(), destination.index()))
            .copied()
    }

    /// The pool backend name of each assigned destination of `service`, by destination index.
    pub fn backends_of(&self, service: &ServiceName) -> BTreeMap<u16, String> {
        self.assigned
            .iter()
            .filter(|((name, _), _)| name == service)
            .map(|((_, index), number)| (*index, pool_backend_name(*number)))
            .collect()
    }

    /// The name the backend of `destination` of `spec` has in the file: its pool backend's, or
    /// `<serviceName>-be<index>`.
    pub(super) fn backend_name(&self, spec: &ServiceSpec, destination: &Destination) -> String {
        match self.number_of(spec.service_name(), destination) {
            Some(number) => pool_backend_name(number),
            None => super::view::backend_name(spec, destination),
        }
    }
}

/// The spec a free pool backend `number` is rendered from: a default plain service.
pub(super) fn free_pool_spec(number: usize) -> Result<ServiceSpec, super::RenderError> {
    let pairs = [
        ("serviceName".to_string(), pool_backend_name(number)),
        ("servicePath".to_string(), "/".to_string()),
    ];
    ServiceSpec::from_query(&pairs).map_err(|error| {
        super::RenderError::Render(format!("the spec of pool backend {number}: {error}"))
    })
}
