//! The registry: flow-proxy's Consul client (healthy instances, the checks and catalog change
//! detectors, KV, blocking queries), the rules its watch loops follow, and the embedded
//! Consul-compatible server used when no Consul address is given.

mod client;
pub mod embedded;
pub mod watch;

pub use client::{
    Blocking, ConsulClient, HealthCheck, Indexed, InstanceQuery, KvEntry, ListedKvEntry,
    NodeInstance, RegistryError, IDLE_CONNECTIONS_PER_ADDRESS,
};
